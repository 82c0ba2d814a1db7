"""``cpcluster convert flax-ncsnpp`` on a checkpoint jcm itself wrote, against jcm's own outputs.

tests/data/flax_ncsnpp (scripts/dev/make_flax_ncsnpp_reference.py): jcm's NCSN++ with the released CD config at
nf 8 and two resolutions, random weights, saved by ``jcm.checkpoints.save_checkpoint`` (a full ``State``: params,
params_ema, RAdam moments, rng), and the outputs of jcm's ``get_distiller_fn`` and of the raw Flax network.
Tolerance: 1e-5 absolute on outputs of size ~1 (float32; the port agrees to ~1e-6).
"""
from __future__ import annotations

import json
import os
import sys

import msgpack
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.convert import run_conversion
from cpcluster.models.consistency import ConsistencyFunction, karras_grid, time_for_sigma
from cpcluster.models.specs import load_denoiser
from cpcluster.util.errors import InputError

torch.set_num_threads(1)
DATA = os.path.join(os.path.dirname(__file__), "data", "flax_ncsnpp")
CHECKPOINT = os.path.join(DATA, "checkpoint_80")
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(DATA, "reference.npz")))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("net") / "cd")
    report = run_conversion("flax-ncsnpp", CHECKPOINT, out)
    return out, report


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def flax_bytes(tree: dict) -> bytes:
    """msgpack as flax.serialization.to_bytes writes it: arrays as extension type 1 [shape, dtype, bytes]."""
    def pack(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((list(x.shape), x.dtype.name, x.tobytes()), use_bin_type=True))
        raise TypeError(type(x))
    return msgpack.packb(tree, default=pack, use_bin_type=True)


def load_tree(key: str) -> dict:
    from cpcluster.convert.flax_msgpack import read_flax_entries
    return read_flax_entries(CHECKPOINT, {key}, "test")[0][key]


def test_consistency_function_matches_jcm_distiller(converted, reference):
    out, report = converted
    den = load_denoiser(f"net:{out}")
    assert den.kind == "consistency" and den.meta["c_noise"] == "jax" and den.meta["grid_steps"] == 18
    assert report["architecture"] == "ncsnpp" and report["meta"]["c_noise"] == "jax"
    assert any("nf=8, ch_mult=[1, 2], num_res_blocks=1" in n for n in report["notes"])  # read off the shapes
    cf = ConsistencyFunction(den.module, c_noise="jax")
    with torch.no_grad():
        for x_t, t, expected in zip(reference["x_t"], reference["times"], reference["distiller"]):
            got = cf(nchw(x_t), float(t))
            assert torch.allclose(got, nchw(expected), atol=ATOL, rtol=0), (t, (got - nchw(expected)).abs().max())
    # D(x, eps) = x: the first reference time is jcm's t_min, where the boundary condition holds
    assert reference["times"][0] == np.float32(0.002)


def test_raw_network_and_the_choice_of_weights(converted, reference, tmp_path):
    ema = load_denoiser(f"net:{converted[0]}").module
    run_conversion("flax-ncsnpp", CHECKPOINT, str(tmp_path / "raw"), ["params=params"])
    raw = load_denoiser(f"net:{tmp_path / 'raw'}").module
    x, time_input = nchw(reference["raw_input"]), torch.from_numpy(reference["raw_time_input"])
    with torch.no_grad():
        assert torch.allclose(ema(x, time_input), nchw(reference["raw_ema"]), atol=ATOL, rtol=0)
        assert torch.allclose(raw(x, time_input), nchw(reference["raw_params"]), atol=ATOL, rtol=0)
    assert np.abs(reference["raw_ema"] - reference["raw_params"]).max() > 0.1  # the choice matters


def test_no_nan_on_the_training_grid_and_grid_times_are_jcms(converted, reference):
    den = load_denoiser(f"net:{converted[0]}")
    cf = ConsistencyFunction(den.module, c_noise="jax")
    x = nchw(reference["x_t"][1])
    with torch.no_grad():
        for t in karras_grid(18):
            assert torch.isfinite(cf(x + float(t) * torch.randn_like(x), float(t))).all(), t
    picked = [time_for_sigma(s, den.meta["grid_steps"]) for s in (0.25, 0.5, 1.0)]
    np.testing.assert_allclose(picked, reference["times"][1:4], rtol=1e-6)


