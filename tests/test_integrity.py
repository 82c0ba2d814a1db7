"""No silent loss, no false success (issue 11): damaged results are never counted as done, every tool agrees on
them, writes fail with their cause and leave nothing half-written, diverged training exports nothing."""
import errno
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from test_status import SHARDS, SMALL, make_partial, reference, run_dir, shard_path  # noqa: F401 (fixtures)

from cpcluster.cli import main
from cpcluster.core.shards import encode_shard, read_shard
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import write_bytes_atomic


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res, *needles, after_progress=False):
    """Exit code 2, no traceback, and one ``Error:`` line naming ``needles``: the whole output, or (for commands
    that fail while running, ``after_progress``) its last line, after what the command printed as it ran."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.output.strip().splitlines()
    assert "Traceback" not in res.output and sum(line.startswith("Error: ") for line in lines) == 1, res.output
    assert lines[-1].startswith("Error: ") and (after_progress or len(lines) == 1), res.output
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def certify_again(run_dir, *extra):
    return cli("certify", *SMALL, "--sigma", "0.5", "--shards", SHARDS, "--executor", "debug",
               "--out", os.path.dirname(run_dir), *extra)


def counts_of(path):
    shard = read_shard(path)
    return shard.units.tolist(), shard.counts.tolist()


def test_truncated_shard_is_counted_again_by_certify_and_resubmit(run_dir):
    before = {k: counts_of(shard_path(run_dir, k)) for k in (1, 3)}
    for k in (1, 3):
        with open(shard_path(run_dir, k), "r+b") as fh:
            fh.truncate(os.path.getsize(shard_path(run_dir, k)) // 2)
    # status, aggregate, certify and resubmit agree: the two shards are not done
    status = json.loads(cli("status", run_dir, "--json", "--no-slurm").output)
    assert [s["state"] for s in status["shards"]] == ["complete", "failed", "complete", "failed", "complete"]
    one_error_line(cli("aggregate", run_dir, "--out", os.path.join(run_dir, "agg")), "shard-00001-of-00005.h5")
    res = cli("resubmit", run_dir, "--dry-run", "--executor", "debug")
    assert res.exit_code == 0 and "2 shard(s) to rerun (1, 3)" in res.output, res.output

    res = cli("resubmit", run_dir, "--executor", "debug")
    assert res.exit_code == 0, res.output
    assert "3 of 5 shards complete" in res.output and "(5 of 5 complete)" in res.output
    for k in (1, 3):  # counted again from scratch: the same counts (noise is a function of the seeds only)
        assert counts_of(shard_path(run_dir, k)) == before[k]
        assert os.path.exists(shard_path(run_dir, k) + ".damaged"), "the damaged file is kept aside"

    with open(shard_path(run_dir, 4), "r+b") as fh:
        fh.truncate(100)
    res = certify_again(run_dir)
    assert res.exit_code == 0, res.output
    assert "resume, 4 of 5 shards complete" in res.output and "(5 of 5 complete)" in res.output
    assert cli("aggregate", run_dir, "--out", os.path.join(run_dir, "agg")).exit_code == 0


def test_shard_edited_in_place_fails_its_checksum(run_dir):
    import h5py

    with h5py.File(shard_path(run_dir, 2), "r+") as f:  # still a valid shard, but not what was counted
        counts = f["counts"][()]
        counts[0, [0, 1]] = counts[0, [1, 0]] if counts[0, 0] != counts[0, 1] else (counts[0, 0] + 1, counts[0, 1] - 1)
        f["counts"][...] = counts
    with pytest.raises(InputError, match="data_sha256"):
        read_shard(shard_path(run_dir, 2))
    status = json.loads(cli("status", run_dir, "--json", "--no-slurm").output)
    assert status["shards"][2]["state"] == "failed"


def test_journal_record_with_a_valid_crc_but_bad_counts_is_refused_everywhere(run_dir):
    from cpcluster.core.journal import encode_record

    shard, journal = make_partial(run_dir, 0, units=2)
    unit = shard.units[2].tolist()
    bad = shard.counts[2].copy()
    bad[0] += 1  # counts no longer sum to n_draws, but the record's CRC is intact
    with open(journal, "ab") as fh:
        fh.write(encode_record(unit, bad.tolist()))
    status = json.loads(cli("status", run_dir, "--json", "--no-slurm").output)
    assert status["shards"][0]["state"] == "failed" and "damaged shard journal" in status["shards"][0]["detail"]
    one_error_line(cli("resubmit", run_dir, "--executor", "debug"), journal, "but n_draws is", after_progress=True)
    assert not os.path.exists(shard_path(run_dir, 0)), "no shard file is made from a damaged journal"


def test_units_of_images_outside_the_run_are_refused(run_dir):
    shard = read_shard(shard_path(run_dir, 4))
    extra = int(shard.image_index.max()) + 1  # the run evaluates images 0..4 only
    units = np.vstack([shard.units, [[extra, 0, 0, shard.units[0, 3]]]])
    counts = np.vstack([shard.counts, shard.counts[:1]])
    write_bytes_atomic(shard_path(run_dir, 4), encode_shard(
        shard.config, shard.shard, units, counts, np.append(shard.image_index, extra),
        np.append(shard.labels, 0), complete=True))
    one_error_line(cli("aggregate", run_dir, "--out", os.path.join(run_dir, "agg")),
                   f"lists image {extra}, which its run does not evaluate")
    status = json.loads(cli("status", run_dir, "--json", "--no-slurm").output)
    assert status["shards"][4]["state"] == "failed"


def test_memory_output_is_refused_when_jobs_run_in_other_processes(tmp_path):
    for executor in ("local", "slurm"):
        res = cli("certify", *SMALL, "--sigma", "0.5", "--executor", executor, "--out", "memory://cp-results")
        one_error_line(res, "--out memory://cp-results", "other processes")
    res = cli("finetune", "--model", "demo-random", "--data", "demo:train", "--out", "memory://ft",
              "--lpips-random-backbone", "--lpips-net", "alex", "--executor", "local")
    one_error_line(res, "--out memory://ft")


def test_disk_full_during_certify_names_the_cause_and_keeps_the_recorded_units(run_dir, monkeypatch):
    make_partial(run_dir, 2, units=1)
    real, calls = os.fsync, []

    def full(fd):
        calls.append(fd)
        if len(calls) >= 2:  # the second unit's record cannot be made durable
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    line = one_error_line(cli("resubmit", run_dir, "--executor", "debug"), "No space left on device",
                          shard_path(run_dir, 2), after_progress=True)
    assert "ENOSPC" in line
    monkeypatch.setattr(os, "fsync", real)
    res = cli("resubmit", run_dir, "--executor", "debug")
    assert res.exit_code == 0 and "(5 of 5 complete)" in res.output, res.output


def test_disk_full_during_aggregate_leaves_the_old_outputs_whole(run_dir, monkeypatch):
    out = os.path.join(os.path.dirname(run_dir), "agg")
    assert cli("aggregate", run_dir, "--out", out, "--format", "latex").exit_code == 0
    old = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert "table.tex" in old
    real, calls = os.fsync, []

    def full(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    one_error_line(cli("aggregate", run_dir, "--out", out, "--alpha", "0.01"), "No space left on device",
                   f"--out {out}")
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == old
    monkeypatch.setattr(os, "fsync", real)
    assert cli("aggregate", run_dir, "--out", out, "--alpha", "0.01").exit_code == 0
    new = sorted(os.listdir(out))
    assert "table.tex" not in new, "outputs of the earlier aggregation that this one does not write are removed"
    assert json.load(open(os.path.join(out, "inputs.json")))["options"]["alpha"] == 0.01
    assert sorted(json.load(open(os.path.join(out, "inputs.json")))["outputs"]) == new


def test_stray_temporary_from_a_kill_during_finish_is_removed(run_dir):
    shard, journal = make_partial(run_dir, 1, units=10**6)  # every unit recorded, killed while finishing
    raw = encode_shard(shard.config, shard.shard, shard.units, shard.counts, shard.image_index, shard.labels,
                       complete=True)
    stray = shard_path(run_dir, 1) + ".k3j9x.tmp"
    with open(stray, "wb") as fh:
        fh.write(raw[: len(raw) // 3])
    res = cli("resubmit", run_dir, "--executor", "debug")
    assert res.exit_code == 0, res.output
    assert not os.path.exists(stray) and not os.path.exists(journal)
    assert counts_of(shard_path(run_dir, 1)) == (shard.units.tolist(), shard.counts.tolist())


def test_diverged_fine_tuning_exports_nothing(tmp_path):
    from test_finetune import tiny

    from cpcluster.jobs.finetune import FinetuneJob
    from cpcluster.jobs.training import Diverged

    with pytest.raises(InputError, match="--lr inf: must be a positive finite number"):
        tiny(tmp_path / "a", lr=float("inf"))
    cfg = tiny(tmp_path / "b", lr=1e30, loss="l2", eval_images=0, grad_clip=0)
    with pytest.raises(Diverged, match="training diverged"):
        FinetuneJob(cfg)()
    assert not os.path.exists(tmp_path / "b" / "final")
    res = cli("finetune", "--model", "demo-random", "--data", "demo:train", "--out", tmp_path / "c", "--lr", "inf",
              "--loss", "l2", "--eval-images", "0", "--executor", "debug")
    one_error_line(res, "--lr inf")


def test_networks_with_non_finite_weights_are_refused_by_inspect_and_certify(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from unet_files import CM_SCHEDULER, save_unet

    folder = save_unet(str(tmp_path / "unet"), scheduler=CM_SCHEDULER)
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = load_file(weights)
    name = sorted(state)[3]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, weights)
    spec = f"diffusers:{folder}"
    one_error_line(cli("inspect", "--denoiser", spec, "--dataset", ""), "NaN or infinite", name)
    res = cli("certify", *SMALL[2:], "--denoiser", spec, "--sigma", "0.5",
              "--executor", "debug", "--out", tmp_path / "out")
    one_error_line(res, "NaN or infinite")
    assert not (tmp_path / "out").exists()
