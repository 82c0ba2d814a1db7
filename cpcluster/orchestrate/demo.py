"""``cpcluster demo`` as a function: the Consistency Purification story in miniature, on this machine.

1. **fine-tune** the shipped one-step denoiser ``demo`` (trained with the L2 loss) with LPIPS (DM-FT), through the
   project's fine-tuning job run by the local executor; then the demo classifier behind the purifier before
   (CLS-FT) and after (both) that fine-tuning;
2. **certify** the demo test digits at sigma 0.25, 0.5 and 1.0, each run cut into several shards run by the local
   executor, for three purifiers in front of the same clean-trained classifier: none, the denoiser before
   fine-tuning (``demo``) and after (``finetuned:<out>/finetune/final``); and the two fine-tuned classifiers at the
   evidence sigma;
3. **aggregate** every run: the certified-accuracy table in the terminal, ``certified_accuracy.png``,
   ``summary.json`` (:func:`cpcluster.aggregate.pipeline.run_aggregate`);
4. **purification quality** and a **grid** at the evidence sigma.

The sizes are in :mod:`cpcluster.orchestrate.demo_plan`, the stages in :mod:`cpcluster.orchestrate.demo_stages`;
each prints the command line that does the same. Everything runs on the CPU and lands under ``<out>``
(``<out>/quick`` for the quick preset). A rerun with the same settings reuses the finished fine-tunings and the
finished shards (certify resumes); only aggregation is redone. Measured on the project's 2-core machine: about 5
minutes for ``FULL`` (README.md has the output), about a minute for ``QUICK``.

LPIPS runs on a *randomly initialised* AlexNet trunk (no ImageNet weights can be downloaded here): the demo shows
the machinery, not the paper's perceptual metric. The output says so.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from cpcluster.orchestrate.demo_plan import (CLS_RUNS, METHODS, DemoPlan, certify_request, cls_certify_request,
                                             default_workers, demo_paths, finetune_config)
from cpcluster.orchestrate import demo_stages as stages
from cpcluster.util.errors import InputError


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
    stages.check_models()
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


def _stages(plan: DemoPlan, root: str, echo: Callable, warn: Callable, workers: int) -> DemoResult:
    from cpcluster.core.fid import RANDOM_WEIGHTS_WARNING
    from cpcluster.core.losses import RANDOM_BACKBONE_WARNING
    from cpcluster.jobs.finetune_io import read_metrics

    seconds, start, ev = {}, time.perf_counter(), plan.evidence
    config = finetune_config(plan, root)
    warn(RANDOM_BACKBONE_WARNING.format(net=config.lpips_net))
    echo(f"\n[1/5] LPIPS fine-tuning of the demo denoiser (DM-FT): {config.steps} steps of {config.batch_size} "
         f"digits, from `demo` (trained with the L2 loss) -> {config.out}/final")
    tic = time.perf_counter()
    meta = stages.run_finetune(config, echo)
    evals = [r for r in read_metrics(config.out) if r.get("kind") == "eval"]
    for line in stages.eval_lines(evals):
        echo(line)
    final = os.path.join(config.out, "final")
    echo(f"\n[2/5] classifier fine-tuning on purified digits at sigma {ev.sigma:g} (CLS-FT, and both)")
    classifiers = stages.run_classifiers(plan, root, final, echo)
    seconds["finetune"] = time.perf_counter() - tic

    echo(f"\n[3/5] certification: {len(METHODS)} purifiers x sigma {', '.join(f'{s:g}' for s in plan.sigmas)}, "
         f"then the two fine-tuned classifiers at sigma {ev.sigma:g}; {plan.shards} shards each, {workers} at a "
         "time (local executor)")
    tic = time.perf_counter()
    for method in METHODS:
        echo(f"\n-- {method[1]}")
        stages.run_certify(certify_request(plan, root, method, final, workers), echo)
    for prefix, what, denoiser in CLS_RUNS:
        echo(f"\n-- {what}")
        stages.run_certify(cls_certify_request(plan, root, prefix, denoiser.format(final=final),
                                               f"finetuned:{classifiers[prefix][0]}", workers), echo)
    seconds["certify"] = time.perf_counter() - tic

    echo("\n[4/5] aggregation")
    tic = time.perf_counter()
    result = stages.run_aggregate(plan, root, echo)
    seconds["aggregate"] = time.perf_counter() - tic

    echo(f"\n[5/5] purification quality at sigma {ev.sigma:g} on {ev.quality_images} test digits, and a grid")
    warn(RANDOM_WEIGHTS_WARNING)
    tic = time.perf_counter()
    quality = stages.run_quality(plan, root, final, echo)
    grid = stages.run_grid(plan, root, final, echo)
    seconds["quality"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - start
    return DemoResult(root=root, finetune=meta, evals=evals, aggregate=result, seconds=seconds,
                      classifiers=classifiers, quality=quality, grid=grid)


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
