"""``cpcluster demo`` as a function: the Consistency Purification story in miniature, on this machine.

1. **fine-tune** the shipped one-step denoiser ``demo`` (trained with the L2 loss) with LPIPS, through the project's
   fine-tuning job (:class:`cpcluster.jobs.finetune.FinetuneJob`) run by the local executor;
2. **certify** the demo test digits at sigma 0.25, 0.5 and 1.0, each run cut into several shards run by the local
   executor, for three purifiers in front of the same clean-trained classifier: none, the denoiser before
   fine-tuning (``demo``) and after (``finetuned:<out>/finetune/final``) -- by calling ``cpcluster certify``;
3. **aggregate** every run: the certified-accuracy table in the terminal, ``certified_accuracy.png``,
   ``summary.json`` (:func:`cpcluster.aggregate.pipeline.run_aggregate`).

Everything runs on the CPU and lands under ``<out>`` (``<out>/quick`` for the quick preset). A rerun with the same
settings reuses the finished fine-tuning and the finished shards (certify resumes); only aggregation is redone.
Measured on the project's 2-core machine: 3.4-5.4 min for :data:`FULL` (README.md has the output), ~40 s for
:data:`QUICK`.

LPIPS runs on a *randomly initialised* AlexNet trunk (no ImageNet weights can be downloaded here): the demo shows
the machinery, not the paper's perceptual metric. The output says so.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable

from cpcluster.orchestrate.demo_evidence import EvidencePlan
from cpcluster.util.errors import InputError

# (run-name prefix, what it is, certify options naming the purifier)
METHODS = (("none", "no purifier", ("--purifier", "none")),
           ("demo", "denoiser before fine-tuning", ("--denoiser", "demo")),
           ("finetuned", "denoiser after fine-tuning", ("--denoiser", "finetuned:{final}")))


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run. ``FULL`` is what ``make demo`` runs; ``QUICK`` is the smoke test (``--quick``)."""

    name: str
    sigmas: tuple = (0.25, 0.5, 1.0)
    skip: int = 5  # every skip-th of the 500 test digits
    max_images: int | None = None
    n0: int = 100
    n: int = 500
    alpha: float = 0.001
    shards: int = 3  # per sigma and purifier (run by the local executor, `workers` at a time)
    draw_batch: int = 100
    batch: int = 400
    radii: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    finetune: dict = field(default_factory=dict)  # FinetuneConfig fields
    evidence: EvidencePlan = field(default_factory=EvidencePlan)  # CLS-FT, quality, grid (cpcluster/orchestrate/demo_evidence.py)


FINETUNE_COMMON = dict(model="demo", data="demo:train", eval_data="demo", loss="lpips", lpips_net="alex",
                       lpips_resize=64, lpips_random_backbone=True, classifier="demo", eval_every=0,
                       keep_checkpoints=1, device="cpu")
CLS_FT_COMMON = dict(classifier="demo", data="demo:train", eval_data="demo", optimizer="radam", lr=1e-3,
                     eval_every=0, keep_checkpoints=1, device="cpu")
FULL = DemoPlan("full", skip=5, n0=100, n=500, shards=3,
                finetune=dict(FINETUNE_COMMON, steps=300, batch_size=32, lr=1e-3, ema_decay=0.99, eval_images=250,
                              eval_batch=125, ranks_per_node=2),
                evidence=EvidencePlan(cls_ft=dict(CLS_FT_COMMON, steps=60, batch_size=32, eval_images=250,
                                                  eval_batch=125), quality_skip=10, quality_images=32))
QUICK = DemoPlan("quick", skip=100, max_images=3, n0=20, n=100, shards=2, batch=100,
                 finetune=dict(FINETUNE_COMMON, steps=4, batch_size=8, lr=1e-3, ema_decay=0.5, eval_images=16,
                               lpips_resize=32),
                 evidence=EvidencePlan(cls_ft=dict(CLS_FT_COMMON, steps=4, batch_size=8, eval_images=16),
                                       quality_skip=100, quality_images=4, grid_indices="0-3"))
PRESETS = {"full": FULL, "quick": QUICK}


