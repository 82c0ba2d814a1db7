"""What every purifier is: noisy pixel-space images in, purified pixel-space images in [0, 1] out (DESIGN.md
section 1); the label policy of class-conditional networks; ``consistency`` (the paper's purifier) and ``none``; and
the smoothed base classifier ``clf(D(x + delta))``. The registry of purifiers is :mod:`cpcluster.models.purifiers`.

Every purifier is built for one smoothing level ``sigma`` (pixel space) and is called as
``purifier(x_noisy, generator)`` with ``x_noisy = x + delta`` of shape (B, C, H, W), *not* clamped, and an
optional ``torch.Generator`` that the caller seeds per noise batch (so any randomness a purifier uses, such as a
random class label, is a function of the noise seed and not of the shard that ran it). A caller that has drawn the
labels itself (fine-tuning draws them for the global batch, so that they do not depend on the world size) passes
``labels=`` (B,) instead.

A class-conditional network never sees the true label: :class:`LabelPolicy` picks labels independently of the
image (a fixed class, or uniform random classes), and the choice is recorded in ``describe()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cpcluster.core.choices import check_label_policy
from cpcluster.models.consistency import ConsistencyFunction, model_to_pixel, pixel_to_model, time_for_sigma
from cpcluster.models.loaded import LoadedClassifier, LoadedDenoiser
from cpcluster.util.errors import InputError


@dataclass(frozen=True)
class LabelPolicy:
    """Labels for class-conditional purifiers: ``"fixed:K"`` or ``"random"`` (uniform, from the batch generator)."""

    text: str = "random"

    def __post_init__(self):
        check_label_policy(self.text)

    def labels(self, batch: int, num_classes: int | None, device, generator=None) -> torch.Tensor | None:
        """(batch,) int64 labels, or None for an unconditional network. Never depends on the true label."""
        if not num_classes:
            return None
        if self.text == "random":
            return torch.randint(num_classes, (batch,), generator=generator, device=device)
        kind, _, value = self.text.partition(":")
        if kind != "fixed" or not value.isdigit() or int(value) >= num_classes:
            raise InputError(f"--purifier-label {self.text!r}: use 'random' or 'fixed:K' with 0 <= K < {num_classes}")
        return torch.full((batch,), int(value), dtype=torch.int64, device=device)


class Purifier(nn.Module):
    """Base class. ``forward(x_noisy (B,C,H,W) pixel space, generator=None, labels=None) -> (B,C,H,W) pixel space
    [0,1]``.

    ``nfe``: network evaluations per purified image (the cost the paper's efficiency claim is about)."""

    kind = "base"
    nfe = 1

    def describe(self) -> dict:
        return {"kind": self.kind}


class IdentityPurifier(Purifier):
    """``none``: plain randomized smoothing; the classifier sees ``x + delta`` unchanged."""

    kind = "none"
    uses_generator = False
    nfe = 0

    def __init__(self, sigma: float = 0.0, **_):
        super().__init__()

    def forward(self, x_noisy: torch.Tensor, generator: torch.Generator | None = None, labels=None) -> torch.Tensor:
        return x_noisy


class DenoiserPurifier(Purifier):
    """Base of purifiers driven by a (possibly class-conditional) network ``self.denoiser``.

    Subclasses set ``self.denoiser`` and ``self.label_policy``; :meth:`labels_for` gives the labels the network
    sees (never the true label), drawn from the batch generator when the policy is random.
    """

    @property
    def uses_generator(self) -> bool:
        """Whether forward draws from the generator (random labels for a class-conditional network)."""
        return self.label_policy.text == "random" and bool(self.denoiser.meta.get("num_classes"))

    def labels_for(self, x_noisy: torch.Tensor, generator: torch.Generator | None,
                   labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B,) int64 labels for a conditional network (``labels`` when the caller drew them), None for an
        unconditional one."""
        if labels is not None and self.denoiser.meta.get("num_classes"):
            return labels
        return self.label_policy.labels(x_noisy.shape[0], self.denoiser.meta.get("num_classes"),
                                        x_noisy.device, generator)


class ConsistencyPurifier(DenoiserPurifier):
    """``consistency``: one step of the consistency function at ``t_sigma``.

    ``x_t = 2 (x + delta) - 1`` (model-space noise 2 sigma), ``y = D(x_t, t_sigma)``, output ``clamp((y + 1) / 2)``.
    ``t_sigma`` is the training-grid point nearest ``2 sigma`` (``time_rule="nearest"``, grid size from the
    network's ``meta["grid_steps"]``) or ``2 sigma`` itself (``time_rule="exact"``).
    """

    kind = "consistency"

    def __init__(self, denoiser: LoadedDenoiser, sigma: float, time_rule: str = "nearest",
                 label_policy: LabelPolicy = LabelPolicy(), **_):
        super().__init__()
        if denoiser.kind != "consistency":
            fix = "pf-ode (--solver-steps 1 is one-shot denoising)" if denoiser.kind == "edm" else "onestep-ddpm or pf-ode"
            raise InputError(f"--denoiser {denoiser.spec}: a {denoiser.kind} network cannot drive the consistency "
                             f"purifier; use --purifier {fix}")
        self.denoiser = denoiser
        self.function = ConsistencyFunction(denoiser.module, denoiser.meta.get("c_noise", "openai"))
        self.sigma = float(sigma)
        self.time_rule = time_rule
        try:
            self.t = time_for_sigma(sigma, denoiser.meta.get("grid_steps"), time_rule)
        except ValueError as e:
            raise InputError(f"--denoiser {denoiser.spec}: {e}; set grid_steps in the spec or use --time-rule exact") \
                from None
        self.label_policy = label_policy

    def forward(self, x_noisy: torch.Tensor, generator: torch.Generator | None = None, labels=None) -> torch.Tensor:
        labels = self.labels_for(x_noisy, generator, labels)
        return model_to_pixel(self.function(pixel_to_model(x_noisy), self.t, labels))

    def describe(self) -> dict:
        return {"kind": self.kind, "t_sigma": self.t, "time_rule": self.time_rule,
                "label_policy": self.label_policy.text if self.denoiser.meta.get("num_classes") else None}


class SmoothedBase(nn.Module):
    """The base classifier of randomized smoothing with purification: ``f(x + delta) = clf(D(x + delta))``.

    ``forward(x_noisy (B,C,H,W) pixel space, generator=None) -> logits (B, num_classes)``.
    """

    def __init__(self, purifier: Purifier, classifier: LoadedClassifier):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier.module
        self.num_classes = classifier.num_classes

    def forward(self, x_noisy: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.classifier(self.purifier(x_noisy, generator))
