"""The stages of ``cpcluster demo``, each through the functions the commands call (never a command itself): the
fine-tunings (:mod:`cpcluster.orchestrate.finetune`, local executor, with a progress bar), certify
(:mod:`cpcluster.orchestrate.certify`), aggregate, purification quality (:mod:`cpcluster.orchestrate.quality`) and
a grid (:mod:`cpcluster.orchestrate.grid`). Each prints the command line a user would type for it first.

Honesty. No weights can be downloaded here: the LPIPS trunk and the Inception network are randomly initialised, so
the "FID" column is a Frechet distance between random features, not an FID, and LPIPS is LPIPS* as in the
fine-tuning. The transport distance, L2 and accuracy columns are what they say. The evidence sigma is 1.0 because
that is where the clean-trained classifier loses most on purified digits (held-out accuracy 0.56, against 0.85 at
0.5), so where fine-tuning the classifier has room to matter.
"""
from __future__ import annotations

import os
import shlex
import time
from typing import Callable

from cpcluster.orchestrate.demo_plan import (CLS_RUNS, DemoPlan, certify_configs, cls_config, command_line,
                                             grid_request, quality_configs, quality_request, run_dirs)
from cpcluster.util.errors import InputError


def _say(echo: Callable, command: str, request) -> None:
    echo(f"$ cpcluster {command} " + " ".join(shlex.quote(a) for a in command_line(request)))


def check_models() -> None:
    """InputError unless the shipped demo weights load (they are built by ``scripts/train_demo.py``)."""
    from cpcluster.models.specs import load_classifier, load_denoiser

    load_classifier("demo")
    load_denoiser("demo")


def finetune_done(config) -> dict | None:
    """The ``final/cpcluster.json`` of a finished fine-tuning of exactly ``config``, else None."""
    from cpcluster.util.fileio import config_hash, read_json

    path = os.path.join(config.out, "final", "cpcluster.json")
    if not os.path.exists(path):
        return None
    try:
        meta = read_json(path)
    except InputError:  # damaged: not a finished fine-tuning, which is then run again
        return None
    # A purifier export (a network folder) keeps the run under "finetune_run" and the step under "finetuned"; a
    # classifier export keeps both at the top level.
    run, finetuned = meta.get("finetune_run", meta), meta.get("finetuned", meta)
    if not isinstance(run, dict) or not isinstance(finetuned, dict):
        return None
    step = finetuned.get("step")
    if run.get("run_hash") != config_hash(config.run_dict()) or not isinstance(step, int) or step < config.steps:
        return None
    return meta


def run_finetune(config, echo: Callable, desc: str = "fine-tune") -> dict:
    """Run (or reuse) a fine-tuning of ``config`` (purifier or classifier) as a local DDP job with a progress bar;
    return its meta.

    The job runs on ``config.ranks_per_node`` CPU ranks (gloo) through submitit's local executor, started by
    :func:`cpcluster.orchestrate.finetune.start_training` as ``cpcluster finetune`` starts it. The bar follows the
    checkpoints the job writes.
    """
    from cpcluster.jobs.finetune_io import list_checkpoints
    from cpcluster.orchestrate.finetune import start_training, training_job
    from cpcluster.util.progress import advance_to, progress_bar

    meta = finetune_done(config)
    if meta is not None:
        echo(f"reusing the finished fine-tuning in {config.out} (same configuration)")
        return meta
    folder = os.path.join(config.out, "submitit")
    job = start_training(training_job(config), config, "local", folder, job_name="cpcluster-demo-finetune")
    bar = progress_bar(config.steps, unit="step", desc=desc)
    try:
        while True:
            done = job.done()
            found = list_checkpoints(config.out)
            advance_to(bar, found[0][0] if found else 0)
            if done:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        job.cancel(check=False)
        raise
    finally:
        bar.close()
    if job.exception() is not None:
        lines = [line.strip() for line in str(job.exception()).splitlines() if line.strip()]
        raise InputError(f"the fine-tuning job failed: {lines[-1] if lines else 'no message'} (logs in {folder})")
    meta = finetune_done(config)
    if meta is None:
        raise InputError(f"the fine-tuning job ended without a result in {config.out}/final (logs in {folder})")
    return meta


