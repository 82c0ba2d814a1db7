"""Converter ``openai-unet``: an OpenAI PyTorch UNet state dict (``torch.save(model.state_dict())``) -> ``net:OUT``.

Reads the ``.pt`` with ``torch.load(weights_only=True)`` (nothing in it chooses code) and maps it, key for key,
onto the architecture ``openai-unet`` (:mod:`cpcluster.models.archs.openai_unet`). ``--set preset=NAME`` names the
released checkpoint (its file stem) and fixes the architecture and the network metadata:

* improved-diffusion ``cifar10_uncond_50M_500K``, ``imagenet64_uncond_100M_1500K`` (``rescale_timesteps``: the
  network is fed ``t * 1000 / 4000``) and ``imagenet64_cond_270M_250K`` (fed ``t``): ``kind=ddpm``, epsilon
  prediction, cosine schedule with T = 4000, learned sigma (the variance channels are dropped);
* consistency_models ``edm_imagenet64_ema``: ``kind=edm``, driven by cpcluster's EDM preconditioning with
  ``sigma_data = 0.5`` and ``c_noise = 1000 * 0.25 ln(sigma)`` (``c_noise=openai``), as ``KarrasDenoiser`` does;
* consistency_models ``cd_imagenet64_lpips`` / ``cd_imagenet64_l2``: ``kind=consistency``, ``c_noise=openai``,
  ``grid_steps=40``.

``--set KEY=VALUE`` overrides architecture keys (``model_channels=32``, ``channel_mult=1,2,2``, ``num_classes=none``
...), so other OpenAI-format UNets convert too. A file that does not fit is refused with one line naming the first
mismatching tensor and what the tensor shapes say (model_channels, channel_mult, num_res_blocks, ...).
"""
from __future__ import annotations

from cpcluster.convert import Converted
from cpcluster.convert.openai_unet_shapes import describe_differences, infer_config
from cpcluster.models.archs import build_architecture, first_mismatch
from cpcluster.models.archs.openai_unet import KEYS
from cpcluster.models.transforms import parse_bool, parse_float, parse_int
from cpcluster.util.errors import InputError

DESCRIPTION = ("OpenAI PyTorch UNet .pt (improved-diffusion, guided-diffusion, consistency_models); "
               "--set preset=FILE_STEM")
T_IMPROVED = 4000

_IMPROVED = dict(in_channels=3, out_channels=6, num_res_blocks=3, dropout=0.0, conv_resample=True, num_classes=None,
                 num_heads=4, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
                 resblock_updown=False, use_new_attention_order=False, attention_conv_dims=1)
_CM = dict(_IMPROVED, image_size=64, out_channels=3, model_channels=192, channel_mult=[1, 2, 3, 4],
           attention_resolutions=[2, 4, 8], num_classes=1000, num_head_channels=64, resblock_updown=True,
           use_new_attention_order=True, attention_conv_dims=2, time_input_scale=1.0)
_DDPM = {"kind": "ddpm", "prediction": "epsilon", "schedule": "cosine", "timesteps": T_IMPROVED}
_CD = {"kind": "consistency", "c_noise": "openai", "grid_steps": 40}

# preset -> (architecture config, network meta, improved-diffusion's rescale_timesteps or None, where it is from)
PRESETS: dict[str, tuple[dict, dict, bool | None, str]] = {
    "cifar10_uncond_50M_500K": (
        dict(_IMPROVED, image_size=32, model_channels=128, channel_mult=[1, 2, 2, 2], attention_resolutions=[2, 4],
             dropout=0.3), _DDPM, True, "openai/improved-diffusion"),
    "imagenet64_uncond_100M_1500K": (
        dict(_IMPROVED, image_size=64, model_channels=128, channel_mult=[1, 2, 3, 4], attention_resolutions=[4, 8]),
        _DDPM, True, "openai/improved-diffusion"),
    "imagenet64_cond_270M_250K": (
        dict(_IMPROVED, image_size=64, model_channels=192, channel_mult=[1, 2, 3, 4], attention_resolutions=[4, 8],
             num_classes=1000), _DDPM, False, "openai/improved-diffusion"),
    "edm_imagenet64_ema": (dict(_CM, dropout=0.1), {"kind": "edm", "c_noise": "openai", "preconditioned": False,
                                                    "sigma_data": 0.5}, None, "openai/consistency_models"),
    "cd_imagenet64_lpips": (_CM, _CD, None, "openai/consistency_models"),
    "cd_imagenet64_l2": (_CM, _CD, None, "openai/consistency_models"),
}


