"""The consistency fine-tuning job (DESIGN.md section 1): multi-node DDP, LPIPS loss, resumable.

``FinetuneJob(config)()`` runs on every rank of a submitit job (or alone). It minimises

    L = E_{x, s ~ U{sigmas}, z ~ N(0, I)}  loss( x, D(x + 2 s z, t_s) )        (model space [-1, 1])

with ``D = ConsistencyFunction(net, c_noise)`` and ``t_s = time_for_sigma(s, grid_steps, time_rule)``, the code
that certification runs. RAdam, gradient clipping, an EMA of the weights, bf16 autocast on CUDA only.

Determinism. The global batch of step ``k`` is positions ``[p, p + B)`` of a permutation of the training images
drawn from ``(seed, epoch)``, and its noise, sigma choices and labels come from one generator seeded by
``(seed, k)``, drawn for the whole global batch on the CPU. Rank ``r`` of ``W`` takes rows ``[r B/W, (r+1) B/W)``.
So the data a step sees depends on neither the world size nor on whether the run was resumed, and since every
loss is a per-image mean, 2 ranks x B/2 follow the same trajectory as 1 rank x B (up to float summation order;
models with BatchNorm would break this, DDP does not synchronise batch statistics).

Resumption. Rank 0 checkpoints every ``checkpoint_every`` steps and at the end (``jobs/finetune_io.py``); a
rerun or a requeue (``checkpoint()`` resubmits the same config) starts from the newest checkpoint on disk. On
SIGTERM (``scancel``, ``scontrol requeue``) every rank stops at the next log step, rank 0 checkpoints that step,
and the job raises :class:`FinetuneTerminated`: nothing since the last periodic checkpoint is lost.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
import platform
import signal
import time

import numpy as np

from cpcluster.config import FinetuneConfig
from cpcluster.errors import InputError
from cpcluster.jobs.finetune_eval import NOISE_STREAM, TRAIN_STREAM, Evaluator, derive_seed, plot_curves
from cpcluster.jobs.finetune_io import (check_run_record, load_latest, remove_temporaries, save_checkpoint,
                                        write_metrics, write_run_record)
from cpcluster.shards import config_hash, join_url
from cpcluster.signals import Terminated, stop_on_sigterm

# Test hook (fault injection): SIGKILL this process right after step N, on rank CPCLUSTER_FAULT_KILL_RANK (0).
FAULT_KILL_ENV = "CPCLUSTER_FAULT_KILL_AFTER_STEP"
FAULT_TERM_ENV = "CPCLUSTER_FAULT_TERM_AFTER_STEP"  # the same with SIGTERM


class Diverged(InputError):
    """The loss or the weights became NaN or infinite: the run stops before checkpointing or exporting them."""


def check_finite_weights(step: int, *modules) -> None:
    """:class:`Diverged` when a parameter or buffer of ``modules`` (the network, its EMA) is NaN or infinite.

    Called on every rank at the same steps (the weights are identical across ranks), before each checkpoint and
    before the export, so all ranks stop together and no non-finite weights are ever written.
    """
    import torch

    for module in modules:
        if module is not None and not all(torch.isfinite(t).all() for t in module.state_dict().values()
                                          if t.is_floating_point()):
            raise Diverged(f"step {step}: the weights hold NaN or infinite values (training diverged); nothing "
                           "was checkpointed or exported from it; lower --lr or keep --grad-clip on")


class FinetuneTerminated(Terminated):
    """SIGTERM arrived: every rank stopped at the same step, after rank 0 wrote a checkpoint of it."""


class FinetuneJob:
    """A picklable submitit callable: one fine-tuning run, resumed from ``config.out`` when it has checkpoints."""

    def __init__(self, config: FinetuneConfig):
        self.config = config

    def __call__(self) -> dict:
        from cpcluster import dist

        dist.init(self.config.device)
        try:
            return run(self.config)
        finally:
            dist.shutdown()

    def checkpoint(self, *args, **kwargs):
        """On preemption/timeout submitit requeues the same config; the state comes back from disk, not memory."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.config))

    def __repr__(self) -> str:
        return f"FinetuneJob(out={self.config.out!r}, steps={self.config.steps})"


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of ``n`` training positions used in ``epoch`` (a function of ``(seed, epoch)`` only)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(TRAIN_STREAM, epoch)))
    return rng.permutation(n)


