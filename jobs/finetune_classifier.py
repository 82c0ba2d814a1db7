"""The classifier fine-tuning job (CLS-FT): cross-entropy on purified noisy images, purifier frozen; multi-node DDP.

``ClassifierFinetuneJob(config)()`` runs on every rank of a submitit job (or alone). It minimises

    L = E_{(x, y), s ~ U{sigmas}, z ~ N(0, I)}  CE( classifier(purify_s(x + s z)), y )      (pixel space [0, 1])

over the classifier's weights, where ``purify_s`` is the purifier certification uses at sigma ``s``
(``cpcluster.models.purifiers.build_purifier``), evaluated without gradients (frozen). A ``finetuned:DIR``
denoiser (the purifier job's result) makes this the paper's "both": fine-tune the purifier, then the classifier
behind it. SGD (momentum, weight decay) or RAdam, warm-up then a constant, cosine or step learning rate, gradient
clipping, an optional EMA, bf16 autocast on CUDA only.

Data order, noise (``x + s z``, the sigma choice and any purifier labels are drawn for the global batch, then
sliced per rank), resumption from the newest checkpoint, SIGTERM handling and the run record are those of every
fine-tuning job (``jobs/training.py``), so 2 ranks x B/2 follow the same trajectory as 1 rank x B (a classifier with
BatchNorm needs ``batchnorm="frozen"`` or ``"sync"`` for that). The held-out evaluation reports, per sigma, the
accuracy of the classifier on images purified from fixed noise (``jobs/finetune_eval.HeldOut``). The result,
``<out>/final``, is a self-contained export (``cpcluster/models/finetuned_classifier.py``) that
``cpcluster certify --classifier finetuned:<out>/final`` loads.
"""
from __future__ import annotations

import math

from cpcluster.core.config_evidence import ClassifierFinetuneConfig
from cpcluster.jobs.finetune import check_specs, datasets
from cpcluster.jobs.finetune_io import check_run_record
from cpcluster.jobs.training import (DROPOUT_STREAM, Trainer, TrainingJob, derive_seed, global_batch, rank_rows,
                                     rank_setup, step_draws)
from cpcluster.util.errors import InputError


class ClassifierFinetuneJob(TrainingJob):
    """A picklable submitit callable: one CLS-FT run, resumed from ``config.out`` when it has checkpoints."""

    def run(self, config: ClassifierFinetuneConfig) -> dict:
        return run(config)


