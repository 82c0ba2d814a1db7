"""Inference speed options for purifier + classifier forwards (measured in ``benchmarks/bench_forward.py``).

:func:`optimize_for_inference` wraps any module (a :class:`SmoothedBase`, a purifier, a classifier) without
changing its call signature or its output dtype (float32): eval mode, no grad tracking, and optionally
channels_last memory format, bf16/fp16 autocast and ``torch.compile``. What is faster depends on the device and the
model; BENCHMARKS.md ("Forward throughput") has the measurements and :func:`recommended_options` the result.
"""
from __future__ import annotations

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Measured (BENCHMARKS.md, "Forward throughput", 2-thread AMD EPYC with avx512_bf16, CIFAR-size UNet + ResNet-18):
# bf16 autocast 1.4-1.5x; channels_last 1.07x alone and nothing on top of bf16; torch.compile 1.04x for a 44 s
# compile. Exact (float32) stays the default because reduced precision changes the base classifier; callers opt in.
EXACT = {"channels_last": False, "autocast": None, "compile": False}
FAST_CPU_BF16 = {"channels_last": False, "autocast": "bf16", "compile": False}


class InferenceWrapper(nn.Module):
    """Calls ``module(*args, **kwargs)`` with 4-D tensor arguments in channels_last and under autocast.

    Floating outputs are returned as float32 so callers (argmax, counting) see the same dtype either way.
    """

    def __init__(self, module: nn.Module, channels_last: bool = False, autocast: str | None = None):
        super().__init__()
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {autocast!r}")
        self.module = module
        self.channels_last = channels_last
        self.autocast = autocast

    def _format(self, value):
        if self.channels_last and isinstance(value, torch.Tensor) and value.ndim == 4:
            return value.contiguous(memory_format=torch.channels_last)
        return value

    def forward(self, *args, **kwargs):
        args = tuple(self._format(a) for a in args)
        kwargs = {k: self._format(v) for k, v in kwargs.items()}
        if self.autocast is None:
            out = self.module(*args, **kwargs)
        else:
            device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
            with torch.autocast(device_type, dtype=AUTOCAST_DTYPES[self.autocast]):
                out = self.module(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float()
        return out.contiguous() if isinstance(out, torch.Tensor) else out


def optimize_for_inference(module: nn.Module, device: str | torch.device = "cpu", *, channels_last: bool = False,
                           autocast: str | None = None, compile: bool = False,
                           compile_mode: str | None = None) -> nn.Module:
    """``module`` on ``device``, frozen, wrapped for fast inference; same call signature, float32 outputs.

    Parameters
    ----------
    module : any ``nn.Module``; its parameters are moved (and, with ``channels_last``, re-laid out) in place.
    device : target device.
    channels_last : store 4-D weights and inputs in NHWC order (cuDNN / oneDNN convolutions prefer it).
    autocast : ``None`` (float32), ``"bf16"`` or ``"fp16"``: run under ``torch.autocast``; results are cast back.
    compile : wrap with ``torch.compile`` (``compile_mode`` e.g. ``"max-autotune"``); costs a one-off compile
        on the first call of each input shape.

    Numerics: channels_last changes only memory order (results equal up to float rounding); autocast changes the
    arithmetic precision of the network (so a smoothed classifier's counts can differ slightly: it is a different,
    equally valid base classifier, and the choice belongs in the run config).
    """
    device = torch.device(device)
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    wrapped = InferenceWrapper(module, channels_last=channels_last, autocast=autocast)
    if compile:
        return torch.compile(wrapped, mode=compile_mode, dynamic=False)
    return wrapped


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises bf16 arithmetic (``avx512_bf16`` or ``amx_bf16``); False if unknown."""
    try:
        with open(cpuinfo) as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def recommended_options(device: str | torch.device, reduced_precision: bool = False) -> dict:
    """Keyword arguments of :func:`optimize_for_inference` for ``device``, from the measurements above.

    ``reduced_precision=False`` (default): float32, no layout change, no compile (exact, the certify default).
    ``reduced_precision=True``: bf16 autocast where it was measured faster (CPUs with native bf16); on CUDA bf16
    autocast too (tensor cores; not measured on this project's machines yet).
    """
    kind = torch.device(device).type
    if reduced_precision and (kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16())):
        return dict(FAST_CPU_BF16)
    return dict(EXACT)
