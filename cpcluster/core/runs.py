"""A certification run: its configuration resolved against the loaded models, its plan, and its run record.

:func:`resolve` turns a :class:`~cpcluster.core.config.CertifyConfig` and the loaded :class:`Models` into a
:class:`ResolvedRun`: the shard config of DESIGN.md section 4 and its hash, the images, their labels and the plan.
``<run_dir>/run.json`` records it (:func:`read_run`, :func:`config_from_record`); :func:`verified_shard` says
whether a shard file is a finished shard of the run. What the jobs need lives here; preparing and checking run
folders is :mod:`cpcluster.orchestrate.rundir`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cpcluster import __version__
from cpcluster.core.config import CertifyConfig
from cpcluster.core.shards import read_shard, shard_name, unplanned_units
from cpcluster.sharding.plan import Plan, plan_from_config
from cpcluster.sharding.seeds import NOISE_SCHEME
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import config_hash, filesystem, join_url, read_json

RUN_FILE = "run.json"


@dataclass
class Models:
    """What a run loads: the dataset, the denoiser (None for purifier ``none``) and the classifier (CPU)."""

    dataset: object
    denoiser: object
    classifier: object


def load_models(config: CertifyConfig) -> Models:
    """Load the dataset and networks named by ``config`` (InputError for an unknown spec or a bad checkpoint)."""
    from cpcluster.models.specs import load_classifier, load_dataset, load_denoiser

    dataset = load_dataset(config.dataset)
    denoiser = load_denoiser(config.denoiser) if config.denoiser else None
    classifier = load_classifier(config.classifier)
    if classifier.num_classes != dataset.num_classes:
        raise InputError(f"--classifier {config.classifier} has {classifier.num_classes} classes but --dataset "
                         f"{config.dataset} has {dataset.num_classes}")
    problem = classifier.size_problem(dataset.shape[1:])
    if problem:
        raise InputError(f"--classifier {config.classifier}: {problem}")
    problem = denoiser.channel_problem(dataset.shape) if denoiser is not None else None
    if problem:
        raise InputError(f"--denoiser {config.denoiser} with --dataset {config.dataset}: {problem}; use a denoiser "
                         "trained on this dataset")
    return Models(dataset, denoiser, classifier)


def build_purifier(config: CertifyConfig, models: Models):
    """The run's purifier at ``config.sigma`` (pixel space) from the options of ``config``."""
    from cpcluster.models.purifiers import configured_purifier

    return configured_purifier(config.purifier, models.denoiser, config.sigma, config.time_rule,
                               config.purifier_label, config.steps)


def shard_config(config: CertifyConfig, models: Models, purifier) -> dict:
    """The shard-file config of DESIGN.md section 4: everything that must match across the shards of a run."""
    ds = models.dataset
    subset = {"skip": config.skip, "max_images": config.max_images,
              "indices": list(config.indices) if config.indices is not None else None}
    return {
        "sigma": config.sigma,
        "n0": config.n0 if config.mode == "certify" else 0,
        "n": config.n,
        "block_size": config.block_size,
        "draw_batch": config.draw_batch,
        "seed": config.seed,
        "num_classes": int(models.classifier.num_classes),
        "mode": config.mode,
        "dataset": {"spec": config.dataset, "name": ds.name, "fingerprint": ds.fingerprint, "size": len(ds),
                    **subset},
        "subset": subset,
        "purifier": {**purifier.describe(), "name": config.purifier},
        "denoiser": models.denoiser.describe() if models.denoiser is not None else None,
        "classifier": models.classifier.describe(),
        "dtype": config.dtype,
        **({"early_stop": early_stop_config(config.early_stop)} if config.early_stop is not None else {}),
        "noise": NOISE_SCHEME,
        "code_version": __version__,
    }


def early_stop_config(max_alpha: float) -> dict:
    """The shard config's ``early_stop`` entry: the largest alpha the skips hold for, the rules, the plan layout."""
    return {"max_alpha": float(max_alpha), "rules": ["wrong-class", "abstain-certain"], "layout": "interleaved"}