def finetune_config(plan: DemoPlan, root: str):
    from cpcluster.core.config import FinetuneConfig

    steps = plan.finetune["steps"]
    return FinetuneConfig(out=os.path.join(root, "finetune"), checkpoint_every=max(1, steps // 20),
                          log_every=max(1, steps // 20), **plan.finetune)


def certify_args(plan: DemoPlan, root: str, method: tuple, final: str, workers: int, sigmas=None,
                 classifier: str = "demo", shards: int | None = None) -> list[str]:
    """The ``cpcluster certify`` arguments of one purifier's runs (one per sigma, default: the plan's)."""
    prefix, _, purifier = method
    args = [a.format(final=final) for a in purifier]
    for s in sigmas or plan.sigmas:
        args += ["--sigma", f"{s:g}"]
    args += ["--dataset", "demo", "--classifier", classifier, "--skip", str(plan.skip), "--n0", str(plan.n0),
             "--n", str(plan.n), "--block-size", str(_block(plan)), "--draw-batch", str(plan.draw_batch),
             "--batch", str(plan.batch), "--shards", str(shards or plan.shards), "--device", "cpu", "--executor", "local",
             "--workers", str(workers), "--out", os.path.join(root, "certify"), "--name", f"{prefix}-sigma{{sigma}}"]
    if plan.max_images is not None:
        args += ["--max-images", str(plan.max_images)]
    return args


def _block(plan: DemoPlan) -> int:
    """Estimation draws per unit: n split in two blocks (rounded up to whole noise batches)."""
    half = -(-plan.n // 2)
    return max(plan.draw_batch, -(-half // plan.draw_batch) * plan.draw_batch)


def run_dirs(plan: DemoPlan, root: str) -> list[str]:
    from cpcluster.orchestrate.demo_evidence import cls_run_dirs

    return [os.path.join(root, "certify", f"{m[0]}-sigma{s:g}") for m in METHODS for s in plan.sigmas] + \
        cls_run_dirs(plan, root)


def default_workers() -> int:
    """Shard processes at once: one per core (one torch thread each), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------- stages
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


def run_finetune(config, echo: Callable, target: str = "purifier", desc: str = "fine-tune") -> dict:
    """Run (or reuse) a fine-tuning of ``config`` as a local DDP job with a progress bar; return its meta.

    ``target`` ``"purifier"``: :class:`cpcluster.jobs.finetune.FinetuneJob`; ``"classifier"``:
    :class:`cpcluster.jobs.finetune_classifier.ClassifierFinetuneJob`. The job runs on ``config.ranks_per_node``
    CPU ranks (gloo) through submitit's local executor, built by :func:`cpcluster.orchestrate.slurm.make_executor` as
    ``cpcluster finetune`` does. The bar follows the checkpoints the job writes.
    """
    from cpcluster.jobs import finetune, finetune_classifier
    from cpcluster.jobs.finetune_io import list_checkpoints
    from cpcluster.orchestrate.slurm import SlurmOptions, make_executor
    from cpcluster.util.progress import advance_to, progress_bar

    jobs = {"purifier": (finetune.FinetuneJob, finetune.preflight),
            "classifier": (finetune_classifier.ClassifierFinetuneJob, finetune_classifier.preflight)}
    meta = finetune_done(config)
    if meta is not None:
        echo(f"reusing the finished fine-tuning in {config.out} (same configuration)")
        return meta
    job_class, preflight = jobs[target]
    preflight(config)
    folder = os.path.join(config.out, "submitit")
    options = SlurmOptions(nodes=1, tasks_per_node=config.ranks_per_node, job_name="cpcluster-demo-finetune")
    job = make_executor(folder, options, "local").submit(job_class(config))
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


def run_certify(args: list[str], echo: Callable) -> None:
    """``cpcluster certify ARGS`` in this process (its progress bar, resume and errors included)."""
    from cpcluster.cli.certify_cmd import certify

    echo("$ cpcluster certify " + " ".join(shlex.quote(a) for a in args))
    certify.main(args=args, prog_name="cpcluster certify", standalone_mode=False)


def run_aggregate(plan: DemoPlan, root: str, echo: Callable):
    from cpcluster.aggregate.pipeline import run_aggregate as aggregate
    from cpcluster.core.config import AggregateOptions

    dirs = run_dirs(plan, root)
    out = os.path.join(root, "aggregate")
    radii = ",".join(f"{r:g}" for r in plan.radii)
    echo(f"$ cpcluster aggregate {' '.join(dirs)} --alpha {plan.alpha:g} --radii {radii} --out {out}")
    return aggregate(AggregateOptions(paths=tuple(dirs), alpha=plan.alpha, radii=plan.radii, out=out))


# --------------------------------------------------------------------------------------------------- the demo
@dataclass
class DemoResult:
    """What a demo run produced: the fine-tuning metadata, the aggregation result and the wall time per stage."""

    root: str
    finetune: dict
    evals: list  # held-out records of the fine-tuning run (step 0 = before, last = after)
    aggregate: object  # cpcluster.aggregate.pipeline.AggregateResult
    seconds: dict
    classifiers: dict = field(default_factory=dict)  # CLS-FT runs: prefix -> (final folder, eval records)
    quality: str = ""  # the printed quality table
    grid: str = ""  # the grid PNG


def label(method: str) -> str:
    """Which of the demo's methods an aggregate method name is."""
    if method == "none":
        return "no purifier"
    if method == "consistency(demo)":
        return "before fine-tuning"
    if method.startswith("consistency(finetuned:") and method.endswith("[DM-FT]"):
        return "after fine-tuning (DM-FT)"
    if "[DM-FT + CLS-FT:" in method:
        return "both (DM-FT + CLS-FT)"
    return "classifier fine-tuned (CLS-FT)" if "[CLS-FT:" in method else method


def run_demo(plan: DemoPlan, out: str, echo: Callable = print, warn: Callable | None = None,
             workers: int | None = None, overwrite: bool = False) -> DemoResult:
    """Fine-tune, certify three purifiers at every sigma of ``plan``, aggregate; see the module docstring.

    ``echo`` / ``warn`` print a line (normal / loud); ``workers`` shard processes at once (default: one per core,
    at most 8). Earlier demo results in ``out`` made with other settings are refused with an :class:`InputError`
    unless ``overwrite``, which deletes the demo's folders in ``out`` first (:func:`demo_paths`) and starts over.
    """
    warn = warn or echo
    root = out if plan.name == "full" else os.path.join(out, plan.name)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"--workers {workers}: must be at least 1 (or leave it out: one per CPU core)")
    workers = workers or default_workers()
    check_models()
    if overwrite:
        import shutil

        for path in demo_paths(plan, root):
            if os.path.isdir(path):
                shutil.rmtree(path)
    try:
        return _stages(plan, root, echo, warn, workers)
    except InputError as e:
        if "another configuration" not in str(e) and "holds another run" not in str(e):
            raise
        raise InputError(f"{e}. For the demo: rerun with `cpcluster demo --overwrite`, or delete {out} "
                         "(`make clean` deletes demo-out)") from None


def demo_paths(plan: DemoPlan, root: str) -> list[str]:
    """The folders a demo run writes under ``root``: fine-tuning runs, certify runs, aggregation, quality."""
    from cpcluster.orchestrate.demo_evidence import CLS_RUNS

    return [os.path.join(root, "finetune"), *(os.path.join(root, p) for p, _, _ in CLS_RUNS), *run_dirs(plan, root),
            os.path.join(root, "aggregate"), os.path.join(root, "quality")]


def _stages(plan: DemoPlan, root: str, echo: Callable, warn: Callable, workers: int) -> DemoResult:
    from cpcluster.core.fid import RANDOM_WEIGHTS_WARNING
    from cpcluster.core.losses import RANDOM_BACKBONE_WARNING
    from cpcluster.demo import evidence
    from cpcluster.jobs.finetune_io import read_metrics

    seconds, start, ev = {}, time.perf_counter(), plan.evidence
    config = finetune_config(plan, root)
    warn(RANDOM_BACKBONE_WARNING.format(net=config.lpips_net))
    echo(f"\n[1/5] LPIPS fine-tuning of the demo denoiser (DM-FT): {config.steps} steps of {config.batch_size} "
         f"digits, from `demo` (trained with the L2 loss) -> {config.out}/final")
    tic = time.perf_counter()
    meta = run_finetune(config, echo)
    evals = [r for r in read_metrics(config.out) if r.get("kind") == "eval"]
    for line in eval_lines(evals):
        echo(line)
    final = os.path.join(config.out, "final")
    echo(f"\n[2/5] classifier fine-tuning on purified digits at sigma {ev.sigma:g} (CLS-FT, and both)")
    classifiers = evidence.run_classifiers(plan, root, final, echo)
    seconds["finetune"] = time.perf_counter() - tic

    echo(f"\n[3/5] certification: {len(METHODS)} purifiers x sigma {', '.join(f'{s:g}' for s in plan.sigmas)}, "
         f"then the two fine-tuned classifiers at sigma {ev.sigma:g}; {plan.shards} shards each, {workers} at a "
         "time (local executor)")
    tic = time.perf_counter()
    for method in METHODS:
        echo(f"\n-- {method[1]}")
        run_certify(certify_args(plan, root, method, final, workers), echo)
    for prefix, what, denoiser in evidence.CLS_RUNS:
        echo(f"\n-- {what}")
        run_certify(evidence.cls_certify_args(plan, root, prefix, denoiser.format(final=final),
                                              f"finetuned:{classifiers[prefix][0]}", workers), echo)
    seconds["certify"] = time.perf_counter() - tic

    echo("\n[4/5] aggregation")
    tic = time.perf_counter()
    result = run_aggregate(plan, root, echo)
    seconds["aggregate"] = time.perf_counter() - tic

    echo(f"\n[5/5] purification quality at sigma {ev.sigma:g} on {ev.quality_images} test digits, and a grid")
    warn(RANDOM_WEIGHTS_WARNING)
    tic = time.perf_counter()
    quality = evidence.run_quality(plan, root, final, echo)
    grid = evidence.run_grid(plan, root, final, echo)
    seconds["quality"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - start
    return DemoResult(root=root, finetune=meta, evals=evals, aggregate=result, seconds=seconds,
                      classifiers=classifiers, quality=quality, grid=grid)


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


def story_lines(result: DemoResult, plan: DemoPlan) -> list[str]:
    """The table's reading: certified accuracy and ACR per purifier at each sigma, in words."""
    agg = result.aggregate
    lines = ["methods: " + "; ".join(f"{m} = {label(m)}" for m in sorted({r.group.plan.method for r in agg.results}))]
    mid = plan.radii[len(plan.radii) // 2]
    k = list(plan.radii).index(mid)
    for sigma in plan.sigmas:
        rows = [r for r in agg.results if r.group.plan.sigma == sigma]
        parts = [f"{label(r.group.plan.method)} {100 * r.certified_accuracy[k]:.0f}% (ACR {r.acr:.3f})" for r in rows]
        lines.append(f"sigma {sigma:g}, certified accuracy at radius {mid:g}: " + ", ".join(parts))
    return lines
