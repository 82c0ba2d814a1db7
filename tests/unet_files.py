"""Small diffusers UNet2DModel folders written by tests with ``save_pretrained`` (random init, real architecture)."""
from __future__ import annotations

import json
import os

import torch

SMALL_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, attention_head_dim=8)
CM_SCHEDULER = {"_class_name": "CMStochasticIterativeScheduler", "num_train_timesteps": 40, "sigma_min": 0.002,
                "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0, "s_noise": 1.0, "clip_denoised": True}
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                  "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon"}


def save_unet(folder: str, seed: int = 0, scheduler: dict | None = None, cpcluster: dict | None = None,
              safe: bool = True, variant: str | None = None, max_shard_size: str | None = None, **config) -> str:
    """Write a UNet2DModel folder (config.json + weights [+ scheduler_config.json] [+ cpcluster.json])."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**{**SMALL_UNET, **config})
    with torch.no_grad():  # diffusers zero-inits some output layers; make every weight matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if variant == "fp16":
        unet = unet.half()
    unet.save_pretrained(folder, safe_serialization=safe, variant=variant,
                         **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if scheduler is not None:
        with open(os.path.join(folder, "scheduler_config.json"), "w") as fh:
            json.dump(scheduler, fh)
    if cpcluster is not None:
        with open(os.path.join(folder, "cpcluster.json"), "w") as fh:
            json.dump(cpcluster, fh)
    return folder


def unet_module(folder: str):
    """The folder's UNet2DModel loaded directly by diffusers (offline), as an independent reference."""
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(folder, local_files_only=True).eval()
