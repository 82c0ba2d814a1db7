"""The purification-quality shard job: per image, what the purified image looks like next to the clean one.

``QualityShardJob(config, index)()`` takes shard ``index`` of the run's images (the selected images cut into
``num_shards`` contiguous pieces), and for each image ``x`` (pixel space [0, 1]) with noise ``z`` drawn from a
generator seeded by ``(seed, image index)`` -- the same noise for every purifier and every way of splitting --
computes ``p = purify(x + sigma z)`` (``p = x`` for the clean reference run) and records the Inception features of
``p`` (:mod:`cpcluster.core.fid`), ``p`` itself, LPIPS(p, x) and ||p - x||_2 and the classifier's prediction on ``p``
(``aggregate/quality_io.py`` has the file format). ``aggregate/quality.py`` turns the shards of a dataset's runs
into FID, transport distance, mean LPIPS / L2 and accuracy per (purifier, sigma).

A shard is one atomic file: a finished shard is a no-op when rerun; a shard killed or stopped by SIGTERM (it stops
after the batch in progress and raises :class:`QualityTerminated`) leaves no file and is redone by the rerun.
"""
from __future__ import annotations

import json
import os
import socket
import time

import numpy as np

from cpcluster.core.config_evidence import QualityConfig
from cpcluster.util.errors import InputError
from cpcluster.util.signals import Terminated

QUALITY_STREAM = 5  # derive_seed(seed, QUALITY_STREAM, image index): the noise of one image
RUN_FILE = "run.json"


class QualityTerminated(Terminated):
    """SIGTERM arrived: the shard stopped after the batch in progress; nothing of it was written."""


class QualityShardJob:
    """One shard of a quality run; picklable; ``__call__`` returns the shard file's URL."""

    def __init__(self, config: QualityConfig, shard_index: int):
        self.config = config
        self.shard_index = int(shard_index)

    def __call__(self) -> str:
        return run_shard(self.config, self.shard_index)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.config, self.shard_index))

    def __repr__(self) -> str:
        return f"QualityShardJob(run_dir={self.config.run_dir!r}, shard={self.shard_index})"


def shard_images(config: QualityConfig, size: int) -> list[np.ndarray]:
    """The dataset indices of every shard: the selected images in ``num_shards`` contiguous, near-equal pieces."""
    from cpcluster.sharding.plan import select_images

    chosen = select_images(size, config.skip, config.max_images, config.indices)
    if config.num_shards > len(chosen):
        raise InputError(f"--shards {config.num_shards}: more shards than the {len(chosen)} selected images")
    return np.array_split(chosen, config.num_shards)


def image_noise(seed: int, image_ids, shape: tuple, policy, num_classes):
    """``(z, labels)``: (B, *shape) standard normal noise and (B,) purifier labels (or None), image ``i``'s drawn
    from its own generator seeded by ``(seed, QUALITY_STREAM, i)`` (noise first, then its label)."""
    import torch

    from cpcluster.jobs.training import derive_seed

    zs, labels = [], []
    for i in image_ids:
        gen = torch.Generator().manual_seed(derive_seed(seed, QUALITY_STREAM, int(i)))
        zs.append(torch.randn(shape, generator=gen))
        label = policy.labels(1, num_classes, "cpu", gen)
        labels.append(label)
    return torch.stack(zs), None if labels[0] is None else torch.cat(labels)


class Models:
    """What a quality run loads besides its feature networks: dataset, classifier, denoiser and purifier (None for
    the clean reference); all on the CPU."""

    def __init__(self, config: QualityConfig):
        from cpcluster.models.purifiers import configured_purifier
        from cpcluster.models.specs import load_classifier, load_dataset, load_denoiser

        self.dataset = load_dataset(config.dataset)
        self.classifier = load_classifier(config.classifier)
        if self.classifier.num_classes != self.dataset.num_classes:
            raise InputError(f"--classifier {config.classifier} has {self.classifier.num_classes} classes but "
                             f"--dataset {config.dataset} has {self.dataset.num_classes}")
        self.denoiser = load_denoiser(config.denoiser) if config.denoiser else None
        self.purifier = None
        if config.purifier != "clean":
            self.purifier = configured_purifier(config.purifier, self.denoiser, config.sigma, config.time_rule,
                                                config.purifier_label, config.purifier_steps).eval()


def shard_config(config: QualityConfig, models: Models) -> dict:
    """Everything the measurements depend on, as written into every shard and ``run.json`` (hashed like certify's)."""
    from cpcluster import __version__
    from cpcluster.core.fid import check_inception
    from cpcluster.models.weights import sha256_file

    if config.inception_random_weights:
        inception = {"weights": "random", "seed": 0, "sha256": None}
    else:
        path = check_inception(config.inception_weights)
        inception = {"weights": path, "sha256": sha256_file(path, "Inception weights")}
    purifier = {"kind": "clean"} if models.purifier is None else {**models.purifier.describe(),
                                                                   "name": config.purifier}
    return {"quality": config.run_dict(), "sigma": config.sigma, "seed": config.seed,
            "dataset": models.dataset.describe(), "purifier": purifier,
            "denoiser": models.denoiser.describe() if models.denoiser is not None else None,
            "classifier": models.classifier.describe(), "inception": inception,
            "lpips": {"net": config.lpips_net, "resize": config.lpips_resize, "random": config.lpips_random_backbone},
            "code_version": __version__}


