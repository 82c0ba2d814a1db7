"""The demo's share of the paper's other evidence, small enough for ``make demo`` (one sigma, few steps and images).

* **CLS-FT and "both"**: the demo classifier fine-tuned on purified noisy digits at ``EvidencePlan.sigma``
  (:mod:`cpcluster.jobs.finetune_classifier`, local executor) behind the demo purifier before LPIPS fine-tuning
  (CLS-FT) and behind the LPIPS-fine-tuned one (both); each then certified exactly like the other runs (same
  images, draws and shards), so the aggregate table shows the purifier fine-tuned ([DM-FT]), the classifier
  ([CLS-FT: ...]) or both side by side at that sigma.
* **purification quality** at that sigma: ``cpcluster quality`` (the clean reference, no purifier, the purifier
  before and after LPIPS fine-tuning) and ``cpcluster quality-report``.
* **a grid**: ``cpcluster grid`` of a few test digits.

Honesty. No weights can be downloaded here: the LPIPS trunk and the Inception network are randomly initialised, so
the "FID" column is a Frechet distance between random features, not an FID, and LPIPS is LPIPS* as in the
fine-tuning. The transport distance, L2 and accuracy columns are what they say. The sigma is 1.0 because that is
where the clean-trained classifier loses most on purified digits (held-out accuracy 0.56, against 0.85 at 0.5),
so where fine-tuning the classifier has room to matter.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Callable

# (run-name prefix, what it is, denoiser of the purifier the classifier is trained behind and certified with)
CLS_RUNS = (("cls-ft", "classifier fine-tuned behind the purifier before LPIPS fine-tuning (CLS-FT)", "demo"),
            ("both", "classifier fine-tuned behind the LPIPS-fine-tuned purifier (DM-FT + CLS-FT)",
             "finetuned:{final}"))


@dataclass(frozen=True)
class EvidencePlan:
    """Sizes of the demo's evidence stages (``cls_ft``: ClassifierFinetuneConfig fields)."""

    sigma: float = 1.0
    cls_ft: dict = field(default_factory=dict)
    cls_shards: int = 2  # shards of each CLS-FT certify run
    quality_skip: int = 10
    quality_images: int = 32
    grid_indices: str = "0-9"


def cls_config(plan, root: str, prefix: str, denoiser: str):
    """The ClassifierFinetuneConfig of one demo classifier run, into ``<root>/<prefix>``."""
    from cpcluster.core.config_evidence import ClassifierFinetuneConfig

    ev = plan.evidence
    steps = ev.cls_ft["steps"]
    return ClassifierFinetuneConfig(out=os.path.join(root, prefix), denoiser=denoiser, sigmas=(ev.sigma,),
                                    checkpoint_every=steps, log_every=max(1, steps // 10), **ev.cls_ft)


def run_classifiers(plan, root: str, final: str, echo: Callable) -> dict:
    """Fine-tune (or reuse) the two demo classifiers; ``{prefix: (final folder, [eval records])}``."""
    from cpcluster.jobs.finetune_io import read_metrics
    from cpcluster.orchestrate.demo import run_finetune

    out = {}
    for prefix, what, denoiser in CLS_RUNS:
        config = cls_config(plan, root, prefix, denoiser.format(final=final))
        echo(f"-- {what}: {config.steps} steps of {config.batch_size} digits at sigma {plan.evidence.sigma:g}, "
             f"{config.optimizer} lr {config.lr:g} -> {config.out}/final")
        run_finetune(config, echo, target="classifier", desc=prefix)
        evals = [r for r in read_metrics(config.out) if r.get("kind") == "eval"]
        out[prefix] = (os.path.join(config.out, "final"), evals)
        if evals:
            first, last = min(evals, key=lambda r: r["step"]), max(evals, key=lambda r: r["step"])
            echo(f"   held-out accuracy of classifier(purified) on {first['images']} test digits, one noise draw "
                 f"each: {first['acc']:.3f} -> {last['acc']:.3f}")
    return out


def cls_certify_args(plan, root: str, prefix: str, denoiser: str, classifier: str, workers: int) -> list[str]:
    """``cpcluster certify`` arguments of one CLS-FT run: the main runs' settings at the evidence sigma only, in
    ``cls_shards`` shards (the counts do not depend on the split; one per core of a 2-core machine idles none)."""
    from cpcluster.orchestrate.demo import certify_args

    return certify_args(plan, root, (prefix, "", ("--denoiser", denoiser)), "", workers,
                        sigmas=(plan.evidence.sigma,), classifier=classifier, shards=plan.evidence.cls_shards)


def cls_run_dirs(plan, root: str) -> list[str]:
    return [os.path.join(root, "certify", f"{prefix}-sigma{plan.evidence.sigma:g}") for prefix, _, _ in CLS_RUNS]


def _cli(command, args: list[str], echo: Callable, name: str) -> None:
    """``cpcluster NAME ARGS`` in this process, its command line echoed first."""
    echo(f"$ cpcluster {name} " + " ".join(shlex.quote(a) for a in args))
    command.main(args=args, prog_name=f"cpcluster {name}", standalone_mode=False)


def run_quality(plan, root: str, final: str, echo: Callable) -> str:
    """``cpcluster quality`` + ``quality-report`` at the evidence sigma; returns the printed table. The shard jobs
    run in this process (``--executor debug``): here they are small, and starting a process each costs more."""
    from cpcluster.aggregate.quality_report import write_report
    from cpcluster.cli.quality_cmd import quality

    ev, out = plan.evidence, os.path.join(root, "quality")
    args = ["--purifier", "none", "--purifier", "demo=consistency:demo", "--purifier",
            f"finetuned=consistency:{'finetuned:' + final}", "--sigma", f"{ev.sigma:g}", "--skip",
            str(ev.quality_skip), "--max-images", str(ev.quality_images), "--lpips-net", "alex", "--lpips-resize",
            "64", "--lpips-random-backbone", "--inception-random-weights", "--device", "cpu", "--executor", "debug",
            "--out", out]
    _cli(quality, args, echo, "quality")
    runs = [os.path.join(out, name) for name in ("clean", f"none-sigma{ev.sigma:g}", f"demo-sigma{ev.sigma:g}",
                                                 f"finetuned-sigma{ev.sigma:g}")]
    echo(f"$ cpcluster quality-report {' '.join(runs)} --out {out}/report")
    text, _ = write_report(runs, os.path.join(out, "report"))
    return text


def run_grid(plan, root: str, final: str, echo: Callable) -> str:
    """``cpcluster grid`` of the demo purifier before and after LPIPS fine-tuning; returns the PNG path."""
    from cpcluster.cli.grid_cmd import grid

    png = os.path.join(root, "grid.png")
    _cli(grid, ["--purifier", "demo=consistency:demo", "--purifier",
                f"finetuned=consistency:finetuned:{final}", "--sigma", f"{plan.evidence.sigma:g}", "--indices",
                plan.evidence.grid_indices, "--out", png], echo, "grid")
    return png
