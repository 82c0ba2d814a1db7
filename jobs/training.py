"""What the two fine-tuning jobs share: data order, per-step noise, resumption, the step loop, the run summary.

The purifier job (DM-FT, ``jobs/finetune.py``) and the classifier job (CLS-FT, ``jobs/finetune_classifier.py``)
differ only in what one optimizer step computes; everything around it lives here, once:

* **data order** -- the global batch of step ``k`` is positions ``[p, p + B)`` of a permutation of the training
  images drawn from ``(seed, epoch)`` (:func:`global_batch`);
* **noise** -- the noise, sigma choices and purifier labels of step ``k`` come from one generator seeded by
  ``(seed, k)`` and are drawn for the whole global batch on the CPU (:func:`step_draws`); rank ``r`` of ``W`` keeps
  rows ``[r B/W, (r+1) B/W)``. So what a step sees depends on neither the world size nor on resumption;
* **resumption** -- rank 0 checkpoints every ``checkpoint_every`` steps and at the end (``jobs/finetune_io.py``);
  every rank starts from the newest checkpoint on disk (:meth:`Trainer.resume`);
* **SIGTERM** -- every rank stops at the next log step (the flag rides the loss all-reduce), rank 0 checkpoints
  that step and the job raises :class:`FinetuneTerminated` (:meth:`Trainer.loop`).

A config passed here needs the fields ``out, seed, steps, batch_size, log_every, eval_every, checkpoint_every,
keep_checkpoints, ema_decay, grad_clip`` and a ``run_dict()``.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
import platform
import signal
import time
from typing import Callable

import numpy as np

from cpcluster.util.errors import InputError
from cpcluster.util.signals import Terminated

TRAIN_STREAM, NOISE_STREAM, EVAL_STREAM = 0, 1, 2
DROPOUT_STREAM = 3
# Test hook (fault injection): SIGKILL this process right after step N, on rank CPCLUSTER_FAULT_KILL_RANK (0).
FAULT_KILL_ENV = "CPCLUSTER_FAULT_KILL_AFTER_STEP"
FAULT_TERM_ENV = "CPCLUSTER_FAULT_TERM_AFTER_STEP"  # the same with SIGTERM


class FinetuneTerminated(Terminated):
    """SIGTERM arrived: every rank stopped at the same step, after rank 0 wrote a checkpoint of it."""


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


class TrainingJob:
    """Base of the picklable submitit callables of the fine-tuning jobs: ``__call__`` runs ``self.run(config)`` on
    every rank between :func:`cpcluster.util.dist.init` and ``shutdown``; ``checkpoint()`` resubmits the same config (on
    preemption or timeout: the state comes back from disk, not memory)."""

    def __init__(self, config):
        self.config = config

    def run(self, config) -> dict:
        raise NotImplementedError

    def __call__(self) -> dict:
        from cpcluster.util import dist

        dist.init(self.config.device)
        try:
            return self.run(self.config)
        finally:
            dist.shutdown()

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.config))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out={self.config.out!r}, steps={self.config.steps})"


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed that is a function of ``(seed, *key)`` only (numpy SeedSequence spawn key)."""
    state = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


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


def step_draws(seed: int, step: int, shape: tuple, num_sigmas: int, rows: slice, policy, num_classes):
    """``(z, choice, labels)`` of 0-based ``step`` for this rank's ``rows`` of the global batch.

    ``shape`` is the global batch's (B, C, H, W). ``z``: standard normal (rows, C, H, W) on the CPU; ``choice``:
    (rows,) index into the run's sigmas; ``labels``: (rows,) labels for a class-conditional purifier (``policy``, a
    :class:`~cpcluster.models.purifier_base.LabelPolicy`) or None. Drawn in this order for all B rows from one
    generator seeded by ``(seed, NOISE_STREAM, step)``, then sliced.
    """
    import torch

    gen = torch.Generator().manual_seed(derive_seed(seed, NOISE_STREAM, step))
    z = torch.randn(shape, generator=gen)[rows]
    choice = torch.randint(num_sigmas, (shape[0],), generator=gen)[rows]
    labels = policy.labels(shape[0], num_classes, "cpu", gen)
    return z, choice, None if labels is None else labels[rows]


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


