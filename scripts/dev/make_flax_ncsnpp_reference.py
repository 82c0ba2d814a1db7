"""Make the ``flax-ncsnpp`` test stand-in: jcm's own NCSN++ at small width, saved the way jcm saves it.

Development tool, run once in a side environment that has jax, jaxlib, flax, dm-haiku, optax, ml-collections,
blobfile and pillow (not cpcluster's environment; cpcluster never imports jax)::

    git -C MIRROR archive HEAD | tar -x -C /tmp/jcm-src        # openai/consistency_models_cifar10
    python scripts/dev/make_flax_ncsnpp_reference.py /tmp/jcm-src tests/data/flax_ncsnpp

``JCM_REPO_DIR`` is a checkout of openai/consistency_models_cifar10; its ``jcm`` package and ``configs`` are
imported from there (nothing of it is copied here). The script

1. takes the released consistency-distillation config (``configs/cifar10_ve_cd.py``: NCSN++, BigGAN blocks, FIR
   resampling, residual input pyramid, skip_rescale, Gaussian Fourier embedding of scale 16) and shrinks only its
   width (``SMALL``: 32x32 images and attention at 16 as released, nf 8, two resolutions), unless ``--full``;
2. builds the model with ``jcm.models.utils.init_model`` and replaces ``params`` and ``params_ema`` by two different
   random draws of realistic scale (jcm's init_scale 0 would zero the output convolutions and make any comparison
   trivial); the Fourier frequencies ``W`` keep their init, as training never changes them;
3. saves jcm's ``State`` (with the RAdam state of ``losses.get_optimizer``) through ``jcm.checkpoints.
   save_checkpoint``: ``OUT/checkpoint_80``, byte for byte what ``jcm.train`` writes;
4. writes ``OUT/reference.npz``: noisy inputs ``x_t`` (T, B, H, W, C) at ``times`` (T,), the consistency function
   ``get_distiller_fn`` of ``params_ema`` on them (``distiller``), and the raw network on ``raw_input`` /
   ``raw_time_input`` (= 0.25 ln t) with ``params_ema`` (``raw_ema``) and ``params`` (``raw_params``), all NHWC
   float32 in model space; and ``OUT/reference.json``: the model config and the versions that produced them.

``--full`` builds the released width (nf 128, 32x32, 56M parameters, a ~900 MB checkpoint): a one-off check of the
PyTorch port at the real size, for a scratch folder, never for the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SMALL = {"nf": 8, "ch_mult": (1, 2), "num_res_blocks": 1}  # image 32x32, attention at 16: as released
SEED = 20240701
BATCH = 2
SIGMAS = (0.25, 0.5, 1.0)  # pixel-space smoothing levels; model-space noise 2 sigma


def karras_grid(n: int, t_min: float, t_max: float, rho: float) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    return (t_min ** (1 / rho) + i / (n - 1) * (t_max ** (1 / rho) - t_min ** (1 / rho))) ** rho


def randomize(params, key, jax):
    """Every leaf redrawn: kernels N(0, 1/fan_in), GroupNorm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    new = []
    for (path, leaf), k in zip(leaves, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        z = np.asarray(jax.random.normal(k, leaf.shape, np.float32))
        if name == "W" and leaf.ndim == 1:  # GaussianFourierProjection: never trained (stop_gradient)
            new.append(np.asarray(leaf))
        elif leaf.ndim >= 2:
            new.append(z / np.sqrt(np.prod(leaf.shape[:-1])))
        elif name == "scale":
            new.append(1.0 + 0.2 * z)
        else:
            new.append(0.2 * z)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(v, np.float32) for v in new])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jcm_repo_dir")
    parser.add_argument("out")
    parser.add_argument("--full", action="store_true", help="the released width (scratch folders only)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.jcm_repo_dir))

    import flax
    import haiku as hk
    import jax
    import jax.numpy as jnp
    from configs.cifar10_ve_cd import get_config
    from jcm import checkpoints, losses, sde_lib
    from jcm.models import ncsnpp  # noqa: F401  (registers "ncsnpp")
    from jcm.models import utils as mutils

    # Shim for flax >= 0.7, where init returns a plain dict: jcm's init_model expects FrozenDict.pop's pair.
    if hasattr(flax.config, "flax_return_frozendict"):
        flax.config.update("flax_return_frozendict", True)
    config = get_config()
    if not args.full:
        for key, value in SMALL.items():
            config.model[key] = value
    config.seed = SEED
    rng = hk.PRNGSequence(config.seed)
    model, model_state, params = mutils.init_model(next(rng), config)
    params = randomize(params, next(rng), jax)
    params_ema = randomize(params, next(rng), jax)
    optimizer, _ = losses.get_optimizer(config)
    state = mutils.State(step=80 * config.training.snapshot_freq, lr=config.optim.lr,
                         ema_rate=config.model.ema_rate, params=params, params_ema=params_ema,
                         model_state=model_state, opt_state=optimizer.init(params), rng_state=rng.internal_state)
    os.makedirs(args.out, exist_ok=True)
    path = checkpoints.save_checkpoint(args.out, state, step=80)

    sde = sde_lib.get_sde(config)
    grid = karras_grid(config.model.num_scales, sde.t_min, sde.t_max, sde.rho)
    picks = [float(grid[np.argmin(np.abs(grid - 2 * s))]) for s in SIGMAS]
    times = np.asarray([sde.t_min, *picks, sde.t_max], np.float32)
    shape = (BATCH, config.data.image_size, config.data.image_size, config.data.num_channels)
    gen = np.random.default_rng(SEED)
    clean = gen.uniform(-1, 1, shape).astype(np.float32)
    x_t = np.stack([clean + t * gen.standard_normal(shape).astype(np.float32) for t in times])
    distiller = mutils.get_distiller_fn(sde, model, params_ema, model_state, train=False)
    outputs = np.stack([np.asarray(distiller(jnp.asarray(x), jnp.full((BATCH,), t))) for x, t in zip(x_t, times)])

    t_raw = times[2]
    raw_input = (x_t[2] / np.sqrt(t_raw**2 + sde.data_std**2)).astype(np.float32)
    raw_time = np.full((BATCH,), 0.25 * np.log(t_raw), np.float32)
    raw = {name: np.asarray(model.apply({"params": p, **model_state}, raw_input, raw_time, train=False))
           for name, p in (("raw_ema", params_ema), ("raw_params", params))}
    np.savez_compressed(os.path.join(args.out, "reference.npz"), times=times, x_t=x_t, distiller=outputs,
                        raw_input=raw_input, raw_time_input=raw_time, **raw)
    model_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()
                    if isinstance(v, (int, float, str, bool, tuple, list))}
    record = {"checkpoint": os.path.basename(path), "model": model_config, "image_size": config.data.image_size,
              "num_channels": config.data.num_channels, "seed": SEED, "times": times.tolist(),
              "versions": {"jax": jax.__version__, "flax": flax.__version__, "haiku": hk.__version__,
                           "numpy": np.__version__}}
    with open(os.path.join(args.out, "reference.json"), "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and reference.npz / reference.json in {args.out}")


if __name__ == "__main__":
    main()
