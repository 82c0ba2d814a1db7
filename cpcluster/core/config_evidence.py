"""Frozen dataclass configs of the jobs behind the paper's other evidence: classifier fine-tuning (CLS-FT) and
purification quality. Like :mod:`cpcluster.core.config`, they are what gets pickled, hashed and written beside results;
invalid values raise :class:`InputError` at construction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cpcluster.core.choices import (BATCHNORM_MODES, DEVICES, LPIPS_NETS, OPTIMIZERS, SCHEDULES, TIME_RULES,
                                    check_choices, check_solver_steps)
from cpcluster.core.config import TrainingConfig, check_training
from cpcluster.models.purifiers import PURIFIER_NAMES
from cpcluster.util.errors import InputError

# ------------------------------------------------------------------------------------------ classifier fine-tuning
# Fields that may change between a run and its resumption without changing what is trained (``steps`` too, but only
# under the constant schedule: the cosine and step schedules are functions of the total number of steps).
CLASSIFIER_RESUME_FREE = frozenset({"out", "nodes", "ranks_per_node", "device", "log_every", "eval_every",
                                    "checkpoint_every", "keep_checkpoints", "eval_batch"})


@dataclass(frozen=True)
class ClassifierFinetuneConfig(TrainingConfig):
    """One classifier fine-tuning run behind a frozen purifier (CLS-FT, ``jobs/finetune_classifier.py``).

    Minimises ``E_{(x, y), s ~ U{sigmas}, z} CE(classifier(purify_s(x + s z)), y)`` over the classifier's weights;
    ``x`` in pixel space [0, 1], ``sigmas`` pixel-space smoothing levels, ``purify_s`` the certification purifier
    ``purifier`` built on ``denoiser`` for sigma ``s`` (``purifier="none"``: Gaussian data augmentation). With a
    fine-tuned denoiser (``finetuned:DIR``) this is the "both" recipe. ``batch_size`` is the global batch, split
    evenly over ``nodes * ranks_per_node`` ranks. Learning rate at 0-based step ``k``: linear warm-up over
    ``warmup_steps``, then ``constant``, ``cosine`` (to 0 at ``steps``) or ``step`` (times ``lr_gamma`` every
    ``lr_step_every`` steps). ``batchnorm``: ``train`` (per-rank batch statistics), ``frozen`` (running statistics
    kept, BatchNorm layers in eval mode) or ``sync`` (SyncBatchNorm, CUDA ranks).
    """

    classifier: str
    data: str
    out: str
    denoiser: str | None = "demo"
    purifier: str = "consistency"
    purifier_steps: int | str | None = None  # pf-ode solver steps, or "grid"
    sigmas: tuple = (0.25, 0.5, 1.0)
    steps: int = 2000
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    lr_step_every: int = 1000  # the step schedule's period
    lr_gamma: float = 0.1
    ema_decay: float = 0.0  # 0 = no EMA; the exported weights are the EMA when it is on
    grad_clip: float = 0.0
    batchnorm: str = "train"
    time_rule: str = "nearest"
    purifier_label: str = "random"
    seed: int = 0
    eval_data: str | None = None  # None: hold out the last eval_images images of `data`
    eval_images: int = 256
    eval_every: int = 500
    eval_batch: int = 128
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    nodes: int = 1
    ranks_per_node: int = 1
    device: str = "auto"
    amp: bool = True

    def __post_init__(self):
        check_training(self, ("steps", "batch_size", "nodes", "ranks_per_node", "eval_batch", "checkpoint_every",
                              "keep_checkpoints", "log_every", "lr_step_every"),
                       ("eval_images", "eval_every", "warmup_steps"),
                       {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "batchnorm": BATCHNORM_MODES,
                        "purifier": PURIFIER_NAMES, "time_rule": TIME_RULES, "device": DEVICES})
        if not 0 <= self.momentum < 1:
            raise InputError(f"--momentum {self.momentum}: must be in [0, 1)")
        if self.weight_decay < 0:
            raise InputError(f"--weight-decay {self.weight_decay}: must be 0 or more")
        if not 0 < self.lr_gamma <= 1:
            raise InputError(f"--lr-gamma {self.lr_gamma}: must be in (0, 1]")
        check_solver_steps(self.purifier_steps)
        if self.purifier == "none":
            object.__setattr__(self, "denoiser", None)
        elif not self.denoiser:
            raise InputError(f"--purifier {self.purifier} needs a --denoiser SPEC (or use --purifier none)")

    def run_dict(self) -> dict:
        """What defines the trained weights; a checkpoint resumes only under an equal ``run_dict``."""
        free = CLASSIFIER_RESUME_FREE | ({"steps"} if self.schedule == "constant" else set())
        return {"job": "finetune-classifier", **{k: v for k, v in self.to_dict().items() if k not in free}}


# ---------------------------------------------------------------------------------------------- purification quality
QUALITY_PURIFIERS = ("clean",) + PURIFIER_NAMES
# Fields that do not change what a quality run measures: where and how fast it runs.
QUALITY_RUN_FREE = frozenset({"run_dir", "batch", "device", "threads"})


@dataclass(frozen=True)
class QualityConfig:
    """One purification-quality run (``jobs/quality.py``): a purifier at one pixel-space ``sigma`` -- or, with
    ``purifier="clean"``, the clean images themselves (the FID reference; no noise, no sigma) -- on the selected
    images of ``dataset`` (``indices``, then every ``skip``-th, then the first ``max_images``), cut into
    ``num_shards`` contiguous shards of images.

    Per image it records the Inception pool3 features of the purified image, the purified image itself (for the
    transport distance), LPIPS and L2 to the clean image and the classifier's prediction. The noise of image ``i``
    is a function of ``(seed, i)`` only: every purifier sees the same noisy images, however the run is split.
    """

    run_dir: str
    dataset: str = "demo"
    purifier: str = "consistency"
    denoiser: str | None = "demo"
    sigma: float | None = 0.5
    classifier: str = "demo"
    num_shards: int = 1
    skip: int = 1
    max_images: int | None = None
    indices: tuple | None = None
    seed: int = 0
    purifier_steps: int | str | None = None  # pf-ode solver steps, or "grid"
    time_rule: str = "nearest"
    purifier_label: str = "random"
    lpips_net: str = "vgg"
    lpips_resize: int = 224
    lpips_random_backbone: bool = False  # tests and the demo only
    inception_weights: str | None = None  # None: <torch hub>/checkpoints/weights-inception-2015-12-05-6726825d.pth
    inception_random_weights: bool = False  # tests and the demo only: a seeded random stand-in
    batch: int = 64
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        if self.purifier not in QUALITY_PURIFIERS:
            raise InputError(f"--purifier {self.purifier!r}: use one of {', '.join(QUALITY_PURIFIERS)}")
        check_solver_steps(self.purifier_steps)
        if self.purifier == "clean":
            object.__setattr__(self, "sigma", None)
            object.__setattr__(self, "denoiser", None)
        else:
            if self.sigma is None or not 0.0 < float(self.sigma) < float("inf"):
                raise InputError(f"--sigma {self.sigma}: give a positive pixel-space noise level, e.g. --sigma 0.5")
            object.__setattr__(self, "sigma", float(self.sigma))
            if self.purifier == "none":
                object.__setattr__(self, "denoiser", None)
            elif not self.denoiser:
                raise InputError(f"--purifier {self.purifier} needs a denoiser, e.g. {self.purifier}:demo")
        if self.indices is not None:
            object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        for name, least in (("num_shards", 1), ("skip", 1), ("batch", 1), ("seed", 0), ("lpips_resize", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"--{name.replace('_', '-').replace('num-', '')} {value}: must be an integer >= {least}")
        if self.max_images is not None and self.max_images < 1:
            raise InputError(f"--max-images {self.max_images}: must be at least 1")
        check_choices(self, {"lpips_net": LPIPS_NETS, "time_rule": TIME_RULES, "device": DEVICES})
        if not self.run_dir:
            raise InputError("--out is required: a folder or fsspec URL for the quality shards")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["indices"] = list(self.indices) if self.indices is not None else None
        return d

    def run_dict(self) -> dict:
        """What the measurements depend on (the shard files' config adds the models' and data's hashes)."""
        return {k: v for k, v in self.to_dict().items() if k not in QUALITY_RUN_FREE}
