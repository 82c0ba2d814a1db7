"""Dev-time: small OpenAI-format UNets built by upstream code, and what upstream computes with them.

    python scripts/dev/make_openai_unet_reference.py UPSTREAM_DIR tests/data/openai_unet

UPSTREAM_DIR holds checkouts of openai/improved-diffusion (``improved-diffusion/``) and openai/consistency_models
(``consistency_models/``); this script imports them from there (it contains no upstream code). It needs torch,
numpy and einops (cm/unet.py imports it); run it in a side environment, e.g.
``pip install --target /tmp/side einops`` and ``PYTHONPATH=/tmp/side``.

For each flavour it builds upstream's ``UNetModel`` at a small width, replaces every parameter by seeded random
values (upstream zero-initialises output convolutions, which would make every output 0; the values are 4-level so
that the compressed file stays small), saves ``torch.save(model.state_dict())`` exactly as upstream's training loop
does (xz-compressed, as ``NAME.pt.xz``) and writes ``NAME.npz`` with inputs and upstream's outputs:

* ``id_uncond`` / ``id_cond`` (improved_diffusion, learned sigma): ``x`` (x_t, model space), ``timesteps`` (integer
  t), ``labels`` (cond only), ``out`` = the network through upstream's timestep wrapper (``rescale_timesteps``),
  ``pred_xstart`` = ``GaussianDiffusion.p_mean_variance(..., clip_denoised=False)["pred_xstart"]`` for the cosine
  schedule with T = 4000, ``alphas_cumprod`` (float64, (T,)).
* ``cm`` (consistency_models, class-conditional, scale-shift norm, resblock up/down, 16-channel heads): ``x``,
  ``sigmas``, ``labels``, ``out`` = the raw network output inside ``KarrasDenoiser.denoise``, ``denoised_edm``
  (EDM preconditioning) and ``denoised_cm`` (consistency boundary scalings), both with sigma_data 0.5, and
  ``out_fp16_attention``: ``out`` with upstream's non-flash attention (``QKVAttentionLegacy``, float16).

``presets.json``: for each released checkpoint cpcluster has a preset for, the layout of upstream's full-size network
built from the flags in the upstream README with upstream's own ``create_model`` (on the meta device: nothing is
allocated): tensor count, parameter count, sha256 of the lines ``KEY SHAPE`` in state_dict order, and for
improved-diffusion the diffusion's ``rescale_timesteps`` and T.

cm/unet.py builds flash attention (``flash_attn``, CUDA only) by default. Here its ``QKVFlashAttention`` is replaced by
upstream's own float32 ``QKVAttention`` (same ``(three, heads, channels)`` channel layout, softmax(q^T k / sqrt(d)) v),
and the training-only imports of ``KarrasDenoiser`` (piq, mpi4py, blobfile) are stubbed (``loss_norm="l2"``: no LPIPS).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import lzma
import os
import sys
import types

import numpy as np
import torch

SIZE, BATCH, T = 16, 2, 4000


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter := 4-level seeded random values scaled for unit-size activations (weights 1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / 1.118
    with torch.no_grad():
        for name, p in model.named_parameters():
            k = levels[torch.randint(4, p.shape, generator=gen)]
            if name.endswith("bias"):
                p.copy_(0.1 * k)
            elif p.ndim == 1:  # group-norm scale
                p.copy_(1.0 + 0.2 * k)
            elif "label_emb" in name:
                p.copy_(k)
            else:
                p.copy_(k / np.sqrt(p[0].numel()))


def save(out_dir: str, name: str, model: torch.nn.Module, arrays: dict) -> None:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # what improved-diffusion's / cm's train_util save (float32 master params)
    with open(os.path.join(out_dir, name + ".pt.xz"), "wb") as fh:
        fh.write(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    np.savez_compressed(os.path.join(out_dir, name + ".npz"), **{k: np.asarray(v) for k, v in arrays.items()})
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters")


def improved_diffusion(upstream: str, out_dir: str) -> None:
    sys.path.insert(0, os.path.join(upstream, "improved-diffusion"))
    from improved_diffusion.script_util import create_gaussian_diffusion
    from improved_diffusion.unet import UNetModel

    flavours = {
        "id_uncond": dict(num_classes=None, rescale=True, model=dict(num_heads=4, use_scale_shift_norm=True)),
        "id_cond": dict(num_classes=10, rescale=False,
                        model=dict(num_heads=4, num_heads_upsample=2, use_scale_shift_norm=False)),
    }
    for seed, (name, f) in enumerate(flavours.items(), start=1):
        model = UNetModel(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                          attention_resolutions=(2,), channel_mult=(1, 1), num_classes=f["num_classes"],
                          dropout=0.3, **f["model"]).eval()
        randomize(model, seed)
        diffusion = create_gaussian_diffusion(steps=T, learn_sigma=True, noise_schedule="cosine",
                                              rescale_timesteps=f["rescale"], rescale_learned_sigmas=f["rescale"])
        abar = diffusion.alphas_cumprod
        ratio = np.sqrt((1 - abar) / abar)
        sigmas = np.array([0.25, 0.5])
        t = torch.tensor([int(np.nonzero(ratio >= 2 * s)[0][0]) for s in sigmas])  # Carlini et al.'s t for sigma
        gen = torch.Generator().manual_seed(100 + seed)
        x0 = torch.rand(BATCH, 3, SIZE, SIZE, generator=gen) * 2 - 1
        x_t = torch.from_numpy(np.sqrt(abar[t])).float()[:, None, None, None] * (
            x0 + 2 * torch.from_numpy(sigmas).float()[:, None, None, None] * torch.randn(x0.shape, generator=gen))
        kwargs = {} if f["num_classes"] is None else {"y": torch.tensor([3, 7])}
        with torch.no_grad():
            out = diffusion._wrap_model(model)(x_t, t, **kwargs)
            pred = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=kwargs)["pred_xstart"]
        arrays = dict(x=x_t, timesteps=t, sigmas_pixel=sigmas, out=out, pred_xstart=pred, alphas_cumprod=abar)
        if kwargs:
            arrays["labels"] = kwargs["y"]
        save(out_dir, name, model, arrays)


def consistency_models(upstream: str, out_dir: str) -> None:
    for stub in ("piq", "blobfile", "mpi4py"):  # imported by karras_diffusion / dist_util, used only in training
        sys.modules.setdefault(stub, types.SimpleNamespace(LPIPS=None, MPI=None))
    sys.path.insert(0, os.path.join(upstream, "consistency_models"))
    import cm.unet as cm_unet
    from cm.karras_diffusion import KarrasDenoiser

    cm_unet.QKVFlashAttention = lambda channels, num_heads, **_: cm_unet.QKVAttention(num_heads)
    model = cm_unet.UNetModel(image_size=SIZE, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                              attention_resolutions=(1, 2), dropout=0.1, channel_mult=(1, 1), num_classes=10,
                              num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True).eval()
    randomize(model, 3)
    gen = torch.Generator().manual_seed(103)
    sigmas = torch.tensor([0.6, 2.5])
    x_t = torch.rand(BATCH, 3, SIZE, SIZE, generator=gen) * 2 - 1 + sigmas[:, None, None, None] * torch.randn(
        BATCH, 3, SIZE, SIZE, generator=gen)
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        out, edm = KarrasDenoiser(sigma_data=0.5, loss_norm="l2").denoise(model, x_t, sigmas, y=labels)
        _, cd = KarrasDenoiser(sigma_data=0.5, loss_norm="l2", distillation=True).denoise(model, x_t, sigmas,
                                                                                          y=labels)
        for block in model.modules():
            if isinstance(block, cm_unet.AttentionBlock):
                block.attention = cm_unet.QKVAttentionLegacy(block.num_heads)
        out16, _ = KarrasDenoiser(sigma_data=0.5, loss_norm="l2").denoise(model, x_t, sigmas, y=labels)
    save(out_dir, "cm", model, dict(x=x_t, sigmas=sigmas, labels=labels, out=out, denoised_edm=edm,
                                    denoised_cm=cd, out_fp16_attention=out16))


# Flags of the released checkpoints, as the upstream READMEs give them.
IMPROVED_FLAGS = {
    "cifar10_uncond_50M_500K": dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3,
                                    diffusion_steps=4000, noise_schedule="cosine"),
    "imagenet64_uncond_100M_1500K": dict(image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True,
                                         diffusion_steps=4000, noise_schedule="cosine"),
    "imagenet64_cond_270M_250K": dict(image_size=64, num_channels=192, num_res_blocks=3, learn_sigma=True,
                                      class_cond=True, diffusion_steps=4000, noise_schedule="cosine",
                                      rescale_learned_sigmas=False, rescale_timesteps=False),
}
CM_FLAGS = dict(attention_resolutions="32,16,8", class_cond=True, dropout=0.1, image_size=64, num_channels=192,
                num_head_channels=64, num_res_blocks=3, resblock_updown=True, use_fp16=True, use_scale_shift_norm=True)


def layout(model: torch.nn.Module) -> dict:
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())
    return {"tensors": len(model.state_dict()), "parameters": sum(p.numel() for p in model.parameters()),
            "layout_sha256": hashlib.sha256(lines.encode()).hexdigest()}


def preset_layouts(out_dir: str) -> None:
    """presets.json (see the module docstring); needs improved_diffusion and cm importable (run after the others)."""
    import cm.script_util as cm_script
    from improved_diffusion import script_util

    found = {}
    for name, flags in IMPROVED_FLAGS.items():
        args = {**script_util.model_and_diffusion_defaults(), **flags}
        with torch.device("meta"):
            model, diffusion = script_util.create_model_and_diffusion(**args)
        found[name] = {**layout(model), "rescale_timesteps": diffusion.rescale_timesteps,
                       "timesteps": diffusion.original_num_steps}
    args = {**cm_script.model_and_diffusion_defaults(), **CM_FLAGS}
    wanted = inspect.signature(cm_script.create_model).parameters
    with torch.device("meta"):
        model = cm_script.create_model(**{k: v for k, v in args.items() if k in wanted})
    for name in ("edm_imagenet64_ema", "cd_imagenet64_lpips", "cd_imagenet64_l2"):
        found[name] = layout(model)
    with open(os.path.join(out_dir, "presets.json"), "w") as fh:
        json.dump(found, fh, indent=1, sort_keys=True)
        fh.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("upstream", help="folder with improved-diffusion/ and consistency_models/ checkouts")
    parser.add_argument("out", help="output folder (tests/data/openai_unet)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    improved_diffusion(args.upstream, args.out)
    consistency_models(args.upstream, args.out)
    preset_layouts(args.out)


if __name__ == "__main__":
    main()