def learning_rate(config: ClassifierFinetuneConfig, step: int) -> float:
    """The learning rate of 0-based ``step``: linear warm-up to ``lr``, then the schedule (see the config)."""
    cfg = config
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_gamma ** ((step - cfg.warmup_steps) // cfg.lr_step_every)
    return cfg.lr


def preflight(config: ClassifierFinetuneConfig) -> None:
    """Before submitting: spec kinds known, local paths present, ``--out`` free of another run (InputError)."""
    check_specs([("classifier", "--classifier", config.classifier), ("denoiser", "--denoiser", config.denoiser),
                 ("dataset", "--data", config.data), ("dataset", "--eval-data", config.eval_data)])
    check_run_record(config.out, config.run_dict())


def set_train_mode(net, batchnorm: str) -> None:
    """``net.train()``, except BatchNorm layers under ``batchnorm="frozen"`` (eval mode: running statistics)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    net.train()
    if batchnorm == "frozen":
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def frozen_purifiers(cfg: ClassifierFinetuneConfig, device):
    """``(purifiers, denoiser)``: one purifier per sigma on ``device``, eval mode, no gradients."""
    from cpcluster.models.purifiers import configured_purifier
    from cpcluster.models.specs import load_denoiser

    denoiser = load_denoiser(cfg.denoiser) if cfg.denoiser else None
    purifiers = [configured_purifier(cfg.purifier, denoiser, s, cfg.time_rule, cfg.purifier_label,
                                     cfg.purifier_steps).to(device).eval().requires_grad_(False) for s in cfg.sigmas]
    return purifiers, denoiser


def purify(purifiers, noisy, choice, labels):
    """(B, C, H, W) pixel space: row ``b`` of ``noisy`` purified by ``purifiers[choice[b]]`` (with ``labels[b]``)."""
    out = noisy.new_empty(noisy.shape)
    for i in choice.unique().tolist():
        rows = choice == i
        out[rows] = purifiers[i](noisy[rows], None, None if labels is None else labels[rows]).to(out.dtype)
    return out


def run(config: ClassifierFinetuneConfig) -> dict:
    """Train on this rank (``cpcluster.util.dist`` already initialised); returns a summary of this rank's run."""
    import torch
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel

    from cpcluster.jobs.finetune_eval import HeldOut
    from cpcluster.models.finetuned_classifier import export_finetuned_classifier
    from cpcluster.models.purifier_base import LabelPolicy
    from cpcluster.models.specs import load_classifier
    from cpcluster.util import dist

    cfg = config
    info, device, amp = rank_setup(cfg)

    base = load_classifier(cfg.classifier)
    purifiers, denoiser = frozen_purifiers(cfg, device)
    train_set, n_train, eval_set, eval_idx = datasets(cfg)
    if base.num_classes != train_set.num_classes:
        raise InputError(f"--classifier {cfg.classifier} has {base.num_classes} classes but --data {cfg.data} has "
                         f"{train_set.num_classes}")
    held = HeldOut(cfg.sigmas, cfg.seed, cfg.eval_batch, eval_set, eval_idx, info.device, amp)

    net = base.module.to(device).requires_grad_(True)
    if cfg.batchnorm == "sync":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    set_train_mode(net, cfg.batchnorm)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.RAdam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainer = Trainer(cfg, net, opt, "finetune-classifier")
    resumed = trainer.resume(cfg.to_dict())
    model = net
    if info.world_size > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    dist.print0(f"[finetune-classifier] {info.world_size} rank(s) on {device.type} "
                f"({info.backend or 'single process'}), global batch {cfg.batch_size}, steps {trainer.start} -> "
                f"{cfg.steps}, purifier {cfg.purifier}({cfg.denoiser or ''}), {cfg.optimizer} {cfg.schedule}")

    rows = rank_rows(cfg.batch_size, info)
    sig = torch.tensor(cfg.sigmas)
    policy = LabelPolicy(cfg.purifier_label)
    num_classes = denoiser.meta.get("num_classes") if denoiser is not None else None
    shape = (cfg.batch_size, *train_set.shape)

    def evaluate(step):
        if not len(eval_idx):
            return
        module = trainer.exported
        module.eval()
        trainer.log.extend(held.records(held.measure(purifiers, module), step, trainer.which, purifiers,
                                        lpips=False, acc=True))
        set_train_mode(net, cfg.batchnorm)

    def train_step(step):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        idx = global_batch(cfg.seed, step, n_train, cfg.batch_size)[rows]
        z, choice, labels = step_draws(cfg.seed, step, shape, len(cfg.sigmas), rows, policy, num_classes)
        torch.manual_seed(derive_seed(cfg.seed, DROPOUT_STREAM, step, info.rank))  # dropout, if the network has any
        x, y = train_set.get(idx)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        noisy = x + sig[choice].to(device).view(-1, 1, 1, 1) * z.to(device)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            purified = purify(purifiers, noisy, choice.to(device), None if labels is None else labels.to(device))
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(purified.float()).float(), y)
        return loss.detach(), trainer.optimizer_step(loss)

    def export(final, record):
        trained = {"denoiser": denoiser.describe() if denoiser is not None else None, "kind": cfg.purifier,
                   "sigmas": list(cfg.sigmas), "time_rule": cfg.time_rule, "steps": cfg.purifier_steps}
        export_finetuned_classifier(final, trainer.exported.state_dict(), base, trainer.which,
                                    max(trainer.start, cfg.steps), cfg.to_dict(), trained, record)

    return trainer.run(train_step, evaluate, resumed, export)
