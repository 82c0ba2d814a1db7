"""Fine-tuning, in one process: config validation, data order, job pickling, checkpoints, export and loading."""
import json
import pickle

import cloudpickle
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcluster.core.config import FinetuneConfig
from cpcluster.jobs import finetune_io
from cpcluster.jobs.finetune import FinetuneJob, preflight
from cpcluster.jobs.training import derive_seed, epoch_order, global_batch
from cpcluster.models.finetuned import export_finetuned
from cpcluster.models.purifiers import build_purifier
from cpcluster.models.specs import load_denoiser
from cpcluster.util.errors import InputError

torch.set_num_threads(1)


def tiny(folder, **kw):
    base = dict(model="demo-random", data="demo:train", eval_data="demo", out=str(folder), steps=4, batch_size=8,
                lr=1e-2, lpips_net="alex", lpips_resize=32, lpips_random_backbone=True, eval_images=16,
                eval_every=0, checkpoint_every=2, log_every=1, ema_decay=0.5)
    return FinetuneConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw, match", [
    ({"sigmas": ()}, "--sigma"), ({"sigmas": (0.5, 0.0)}, "0 is not positive"),
    ({"sigmas": (-0.25,)}, "not positive"), ({"sigmas": (float("nan"),)}, "not positive"),
    ({"batch_size": 10, "ranks_per_node": 4}, "not divisible by the 4 ranks"),
    ({"batch_size": 64, "nodes": 3}, "not divisible by the 3 ranks"),
    ({"loss": "l3"}, "--loss"), ({"ema_decay": 1.0}, "--ema-decay"), ({"lr": 0}, "--lr"), ({"steps": 0}, "--steps"),
    ({"lpips_net": "squeeze"}, "--lpips-net"), ({"out": ""}, "--out"), ({"purifier_label": "true"}, "fixed:K"),
    ({"seed": -1}, "--seed"),
])
def test_config_rejects_bad_values(tmp_path, kw, match):
    with pytest.raises(InputError, match=match):
        tiny(tmp_path, **kw)


def test_config_run_dict_ignores_where_and_how_often(tmp_path):
    a = tiny(tmp_path / "a")
    b = tiny(tmp_path / "b", steps=99, nodes=2, ranks_per_node=4, log_every=7, checkpoint_every=5, classifier="demo")
    assert a.run_dict() == b.run_dict()
    assert a.run_dict() != tiny(tmp_path, lr=1e-3).run_dict()
    assert json.loads(json.dumps(a.to_dict()))["sigmas"] == [0.25, 0.5, 1.0]


# -------------------------------------------------------------------------------------------------- data order
@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 200), batch=st.integers(1, 64), seed=st.integers(0, 2**32), data=st.data())
def test_global_batches_cover_each_epoch_without_repeats(n, batch, seed, data):
    batch = min(batch, n)
    per_epoch = n // batch
    epoch = data.draw(st.integers(0, 3))
    seen = np.concatenate([global_batch(seed, epoch * per_epoch + k, n, batch) for k in range(per_epoch)])
    assert len(seen) == per_epoch * batch and len(np.unique(seen)) == len(seen)  # no image twice in an epoch
    assert seen.min() >= 0 and seen.max() < n
    np.testing.assert_array_equal(seen, epoch_order(seed, epoch, n)[:len(seen)])


def test_data_order_depends_on_seed_and_epoch_only():
    a = global_batch(0, 5, 100, 8)
    np.testing.assert_array_equal(a, global_batch(0, 5, 100, 8))
    assert not np.array_equal(epoch_order(0, 0, 100), epoch_order(0, 1, 100))
    assert not np.array_equal(epoch_order(0, 0, 100), epoch_order(1, 0, 100))
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    assert 0 <= derive_seed(2**40, 7) < 2**63


