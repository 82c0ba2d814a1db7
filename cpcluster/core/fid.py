"""The FID feature extractor: torch-fidelity's InceptionV3 with weights from a local file, never downloaded.

Why torch-fidelity. Published FIDs (TTUR, and the CIFAR-10 / ImageNet-64 numbers papers compare against) come from
the 2015-12-05 TensorFlow Inception graph fed with uint8 images resized by TensorFlow 1.x's bilinear resize.
torch-fidelity ports exactly that: the TF weights converted to a plain state_dict
(``weights-inception-2015-12-05-6726825d.pth``) and a re-implementation of TF 1.x's resize, and its authors
report FID agreeing with the TF reference to floating-point precision. pytorch-fid uses the same weights but
PyTorch's bilinear resize (documented small deviations); clean-fid deliberately resizes differently (so its
default numbers differ from published ones) and loads a TorchScript file (code); torchmetrics' FID wraps
torch-fidelity's extractor. So: torch-fidelity, used only for its network; the Frechet distance itself is computed
in numpy (``aggregate/quality.py``), which needs no torch.

Loading. torch-fidelity's constructor would download the weights, or read a given file with
``torch.load(weights_only=False)`` (a plain unpickle). Neither happens here: :func:`architecture` builds the
network with a no-op load, then :func:`load_inception` reads the user's file with ``weights_only=True``, checks
every key and shape (naming the first mismatch) and loads it strictly. :func:`check_inception` runs before
submission and names the file and the folder it belongs in (``$TORCH_HOME/hub/checkpoints``, like the LPIPS trunk).

Features: :func:`features` takes pixel-space images in [0, 1], (B, C, H, W) with C = 1 or 3, quantizes them to
uint8 (as if saved as PNG, the way published FIDs are computed), repeats grey to RGB, and returns the (B, 2048)
pool3 features in float64.
"""
from __future__ import annotations

import functools
import io
import os

import torch

from cpcluster.util.errors import InputError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
FEATURE = "2048"
RANDOM_WEIGHTS_WARNING = ("WARNING: --inception-random-weights: FID uses a RANDOMLY INITIALISED InceptionV3. Its "
                          "numbers are not FIDs; use this for tests and the demo only.")
MAX_FILE_BYTES = 512 * 2**20


def default_path() -> str:
    """Where the weights are expected unless ``--inception-weights`` says otherwise (torch's hub cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def check_inception(path: str | None) -> str:
    """The weights file to use (``path`` or :func:`default_path`); :class:`InputError` naming it if it is missing."""
    path = os.path.expanduser(path) if path else default_path()
    if not os.path.isfile(path):
        raise InputError(f"Inception weights for FID missing: {path} is not a file; put {INCEPTION_FILE} (from "
                         f"{INCEPTION_URL}) there or pass --inception-weights FILE, or --inception-random-weights "
                         "for tests and demos")
    return path


@functools.lru_cache(maxsize=1)
def _architecture_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise InputError("FID needs the torch-fidelity package: pip install 'cpcluster[quality]' "
                         "(or torch-fidelity)") from None

    class InceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's network; its constructor's weight loading is a no-op (weights come later, checked)."""

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if state_dict:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            return None

    return InceptionV3


def architecture() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (pool3 features) with PyTorch's default initialisation, in eval mode, CPU."""
    empty = io.BytesIO()
    torch.save({}, empty)  # the constructor reads this (our own empty dict) instead of downloading
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        return _architecture_class()("inception-v3-compat", [FEATURE], feature_extractor_weights_path=empty)


def random_state(seed: int = 0, template: dict | None = None) -> dict:
    """A seeded random-weight stand-in for the real file (same keys and shapes): He-normal convolutions, identity
    BatchNorm statistics, so activations keep their scale through the 94 layers. For tests and the demo.
    ``template``: a state_dict of :func:`architecture` to take the keys and shapes from (else one is built)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in (template if template is not None else architecture().state_dict()).items():
        if key.endswith("running_var") or (key.endswith(".weight") and value.ndim == 1):
            state[key] = torch.ones_like(value)
        elif value.ndim > 1:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.zeros_like(value)
    return state


def load_inception(path: str | None = None, random_seed: int | None = None) -> torch.nn.Module:
    """The feature extractor with the weights of ``path`` (see :func:`check_inception`), or the random stand-in of
    ``random_seed``; eval mode, no gradients, CPU. One process builds each at most once (the quality jobs of a
    ``--executor debug`` run share it); the file's size and modification time are part of the cache key."""
    if random_seed is not None:
        return _load(None, None, int(random_seed))
    path = check_inception(path)
    stat = os.stat(path)
    return _load(path, (stat.st_size, stat.st_mtime_ns), None)


@functools.lru_cache(maxsize=1)
def _load(path: str | None, version, random_seed: int | None) -> torch.nn.Module:
    model = architecture()
    if random_seed is not None:
        state = random_state(random_seed, model.state_dict())
    else:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            raise InputError(f"Inception weights {path}: {os.path.getsize(path)} bytes is too large for this network")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for foreign or damaged files
            raise InputError(f"Inception weights {path}: cannot be loaded with weights_only=True "
                             f"({type(e).__name__}); use torch-fidelity's {INCEPTION_FILE}") from None
        mine = model.state_dict()
        if not isinstance(state, dict):
            raise InputError(f"Inception weights {path}: not a state_dict")
        for key, value in mine.items():
            other = state.get(key)
            if not isinstance(other, torch.Tensor) or tuple(other.shape) != tuple(value.shape):
                raise InputError(f"Inception weights {path}: no tensor {key} of shape {tuple(value.shape)}; is this "
                                 f"torch-fidelity's {INCEPTION_FILE}?")
        extra = sorted(set(state) - set(mine))
        if extra:
            raise InputError(f"Inception weights {path}: unexpected tensor {extra[0]}; is this {INCEPTION_FILE}?")
    torch.nn.Module.load_state_dict(model, state, strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 2048) float64 pool3 features of pixel-space images (B, C, H, W) in [0, 1], C in {1, 3}.

    Images are clamped and quantized to uint8 first (published FIDs are computed on saved images) and grey images
    repeated to three channels; the network resizes them to 299 x 299 itself (TensorFlow 1.x bilinear).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"FID features need (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    x = torch.round(images.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    device = next(model.parameters()).device
    (out,) = model(x.to(device).contiguous())
    return out.double().cpu()
