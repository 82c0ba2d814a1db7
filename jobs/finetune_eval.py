"""Held-out evaluation of a fine-tuning run, and the curves PNG.

Every ``eval_every`` steps (and at the start and the end) the exported weights (the EMA when kept) purify
held-out images at each training sigma through ``build_purifier("consistency", ...)``, the very purifier that
certification uses, and we report per sigma

* ``lpips``: mean LPIPS(purified, clean), computed like the training loss (model space, same resize);
* ``l2``: mean Euclidean distance ``||purified - clean||_2`` in pixel space [0, 1] (the norm of the radii);
* ``acc``: accuracy of ``classifier(purified)`` when a classifier is given (else None).

The classifier job (``jobs/finetune_classifier.py``) uses the same :class:`HeldOut` images and noise with its frozen
purifier, reporting the accuracy of the classifier being trained (and L2; LPIPS is None there).

The evaluation noise is fixed for the whole run: batch ``j`` of sigma ``i`` draws from a generator seeded by
``(seed, EVAL_STREAM, i, j)``, so the curves compare weights, not noise, and do not depend on the world size
(batch ``j`` runs on rank ``j % world_size``; sums are all-reduced).
"""
from __future__ import annotations


import numpy as np
import torch

from cpcluster.jobs.training import EVAL_STREAM, derive_seed
from cpcluster.models.consistency import pixel_to_model
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.purifier_base import LabelPolicy
from cpcluster.models.purifiers import build_purifier
from cpcluster.util import dist


class HeldOut:
    """Purified-vs-clean metrics per sigma on fixed held-out images ``dataset[indices]`` with fixed noise.

    Parameters
    ----------
    sigmas, seed, eval_batch : the run's pixel-space sigmas, seed and evaluation batch size.
    dataset, indices : an ``ImageDataset`` and the (E,) held-out image indices into it.
    """

    def __init__(self, sigmas, seed: int, eval_batch: int, dataset, indices, device: str = "cpu",
                 autocast: bool = False):
        self.sigmas, self.seed, self.eval_batch = tuple(sigmas), int(seed), int(eval_batch)
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.device = torch.device(device)
        self.autocast = autocast

    def batches(self) -> list[tuple[int, np.ndarray]]:
        """``[(j, image indices of global batch j), ...]`` for the batches this rank evaluates."""
        size = self.eval_batch
        starts = range(0, len(self.indices), size)
        return [(j, self.indices[s:s + size]) for j, s in enumerate(starts) if j % dist.world_size() == dist.rank()]

    @torch.no_grad()
    def measure(self, purifiers, classifier=None, perceptual=None) -> torch.Tensor:
        """(S, 4) float64 sums over every rank's images of (LPIPS, L2, correct, images) per sigma.

        ``purifiers[i]`` purifies at ``sigmas[i]`` (pixel space in and out); ``classifier``: pixel-space images ->
        logits, or None; ``perceptual``: a ``PerceptualLoss`` (model space in, (B,) out) or None (LPIPS sums 0).
        """
        sums = torch.zeros(len(self.sigmas), 4, dtype=torch.float64, device=self.device)
        for i, (sigma, purifier) in enumerate(zip(self.sigmas, purifiers)):
            for j, idx in self.batches():
                x, labels = self.dataset.get(idx)
                x = torch.from_numpy(x)
                gen = torch.Generator().manual_seed(derive_seed(self.seed, EVAL_STREAM, i, j))
                noisy = (x + sigma * torch.randn(x.shape, generator=gen)).to(self.device)
                x = x.to(self.device)
                label_gen = torch.Generator(device=self.device).manual_seed(
                    derive_seed(self.seed, EVAL_STREAM, i, j, 1))
                lp, correct = None, 0
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    purified = purifier(noisy, label_gen).float()
                    if perceptual is not None:
                        lp = perceptual(pixel_to_model(purified), pixel_to_model(x)).float()
                    if classifier is not None:
                        pred = classifier(purified).argmax(1).cpu()
                        correct = int((pred == torch.from_numpy(labels)).sum())
                if lp is not None:
                    sums[i, 0] += lp.double().sum()
                sums[i, 1] += (purified - x).flatten(1).double().norm(dim=1).sum()
                sums[i, 2] += correct
                sums[i, 3] += len(idx)
        return dist.all_reduce_sum(sums)

    def records(self, sums, step: int, which: str, purifiers, lpips: bool, acc: bool) -> list[dict]:
        """One ``"eval"`` record per sigma from :meth:`measure`'s sums (``lpips`` / ``acc``: whether measured)."""
        records = []
        for i, sigma in enumerate(self.sigmas):
            n = max(float(sums[i, 3]), 1.0)
            records.append({
                "kind": "eval", "step": int(step), "sigma": float(sigma), "weights": which,
                "t_sigma": purifiers[i].describe().get("t_sigma"),
                "lpips": float(sums[i, 0]) / n if lpips else None, "l2": float(sums[i, 1]) / n,
                "acc": float(sums[i, 2]) / n if acc else None, "images": int(sums[i, 3]),
            })
        return records


class Evaluator:
    """The purifier job's held-out evaluation: the network being trained purifies, LPIPS / L2 / accuracy per sigma.

    Parameters
    ----------
    config : the run's ``FinetuneConfig`` (sigmas, time_rule, purifier_label, eval_batch, seed).
    dataset, indices : an ``ImageDataset`` and the (E,) held-out image indices into it.
    perceptual : a ``PerceptualLoss`` (model space in, (B,) out).
    base : the ``LoadedDenoiser`` the run started from (kind and meta; its module is not used).
    classifier : a ``LoadedClassifier`` (pixel-space input) or None.
    """

    def __init__(self, config, dataset, indices, perceptual, base: LoadedDenoiser, classifier=None,
                 device: str = "cpu", autocast: bool = False):
        self.config = config
        self.held = HeldOut(config.sigmas, config.seed, config.eval_batch, dataset, indices, device, autocast)
        self.perceptual = perceptual
        self.base = base
        self.classifier = classifier.module.to(device).eval() if classifier is not None else None

    def __call__(self, module: torch.nn.Module, step: int, which: str) -> list[dict]:
        """Evaluate ``module`` (the raw network F, model space) at every sigma; one record per sigma (all ranks)."""
        was_training = module.training
        module.eval()
        denoiser = LoadedDenoiser(module, self.base.kind, self.base.meta, self.base.spec, self.base.sha256)
        purifiers = [build_purifier("consistency", denoiser, sigma, time_rule=self.config.time_rule,
                                    label_policy=LabelPolicy(self.config.purifier_label))
                     for sigma in self.config.sigmas]
        sums = self.held.measure(purifiers, self.classifier, self.perceptual)
        module.train(was_training)
        return self.held.records(sums, step, which, purifiers, lpips=True, acc=self.classifier is not None)
