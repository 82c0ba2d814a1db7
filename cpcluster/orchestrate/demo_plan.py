"""What ``cpcluster demo`` runs: its sizes (:data:`FULL` for ``make demo``, :data:`QUICK` for ``--quick``), the
fine-tuning configs, the certify runs as command lines, and the folders it writes. Nothing here runs anything.

A certify run of the demo is a *request*: the ``cpcluster certify`` options as ``(option, value)`` pairs. The demo
prints it as the command line a user would type (:func:`command_line`) and runs it through the same functions that
command calls (:func:`certify_configs`); ``tests/test_demo.py`` checks that the command parses into those configs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# (run-name prefix, what it is, certify options naming the purifier)
METHODS = (("none", "no purifier", ("--purifier", "none")),
           ("demo", "denoiser before fine-tuning", ("--denoiser", "demo")),
           ("finetuned", "denoiser after fine-tuning", ("--denoiser", "finetuned:{final}")))
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
    shards: int = 2  # per sigma and purifier (run by the local executor, `workers` at a time)
    draw_batch: int = 100
    batch: int = 400
    radii: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    finetune: dict = field(default_factory=dict)  # FinetuneConfig fields
    evidence: EvidencePlan = field(default_factory=EvidencePlan)  # CLS-FT, quality, grid (demo_stages.py)


FINETUNE_COMMON = dict(model="demo", data="demo:train", eval_data="demo", loss="lpips", lpips_net="alex",
                       lpips_resize=64, lpips_random_backbone=True, classifier="demo", eval_every=0,
                       keep_checkpoints=1, device="cpu")
CLS_FT_COMMON = dict(classifier="demo", data="demo:train", eval_data="demo", optimizer="radam", lr=1e-3,
                     eval_every=0, keep_checkpoints=1, device="cpu")
FULL = DemoPlan("full", skip=5, n0=100, n=500, shards=2,
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
    """The FinetuneConfig of the demo's LPIPS fine-tuning, into ``<root>/finetune``."""
    from cpcluster.core.config import FinetuneConfig

    steps = plan.finetune["steps"]
    return FinetuneConfig(out=os.path.join(root, "finetune"), checkpoint_every=max(1, steps // 20),
                          log_every=max(1, steps // 20), **plan.finetune)


def cls_config(plan: DemoPlan, root: str, prefix: str, denoiser: str):
    """The ClassifierFinetuneConfig of one demo classifier run, into ``<root>/<prefix>``."""
    from cpcluster.core.config_evidence import ClassifierFinetuneConfig

    ev = plan.evidence
    steps = ev.cls_ft["steps"]
    return ClassifierFinetuneConfig(out=os.path.join(root, prefix), denoiser=denoiser, sigmas=(ev.sigma,),
                                    checkpoint_every=steps, log_every=max(1, steps // 10), **ev.cls_ft)


# ------------------------------------------------------------------------------------------------ certify runs
def certify_request(plan: DemoPlan, root: str, method: tuple, final: str, workers: int, sigmas=None,
                    classifier: str = "demo", shards: int | None = None) -> list[tuple[str, object]]:
    """The ``cpcluster certify`` options of one purifier's runs (one per sigma, default: the plan's)."""
    prefix, _, purifier = method
    request = [(purifier[0], purifier[1].format(final=final))]
    request += [("--sigma", s) for s in sigmas or plan.sigmas]
    request += [("--dataset", "demo"), ("--classifier", classifier), ("--skip", plan.skip), ("--n0", plan.n0),
                ("--n", plan.n), ("--block-size", _block(plan)), ("--draw-batch", plan.draw_batch),
                ("--batch", plan.batch), ("--shards", shards or plan.shards), ("--device", "cpu"),
                ("--executor", "local"), ("--workers", workers), ("--out", os.path.join(root, "certify")),
                ("--name", f"{prefix}-sigma{{sigma}}")]
    if plan.max_images is not None:
        request.append(("--max-images", plan.max_images))
    return request


def cls_certify_request(plan: DemoPlan, root: str, prefix: str, denoiser: str, classifier: str,
                        workers: int) -> list[tuple[str, object]]:
    """The options of one CLS-FT run: the main runs' settings at the evidence sigma only, in ``cls_shards`` shards
    (the counts do not depend on the split; one per core of a 2-core machine idles none)."""
    return certify_request(plan, root, (prefix, "", ("--denoiser", denoiser)), "", workers,
                           sigmas=(plan.evidence.sigma,), classifier=classifier, shards=plan.evidence.cls_shards)


def command_line(request: list[tuple[str, object]]) -> list[str]:
    """The arguments of a request as typed (floats as ``%g``; a flag's value is None)."""
    return [text for option, value in request for text in
            ((option,) if value is None else (option, f"{value:g}" if isinstance(value, float) else str(value)))]


def certify_args(plan: DemoPlan, root: str, method: tuple, final: str, workers: int, **kwargs) -> list[str]:
    """:func:`certify_request` as ``cpcluster certify`` arguments."""
    return command_line(certify_request(plan, root, method, final, workers, **kwargs))


# Request options -> CertifyConfig fields (the other options say where the runs go and how they run).
_FIELDS = {"--purifier": "purifier", "--denoiser": "denoiser", "--dataset": "dataset", "--classifier": "classifier",
           "--skip": "skip", "--n0": "n0", "--n": "n", "--block-size": "block_size", "--draw-batch": "draw_batch",
           "--batch": "batch", "--shards": "num_shards", "--device": "device", "--max-images": "max_images"}


def certify_configs(request: list[tuple[str, object]]) -> tuple[list, str, int]:
    """``(configs, executor, workers)`` of a request, through :func:`cpcluster.orchestrate.certify.build_configs`
    as ``cpcluster certify`` builds them."""
    from cpcluster.orchestrate.certify import build_configs

    options = dict(request)
    fields = {_FIELDS[option]: value for option, value in request if option in _FIELDS}
    sigmas = [value for option, value in request if option == "--sigma"]
    return build_configs(sigmas, options["--out"], options["--name"], **fields), options["--executor"], \
        options["--workers"]


def quality_request(plan: DemoPlan, root: str, final: str) -> list[tuple[str, object]]:
    """The ``cpcluster quality`` options of the demo: the clean reference, no purifier, the purifier before and after
    LPIPS fine-tuning at the evidence sigma. The shard jobs run in this process (``--executor debug``): here they
    are small, and starting a process each costs more."""
    ev = plan.evidence
    return [("--purifier", "none"), ("--purifier", "demo=consistency:demo"),
            ("--purifier", f"finetuned=consistency:finetuned:{final}"), ("--sigma", ev.sigma),
            ("--skip", ev.quality_skip), ("--max-images", ev.quality_images), ("--lpips-net", "alex"),
            ("--lpips-resize", 64), ("--lpips-random-backbone", None), ("--inception-random-weights", None),
            ("--device", "cpu"), ("--executor", "debug"), ("--out", os.path.join(root, "quality"))]


_QUALITY_FIELDS = {"--skip": "skip", "--max-images": "max_images", "--lpips-net": "lpips_net",
                   "--lpips-resize": "lpips_resize", "--lpips-random-backbone": "lpips_random_backbone",
                   "--inception-random-weights": "inception_random_weights", "--device": "device"}


def quality_configs(request: list[tuple[str, object]]) -> tuple[list, str]:
    """``(configs, executor)`` of a quality request, through :func:`cpcluster.orchestrate.quality.build_configs` as
    ``cpcluster quality`` builds them."""
    from cpcluster.orchestrate.quality import build_configs

    options = dict(request)
    fields = {_QUALITY_FIELDS[option]: True if value is None else value for option, value in request
              if option in _QUALITY_FIELDS}
    purifiers = [value for option, value in request if option == "--purifier"]
    sigmas = [value for option, value in request if option == "--sigma"]
    return build_configs(purifiers, sigmas, options["--out"], **fields), options["--executor"]


def grid_request(plan: DemoPlan, root: str, final: str) -> list[tuple[str, object]]:
    """The ``cpcluster grid`` options of the demo: its purifier before and after LPIPS fine-tuning."""
    return [("--purifier", "demo=consistency:demo"), ("--purifier", f"finetuned=consistency:finetuned:{final}"),
            ("--sigma", plan.evidence.sigma), ("--indices", plan.evidence.grid_indices),
            ("--out", os.path.join(root, "grid.png"))]


def _block(plan: DemoPlan) -> int:
    """Estimation draws per unit: n split in two blocks (rounded up to whole noise batches)."""
    half = -(-plan.n // 2)
    return max(plan.draw_batch, -(-half // plan.draw_batch) * plan.draw_batch)


# ---------------------------------------------------------------------------------------------------- folders
def run_dirs(plan: DemoPlan, root: str) -> list[str]:
    """Every certify run folder of the demo: the purifiers at every sigma, then the CLS-FT runs."""
    return [os.path.join(root, "certify", f"{m[0]}-sigma{s:g}") for m in METHODS for s in plan.sigmas] + \
        cls_run_dirs(plan, root)


def cls_run_dirs(plan: DemoPlan, root: str) -> list[str]:
    return [os.path.join(root, "certify", f"{prefix}-sigma{plan.evidence.sigma:g}") for prefix, _, _ in CLS_RUNS]


def demo_paths(plan: DemoPlan, root: str) -> list[str]:
    """The folders a demo run writes under ``root``: fine-tuning runs, certify runs, aggregation, quality."""
    return [os.path.join(root, "finetune"), *(os.path.join(root, p) for p, _, _ in CLS_RUNS), *run_dirs(plan, root),
            os.path.join(root, "aggregate"), os.path.join(root, "quality")]


def default_workers() -> int:
    """Shard processes at once: one per core (one torch thread each), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
