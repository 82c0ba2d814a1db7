"""``cpcluster convert edm-pickle``: EDM snapshot pickles (persistence layout, nothing run) -> net:DIR folders."""
from __future__ import annotations

import json
import os
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.models.specs import load_denoiser
from edm_files import CASES, dump_edm_pickle, load_case, marker_source, pickle_structure, snapshot, write_edm_pickle
from test_edm_arch import assert_matches

torch.set_num_threads(1)


def convert(*args):
    result = CliRunner().invoke(main, ["convert", "edm-pickle", *map(str, args)])
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("name", CASES)
def test_converted_network_matches_edm(tmp_path, name):
    marker = tmp_path / "module_src-ran"
    pkl = write_edm_pickle(str(tmp_path / "network.pkl"), name, marker_source(str(marker)))
    result = convert(pkl, tmp_path / "net")
    assert result.exit_code == 0, result.output
    assert "use it as: --denoiser net:" in result.output and "was not run" in result.output
    assert not marker.exists()

    record, state, arrays = load_case(name)
    den = load_denoiser(f"net:{tmp_path / 'net'}")
    assert den.kind == "edm" and den.meta["preconditioned"] is True
    label_dim = record["tree"][0]["init_kwargs"].get("label_dim", 0)
    assert den.meta["num_classes"] == (label_dim or None)
    saved = json.loads((tmp_path / "net" / "cpcluster.json").read_text())
    config = saved["arch_config"]
    assert (config["precond"], config["model_type"]) == (record["precond"], record["tree"][1]["class"])
    inner = record["tree"][1]["init_kwargs"]
    assert {k: config["model_kwargs"][k] for k in inner} == inner  # EDM's recorded arguments, defaults added
    assert sorted(den.module.state_dict()) == sorted(state)  # EDM's key names
    x, sigma = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["sigma"])
    labels = torch.from_numpy(arrays["labels"]) if label_dim else None
    with torch.no_grad():
        assert_matches(den.module(x, sigma, labels).numpy(), arrays["out"])


@pytest.mark.skipif(not os.environ.get("CPCLUSTER_EDM_PICKLES"),
                    reason="development check: set CPCLUSTER_EDM_PICKLES to the --pickles folder of "
                           "scripts/dev/make_edm_reference.py")
@pytest.mark.parametrize("name", CASES)
def test_stand_in_pickles_have_the_layout_of_real_ones(name):
    with open(os.path.join(os.environ["CPCLUSTER_EDM_PICKLES"], f"{name}.pkl"), "rb") as fh:
        real = fh.read()
    assert pickle_structure(dump_edm_pickle(snapshot(name))) == pickle_structure(real)


@pytest.mark.parametrize("protocol", [3, 5])
def test_other_pickle_protocols(tmp_path, protocol):
    """Python 3.7 wrote protocol 3 (sets as builtins.set(list)), Python 3.14 writes 5; both read the same."""
    _, _, arrays = load_case("vp-skip")
    raw = dump_edm_pickle(snapshot("vp-skip"), str(tmp_path / "n.pkl"), protocol)
    assert (b"builtins\nset" in raw) == (protocol == 3)
    assert convert(tmp_path / "n.pkl", tmp_path / "net").exit_code == 0
    den = load_denoiser(f"net:{tmp_path / 'net'}")
    with torch.no_grad():
        assert_matches(den.module(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["sigma"]), None).numpy(),
                       arrays["out"])


def test_which_selects_another_entry(tmp_path):
    data = snapshot("ve-ncsnpp")
    data["net"] = snapshot("adm-cond")["ema"]
    pkl = tmp_path / "snap.pkl"
    dump_edm_pickle(data, str(pkl))
    assert convert(pkl, tmp_path / "net", "--set", "which=net").exit_code == 0
    assert load_denoiser(f"net:{tmp_path / 'net'}").meta["num_classes"] == 10
    result = convert(pkl, tmp_path / "other", "--set", "which=loss_fn")
    assert result.exit_code == 2 and "'loss_fn' is a VELoss" in result.output


class SystemCall:
    """Unpickles as os.system(command) -- what a malicious 'network' pickle would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class OutOfBounds:
    """A tensor view claiming a million elements of a 4-element storage."""

    def __reduce__(self):
        with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what a tensor pickles
            warnings.simplefilter("ignore")
            storage = torch.zeros(4).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (10**6,), (1,), False, OrderedDict())


def _with_bad_parameter(tmp_path, value) -> bytes:
    data = snapshot("ddpmpp-cond")
    data["ema"].model.map_layer0._parameters["weight"] = value
    return dump_edm_pickle(data)


def _bad_pickles(tmp_path):
    good = dump_edm_pickle(snapshot("ddpmpp-cond"))
    marker = tmp_path / "pwned"
    versioned = good.replace(b"\x8c\x07version\x94K\x06", b"\x8c\x07version\x94K\x05", 1)
    assert versioned != good
    return marker, {
        "os.system": (_with_bad_parameter(tmp_path, SystemCall(f"touch {marker}")), "refused global posix.system"),
        "truncated": (good[: len(good) // 2], "not a readable EDM network pickle"),
        "a list": (pickle.dumps([1, 2, 3]), "holds a list, not EDM's snapshot dict"),
        "no ema": (pickle.dumps({"net": 1}), "no 'ema' entry (its keys: net); choose one with --set which=KEY"),
        "not a network": (pickle.dumps({"ema": {"weight": 1}}), "'ema' is a dict, not one of EDM's networks"),
        "out of bounds": (_with_bad_parameter(tmp_path, OutOfBounds()), "lies outside its storage"),
        "version": (versioned, "persistence version 5"),
        "empty": (b"", "not a readable EDM network pickle"),
    }


@pytest.mark.parametrize("case", ["os.system", "truncated", "a list", "no ema", "not a network", "out of bounds",
                                  "version", "empty"])
def test_bad_pickles_are_one_error_and_write_nothing(tmp_path, case):
    marker, cases = _bad_pickles(tmp_path)
    raw, message = cases[case]
    pkl = tmp_path / "bad.pkl"
    pkl.write_bytes(raw)
    result = convert(pkl, tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()
    assert not marker.exists()  # os.system was never called


def test_a_torch_save_archive_is_named(tmp_path):
    torch.save({"net": torch.zeros(2)}, tmp_path / "training-state-000100.pt")
    result = convert(tmp_path / "training-state-000100.pt", tmp_path / "out")
    assert result.exit_code == 2 and "network-snapshot-*.pkl" in result.output


def test_an_existing_folder_needs_overwrite(tmp_path):
    pkl = write_edm_pickle(str(tmp_path / "n.pkl"), "vp-skip")
    assert convert(pkl, tmp_path / "net").exit_code == 0
    result = convert(pkl, tmp_path / "net")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert convert(pkl, tmp_path / "net", "--overwrite").exit_code == 0


def test_arguments_the_network_does_not_record_are_refused(tmp_path):
    data = snapshot("vp-skip")
    data["ema"]._init_kwargs["model_channels"] = 16  # the preconditioner passed 16, the SongUNet says 8
    pkl = tmp_path / "n.pkl"
    dump_edm_pickle(data, str(pkl))
    result = convert(pkl, tmp_path / "out")
    assert result.exit_code == 2 and "VPPrecond was given model_channels=16 but its SongUNet records 8" in \
        result.output
    assert not (tmp_path / "out").exists()
