"""The consistency fine-tuning job (DESIGN.md section 1): multi-node DDP, LPIPS loss, resumable.

``FinetuneJob(config)()`` runs on every rank of a submitit job (or alone). It minimises

    L = E_{x, s ~ U{sigmas}, z ~ N(0, I)}  loss( x, D(x + 2 s z, t_s) )        (model space [-1, 1])

with ``D = ConsistencyFunction(net, c_noise)`` and ``t_s = time_for_sigma(s, grid_steps, time_rule)``, the code
that certification runs. RAdam, gradient clipping, an EMA of the weights, bf16 autocast on CUDA only.

Determinism, resumption and SIGTERM handling are those of every fine-tuning job (``jobs/training.py``): the data
and noise of a step depend on neither the world size nor on resumption, and since every loss is a per-image mean,
2 ranks x B/2 follow the same trajectory as 1 rank x B (up to float summation order; models with BatchNorm would
break this, DDP does not synchronise batch statistics). A rerun or a requeue (``checkpoint()`` resubmits the same
config) starts from the newest checkpoint on disk; on SIGTERM the job raises :class:`FinetuneTerminated` after
checkpointing the step every rank stopped at.
"""
from __future__ import annotations

import os

import numpy as np

from cpcluster.core.config import FinetuneConfig
from cpcluster.jobs.finetune_eval import Evaluator
from cpcluster.jobs.finetune_io import check_run_record
from cpcluster.jobs.training import (DROPOUT_STREAM, FinetuneTerminated, Trainer, TrainingJob, derive_seed,
                                     global_batch, rank_rows, rank_setup, step_draws)
from cpcluster.util.errors import InputError


class FinetuneJob(TrainingJob):
    """A picklable submitit callable: one fine-tuning run, resumed from ``config.out`` when it has checkpoints."""

    def run(self, config: FinetuneConfig) -> dict:
        return run(config)


def datasets(config: FinetuneConfig):
    """``(train_set, n_train, eval_set, eval_indices)``; held-out images come from ``eval_data`` or the tail."""
    from cpcluster.models.specs import load_dataset

    train = load_dataset(config.data)
    if config.eval_data:
        held = load_dataset(config.eval_data)
        if held.shape != train.shape:
            raise InputError(f"--eval-data {config.eval_data}: images {held.shape} differ from --data {train.shape}")
        n_train, eval_set, eval_idx = len(train), held, np.arange(min(config.eval_images, len(held)))
    else:
        n_train, eval_set = len(train) - config.eval_images, train
        eval_idx = np.arange(max(n_train, 0), len(train))
    if n_train < config.batch_size:
        raise InputError(f"--data {config.data}: {n_train} training images (after holding out "
                         f"{0 if config.eval_data else config.eval_images}) is fewer than --batch-size "
                         f"{config.batch_size}")
    return train, n_train, eval_set, eval_idx


def needs_lpips(config: FinetuneConfig) -> bool:
    """LPIPS is the loss, or the held-out evaluation reports it."""
    return config.loss == "lpips" or config.eval_images > 0


def _spec_paths(spec: str) -> list[str]:
    """The local paths named in a spec (``kind:/a/b``, ``timm:name:/a/b.safetensors``); URLs are not checked.

    Options after the last ``?`` and a repeated base spec after ``|`` (``finetuned:DIR|python:...``) are not paths.
    """
    body = spec.partition("|")[0]
    body = body.rpartition("?")[0] if "?" in body else body
    parts = body.partition(":")[2].split(":")
    return [p for p in parts if ("/" in p or p.startswith((".", "~"))) and "//" not in p]


TRAINABLE_KINDS = ("consistency",)  # the loss is that of the consistency function D


def trainable(base, what: str = "--model"):
    """``base.module`` made trainable: every loader freezes its network for inference (``requires_grad=False``,
    eval mode); fine-tuning turns gradients back on for all parameters and switches to train mode.

    Refused with :class:`InputError`: networks that are not consistency models (the loss applies the consistency
    function's boundary scalings to the network), and TorchScript networks (their weights could not be exported in
    a form certify loads).
    """
    if base.kind not in TRAINABLE_KINDS:
        raise InputError(f"{what} {base.spec}: a {base.kind} network has no consistency function to fine-tune")
    if base.spec.startswith("torchscript:"):
        raise InputError(f"{what} {base.spec}: TorchScript networks cannot be fine-tuned; save the network's "
                         "state_dict and load it through python:MODULE:FACTORY:WEIGHTS, or convert it")
    return base.module.train().requires_grad_(True)


def check_specs(specs) -> None:
    """``[(table, option, spec or None), ...]``: every kind is known and the local paths it names exist."""
    from cpcluster.models.specs import known_kinds

    for table, option, spec in specs:
        if spec is None:
            continue
        kind = spec.partition(":")[0]
        if kind not in known_kinds(table):
            raise InputError(f"{option} {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(known_kinds(table))}")
        for path in _spec_paths(spec):
            if not os.path.exists(os.path.expanduser(path)):
                raise InputError(f"{option} {spec}: {path} does not exist")


