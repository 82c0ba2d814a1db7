"""Purification quality as sharded jobs (``cpcluster quality``, the demo): one run per (purifier, sigma) plus the
dataset's clean reference run (``clean``), each cut into shards of :class:`cpcluster.jobs.quality.QualityShardJob`.

Everything is checked before anything runs (spec kinds and paths, the Inception weights file, the LPIPS trunk, run
folders holding other runs: :func:`preflight`, :func:`prepare`); :func:`run_quality` then runs or submits the
unfinished shards. ``cpcluster quality-report`` turns the finished runs into tables (``aggregate/quality_report.py``).
"""
from __future__ import annotations

import os
import re
from typing import Callable

from cpcluster.core.config_evidence import QualityConfig
from cpcluster.models.purifiers import PURIFIER_NAMES
from cpcluster.util.errors import InputError


def parse_purifier(text: str) -> tuple[str, str, str | None]:
    """``[NAME=]KIND[:DENOISER SPEC]`` -> ``(run name prefix, kind, denoiser spec or None)``."""
    name, eq, body = text.partition("=") if re.match(r"^[A-Za-z0-9._-]+=", text) else ("", "", text)
    kind, _, denoiser = body.partition(":")
    if kind not in PURIFIER_NAMES:
        raise InputError(f"--purifier {text!r}: start with one of {', '.join(PURIFIER_NAMES)}, e.g. consistency:demo "
                         "or none (an optional NAME= prefix names its runs)")
    if kind != "none" and not denoiser:
        raise InputError(f"--purifier {text!r}: name the denoiser, e.g. {kind}:demo")
    prefix = name or re.sub(r"[^A-Za-z0-9.=-]+", "-", f"{kind}-{denoiser}" if denoiser else kind).strip("-")
    return prefix, kind, denoiser or None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_configs(purifiers, sigmas, out: str, **fields) -> list[QualityConfig]:
    """The clean reference run, then one run per (purifier, sigma), each in ``<out>/<name>``; names unique."""
    from cpcluster.util.fileio import is_local, join_url

    if is_local(out):
        out = os.path.abspath(out.removeprefix("file://"))
    if not purifiers or not sigmas:
        raise InputError("give at least one --purifier (e.g. consistency:demo) and one --sigma")
    configs = [QualityConfig(run_dir=join_url(out, "clean"), purifier="clean", **fields)]
    for text in purifiers:
        prefix, kind, denoiser = parse_purifier(text)
        for sigma in sigmas:
            configs.append(QualityConfig(run_dir=join_url(out, f"{prefix}-sigma{sigma:g}"), purifier=kind,
                                         denoiser=denoiser, sigma=sigma, **fields))
    dirs = [c.run_dir for c in configs]
    if len(set(dirs)) != len(dirs):
        raise InputError("two --purifier values give runs the same folder name; prefix them with NAME=")
    return configs


def preflight(configs: list[QualityConfig]) -> None:
    """Spec kinds and local paths, the Inception weights and the LPIPS trunk, before anything runs (InputError)."""
    from cpcluster.core.fid import check_inception
    from cpcluster.jobs.finetune import check_specs

    first = configs[0]
    check_specs([("dataset", "--dataset", first.dataset), ("classifier", "--classifier", first.classifier)]
                + [("denoiser", "--purifier", c.denoiser) for c in configs])
    if not first.inception_random_weights:
        check_inception(first.inception_weights)
    if not first.lpips_random_backbone:
        from cpcluster.core.losses import check_backbone

        check_backbone(first.lpips_net)


def prepare(config: QualityConfig, overwrite: bool) -> list[int]:
    """Check or write ``<run_dir>/run.json``; returns the indices of its shards still to compute."""
    import json

    import fsspec

    from cpcluster.aggregate.quality_io import SHARD_GLOB, shard_name
    from cpcluster.jobs.quality import RUN_FILE, Models, read_run, shard_config
    from cpcluster.util.fileio import config_hash, exists, join_url, write_bytes_atomic

    digest = config_hash(shard_config(config, Models(config)))
    record = read_run(config.run_dir)
    fs, path = fsspec.core.url_to_fs(config.run_dir)
    if record is not None and (record.get("config_hash"), record.get("num_shards")) != (digest, config.num_shards):
        if not overwrite:
            raise InputError(f"{config.run_dir} holds another quality run (settings, models or data differ); use "
                             "another --out, or --overwrite to replace it")
        for old in fs.glob(path.rstrip("/") + "/" + SHARD_GLOB):
            fs.rm(old)
    write_bytes_atomic(join_url(config.run_dir, RUN_FILE), (json.dumps(
        {"config": config.to_dict(), "config_hash": digest, "num_shards": config.num_shards}, indent=1) + "\n").encode())
    return [k for k in range(config.num_shards) if not exists(join_url(config.run_dir, shard_name(k, config.num_shards)))]


def run_quality(configs: list[QualityConfig], executor: str, slurm: dict, *, workers: int | None = None,
                overwrite: bool = False, echo: Callable[[str], None] = print) -> None:
    """Check every run folder of ``configs`` (:func:`prepare`), then run or submit their unfinished shards.

    ``configs`` come from :func:`build_configs` and passed :func:`preflight`; ``slurm``: the SLURM settings
    (``partition``, ``account``, ``time_min``, ``array_parallelism``, ``sbatch_extra``).
    """
    from cpcluster.jobs.quality import QualityShardJob
    from cpcluster.orchestrate.certify_plan import array_slurm_options
    from cpcluster.orchestrate.submit import Task, choose_executor, run_debug, run_local, submit_slurm
    from cpcluster.util.fileio import is_local

    kind, reason = choose_executor(executor)
    workers = workers or 1
    device = configs[0].device
    on_cpu = device == "cpu" or (device == "auto" and not _cuda())
    threads = max(1, (os.cpu_count() or 1) // workers) if kind == "local" and on_cpu else None  # cores shared
    tasks = []
    for c in configs:
        todo = prepare(c, overwrite)
        echo(f"run {c.run_dir}: {c.num_shards - len(todo)} of {c.num_shards} shards complete")
        job_config = QualityConfig(**{**c.to_dict(), "indices": c.indices, "threads": threads})
        logs = os.path.join(c.run_dir, "logs") if is_local(c.run_dir) else os.path.abspath("cpcluster-logs")
        tasks += [Task(QualityShardJob(job_config, k), logs, {"run": os.path.basename(c.run_dir), "shard": k})
                  for k in todo]
    echo(f"executor: {kind} ({reason})" + (f", {workers} shard(s) at a time" if kind == "local" else ""))
    if kind == "slurm":
        jobs = submit_slurm([Task(t.fn, os.path.join(t.folder, "%j"), t.tags) for t in tasks],
                            array_slurm_options(device, slurm, "cpcluster-quality"))
        echo(f"submitted {len(jobs)} shard jobs")
    elif kind == "local" and tasks:
        run_local(tasks, workers=workers)
    elif tasks:
        run_debug(tasks)
    when = "when the jobs have finished" if kind == "slurm" else "next"
    echo(f"{when}: cpcluster quality-report {' '.join(c.run_dir for c in configs)}")