# ------------------------------------------------------------------------------------------------------ the job
def test_job_pickles_and_checkpoint_resubmits_the_same_config(tmp_path):
    from submitit.helpers import DelayedSubmission

    job = FinetuneJob(tiny(tmp_path))
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(job))
        assert isinstance(back, FinetuneJob) and back.config == job.config
    delayed = job.checkpoint()
    assert isinstance(delayed, DelayedSubmission)
    assert isinstance(delayed.function, FinetuneJob) and delayed.function is not job
    assert delayed.function.config == job.config and delayed.args == () and delayed.kwargs == {}
    assert pickle.loads(pickle.dumps(delayed)).function.config == job.config


def test_run_writes_everything_and_reruns_resume(tmp_path):
    cfg = tiny(tmp_path / "run")
    first = FinetuneJob(cfg)()
    assert (first["start_step"], first["step"], first["attempt"]) == (0, 4, 1)
    assert [s for s, _ in finetune_io.list_checkpoints(cfg.out)] == [4, 2]  # keep_checkpoints=2
    records = finetune_io.read_metrics(cfg.out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["kind"] == "eval"]
    assert sorted({r["step"] for r in evals}) == [0, 4] and {r["sigma"] for r in evals} == {0.25, 0.5, 1.0}
    assert all(r["images"] == 16 and r["acc"] is None and r["weights"] == "ema" for r in evals)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    again = FinetuneJob(cfg)()  # complete: trains nothing, weights unchanged
    assert (again["start_step"], again["attempt"], again["param_sha256"]) == (4, 2, first["param_sha256"])
    more = FinetuneJob(tiny(tmp_path / "run", steps=6))()  # more steps continue the same run
    assert (more["start_step"], more["step"]) == (4, 6)
    trains = [r["step"] for r in finetune_io.read_metrics(cfg.out) if r["kind"] == "train"]
    assert trains == [1, 2, 3, 4, 5, 6]
    meta = json.loads((tmp_path / "run" / "final" / "cpcluster.json").read_text())
    assert meta["finetuned"]["step"] == 6 and meta["finetune_run"]["config"]["steps"] == 6
    assert meta["finetuned"]["weights"] == "ema" and meta["format"] == "cpcluster-network"

    with pytest.raises(InputError, match="differs in: lr"):
        FinetuneJob(tiny(tmp_path / "run", lr=1e-3))()
    with pytest.raises(InputError, match="differs in: seed"):
        preflight(tiny(tmp_path / "run", seed=1))


def test_fsspec_url_output_and_classifier_accuracy():
    import fsspec

    cfg = tiny("memory://ft-unit/run", steps=2, classifier="demo-random", ema_decay=0.0, loss="l2")
    FinetuneJob(cfg)()
    evals = [r for r in finetune_io.read_metrics(cfg.out) if r["kind"] == "eval"]
    assert all(0.0 <= r["acc"] <= 1.0 and r["weights"] == "raw" for r in evals)
    den = load_denoiser("finetuned:memory://ft-unit/run/final")
    assert den.meta["finetuned"]["weights"] == "raw" and den.meta["finetuned"]["step"] == 2
    fsspec.filesystem("memory").rm("/ft-unit", recursive=True)


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    run = {"a": 1}
    from cpcluster.util.fileio import config_hash

    for step in (2, 4):
        finetune_io.save_checkpoint(str(tmp_path), {"step": step, "run": run, "run_hash": config_hash(run)}, 5)
    path = tmp_path / "checkpoints" / "step-00000004.pt"
    path.write_bytes(path.read_bytes()[:20])
    (tmp_path / "checkpoints" / "step-00000006.pt.x1.tmp").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="step-00000004.pt"):
        assert finetune_io.load_latest(str(tmp_path), run)["step"] == 2
    assert finetune_io.remove_temporaries(str(tmp_path)) == 1
    assert [s for s, _ in finetune_io.list_checkpoints(str(tmp_path))] == [4, 2]


# -------------------------------------------------------------------------------------- export and finetuned:
def _perturbed(seed=0):
    den = load_denoiser("demo-random")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in den.module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return den