def preflight(config: FinetuneConfig) -> None:
    """Checks to run *before* submitting, on the submitting machine: :class:`InputError` naming the problem.

    The spec kinds are known and the local paths they name exist (``--model``, ``--data``, ``--eval-data``,
    ``--classifier``); the LPIPS backbone is in torchvision's cache (unless ``lpips_random_backbone``); ``--out``
    does not hold a run of another configuration.
    """
    check_specs([("denoiser", "--model", config.model), ("dataset", "--data", config.data),
                 ("dataset", "--eval-data", config.eval_data), ("classifier", "--classifier", config.classifier)])
    if needs_lpips(config) and not config.lpips_random_backbone:
        from cpcluster.core.losses import check_backbone

        check_backbone(config.lpips_net)
    check_run_record(config.out, config.run_dict())


def run(config: FinetuneConfig) -> dict:
    """Train on this rank (``cpcluster.util.dist`` already initialised); returns a summary of this rank's run."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from cpcluster.core.losses import PerceptualLoss, PixelLoss, RANDOM_BACKBONE_WARNING, build_lpips
    from cpcluster.models.consistency import ConsistencyFunction, pixel_to_model, time_for_sigma
    from cpcluster.models.finetuned import export_finetuned
    from cpcluster.models.purifier_base import LabelPolicy
    from cpcluster.models.specs import load_classifier, load_denoiser
    from cpcluster.util import dist

    cfg = config
    info, device, amp = rank_setup(cfg)

    base = load_denoiser(cfg.model)
    net = trainable(base).to(device)
    times = [time_for_sigma(s, base.meta.get("grid_steps"), cfg.time_rule) for s in cfg.sigmas]
    train_set, n_train, eval_set, eval_idx = datasets(cfg)
    if cfg.lpips_random_backbone and needs_lpips(cfg):
        dist.print0(RANDOM_BACKBONE_WARNING.format(net=cfg.lpips_net))
    perceptual = None
    if needs_lpips(cfg):
        perceptual = PerceptualLoss(build_lpips(cfg.lpips_net, cfg.lpips_random_backbone, cfg.seed),
                                    cfg.lpips_resize).to(device)
    loss_fn = perceptual if cfg.loss == "lpips" else PixelLoss(cfg.loss)
    classifier = load_classifier(cfg.classifier) if cfg.classifier else None
    evaluator = Evaluator(cfg, eval_set, eval_idx, perceptual, base, classifier, info.device, amp)

    trainer = Trainer(cfg, net, torch.optim.RAdam(net.parameters(), lr=cfg.lr), "finetune")
    resumed = trainer.resume(cfg.to_dict())

    function = ConsistencyFunction(net, base.meta.get("c_noise", "openai"))
    model = function
    if info.world_size > 1:
        model = DistributedDataParallel(function, device_ids=[device.index] if device.type == "cuda" else None)
    dist.print0(f"[finetune] {info.world_size} rank(s) on {device.type} ({info.backend or 'single process'}), "
                f"global batch {cfg.batch_size}, steps {trainer.start} -> {cfg.steps}, loss {cfg.loss}, out {cfg.out}")

    rows = rank_rows(cfg.batch_size, info)
    sig, tim = torch.tensor(cfg.sigmas), torch.tensor(times)
    policy, num_classes = LabelPolicy(cfg.purifier_label), base.meta.get("num_classes")
    shape = (cfg.batch_size, *train_set.shape)

    def evaluate(step):
        if len(eval_idx):
            trainer.log.extend(evaluator(trainer.exported, step, trainer.which))

    def train_step(step):
        idx = global_batch(cfg.seed, step, n_train, cfg.batch_size)[rows]
        z, choice, labels = step_draws(cfg.seed, step, shape, len(cfg.sigmas), rows, policy, num_classes)
        labels = None if labels is None else labels.to(device)
        torch.manual_seed(derive_seed(cfg.seed, DROPOUT_STREAM, step, info.rank))  # dropout, if the network has any
        x0 = pixel_to_model(torch.from_numpy(train_set.get(idx)[0])).to(device)
        s = sig[choice].to(device).view(-1, 1, 1, 1)
        x_t = x0 + 2.0 * s * z.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x_t, tim[choice].to(device), labels), x0).float().mean()
        return loss.detach(), trainer.optimizer_step(loss)

    def export(final, record):
        export_finetuned(final, trainer.exported.state_dict(), base, trainer.which, max(trainer.start, cfg.steps),
                         cfg.to_dict(), {**record, "ema_decay": cfg.ema_decay})

    return trainer.run(train_step, evaluate, resumed, export)
