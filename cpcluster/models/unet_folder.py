"""diffusers ``UNet2DModel`` folders, loaded offline, and the network metadata the purifiers need.

Layouts: ``DIR/config.json`` + ``DIR/diffusion_pytorch_model.safetensors`` (or ``.bin``, read with
``weights_only=True``; or the ``.fp16`` variants, cast to float32; or shards listed by
``diffusion_pytorch_model.safetensors.index.json``), optionally ``DIR/scheduler_config.json``; or a
pipeline folder ``DIR/unet/...`` + ``DIR/scheduler/scheduler_config.json`` (the layout of
``openai/diffusers-cd_imagenet64_lpips``). The architecture is built from ``config.json`` on the meta device and
the weights are assigned to it (no second copy in memory, no hub access).

Metadata layers, later ones override earlier ones:

1. the scheduler config: ``CMStochasticIterativeScheduler`` -> ``kind=consistency``, ``c_noise=openai``
   (diffusers' ``1000 * 0.25 ln(t + 1e-44)``), ``grid_steps = num_train_timesteps``; a DDPM-style scheduler
   (``beta_schedule`` / ``trained_betas``) -> ``kind=ddpm`` with its betas and ``prediction_type``;
2. ``cpcluster.json`` beside ``config.json`` (or in ``DIR``): any of :data:`META_KEYS` (``betas`` may be a list);
3. the spec options after ``?``.

``num_classes`` always comes from the UNet config (``num_class_embeds``). A consistency network without
``grid_steps`` can only run with ``--time-rule exact``; ``inspect`` shows ``grid_steps: None`` for it.
"""
from __future__ import annotations

from torch import nn

from cpcluster.models.archs import assign_state, build_architecture
from cpcluster.models.consistency import C_NOISE, RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from cpcluster.models.ddpm import PREDICTIONS, alphas_cumprod, ddpm_betas
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.transforms import parse_bool, parse_float, parse_int
from cpcluster.models.weights import load_sharded_state_dict, load_state_dict, read_json_object
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import exists, join_url

KINDS = ("consistency", "edm", "ddpm")
MAX_TIMESTEPS = 100_000  # grid points / DDPM timesteps a network may name (the releases use 18 to 4000)
SCHEDULE_KEYS = ("schedule", "beta_start", "beta_end", "timesteps")
META_KEYS = ("kind", "c_noise", "grid_steps", "num_classes", "prediction", "preconditioned", "sigma_data", "betas",
             *SCHEDULE_KEYS)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")  # fp16: cast to fp32
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


def merge_meta(*layers: dict) -> dict:
    """Later layers override earlier ones; an explicit ``betas`` list and a named schedule replace each other."""
    merged: dict = {}
    for layer in layers:
        if "betas" in layer:
            for k in SCHEDULE_KEYS:
                merged.pop(k, None)
        if any(k in layer for k in SCHEDULE_KEYS):
            merged.pop("betas", None)
        merged.update(layer)
    return merged


def normalize_meta(raw: dict, what: str) -> dict:
    """Checked, typed metadata from raw strings/values: ``kind`` plus what that kind needs (see module doc)."""
    unknown = sorted(set(raw) - set(META_KEYS) - {"meta_source", "schedule_name"})
    if unknown:
        raise InputError(f"{what}: unknown metadata {unknown}; known keys: {', '.join(META_KEYS)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise InputError(f"{what}: cannot tell the network kind (got {kind!r}); add ?kind=consistency, edm or ddpm "
                         "(or a cpcluster.json / scheduler config beside the weights)")
    meta: dict = {"kind": kind}
    for key in ("c_noise", "prediction", "schedule", "schedule_name"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise InputError(f"{what}: {key}={raw[key]!r} must be a name (a string)")
    nc = raw.get("num_classes")
    meta["num_classes"] = parse_int(nc, what, "num_classes", minimum=1) if nc not in (None, "", "none") else None
    if kind in ("consistency", "edm"):
        c_noise = raw.get("c_noise") or ("openai" if kind == "consistency" else "edm")
        allowed = set(C_NOISE) | ({"edm"} if kind == "edm" else set())
        if c_noise not in allowed:
            raise InputError(f"{what}: c_noise={c_noise!r}; use one of {', '.join(sorted(allowed))}")
        meta["c_noise"] = c_noise
        gs = raw.get("grid_steps")
        meta["grid_steps"] = parse_int(gs, what, "grid_steps", minimum=2, maximum=MAX_TIMESTEPS) \
            if gs not in (None, "") else None
    if kind == "edm":
        meta["preconditioned"] = parse_bool(raw.get("preconditioned", False), what, "preconditioned")
        meta["sigma_data"] = parse_float(raw.get("sigma_data", SIGMA_DATA), what, "sigma_data")
        if meta["sigma_data"] <= 0:
            raise InputError(f"{what}: sigma_data={meta['sigma_data']} must be positive")
    elif raw.get("preconditioned") is not None or raw.get("sigma_data") is not None:
        raise InputError(f"{what}: preconditioned / sigma_data apply to kind=edm only (the consistency function "
                         f"uses sigma_data = {SIGMA_DATA})")
    if kind == "ddpm":
        meta["prediction"] = raw.get("prediction") or "epsilon"
        if meta["prediction"] not in PREDICTIONS:
            raise InputError(f"{what}: prediction={meta['prediction']!r}; use one of {', '.join(PREDICTIONS)}")
        if raw.get("betas") is not None:
            betas = raw["betas"]
            if not isinstance(betas, (list, tuple)) or not 1 <= len(betas) <= MAX_TIMESTEPS:
                raise InputError(f"{what}: betas must be a list of 1 to {MAX_TIMESTEPS} numbers")
            betas = [parse_float(b, what, "betas") for b in betas]
            meta["schedule"] = raw.get("schedule_name") or f"explicit betas (T={len(betas)})"
        else:
            name = raw.get("schedule") or "linear"
            steps = parse_int(raw.get("timesteps", 1000), what, "timesteps", maximum=MAX_TIMESTEPS)
            start = parse_float(raw.get("beta_start", 1e-4), what, "beta_start")
            end = parse_float(raw.get("beta_end", 0.02), what, "beta_end")
            betas = ddpm_betas(name, steps, start, end).tolist()
            meta["schedule"] = f"{name}(T={steps})" if "cos" in name else f"{name}({start:g}..{end:g}, T={steps})"
        try:
            alphas_cumprod(betas)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None
        meta["betas"] = betas
    if raw.get("meta_source"):
        meta["meta_source"] = raw["meta_source"]
    return meta


def scheduler_meta(cfg: dict, url: str) -> dict:
    """Raw metadata implied by a diffusers scheduler config (empty for schedulers it says nothing about)."""
    name = cfg.get("_class_name", "")
    where = f"scheduler config {url}"
    if name == "CMStochasticIterativeScheduler":
        expected = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "sigma_data": SIGMA_DATA, "rho": RHO}
        for key, value in expected.items():
            if abs(parse_float(cfg.get(key, value), where, key) - value) > 1e-9:
                raise InputError(f"{where}: {key}={cfg[key]} but cpcluster's consistency function uses {key}={value}")
        steps = parse_int(cfg.get("num_train_timesteps", 40), where, "num_train_timesteps", 2, MAX_TIMESTEPS)
        return {"kind": "consistency", "c_noise": "openai", "grid_steps": steps}
    if "beta_schedule" in cfg or cfg.get("trained_betas") is not None:
        raw = {"kind": "ddpm", "prediction": cfg.get("prediction_type", "epsilon")}
        if cfg.get("trained_betas") is not None:
            raw["betas"] = cfg["trained_betas"]
        else:
            raw.update(schedule=cfg.get("beta_schedule", "linear"), timesteps=cfg.get("num_train_timesteps", 1000),
                       beta_start=cfg.get("beta_start", 1e-4), beta_end=cfg.get("beta_end", 0.02))
        return raw
    return {}