def test_flax_paths_and_layouts(converted):
    """Keys are the Flax paths; HWIO -> OIHW, (in, out) -> (out, in), the rest unchanged."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(converted[0], "model.safetensors"))
    tree = load_tree("params_ema")
    kernel = tree["ResnetBlockBigGANpp_2"]["Conv_0"]["kernel"]  # (3, 3, 8, 16) HWIO
    assert torch.equal(state["ResnetBlockBigGANpp_2.Conv_0.kernel"], torch.tensor(kernel.transpose(3, 2, 0, 1)))
    assert torch.equal(state["AttnBlockpp_0.NIN_1.W"], torch.tensor(tree["AttnBlockpp_0"]["NIN_1"]["W"].T))
    assert torch.equal(state["Dense_0.kernel"], torch.tensor(tree["Dense_0"]["kernel"].T))
    assert torch.equal(state["Downsample_0.Conv2d_0.weight"],
                       torch.tensor(tree["Downsample_0"]["Conv2d_0"]["weight"].transpose(3, 2, 0, 1)))
    assert torch.equal(state["GaussianFourierProjection_0.W"], torch.tensor(tree["GaussianFourierProjection_0"]["W"]))
    assert len(state) == 157


def test_missing_msgpack_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "msgpack", None)  # import msgpack -> ImportError
    with pytest.raises(InputError, match=r"pip install 'cpcluster\[convert\]'"):
        run_conversion("flax-ncsnpp", CHECKPOINT, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _state(params_ema: dict, **extra) -> dict:
    return {"step": 0, "params": params_ema, "params_ema": params_ema, "model_state": {}, **extra}


def bad_sources():
    raw = open(CHECKPOINT, "rb").read()
    tree = load_tree("params_ema")
    cnn = {"Conv_0": {"kernel": np.zeros((3, 3, 3, 8), np.float32), "bias": np.zeros(8, np.float32)},
           "Dense_0": {"kernel": np.zeros((8, 10), np.float32), "bias": np.zeros(10, np.float32)}}
    bomb = msgpack.ExtType(1, msgpack.packb(([10**6, 10**6], "float32", b"\0" * 16), use_bin_type=True))
    deep: dict = {}
    for _ in range(200):
        deep = {"a": deep}
    return {
        "truncated": (raw[: len(raw) // 3], [], "ends early"),
        "empty file": (b"", [], "ends early"),
        "trailing bytes": (raw + b"\xc0", [], "bytes follow"),
        "not msgpack": (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, [], "a top-level key is not a name"),
        "declared huge array": (flax_bytes(_state({"Conv_0": {"kernel": bomb}})), [], "declares shape"),
        "declared huge map": (b"\x81\xaaparams_ema\xdf\x7f\xff\xff\xff", [], "exceeds max_map_len"),
        "nested bomb": (flax_bytes(_state(deep)), [], "nested"),
        "another architecture": (flax_bytes(_state(cnn)), [], "tensor 'GaussianFourierProjection_0.W'"),
        "wrong width override": (raw, ["nf=16"], "tensor 'GaussianFourierProjection_0.W' has shape (8,)"),
        "missing block": (raw, ["num_res_blocks=2"], "tensor 'ResnetBlockBigGANpp_"),
        "joint_ncsnpp": (flax_bytes(_state({"NCSNpp_0": tree, "NCSNpp_1": tree})), [], "joint_ncsnpp"),
        "integer parameter": (flax_bytes(_state({"Conv_0": {"kernel": np.zeros(3, np.int32)}})), [],
                              "Conv_0.kernel is an array of int32"),
        "no params_ema": (flax_bytes({"step": 0, "params": tree}), [],
                          "no 'params_ema' entry (its entries: step, params)"),
        "unknown preset": (raw, ["preset=imagenet64"], "unknown preset"),
        "bad override": (raw, ["ch_mult=2;2"], "not a list of integers"),
    }


BAD_CASES = ["truncated", "empty file", "trailing bytes", "not msgpack", "declared huge array", "declared huge map",
             "nested bomb", "another architecture", "wrong width override", "missing block", "joint_ncsnpp",
             "integer parameter", "no params_ema", "unknown preset", "bad override"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_checkpoints_are_one_error_line_and_write_nothing(tmp_path, case):
    cases = bad_sources()
    assert sorted(cases) == sorted(BAD_CASES)
    data, sets, message = cases[case]
    source = _write(tmp_path / "checkpoint_80", data)
    out = tmp_path / "out"
    args = ["convert", "flax-ncsnpp", source, str(out)] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert not out.exists()


def test_only_the_chosen_weights_are_decoded(tmp_path):
    """Entries other than params/params_ema (optimizer state, rng) are skipped undecoded, even if foreign."""
    tree = load_tree("params_ema")
    odd = msgpack.ExtType(42, b"not a flax array")
    state = flax_bytes({"opt_state": {"0": 0}, "params_ema": tree, "params": tree})
    odd_state = state.replace(flax_bytes({"0": 0}), msgpack.packb({"0": odd}), 1)
    report = run_conversion("flax-ncsnpp", _write(tmp_path / "ckpt", odd_state), str(tmp_path / "ok"))
    assert report["tensors"] == 157
    with pytest.raises(InputError, match="extension type 42"):
        run_conversion("flax-ncsnpp", _write(tmp_path / "bad", msgpack.packb({"params_ema": {"Conv_0": odd}})),
                       str(tmp_path / "no"))
    assert not (tmp_path / "no").exists()


def test_convert_list_and_cli_report(tmp_path):
    listing = CliRunner().invoke(main, ["convert", "list"])
    assert listing.exit_code == 0 and "flax-ncsnpp:" in listing.output and "--set params=" in listing.output
    res = CliRunner().invoke(main, ["convert", "flax-ncsnpp", CHECKPOINT, str(tmp_path / "net"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    record = json.loads((tmp_path / "net" / "cpcluster.json").read_text())
    assert record["source"]["weights"] == "params_ema" and record["arch_config"]["nf"] == 8
    assert record["weights"]["sha256"] == report["weights_sha256"] and record["meta"]["grid_steps"] == 18
    res = CliRunner().invoke(main, ["convert", "flax-ncsnpp", CHECKPOINT, str(tmp_path / "n40"),
                                    "--set", "grid_steps=40"])
    assert res.exit_code == 0 and load_denoiser(f"net:{tmp_path / 'n40'}").meta["grid_steps"] == 40


def test_edm_preset_is_jcms_edm_denoiser_through_onestep_edm_and_pf_ode(reference, tmp_path):
    """preset=cifar10-edm (the teacher edm_cifar10_ema, the paper's onestep-EDM / PF-ODE EDM network): onestep-edm at
    sigma gives jcm's get_denoiser_fn at t = 2 sigma, c_skip x + c_out F(c_in x, 0.25 ln t) with sigma_data 0.5.

    The reference D is derived from jcm's own distiller output alone: both apply the same network F to the same
    input (c_in x_t, 0.25 ln t) and differ only in the outer scalings, so F = (distiller - c_skip' x) / c_out'.
    """
    from cpcluster.models.purifiers import build_purifier

    run_conversion("flax-ncsnpp", CHECKPOINT, str(tmp_path / "edm"), ["preset=cifar10-edm"])
    den = load_denoiser(f"net:{tmp_path / 'edm'}")
    assert (den.kind, den.meta["c_noise"], den.meta["preconditioned"], den.meta["sigma_data"],
            den.meta["grid_steps"]) == ("edm", "jax", False, 0.5, None)
    sd, eps = 0.5, 0.002
    for x_t, t, distiller in list(zip(reference["x_t"], reference["times"], reference["distiller"]))[1:4]:
        t = float(t)
        f = (distiller - sd**2 / ((t - eps) ** 2 + sd**2) * x_t) / ((t - eps) * sd / np.sqrt(sd**2 + t**2))
        expected = sd**2 / (t**2 + sd**2) * x_t + t * sd / np.sqrt(t**2 + sd**2) * f
        expected = np.clip((expected + 1) / 2, 0, 1).astype(np.float32)
        noisy = nchw((x_t + 1) / 2)  # pixel space: the purifier maps it back to x_t = 2 noisy - 1
        with torch.no_grad():
            one = build_purifier("onestep-edm", den, t / 2, time_rule="exact")(noisy)
            euler = build_purifier("pf-ode", den, t / 2, time_rule="exact", steps=1, solver="euler")(noisy)
        assert torch.allclose(one, nchw(expected), atol=1e-5, rtol=0), (t, (one - nchw(expected)).abs().max())
        assert torch.allclose(euler, one, atol=1e-6, rtol=0)
