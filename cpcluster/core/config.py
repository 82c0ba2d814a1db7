"""Frozen dataclass configs, one per job kind. They are what gets pickled, hashed and written beside results."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cpcluster.core.choices import (AGGREGATE_FORMATS, DEVICES, DTYPES, FINETUNE_LOSSES, LPIPS_NETS, MODES, TIME_RULES,
                                    check_choices, check_label_policy, check_solver_steps)
from cpcluster.core.journal import MAX_DRAWS  # draws one unit may hold, so also per image and stream
from cpcluster.sharding.seeds import MAX_BATCH as MAX_NOISE_BATCHES  # noise batches per (image, stream)
from cpcluster.sharding.seeds import check_batching, check_forward_batch
from cpcluster.util.errors import InputError


# ------------------------------------------------------------------------------------------------------ aggregate
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class AggregateOptions:
    """One ``cpcluster aggregate`` run (DESIGN.md section 5, ``aggregate/pipeline.py``).

    ``paths`` are shard files, globs, directories or fsspec URLs; ``radii`` are pixel-space L2 radii for the table;
    ``out`` is the output folder (None: ``<deepest folder holding every input>/aggregate``). Invalid values raise
    :class:`InputError` at construction.
    """

    paths: tuple
    alpha: float = 0.001
    radii: tuple = DEFAULT_RADII
    out: str | None = None
    allow_partial: bool = False
    format: str = "md"
    plot: bool = True
    cost_radius: float | None = None  # radius of the cost plot; None: the middle entry of radii

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "radii", tuple(float(r) for r in self.radii))
        if not self.paths:
            raise InputError("no PATHS given: name shard files, globs or run folders, e.g. results/*.h5")
        if not 0.0 < float(self.alpha) < 1.0:  # also refuses NaN
            raise InputError(f"--alpha {self.alpha}: must lie strictly between 0 and 1, e.g. 0.001")
        if not self.radii or any(not (0.0 <= r < float("inf")) for r in self.radii):
            raise InputError(f"--radii {','.join(map(str, self.radii)) or '(empty)'}: give finite radii >= 0, "
                             "e.g. --radii 0,0.25,0.5,0.75,1.0")
        if len(set(self.radii)) != len(self.radii) or list(self.radii) != sorted(self.radii):
            raise InputError(f"--radii {','.join(f'{r:g}' for r in self.radii)}: list each radius once, "
                             "in increasing order")
        if self.cost_radius is not None and not 0.0 <= float(self.cost_radius) < float("inf"):
            raise InputError(f"--cost-radius {self.cost_radius}: give a finite radius >= 0, e.g. --cost-radius 0.5")
        check_choices(self, {"format": AGGREGATE_FORMATS})

    @property
    def radius_for_cost(self) -> float:
        """The radius of the cost plot: ``cost_radius``, or the middle of ``radii``."""
        return float(self.cost_radius) if self.cost_radius is not None else self.radii[len(self.radii) // 2]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["paths"], d["radii"] = list(self.paths), list(self.radii)
        return d


# -------------------------------------------------------------------------------------------------------- certify
MAX_BATCH = 2**20  # draws in one forward pass
# Fields that do not change the counts' meaning: they stay out of the shard config and its hash, so a run can be
# resumed with other values (where it runs, how it is split, how many draws go through one forward).
CERTIFY_RUN_FREE = frozenset({"run_dir", "num_shards", "batch", "device", "threads", "tune_malloc"})


@dataclass(frozen=True)
class CertifyConfig:
    """One certification run at one pixel-space ``sigma`` (DESIGN.md sections 1, 3, 4; ``jobs/certify.py``).

    The run's shards go to ``run_dir``. Per image: ``n0`` selection draws (one unit) and ``n`` estimation draws
    in blocks of ``block_size``; ``mode="predict"`` has no selection draws. Noise is drawn in batches of
    ``draw_batch`` (a block is a whole number of them) and ``batch`` draws go through one forward. Images:
    ``indices`` (default: the whole dataset), then every ``skip``-th of them, then the first ``max_images``.
    Invalid values raise :class:`InputError` at construction, so a config that exists is a valid one.
    """

    sigma: float
    run_dir: str
    num_shards: int = 1
    n0: int = 100
    n: int = 100_000
    batch: int = 1000
    block_size: int = 10_000
    draw_batch: int = 100
    seed: int = 0
    skip: int = 1
    max_images: int | None = None
    indices: tuple | None = None
    dataset: str = "demo"
    denoiser: str | None = "demo"  # None: no denoiser (purifier "none")
    classifier: str = "demo"
    purifier: str = "consistency"
    time_rule: str = "nearest"
    steps: int | str | None = None  # pf-ode solver steps, or "grid"
    purifier_label: str = "random"
    mode: str = "certify"
    early_stop: float | None = None  # max alpha: skip estimation that cannot change the table (aggregate/skipping.py)
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None  # torch threads per shard process (None: torch's default)
    tune_malloc: bool = True  # glibc mallopt at job start on CPU (DESIGN.md section 6)

    def __post_init__(self):
        for name in ("dataset", "classifier", "purifier", "run_dir", "denoiser"):
            value = getattr(self, name)
            if not (value is None and name == "denoiser") and (not isinstance(value, str) or len(value) > 4096):
                flag = "--out" if name == "run_dir" else f"--{name}"
                raise InputError(f"{flag} {str(value)[:60]!r}: must be a spec or path string")
        sigma = float(self.sigma)
        if not 0.0 < sigma < float("inf"):
            raise InputError(f"--sigma {self.sigma}: must be a positive pixel-space noise level, e.g. --sigma 0.5")
        object.__setattr__(self, "sigma", sigma)
        if self.indices is not None:
            object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        low = {"num_shards": ("--shards", 1), "n": ("--n", 1), "batch": ("--batch", 1),
               "block_size": ("--block-size", 1), "draw_batch": ("--draw-batch", 1), "skip": ("--skip", 1),
               "seed": ("--seed", 0), "n0": ("--n0", 1 if self.mode == "certify" else 0)}
        for name, (flag, least) in low.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{flag} {value}: must be an integer >= {least}")
        if self.seed >= 2**63:
            raise InputError(f"--seed {self.seed}: must be below 2**63")
        for name, flag, most in (("n", "--n", MAX_DRAWS), ("n0", "--n0", MAX_DRAWS), ("batch", "--batch", MAX_BATCH),
                                 ("block_size", "--block-size", MAX_DRAWS), ("draw_batch", "--draw-batch", MAX_BATCH),
                                 ("num_shards", "--shards", 10**6), ("skip", "--skip", 2**40)):
            if getattr(self, name) > most:
                raise InputError(f"{flag} {getattr(self, name)}: must be at most {most}")
        if max(self.n, self.n0) > MAX_NOISE_BATCHES * self.draw_batch:
            raise InputError(f"--n {self.n}: at most {MAX_NOISE_BATCHES} noise batches per stream; use --draw-batch "
                             f"{-(-max(self.n, self.n0) // MAX_NOISE_BATCHES)} or more")
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise InputError(f"--max-images {self.max_images}: must be at least 1 (leave it out for all images)")
        check_solver_steps(self.steps)
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(f"threads {self.threads}: must be at least 1")
        check_batching(self.block_size, self.draw_batch)
        check_forward_batch(self.batch, self.draw_batch)
        if self.indices is not None:
            if not self.indices or min(self.indices) < 0 or len(set(self.indices)) != len(self.indices):
                raise InputError("--indices: give distinct image indices >= 0, e.g. --indices 0,20,40")
        check_choices(self, {"mode": MODES, "dtype": DTYPES, "device": DEVICES, "time_rule": TIME_RULES})
        if self.early_stop is not None:
            if isinstance(self.early_stop, bool) or not isinstance(self.early_stop, (int, float)) or \
                    not 0.0 < float(self.early_stop) < 0.5:  # also refuses NaN
                raise InputError(f"--early-stop {self.early_stop}: give the largest alpha you will aggregate at, "
                                 "in (0, 0.5), e.g. --early-stop 0.01")
            if self.mode != "certify":
                raise InputError("--early-stop needs --mode certify (it decides from the selection draws)")
            object.__setattr__(self, "early_stop", float(self.early_stop))
        if self.purifier == "none":
            object.__setattr__(self, "denoiser", None)
        elif not self.denoiser:
            raise InputError(f"--purifier {self.purifier} needs a --denoiser SPEC (or use --purifier none)")
        if not self.run_dir:
            raise InputError("--out is required: a folder or fsspec URL for the shard files")
        check_label_policy(self.purifier_label)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (indices as a list); ``CertifyConfig(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        d["indices"] = list(self.indices) if self.indices is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CertifyConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


MAX_INDICES = 10**7  # --indices longer than this: use --skip and --max-images


def parse_indices(text: str | None) -> tuple | None:
    """``"0,5,10-19"`` -> (0, 5, 10, 11, ..., 19); None stays None."""
    if text is None:
        return None
    out = []
    try:
        for item in (t.strip() for t in text.split(",")):
            lo, dash, hi = item.partition("-")
            part = range(int(lo), int(hi) + 1) if dash else [int(item)]
            if len(out) + len(part) > MAX_INDICES:
                raise InputError(f"--indices {text[:40]!r}: more than {MAX_INDICES:,} indices; use --skip and "
                                 "--max-images for large selections")
            out.extend(part)
    except ValueError:
        raise InputError(f"--indices {text!r}: give comma-separated indices or ranges, e.g. --indices 0,5,10-19") \
            from None
    return tuple(out)


# ------------------------------------------------------------------------------------------------------- finetune
# Fields that may change between a run and its resumption without changing what is trained: where it runs, how
# often it logs/evaluates/checkpoints (and with which classifier), and how many steps it goes to (no learning-rate
# schedule depends on it).
FINETUNE_RESUME_FREE = frozenset({"out", "nodes", "ranks_per_node", "device", "steps", "log_every", "eval_every",
                                  "checkpoint_every", "keep_checkpoints", "eval_batch", "classifier"})


class TrainingConfig:
    """What the fine-tuning configs share (a mixin of the frozen dataclasses below and in ``config_evidence``)."""

    @property
    def world_size(self) -> int:
        return int(self.nodes) * int(self.ranks_per_node)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (sigmas as a list)."""
        d = dataclasses.asdict(self)
        d["sigmas"] = list(self.sigmas)
        return d