def run_classifiers(plan: DemoPlan, root: str, final: str, echo: Callable) -> dict:
    """Fine-tune (or reuse) the two demo classifiers; ``{prefix: (final folder, [eval records])}``."""
    from cpcluster.jobs.finetune_io import read_metrics

    out = {}
    for prefix, what, denoiser in CLS_RUNS:
        config = cls_config(plan, root, prefix, denoiser.format(final=final))
        echo(f"-- {what}: {config.steps} steps of {config.batch_size} digits at sigma {plan.evidence.sigma:g}, "
             f"{config.optimizer} lr {config.lr:g} -> {config.out}/final")
        run_finetune(config, echo, desc=prefix)
        evals = [r for r in read_metrics(config.out) if r.get("kind") == "eval"]
        out[prefix] = (os.path.join(config.out, "final"), evals)
        if evals:
            first, last = min(evals, key=lambda r: r["step"]), max(evals, key=lambda r: r["step"])
            echo(f"   held-out accuracy of classifier(purified) on {first['images']} test digits, one noise draw "
                 f"each: {first['acc']:.3f} -> {last['acc']:.3f}")
    return out


def run_certify(request, echo: Callable) -> None:
    """A certify request (:func:`cpcluster.orchestrate.demo_plan.certify_request`) run here, as ``cpcluster certify``
    runs it: its progress bar, resume and errors included."""
    from cpcluster.orchestrate.certify import certify_runs
    from cpcluster.orchestrate.certify_plan import SLURM_DEFAULTS

    _say(echo, "certify", request)
    configs, executor, workers = certify_configs(request)
    certify_runs(configs, executor, dict(SLURM_DEFAULTS), workers=workers, echo=echo)


def run_aggregate(plan: DemoPlan, root: str, echo: Callable):
    from cpcluster.aggregate.pipeline import run_aggregate as aggregate
    from cpcluster.core.config import AggregateOptions

    dirs = run_dirs(plan, root)
    out = os.path.join(root, "aggregate")
    radii = ",".join(f"{r:g}" for r in plan.radii)
    echo(f"$ cpcluster aggregate {' '.join(dirs)} --alpha {plan.alpha:g} --radii {radii} --out {out}")
    return aggregate(AggregateOptions(paths=tuple(dirs), alpha=plan.alpha, radii=plan.radii, out=out))


def run_quality(plan: DemoPlan, root: str, final: str, echo: Callable) -> str:
    """``cpcluster quality`` + ``quality-report`` at the evidence sigma; returns the printed table."""
    from cpcluster.aggregate.quality_report import write_report
    from cpcluster.orchestrate.certify_plan import SLURM_DEFAULTS
    from cpcluster.orchestrate.quality import preflight, run_quality as run

    request = quality_request(plan, root, final)
    _say(echo, "quality", request)
    configs, executor = quality_configs(request)
    preflight(configs)
    run(configs, executor, dict(SLURM_DEFAULTS), echo=echo)
    ev, out = plan.evidence, os.path.join(root, "quality")
    runs = [os.path.join(out, name) for name in ("clean", f"none-sigma{ev.sigma:g}", f"demo-sigma{ev.sigma:g}",
                                                 f"finetuned-sigma{ev.sigma:g}")]
    echo(f"$ cpcluster quality-report {' '.join(runs)} --out {out}/report")
    text, _ = write_report(runs, os.path.join(out, "report"))
    return text


def run_grid(plan: DemoPlan, root: str, final: str, echo: Callable) -> str:
    """``cpcluster grid`` of the demo purifier before and after LPIPS fine-tuning; returns the PNG path."""
    from cpcluster.core.config import parse_indices
    from cpcluster.orchestrate.grid import draw_grid

    request = grid_request(plan, root, final)
    _say(echo, "grid", request)
    options = dict(request)
    purifiers = [value for option, value in request if option == "--purifier"]
    png, _ = draw_grid(purifiers, options["--sigma"], parse_indices(options["--indices"]), options["--out"],
                       echo=echo)
    return png


def eval_lines(evals: list) -> list[str]:
    """Held-out purification quality before (first evaluation) and after (last) fine-tuning, per sigma."""
    if not evals:
        return []
    first, last = min(r["step"] for r in evals), max(r["step"] for r in evals)
    lines = [f"held-out check on {evals[0]['images']} test digits, one noise draw each "
             f"(step {first} -> step {last}; LPIPS* on the random trunk):"]
    for sigma in sorted({r["sigma"] for r in evals}):
        a = next(r for r in evals if r["sigma"] == sigma and r["step"] == first)
        b = next(r for r in evals if r["sigma"] == sigma and r["step"] == last)
        lines.append(f"  sigma {sigma:<4g} accuracy of classifier(purified) {a['acc']:.3f} -> {b['acc']:.3f}   "
                     f"L2(purified, clean) {a['l2']:.3f} -> {b['l2']:.3f}   "
                     f"LPIPS* {a['lpips']:.4f} -> {b['lpips']:.4f}")
    return lines