def test_export_then_load_reproduces_the_purifier(tmp_path):
    den = _perturbed()
    meta = export_finetuned(str(tmp_path), den.module.state_dict(), den, "ema", 7, {"x": 1})
    assert meta["finetuned"]["base"] == "demo-random" and meta["meta"]["grid_steps"] == 18
    assert meta["architecture"] == "demo-unet" and meta["finetune_run"]["config"] == {"x": 1}
    loaded = load_denoiser(f"finetuned:{tmp_path}")
    assert loaded.sha256 == meta["weights"]["sha256"] and loaded.kind == "consistency"
    assert loaded.meta["finetuned"] == {"base": "demo-random", "base_sha256": None, "step": 7, "weights": "ema"}
    state = den.module.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.module.state_dict().items())
    x = torch.rand(5, 1, 16, 16)
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = build_purifier("consistency", loaded, 0.5)(noisy)
        direct = build_purifier("consistency", den, 0.5)(noisy)
        untouched = build_purifier("consistency", load_denoiser("demo-random"), 0.5)(noisy)
    assert torch.equal(ours, direct) and not torch.equal(ours, untouched)
    assert ours.min() >= 0 and ours.max() <= 1


def test_finetuned_folder_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_denoiser(f"finetuned:{tmp_path}/nothing")
    den = _perturbed()
    export_finetuned(str(tmp_path), den.module.state_dict(), den, "raw", 1, {})
    weights = tmp_path / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state[next(iter(state))] += 1
    save_file(state, str(weights))
    with pytest.raises(InputError, match="sha256"):
        load_denoiser(f"finetuned:{tmp_path}")
    (tmp_path / "cpcluster.json").write_text("{}")
    with pytest.raises(InputError, match="not a cpcluster network folder"):
        load_denoiser(f"finetuned:{tmp_path}")


# ---------------------------------------------------------------------------------------------------- preflight
def test_preflight_checks_before_submitting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(InputError, match=str(tmp_path / "th" / "hub" / "checkpoints")):
        preflight(tiny(tmp_path, lpips_random_backbone=False))
    preflight(tiny(tmp_path, lpips_random_backbone=False, loss="l2", eval_images=0))  # LPIPS not needed at all
    preflight(tiny(tmp_path))
    with pytest.raises(InputError, match="--data npz:/no/such/train.npz: /no/such/train.npz does not exist"):
        preflight(tiny(tmp_path, data="npz:/no/such/train.npz"))
    with pytest.raises(InputError, match="--model 'nope:x': unknown kind"):
        preflight(tiny(tmp_path, model="nope:x"))
    (tmp_path / "cifar").mkdir()
    preflight(tiny(tmp_path, data=f"cifar10:{tmp_path / 'cifar'}?split=train"))  # options are not part of the path
    with pytest.raises(InputError, match=f"{tmp_path / 'nothing'} does not exist"):
        preflight(tiny(tmp_path, data=f"cifar10:{tmp_path / 'nothing'}?split=train"))


def test_export_of_a_python_network_names_the_spec_to_type_and_never_imports_it(tmp_path, monkeypatch):
    import re
    import sys

    base = load_denoiser("python:test_adapters:make_denoiser?kind=consistency&grid_steps=18")
    state = {k: v + 0.5 for k, v in base.module.state_dict().items()}  # keys of the wrapper: net.conv.*
    record = export_finetuned(str(tmp_path / "final"), state, base, "raw", 3, {})
    expected = f"python:test_adapters:make_denoiser:{tmp_path}/final/model.safetensors?kind=consistency&grid_steps=18"
    assert record["architecture"] is None and record["load_with"] == expected
    monkeypatch.delitem(sys.modules, "test_adapters")
    with pytest.raises(InputError, match=re.escape(f"load it by typing --denoiser {expected}")):
        load_denoiser(f"finetuned:{tmp_path}/final")
    assert "test_adapters" not in sys.modules  # the refused folder imported nothing
    typed = load_denoiser(expected)  # the user typed the factory: the exported weights load into it
    assert all(torch.equal(typed.module.state_dict()[k], v) for k, v in state.items())