def _json(url: str, what: str) -> dict | None:
    return read_json_object(url, what) if exists(url) else None


def _build_unet(config: dict, state: dict, url: str, what: str) -> nn.Module:
    module = build_architecture("diffusers-unet2d", config, what, meta_device=True)
    try:
        assign_state(module, {"unet." + k: v for k, v in state.items()}, f"{what}: {url}")
    except InputError as e:
        raise InputError(str(e).replace("the architecture", "its config.json")) from None
    return module


def load_unet_folder(path: str, options: dict, what: str) -> LoadedDenoiser:
    """Load a UNet2DModel folder (local path or fsspec URL) with its metadata; see the module docstring."""
    root = path.rstrip("/")
    unet_dir, sched_urls = root, [join_url(root, "scheduler_config.json")]
    if not exists(join_url(root, "config.json")) and exists(join_url(root, "unet", "config.json")):
        unet_dir = join_url(root, "unet")
        sched_urls.insert(0, join_url(root, "scheduler", "scheduler_config.json"))
    config = _json(join_url(unet_dir, "config.json"), what)
    if config is None:
        raise InputError(f"{what}: no config.json in {root} (nor in {root}/unet); expected a diffusers UNet2DModel "
                         "folder saved with save_pretrained")
    weights = next((join_url(unet_dir, n) for n in (*WEIGHT_NAMES, *INDEX_NAMES) if exists(join_url(unet_dir, n))),
                   None)
    if weights is None:
        raise InputError(f"{what}: no {WEIGHT_NAMES[0]} (or .bin / .fp16 variant, or a sharded "
                         f"{INDEX_NAMES[0]}) in {unet_dir}")
    layers, sources = [], []
    for url in sched_urls:
        cfg = _json(url, what)
        if cfg is not None:
            layers.append(scheduler_meta(cfg, url))
            sources.append(url.rsplit("/", 2)[-2] + "/" + url.rsplit("/", 1)[-1])
            break
    for url in dict.fromkeys([join_url(unet_dir, "cpcluster.json"), join_url(root, "cpcluster.json")]):
        extra = _json(url, what)
        if extra is not None:
            layers.append(extra)
            sources.append("cpcluster.json")
            break
    if options:
        layers.append(options)
        sources.append("spec options")
    raw = merge_meta(*layers)
    n_cls = config.get("num_class_embeds")
    if raw.get("num_classes") is not None and str(raw["num_classes"]) != str(n_cls):
        raise InputError(f"{what}: num_classes={raw['num_classes']} but the UNet config has num_class_embeds={n_cls}")
    raw["num_classes"] = n_cls
    raw["meta_source"] = sources or ["defaults"]
    meta = normalize_meta(raw, what)
    load = load_sharded_state_dict if weights.endswith(".index.json") else load_state_dict
    state, digest = load(weights, what)
    module = _build_unet(config, state, weights, what).eval().requires_grad_(False)
    meta["in_channels"] = int(config.get("in_channels", 3))
    meta["sample_size"] = config.get("sample_size")
    return LoadedDenoiser(module, meta.pop("kind"), meta, sha256=digest,
                          architecture={"name": "diffusers-unet2d", "config": config})