def _cpu_state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Trainer:
    """One rank's run around a network ``net`` being trained: EMA, optimizer, checkpoints, the step loop.

    Parameters
    ----------
    config : the job's frozen config (fields listed in the module docstring).
    net : the ``nn.Module`` being trained, on its device; its state_dict is what is checkpointed and exported.
    optimizer : built over ``net``'s parameters.
    name : the log prefix (``"finetune"``, ``"finetune-classifier"``).
    """

    def __init__(self, config, net, optimizer, name: str):
        from cpcluster.util import dist

        self.cfg, self.net, self.opt, self.name = config, net, optimizer, name
        self.info = dist.info()
        self.ema = copy.deepcopy(net).eval().requires_grad_(False) if config.ema_decay > 0 else None
        self.run_dict = config.run_dict()
        self.start, self.log, self.attempt, self.speeds = 0, [], 1, []
        self._plotted = 0

    @property
    def exported(self):
        """The weights a result exports and evaluation sees: the EMA when kept, else the raw weights."""
        return self.ema if self.ema is not None else self.net

    @property
    def which(self) -> str:
        return "ema" if self.ema is not None else "raw"

    def resume(self, record: dict) -> bool:
        """Check ``out`` against this run, write the run record (rank 0), load the newest checkpoint if any.

        ``record`` is the config dict written to the run record. Returns True when a checkpoint was loaded.
        """
        from cpcluster.jobs.finetune_io import check_run_record, load_latest, remove_temporaries, write_run_record
        from cpcluster.util import dist

        check_run_record(self.cfg.out, self.run_dict)  # on every rank, so that all of them stop on a mismatch
        if dist.is_main():
            remove_temporaries(self.cfg.out)
            write_run_record(self.cfg.out, record, self.run_dict)
        state = load_latest(self.cfg.out, self.run_dict)
        if state is None:
            return False
        self.net.load_state_dict(state["net"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.start, self.log, self.attempt = int(state["step"]), list(state["log"]), int(state["attempt"]) + 1
        self.log.append({"kind": "resume", "step": self.start, "attempt": self.attempt})
        dist.print0(f"[{self.name}] resuming from step {self.start} (attempt {self.attempt})")
        return True

    def save(self, step: int) -> None:
        """Rank 0: checkpoint ``step``, rewrite ``metrics.jsonl``, redraw the curves when there are new evaluations."""
        from cpcluster.jobs.finetune_io import plot_curves, save_checkpoint, write_metrics
        from cpcluster.util import dist
        from cpcluster.util.fileio import config_hash, join_url

        if not dist.is_main():
            return
        save_checkpoint(self.cfg.out, {
            "step": step, "run": self.run_dict, "run_hash": config_hash(self.run_dict), "attempt": self.attempt,
            "net": _cpu_state(self.net), "ema": None if self.ema is None else _cpu_state(self.ema),
            "optimizer": self.opt.state_dict(), "log": self.log}, self.cfg.keep_checkpoints)
        write_metrics(self.cfg.out, self.log)
        evals = sum(r["kind"] == "eval" for r in self.log)
        if evals != self._plotted:  # drawing takes ~0.5 s: only when there are new evaluation points
            plot_curves(self.log, join_url(self.cfg.out, "curves.png"))
            self._plotted = evals

    def optimizer_step(self, loss):
        """Backward, clip the global gradient norm (``grad_clip``; 0 = off), step, update the EMA; the norm."""
        import torch

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip or float("inf"))
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.net.parameters()):
                    e.lerp_(p, 1.0 - self.cfg.ema_decay)
                for e, b in zip(self.ema.buffers(), self.net.buffers()):
                    e.copy_(b)
        return grad_norm

    def loop(self, train_step: Callable[[int], tuple], evaluate: Callable[[int], None]) -> None:
        """Steps ``start .. steps``: ``train_step(step) -> (loss, grad_norm)`` (0-based step, detached loss).

        Logs every ``log_every`` steps (loss averaged over ranks and steps), calls ``evaluate(k)`` every
        ``eval_every`` steps and at the end (``k`` = steps done), checkpoints every ``checkpoint_every`` and at the
        end; on SIGTERM stops every rank at the next log step as described in the module docstring.
        """
        import torch

        from cpcluster.util import dist
        from cpcluster.util.signals import stop_on_sigterm

        cfg, info = self.cfg, self.info
        # (sum of losses, steps) since the last log, and a SIGTERM flag
        window = torch.zeros(3, dtype=torch.float64, device=torch.device(info.device))
        clock, paused = time.perf_counter(), 0.0
        stop = False
        with stop_on_sigterm(f"at the next log step (every {cfg.log_every}) after writing a checkpoint") as term:
            for step in range(self.start, cfg.steps):
                k = step + 1
                loss, grad_norm = train_step(step)
                window[0] += loss.double()
                window[1] += 1
                if k % cfg.log_every == 0 or k == cfg.steps:
                    window[2] = float(term())  # a SIGTERM on any rank stops every rank at this same step
                    sums = dist.all_reduce_sum(window.clone())
                    if not torch.isfinite(sums[0]):  # the same sum on every rank: all of them stop here
                        raise Diverged(f"step {k}: the loss is {float(sums[0] / sums[1])} (training diverged); "
                                       f"nothing was checkpointed or exported from it; lower --lr (now {cfg.lr:g}) "
                                       "or keep --grad-clip on")
                    stop = bool(sums[2] > 0) and k < cfg.steps
                    speed = float(sums[1]) / info.world_size * cfg.batch_size / (time.perf_counter() - clock - paused)
                    self.speeds.append(speed)
                    self.log.append({"kind": "train", "step": k, "loss": float(sums[0] / sums[1]),
                                     "attempt": self.attempt, "grad_norm": float(grad_norm), "samples_per_s": speed})
                    dist.print0(f"[{self.name}] step {k}/{cfg.steps} loss {self.log[-1]['loss']:.5f} "
                                f"{speed:.1f} samples/s")
                    window.zero_()
                    clock, paused = time.perf_counter(), 0.0
                tic = time.perf_counter()
                if cfg.eval_every and k % cfg.eval_every == 0 or k == cfg.steps:
                    evaluate(k)
                if k % cfg.checkpoint_every == 0 or k == cfg.steps:
                    check_finite_weights(k, self.net, self.ema)
                    self.save(k)
                paused += time.perf_counter() - tic  # evaluation and checkpoints do not count as training time
                if stop:
                    if k % cfg.checkpoint_every:
                        check_finite_weights(k, self.net, self.ema)
                        self.save(k)
                    dist.barrier()  # rank 0's checkpoint is on disk before any rank exits
                    raise FinetuneTerminated(f"stopped by SIGTERM after step {k} of {cfg.steps}, checkpoint "
                                             "written; rerun the same command (or let SLURM requeue it) to continue")
                _fault_injection(k, info.rank)

    def run(self, train_step: Callable[[int], tuple], evaluate: Callable[[int], None], resumed: bool,
            export: Callable[[str, dict], None]) -> dict:
        """Evaluate step 0 (a fresh run), :meth:`loop`, then on rank 0 ``export(final folder, record)`` with the
        record every export carries (run hash, the last evaluation); returns :meth:`summary`."""
        from cpcluster.jobs.finetune_io import write_metrics
        from cpcluster.util import dist
        from cpcluster.util.fileio import config_hash, join_url

        if not resumed:
            evaluate(0)
        self.loop(train_step, evaluate)
        final = join_url(self.cfg.out, "final")
        check_finite_weights(max(self.start, self.cfg.steps), self.net, self.ema)
        if dist.is_main():
            if self.start >= self.cfg.steps:  # nothing left to train: refresh the exported files from the checkpoint
                write_metrics(self.cfg.out, self.log)
            evals = [r for r in self.log if r.get("kind") == "eval"][-len(self.cfg.sigmas):]
            export(final, {"run_hash": config_hash(self.run_dict), "eval": evals})
        return self.summary(final)

    def summary(self, final: str) -> dict:
        """This rank's result: steps, attempt, weight digests of every rank (all ranks call it), speed."""
        from cpcluster.util import dist

        digests = dist.all_gather_object(digest(self.net))
        dist.barrier()
        node = os.environ.get("SLURMD_NODENAME", platform.node())
        return {"rank": self.info.rank, "world_size": self.info.world_size, "node": node, "device": self.info.device,
                "start_step": self.start, "step": max(self.start, self.cfg.steps), "attempt": self.attempt,
                "param_sha256": digests[self.info.rank], "all_param_sha256": digests,
                "ema_sha256": digest(self.ema) if self.ema is not None else None, "final": final,
                "train_samples_per_s": float(np.median(self.speeds[1:] or self.speeds)) if self.speeds else None}


def rank_setup(config):
    """``(dist info, torch device, bf16 autocast on?)`` of this rank, after checking that the global batch divides
    over the ranks and sharing a CPU node's cores among its ranks (unless ``OMP_NUM_THREADS`` is set)."""
    import torch

    from cpcluster.util import dist
    from cpcluster.util.errors import InputError

    info = dist.info()
    if config.batch_size % info.world_size:
        raise InputError(f"--batch-size {config.batch_size} is not divisible by the {info.world_size} ranks")
    if info.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    device = torch.device(info.device)
    return info, device, config.amp and device.type == "cuda"


def rank_rows(batch_size: int, info) -> slice:
    """This rank's rows of the global batch (the batch is divisible by the world size)."""
    per_rank = batch_size // info.world_size
    return slice(info.rank * per_rank, (info.rank + 1) * per_rank)
