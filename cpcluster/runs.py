"""A certification run: its resolved configuration, its plan, and its run directory.

A run directory ``<out>/<name>/`` holds ``run.json`` (the resolved config: the shard config of DESIGN.md section 4
and its hash, the :class:`~cpcluster.config.CertifyConfig` it came from, the plan's size), the shard files
``shard-XXXXX-of-YYYYY.h5`` (and their journals while they run), ``jobs.jsonl`` (submitted job ids) and, for local
paths, submitit's ``logs/``.

Rules. A run directory belongs to one run configuration and one shard count: preparing it again with the same
config hash and shard count resumes it (finished shards are kept, unfinished ones continue from their journals);
anything else is refused unless ``overwrite``, which first removes the old shard files, journals and job records,
then writes the new ``run.json``. Nothing is written before every check has passed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from cpcluster import __version__
from cpcluster.config import CertifyConfig
from cpcluster.sharding.plan import Plan, plan_from_config, select_images  # noqa: F401 (select_images: re-export)
from cpcluster.sharding.seeds import NOISE_SCHEME
from cpcluster.shards import _journal_path, read_journal, read_shard, shard_name, unplanned_units
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import config_hash, exists, filesystem, is_local, join_url, read_json, write_bytes_atomic

RUN_FILE = "run.json"
JOBS_FILE = "jobs.jsonl"


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


def check_run_dir(run: ResolvedRun, overwrite: bool = False) -> str:
    """What preparing ``run``'s directory would do: ``"new"``, ``"resume"`` or ``"overwrite"``; writes nothing.

    Raises :class:`InputError` when the directory holds another run (different config hash or shard count) and
    ``overwrite`` is False, or when the run record is damaged and ``overwrite`` is False.
    """
    try:
        old = read_run(run.config.run_dir)
    except InputError:
        if overwrite:
            return "overwrite"
        raise
    if old is None:
        leftovers = _leftovers(run.config.run_dir)
        if leftovers and not overwrite:
            raise InputError(f"{run.config.run_dir} holds shard files but no {RUN_FILE} (not made by this tool, or "
                             "damaged); use --overwrite to replace them, or another --out / --name")
        return "overwrite" if leftovers else "new"
    same = old.get("config_hash") == run.config_hash and old.get("num_shards") == run.plan.num_shards
    if same and not overwrite:
        return "resume"
    if overwrite:
        return "overwrite"
    diff = _config_difference(old, run)
    raise InputError(f"{run.config.run_dir} holds another run ({diff}); use --overwrite to replace it, or "
                     "another --out / --name")


def _config_difference(old: dict, run: ResolvedRun) -> str:
    if old.get("config_hash") == run.config_hash:
        return f"planned with {old.get('num_shards')} shards, not {run.plan.num_shards}"
    a, b = old.get("shard_config") or {}, run.shard_config
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "different " + ", ".join(keys[:4]) if keys else "different config"


def _leftovers(run_dir: str) -> list[str]:
    """Shard files, journals, temporaries and job records in ``run_dir`` (local or fsspec).

    Lock files are not listed: a running shard job holds one, and removing it would let a second process in.
    """
    fs, path = filesystem(run_dir)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    keep = [n for n in names if ((n.startswith("shard-") and ".h5" in n) or n in (RUN_FILE, JOBS_FILE))
            and not n.endswith(".lock")]
    return [join_url(run_dir, n) for n in keep]


def prepare_run_dir(run: ResolvedRun, overwrite: bool = False) -> str:
    """Check (see :func:`check_run_dir`), clear on overwrite, write ``run.json``; return the action taken.

    Raises :class:`InputError` naming the directory when it cannot be created or written.
    """
    action = check_run_dir(run, overwrite)
    if action == "overwrite":
        for url in _leftovers(run.config.run_dir):
            if not url.endswith(RUN_FILE):
                fs, path = filesystem(url)
                fs.rm(path)
        if not is_local(run.config.run_dir):  # journals of remote shards live in local scratch
            try:
                old_total = int((read_run(run.config.run_dir) or {}).get("num_shards", 0))
            except (InputError, TypeError, ValueError):
                old_total = 0
            for total in {old_total, run.plan.num_shards} - {0}:
                for k in range(total):
                    journal = _journal_path(join_url(run.config.run_dir, shard_name(k, total)), None)
                    if os.path.exists(journal):
                        os.remove(journal)
    if action != "resume":
        try:
            write_bytes_atomic(join_url(run.config.run_dir, RUN_FILE),
                               json.dumps(run.record(), indent=1, sort_keys=True).encode("utf-8"))
        except OSError as e:
            raise InputError(f"--out {run.config.run_dir}: cannot write there ({e.strerror or e}); choose a "
                             "writable folder") from None
    return action


def check_writable(run_dir: str) -> None:
    """Raise :class:`InputError` unless ``run_dir`` (a local path) could be created and written; no-op for URLs."""
    fs, path = filesystem(run_dir)
    if "://" in run_dir and not run_dir.startswith("file://"):
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--out {run_dir}: {probe} is not a writable folder; choose a writable --out")


# ----------------------------------------------------------------------------------------------- progress
def shard_draws_done(run: ResolvedRun, index: int) -> int:
    """Draws of shard ``index`` already recorded: all of them once its file exists, else its journal's."""
    url = run.shard_url(index)
    if exists(url):
        return int(run.plan.shard_draws()[index])
    state = read_journal(_journal_path(url, None))
    if state is None or state.header.get("config_hash") != run.config_hash:
        return 0
    return int(state.units[:, 3].sum())


def complete_shards(run: ResolvedRun) -> list[int]:
    """Indices of the shards whose final file exists and passes :func:`verified_shard` (the checks of
    ``cpcluster status`` and ``aggregate``): a truncated or damaged file does not count as done."""
    done = []
    for k in range(run.plan.num_shards):
        url = run.shard_url(k)
        if exists(url):
            try:
                verified_shard(url, run.config_hash, run.plan.shard_units(k))
            except InputError:
                continue
            done.append(k)
    return done


class ShardMismatch(InputError):
    """A readable, undamaged shard file that belongs to another run configuration (never replaced silently)."""


def verified_shard(url: str, config_hash: str, planned: np.ndarray, shard=None):
    """The :class:`~cpcluster.shards.ShardData` of ``url`` if it is a finished shard of the run: readable and
    undamaged (:func:`cpcluster.shards.read_shard`), of config hash ``config_hash``, marked complete and holding
    exactly the units ``planned`` ((u, 4) rows of its shard in the run's plan), counted or (early stopping)
    recorded as skipped.

    Raises :class:`ShardMismatch` for a file of another configuration, :class:`InputError` for any other problem.
    ``shard``: the file's :class:`~cpcluster.shards.ShardData` when it was read already.
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

