"""Submitting a fine-tuning run (``cpcluster finetune``, ``cpcluster finetune-classifier``, the demo): one DDP job of
``nodes x ranks_per_node`` ranks through submitit.

:func:`training_job` picks the job of a config and runs its pre-submit checks; :func:`start_training` builds the
executor and submits it (the one way a fine-tuning is started); :func:`submit_training` is what the commands do
around it: choose the executor, say what runs where, ``--dry-run``, and with ``--wait`` each rank's summary.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from cpcluster.util.errors import InputError, RunError


def check_layout(kind: str, nodes: int, ranks_per_node: int) -> None:
    """What each executor can run: local is one node, debug is one process."""
    if kind == "local" and nodes != 1:
        raise InputError(f"--nodes {nodes}: the local executor runs on this machine only; use --nodes 1 or "
                         "--executor slurm")
    if kind == "debug" and nodes * ranks_per_node != 1:
        raise InputError("--executor debug runs one process inside this one: use --nodes 1 and one rank")


def layout(gpus_per_node: int, ranks_per_node: int | None, out: str) -> tuple[int, str, str]:
    """``(ranks per node, device, absolute out)`` from the layout options (InputError for impossible ones)."""
    if gpus_per_node < 0:
        raise InputError(f"--gpus-per-node {gpus_per_node}: must be 0 (CPU) or more")
    if gpus_per_node and ranks_per_node not in (None, gpus_per_node):
        raise InputError(f"--ranks-per-node {ranks_per_node}: with GPUs there is one rank per GPU; drop it")
    if out and "://" not in out:
        out = os.path.abspath(out)  # the job may start in another working directory
    return gpus_per_node or ranks_per_node or 1, "cuda" if gpus_per_node else "cpu", out


def build_executor(kind: str, folder: str, nodes: int, ranks_per_node: int, gpus_per_node: int,
                   job_name: str = "cpcluster-finetune", **slurm):
    """The submitit executor of one DDP job of ``nodes x ranks_per_node`` tasks (``cpcluster.orchestrate.slurm``
    factory); ``slurm``: further :class:`~cpcluster.orchestrate.slurm.SlurmOptions` fields."""
    from cpcluster.orchestrate.slurm import SlurmOptions, make_executor

    check_layout(kind, nodes, ranks_per_node)
    options = SlurmOptions(nodes=nodes, tasks_per_node=ranks_per_node, gpus_per_node=gpus_per_node or None,
                           job_name=job_name, **slurm)
    return make_executor(folder, options, kind)


def training_job(config):
    """The submitit job of a fine-tuning config, after its pre-submit checks (spec kinds and paths, the LPIPS
    trunk, ``out`` holding no other run): :class:`~cpcluster.jobs.finetune.FinetuneJob` for a
    :class:`~cpcluster.core.config.FinetuneConfig`, :class:`~cpcluster.jobs.finetune_classifier.ClassifierFinetuneJob`
    for a :class:`~cpcluster.core.config_evidence.ClassifierFinetuneConfig`."""
    from cpcluster.core.config import FinetuneConfig
    from cpcluster.jobs import finetune, finetune_classifier

    module = finetune if isinstance(config, FinetuneConfig) else finetune_classifier
    module.preflight(config)
    return module.FinetuneJob(config) if module is finetune else module.ClassifierFinetuneJob(config)


def log_folder(config, log_dir: str | None = None) -> str:
    """submitit's folder of a fine-tuning run: ``log_dir``, else ``<out>/submitit`` (``./submitit`` for URLs)."""
    from cpcluster.util.fileio import is_local, join_url

    return log_dir or (join_url(config.out, "submitit") if is_local(config.out) else os.path.abspath("submitit"))


def start_training(job, config, kind: str, folder: str, gpus_per_node: int = 0, job_name: str = "cpcluster-finetune",
                   **slurm):
    """Submit ``job`` as one DDP job of ``config.nodes x config.ranks_per_node`` ranks with the executor ``kind``
    (``slurm``, ``local``, ``debug``); submitit's logs go to ``folder`` (a ``%j`` sub-folder per SLURM job).
    Returns the submitit job."""
    ex = build_executor(kind, os.path.join(folder, "%j") if kind == "slurm" else folder, config.nodes,
                        config.ranks_per_node, gpus_per_node, job_name, **slurm)
    return ex.submit(job)


def submit_training(job, config, submit: dict, gpus_per_node: int, next_step: str, job_name: str,
                    warning: str | None = None, echo: Callable[[str], None] = print,
                    warn: Callable[[str], None] | None = None) -> None:
    """Choose the executor, print the plan (``dry_run`` stops there), submit ``job``; with ``wait`` (or the debug
    executor) wait and print every rank's summary.

    ``submit``: ``executor``, ``partition``, ``account``, ``time_min``, ``cpus_per_task``, ``log_dir``, ``wait``,
    ``dry_run``; ``next_step`` names how the result is used (``{final}`` is the result folder); ``warning`` goes
    to ``warn`` once every check has passed. A job that fails is a :class:`RunError` with its last line.
    """
    from cpcluster.orchestrate.submit import choose_executor, refuse_process_local
    from cpcluster.util.fileio import join_url

    folder = log_folder(config, submit["log_dir"])
    name, reason = choose_executor(submit["executor"])
    nodes, ranks = config.nodes, config.ranks_per_node
    check_layout(name, nodes, ranks)
    refuse_process_local(config.out, name)
    if warning:
        (warn or echo)(warning)
    device = f"{gpus_per_node} GPU(s) per node" if gpus_per_node else "CPU"
    echo(f"executor: {name} ({reason}): {nodes} node(s) x {ranks} rank(s), {device}")
    if submit["dry_run"]:
        echo(json.dumps({"config": config.to_dict(), "executor": name, "log_dir": folder}, indent=2))
        return
    submitted = start_training(job, config, name, folder, gpus_per_node, job_name, partition=submit["partition"],
                               account=submit["account"], time_min=submit["time_min"],
                               cpus_per_task=submit["cpus_per_task"])
    final = join_url(config.out, "final")
    logs = os.path.join(folder, str(submitted.job_id)) if name == "slurm" else folder
    echo(f"job {submitted.job_id} submitted; logs in {logs}")
    echo(f"result (when done): {final}, for {next_step.format(final=final)}")
    if submit["wait"] or name == "debug":
        try:
            results = submitted.results()
        except Exception as e:  # submitit's FailedJobError carries the job's traceback
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise RunError(f"job {submitted.job_id} failed: {last[0].strip()[:300]} (logs: {folder})") from None
        for r in results:
            echo(f"rank {r['rank']}/{r['world_size']} on {r['node']} ({r['device']}): step "
                 f"{r['start_step']} -> {r['step']}, weights sha256 {r['param_sha256'][:16]}, "
                 f"{r['train_samples_per_s'] or 0:.1f} samples/s")