def _int_list(value: str, what: str, key: str) -> list[int]:
    return [parse_int(v, what, key, minimum=-1) for v in value.replace(" ", "").strip("[]()").split(",") if v]


def _optional_int(value: str, what: str, key: str) -> int | None:
    return None if value.lower() in ("none", "null", "") else parse_int(value, what, key, minimum=-1)


_PARSERS = {"channel_mult": _int_list, "attention_resolutions": _int_list, "num_classes": _optional_int,
            "image_size": _optional_int, "dropout": parse_float, "time_input_scale": parse_float,
            **{k: parse_bool for k in ("conv_resample", "use_scale_shift_norm", "resblock_updown",
                                       "use_new_attention_order", "rescale_timesteps")}}
OPTIONS = {
    "preset": "the released checkpoint: " + ", ".join(PRESETS),
    **{key: "architecture override (upstream constructor argument; lists as 1,2,2)" for key in KEYS},
    "attention_resolutions": "architecture override: the downsampling rates with attention, as the UNet constructor "
                             "takes them (the script flag --attention_resolutions 16,8 at image_size 32 is 2,4)",
    "rescale_timesteps": "DDPM presets: true feeds the network t * 1000 / T (improved-diffusion), false feeds t",
}


def _parse(key: str, value: str, what: str):
    parser = _PARSERS.get(key, lambda v, w, k: parse_int(v, w, k, minimum=-1))
    return parser(value, what, key)


def preset_config(options: dict[str, str], what: str) -> tuple[str, dict, dict, list[str]]:
    """``(preset name, architecture config, raw network meta, notes)`` from the ``--set`` options."""
    name = options.get("preset")
    if name not in PRESETS:
        raise InputError(f"{what}: add --set preset=NAME, the released checkpoint's file stem: "
                         f"{', '.join(PRESETS)} (then --set KEY=VALUE overrides architecture keys)")
    base, meta, rescale, origin = PRESETS[name]
    config, meta = dict(base), dict(meta)
    overrides = {k: _parse(k, v, what) for k, v in options.items() if k != "preset"}
    if rescale is None and "rescale_timesteps" in options:
        raise InputError(f"{what}: rescale_timesteps applies to the DDPM presets only")
    rescale = overrides.pop("rescale_timesteps", rescale)
    if rescale is not None and "time_input_scale" in overrides and "rescale_timesteps" in options:
        raise InputError(f"{what}: give rescale_timesteps or time_input_scale, not both")
    if rescale is not None:
        config["time_input_scale"] = 1000.0 / meta["timesteps"] if rescale else 1.0
    config.update(overrides)
    meta["num_classes"] = config["num_classes"]
    notes = [f"preset {name} ({origin})" + (f", overrides {', '.join(f'{k}={options[k]}' for k in overrides)}"
                                             if overrides else "")]
    if meta["kind"] == "ddpm":
        notes.append(f"time input: the network is fed t * {config['time_input_scale']:g} for timestep t "
                     f"(rescale_timesteps={'true' if config['time_input_scale'] != 1 else 'false'})")
    if config["out_channels"] == 2 * config["in_channels"]:
        notes.append("learned sigma: the network's variance channels are dropped (only the mean is used)")
    if meta["kind"] == "edm":
        notes.append("EDM denoiser: --purifier pf-ode --time-rule exact (no training grid; or net:OUT?grid_steps=40 for "
                     "the CD model's grid); --solver-steps 1 is one-step denoising D(x, t)")
    return name, config, meta, notes


def convert(source: str, options: dict[str, str], what: str) -> Converted:
    """The :class:`Converted` network of ``source`` under the preset and overrides of ``options``."""
    from cpcluster.models.unet_folder import normalize_meta
    from cpcluster.models.weights import load_state_dict

    name, config, meta, notes = preset_config(options, what)
    module = build_architecture("openai-unet", config, what, meta_device=True)  # checks the config first
    normalize_meta(meta, what)
    state, _ = load_state_dict(source, what)
    problem = first_mismatch(module, state)
    if problem:
        hint = describe_differences(infer_config(state), config)
        raise InputError(f"{what}: the file does not fit preset {name}: {problem}"
                         + (f"; its tensors say {hint} (add --set for these, or choose another preset)"
                            if hint else ""))
    return Converted(state=state, architecture="openai-unet", arch_config=config, meta=meta, notes=notes,
                     source_info={"preset": name, "upstream": PRESETS[name][3]})