def global_batch(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """(batch,) training positions of 0-based ``step``: consecutive slices of the epoch's permutation."""
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    return epoch_order(seed, epoch, n)[pos * batch:(pos + 1) * batch]


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
    """The local paths named in a spec (``kind:/a/b``, ``timm:name:/a/b.safetensors``, options after ``?`` dropped);
    URLs are not checked."""
    body = spec.rpartition("?")[0] if "?" in spec else spec
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


def preflight(config: FinetuneConfig) -> None:
    """Checks to run *before* submitting, on the submitting machine: :class:`InputError` naming the problem.

    The spec kinds are known and the local paths they name exist (``--model``, ``--data``, ``--eval-data``,
    ``--classifier``); the LPIPS backbone is in torchvision's cache (unless ``lpips_random_backbone``); ``--out``
    does not hold a run of another configuration.
    """
    from cpcluster.models.specs import known_kinds

    specs = [("denoiser", "--model", config.model), ("dataset", "--data", config.data),
             ("dataset", "--eval-data", config.eval_data), ("classifier", "--classifier", config.classifier)]
    for table, option, spec in specs:
        if spec is None:
            continue
        kind = spec.partition(":")[0]
        if kind not in known_kinds(table):
            raise InputError(f"{option} {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(known_kinds(table))}")
        for path in _spec_paths(spec):
            if not os.path.exists(os.path.expanduser(path)):
                raise InputError(f"{option} {spec}: {path} does not exist")
    if needs_lpips(config) and not config.lpips_random_backbone:
        from cpcluster.losses import check_backbone

        check_backbone(config.lpips_net)
    check_run_record(config.out, config.run_dict())


def digest(module) -> str:
    """sha256 of every parameter and buffer (name, bytes), to compare weights across ranks bit for bit."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fault_injection(step: int, rank: int) -> None:
    """Test hooks, after ``step`` on rank ``CPCLUSTER_FAULT_KILL_RANK`` (0) when the env asks: SIGKILL (no clean-up,
    like an OOM kill or a node loss), or SIGTERM (like ``scancel``)."""
    if rank != int(os.environ.get("CPCLUSTER_FAULT_KILL_RANK", 0)):
        return
    for env, sig in ((FAULT_KILL_ENV, signal.SIGKILL), (FAULT_TERM_ENV, signal.SIGTERM)):
        if os.environ.get(env) == str(step):
            os.kill(os.getpid(), sig)


def run(config: FinetuneConfig) -> dict:
    """Train on this rank (``cpcluster.dist`` already initialised); returns a summary of this rank's run."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from cpcluster import dist
    from cpcluster.losses import RANDOM_BACKBONE_WARNING, PerceptualLoss, PixelLoss, build_lpips
    from cpcluster.models.consistency import ConsistencyFunction, pixel_to_model, time_for_sigma
    from cpcluster.models.finetuned import export_finetuned
    from cpcluster.models.purifiers import LabelPolicy
    from cpcluster.models.specs import load_classifier, load_denoiser

    info, cfg = dist.info(), config
    if cfg.batch_size % info.world_size:
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the {info.world_size} ranks")
    if info.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    device = torch.device(info.device)
    amp = cfg.amp and device.type == "cuda"

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

    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    opt = torch.optim.RAdam(net.parameters(), lr=cfg.lr)
    run_dict = cfg.run_dict()
    check_run_record(cfg.out, run_dict)  # on every rank, so that all of them stop on a mismatch, not only rank 0
    if dist.is_main():
        remove_temporaries(cfg.out)
        write_run_record(cfg.out, cfg.to_dict(), run_dict)
    state = load_latest(cfg.out, run_dict)
    start, log, attempt = 0, [], 1
    if state is not None:
        net.load_state_dict(state["net"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start, log, attempt = int(state["step"]), list(state["log"]), int(state["attempt"]) + 1
        log.append({"kind": "resume", "step": start, "attempt": attempt})
        dist.print0(f"[finetune] resuming from step {start} (attempt {attempt})")
    exported = ema if ema is not None else net
    which = "ema" if ema is not None else "raw"

    function = ConsistencyFunction(net, base.meta.get("c_noise", "openai"))
    model = function
    if info.world_size > 1:
        model = DistributedDataParallel(function, device_ids=[device.index] if device.type == "cuda" else None)
    dist.print0(f"[finetune] {info.world_size} rank(s) on {device.type} ({info.backend or 'single process'}), "
                f"global batch {cfg.batch_size}, steps {start} -> {cfg.steps}, loss {cfg.loss}, out {cfg.out}")

    per_rank = cfg.batch_size // info.world_size
    lo, hi = info.rank * per_rank, (info.rank + 1) * per_rank
    sig, tim = torch.tensor(cfg.sigmas), torch.tensor(times)
    policy, num_classes = LabelPolicy(cfg.purifier_label), base.meta.get("num_classes")
    shape = (cfg.batch_size, *train_set.shape)

    def evaluate(step):
        if len(eval_idx):
            log.extend(evaluator(exported, step, which))

    plotted = [0]

    def save(step):
        if dist.is_main():
            save_checkpoint(cfg.out, {
                "step": step, "run": run_dict, "run_hash": config_hash(run_dict), "attempt": attempt,
                "net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                "ema": None if ema is None else {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()},
                "optimizer": opt.state_dict(), "log": log}, cfg.keep_checkpoints)
            write_metrics(cfg.out, log)
            evals = sum(r["kind"] == "eval" for r in log)
            if evals != plotted[0]:  # drawing takes ~0.5 s: only when there are new evaluation points
                plot_curves(log, join_url(cfg.out, "curves.png"))
                plotted[0] = evals

    if start == 0 and state is None:
        evaluate(0)
    # (sum of losses, steps) since the last log, and a SIGTERM flag
    window, speeds = torch.zeros(3, dtype=torch.float64, device=device), []
    clock, paused = time.perf_counter(), 0.0
    stop = False
    with stop_on_sigterm(f"at the next log step (every {cfg.log_every}) after writing a checkpoint") as terminated:
        for step in range(start, cfg.steps):
            k = step + 1
            idx = global_batch(cfg.seed, step, n_train, cfg.batch_size)[lo:hi]
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, NOISE_STREAM, step))
            z = torch.randn(shape, generator=gen)[lo:hi]
            choice = torch.randint(len(cfg.sigmas), (cfg.batch_size,), generator=gen)[lo:hi]
            labels = policy.labels(cfg.batch_size, num_classes, "cpu", gen)
            labels = None if labels is None else labels[lo:hi].to(device)
            torch.manual_seed(derive_seed(cfg.seed, 3, step, info.rank))  # dropout, if the network has any
            x0 = pixel_to_model(torch.from_numpy(train_set.get(idx)[0])).to(device)
            s = sig[choice].to(device).view(-1, 1, 1, 1)
            x_t = x0 + 2.0 * s * z.to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x_t, tim[choice].to(device), labels), x0).float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), net.parameters()):
                        e.lerp_(p, 1.0 - cfg.ema_decay)
                    for e, b in zip(ema.buffers(), net.buffers()):
                        e.copy_(b)
            window[0] += loss.detach().double()
            window[1] += 1
            if k % cfg.log_every == 0 or k == cfg.steps:
                window[2] = float(terminated())  # a SIGTERM on any rank stops every rank at this same step
                sums = dist.all_reduce_sum(window.clone())
                if not torch.isfinite(sums[0]):  # the same sum on every rank: all of them stop here
                    raise Diverged(f"step {k}: the loss is {float(sums[0] / sums[1])} (training diverged); nothing "
                                   f"was checkpointed or exported from it; lower --lr (now {cfg.lr:g}) or keep "
                                   "--grad-clip on")
                stop = bool(sums[2] > 0) and k < cfg.steps
                speed = float(sums[1]) / info.world_size * cfg.batch_size / (time.perf_counter() - clock - paused)
                speeds.append(speed)
                log.append({"kind": "train", "step": k, "loss": float(sums[0] / sums[1]), "attempt": attempt,
                            "grad_norm": float(grad_norm), "samples_per_s": speed})
                dist.print0(f"[finetune] step {k}/{cfg.steps} loss {log[-1]['loss']:.5f} {speed:.1f} samples/s")
                window.zero_()
                clock, paused = time.perf_counter(), 0.0
            tic = time.perf_counter()
            if cfg.eval_every and k % cfg.eval_every == 0 or k == cfg.steps:
                evaluate(k)
            if k % cfg.checkpoint_every == 0 or k == cfg.steps:
                check_finite_weights(k, net, ema)
                save(k)
            paused += time.perf_counter() - tic  # evaluation and checkpoints do not count as training time
            if stop:
                if k % cfg.checkpoint_every:
                    check_finite_weights(k, net, ema)
                    save(k)
                dist.barrier()  # rank 0's checkpoint is on disk before any rank exits
                raise FinetuneTerminated(f"stopped by SIGTERM after step {k} of {cfg.steps}, checkpoint written; "
                                         "rerun the same command (or let SLURM requeue it) to continue")
            _fault_injection(k, info.rank)

    final = join_url(cfg.out, "final")
    check_finite_weights(max(start, cfg.steps), net, ema)
    if dist.is_main():
        if start >= cfg.steps:  # nothing left to train: refresh the exported files from the checkpoint
            write_metrics(cfg.out, log)
        export_finetuned(final, exported.state_dict(), base, which, max(start, cfg.steps), cfg.to_dict(),
                         {"run_hash": config_hash(run_dict), "ema_decay": cfg.ema_decay,
                          "eval": [r for r in log if r.get("kind") == "eval"][-len(cfg.sigmas):]})
    digests = dist.all_gather_object(digest(net))
    dist.barrier()
    node = os.environ.get("SLURMD_NODENAME", platform.node())
    return {"rank": info.rank, "world_size": info.world_size, "node": node, "device": info.device,
            "start_step": start, "step": max(start, cfg.steps), "attempt": attempt,
            "param_sha256": digests[info.rank], "all_param_sha256": digests,
            "ema_sha256": digest(ema) if ema is not None else None, "final": final,
            "train_samples_per_s": float(np.median(speeds[1:] or speeds)) if speeds else None}