@dataclass(frozen=True)
class ResolvedRun:
    """A config with everything derived from it: shard config and hash, images, labels and the plan."""

    config: CertifyConfig
    shard_config: dict
    config_hash: str
    image_ids: np.ndarray  # (N,) int64 dataset indices, evaluation order
    labels: np.ndarray  # (N,) int64
    plan: Plan

    def shard_url(self, index: int) -> str:
        return join_url(self.config.run_dir, shard_name(index, self.plan.num_shards))

    def record(self) -> dict:
        """The content of ``run.json``."""
        return {"config_hash": self.config_hash, "num_shards": self.plan.num_shards,
                "num_images": int(len(self.image_ids)), "num_units": int(len(self.plan.units)),
                "total_draws": self.plan.total_draws, "shard_config": self.shard_config,
                "certify_config": self.config.to_dict(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                 time.gmtime())}


def resolve(config: CertifyConfig, models: Models, purifier=None) -> ResolvedRun:
    """Resolve ``config`` against loaded ``models`` (InputError for more shards than units, bad indices...)."""
    purifier = purifier if purifier is not None else build_purifier(config, models)
    cfg = shard_config(config, models, purifier)
    plan = plan_from_config(cfg, config.num_shards)
    ids = plan.images
    labels = np.asarray(models.dataset.labels, dtype=np.int64)[ids]
    return ResolvedRun(config, cfg, config_hash(cfg), ids, labels, plan)


# ---------------------------------------------------------------------------------------------- run directory
def read_run(run_dir: str) -> dict | None:
    """The ``run.json`` of ``run_dir``, or None when there is none (InputError when it is not a JSON object)."""
    url = join_url(run_dir, RUN_FILE)
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    try:
        return read_json(url, kind=dict)
    except InputError as e:
        raise InputError(f"{e}; the run record is damaged (use --overwrite to start over)") from None


def recorded_run(run_dir: str) -> tuple[dict, CertifyConfig]:
    """``(run.json record, the CertifyConfig it records)`` of ``run_dir``, without loading models.

    Raises :class:`InputError` naming the folder when it holds no ``run.json`` or one that does not describe a
    certify run. The config's specs come from a file: confirm the ones that run code before loading them
    (:func:`cpcluster.models.specs.confirm_recorded_specs`).
    """
    record = read_run(run_dir)
    if record is None:
        raise InputError(f"{run_dir}: no {RUN_FILE}; not a certify run folder (give the <out>/<name> folder that "
                         "`cpcluster certify` printed)")
    try:
        return record, CertifyConfig.from_dict({**record["certify_config"], "run_dir": run_dir})
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise InputError(f"{run_dir}/{RUN_FILE} cannot be read as a certify run ({type(e).__name__}: {e}); rerun "
                         "`cpcluster certify` with --overwrite") from None


class ShardMismatch(InputError):
    """A readable, undamaged shard file that belongs to another run configuration (never replaced silently)."""


def verified_shard(url: str, config_hash: str, planned: np.ndarray, shard=None):
    """The :class:`~cpcluster.core.shards.ShardData` of ``url`` if it is a finished shard of the run: readable and
    undamaged (:func:`cpcluster.core.shards.read_shard`), of config hash ``config_hash``, marked complete and holding
    exactly the units ``planned`` ((u, 4) rows of its shard in the run's plan), counted or (early stopping)
    recorded as skipped.

    Raises :class:`ShardMismatch` for a file of another configuration, :class:`InputError` for any other problem.
    ``shard``: the file's :class:`~cpcluster.core.shards.ShardData` when it was read already.
    """
    shard = read_shard(url) if shard is None else shard
    if shard.config_hash != config_hash:
        raise ShardMismatch(f"{url}: shard file of another run configuration")
    if not shard.complete:
        raise InputError(f"{url}: shard file marked incomplete")
    present = np.concatenate([shard.units, shard.skipped[:, :4]]) if len(shard.skipped) else shard.units
    if len(present) != len(planned) or len(unplanned_units(present, planned)):
        raise InputError(f"{url}: its units are not those its shard plans ({len(present)} units, "
                         f"{len(planned)} planned)")
    return shard