class Measurer:
    """A run's :class:`Models` on ``device`` with the Inception network (FID) and LPIPS."""

    def __init__(self, config: QualityConfig, models: Models, device):
        from cpcluster.core import fid
        from cpcluster.core.losses import PerceptualLoss, build_lpips
        from cpcluster.models.purifier_base import LabelPolicy

        self.config, self.device, self.models = config, device, models
        self.dataset, self.denoiser = models.dataset, models.denoiser
        self.purifier = None if models.purifier is None else models.purifier.to(device)
        self.policy = LabelPolicy(config.purifier_label)
        seed = 0 if config.inception_random_weights else None
        self.inception = fid.load_inception(config.inception_weights, random_seed=seed).to(device)
        self.lpips = PerceptualLoss(build_lpips(config.lpips_net, config.lpips_random_backbone, config.seed),
                                    config.lpips_resize).to(device)
        self.clf = models.classifier.module.to(device).eval()

    def measure(self, ids: np.ndarray, terminated) -> dict:
        """The arrays of ``aggregate/quality_io.py`` for dataset images ``ids``, in batches of ``config.batch``."""
        import torch

        from cpcluster.core import fid
        from cpcluster.models.consistency import pixel_to_model

        cfg, out = self.config, {k: [] for k in ("features", "images", "lpips", "l2", "pred")}
        num_classes = self.denoiser.meta.get("num_classes") if self.denoiser is not None else None
        for start in range(0, len(ids), cfg.batch):
            batch = ids[start:start + cfg.batch]
            x, _ = self.dataset.get(batch)
            x = torch.from_numpy(x)
            with torch.no_grad():
                if self.purifier is None:
                    purified = x.to(self.device)
                else:
                    z, labels = image_noise(cfg.seed, batch, x.shape[1:], self.policy, num_classes)
                    noisy = (x + cfg.sigma * z).to(self.device)
                    purified = self.purifier(noisy, None, None if labels is None else labels.to(self.device))
                clean = x.to(self.device)
                out["features"].append(fid.features(self.inception, purified).float().numpy())
                out["lpips"].append(self.lpips(pixel_to_model(purified), pixel_to_model(clean)).double().cpu().numpy())
                out["l2"].append((purified - clean).flatten(1).double().norm(dim=1).cpu().numpy())
                out["pred"].append(self.clf(purified).argmax(1).cpu().numpy())
                out["images"].append(purified.cpu().numpy().astype(np.float16))
            if terminated():
                raise QualityTerminated(f"stopped by SIGTERM in shard of {cfg.run_dir}; nothing of it was written: "
                                        "rerun the same command")
        return {k: np.concatenate(v) for k, v in out.items()}


def read_run(run_dir: str) -> dict | None:
    """The run's ``run.json`` (None if absent)."""
    import fsspec

    from cpcluster.util.fileio import join_url

    fs, path = fsspec.core.url_to_fs(join_url(run_dir, RUN_FILE))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def run_shard(config: QualityConfig, index: int) -> str:
    """Compute and write shard ``index`` of ``config``'s run (a no-op when it exists); returns its URL."""
    import torch

    from cpcluster.aggregate.quality_io import shard_bytes, shard_name
    from cpcluster.jobs.certify import resolve_device
    from cpcluster.util.fileio import config_hash, exists, join_url, write_bytes_atomic
    from cpcluster.util.signals import stop_on_sigterm

    url = join_url(config.run_dir, shard_name(index, config.num_shards))
    if exists(url):
        return url
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    tic = time.perf_counter()
    models = Models(config)
    shard_cfg = shard_config(config, models)
    digest = config_hash(shard_cfg)
    record = read_run(config.run_dir)
    if record is not None and (record.get("config_hash") != digest or record.get("num_shards") != config.num_shards):
        raise InputError(f"{config.run_dir}: run.json describes another quality run (models, data or settings "
                         "changed since submission?); rerun with --overwrite")
    ids = shard_images(config, len(models.dataset))[index]
    with stop_on_sigterm("after the batch in progress, writing nothing of the shard") as terminated:
        arrays = Measurer(config, models, device).measure(ids, terminated)
    arrays["image_index"], arrays["labels"] = ids, models.dataset.labels[ids]
    shard = {"index": index, "total": config.num_shards, "host": socket.gethostname(), "device": str(device),
             "seconds": time.perf_counter() - tic, "pid": os.getpid()}
    write_bytes_atomic(url, shard_bytes(arrays, shard_cfg, digest, shard))
    return url