@dataclass(frozen=True)
class FinetuneConfig(TrainingConfig):
    """One consistency fine-tuning run (DESIGN.md section 1, ``jobs/finetune.py``).

    Loss ``E_{x, s ~ U{sigmas}, z} loss(x, D(x + 2 s z, t_s))`` in model space [-1, 1]; ``sigmas`` are pixel-space
    smoothing levels. ``batch_size`` is the *global* batch, split evenly over ``nodes * ranks_per_node`` ranks.
    Invalid values raise :class:`InputError` at construction, so a config that exists is a valid one.
    """

    model: str
    data: str
    out: str
    sigmas: tuple = (0.25, 0.5, 1.0)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    loss: str = "lpips"
    lpips_net: str = "vgg"
    lpips_resize: int = 224  # bilinear upsampling before LPIPS (0 = native size), as in the reference run
    lpips_random_backbone: bool = False  # tests and the demo only: LPIPS on a seeded random VGG/AlexNet
    ema_decay: float = 0.999  # 0 = no EMA; the exported weights are the EMA when it is on
    grad_clip: float = 1.0  # max global gradient L2 norm (0 = off)
    time_rule: str = "nearest"
    purifier_label: str = "random"  # labels a class-conditional network sees (never the true label)
    seed: int = 0
    eval_data: str | None = None  # None: hold out the last eval_images images of `data` (not trained on)
    eval_images: int = 256
    eval_every: int = 500  # 0 = only at the start and the end
    eval_batch: int = 128
    classifier: str | None = None  # accuracy of classifier(purify(x + noise)) per sigma when given
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    nodes: int = 1
    ranks_per_node: int = 1
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast, on CUDA only

    def __post_init__(self):
        check_training(self, ("steps", "batch_size", "nodes", "ranks_per_node", "eval_batch", "checkpoint_every",
                              "keep_checkpoints", "log_every"), ("eval_images", "eval_every", "lpips_resize"),
                       {"loss": FINETUNE_LOSSES, "lpips_net": LPIPS_NETS, "time_rule": TIME_RULES, "device": DEVICES})

    def run_dict(self) -> dict:
        """The fields that define *what* is trained; a checkpoint resumes only under an equal ``run_dict``."""
        return {k: v for k, v in self.to_dict().items() if k not in FINETUNE_RESUME_FREE}


def check_training(cfg, positive: tuple, non_negative: tuple, choices: dict) -> None:
    """The validation the fine-tuning configs share; normalises ``cfg.sigmas`` to floats. :class:`InputError`."""
    object.__setattr__(cfg, "sigmas", tuple(float(s) for s in cfg.sigmas))
    bad = [s for s in cfg.sigmas if not 0 < s < math.inf]
    if not cfg.sigmas or bad:
        raise InputError(f"--sigma {','.join(map(str, cfg.sigmas)) or '(empty)'}: "
                         f"{'%g is not positive (or not finite); ' % bad[0] if bad else ''}give one or more "
                         "positive pixel-space noise levels, e.g. --sigma 0.25,0.5,1.0")
    for name in positive:
        if int(getattr(cfg, name)) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    for name in non_negative:
        if int(getattr(cfg, name)) < 0:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be 0 or more")
    if cfg.batch_size % cfg.world_size:
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the {cfg.world_size} ranks "
                         f"({cfg.nodes} nodes x {cfg.ranks_per_node}); use a multiple of {cfg.world_size}")
    if not 0 < cfg.lr < math.inf:  # also refuses NaN
        raise InputError(f"--lr {cfg.lr}: must be a positive finite number, e.g. 1e-4")
    if not 0 <= cfg.ema_decay < 1:
        raise InputError(f"--ema-decay {cfg.ema_decay}: must be in [0, 1)")
    if not 0 <= cfg.grad_clip < math.inf:
        raise InputError(f"--grad-clip {cfg.grad_clip}: must be 0 (off) or a positive finite number")
    check_choices(cfg, choices)
    if not cfg.out:
        raise InputError("--out is required: a folder or fsspec URL for checkpoints and the result")
    check_label_policy(cfg.purifier_label)
    if not 0 <= int(cfg.seed) < 2**63:
        raise InputError(f"--seed {cfg.seed}: must be in [0, 2**63)")
