"""Purification quality per (dataset, purifier, sigma): FID, transport distance, LPIPS, L2, accuracy. No torch.

Definitions, for the N images of a run (purified ``p_i``) and the same N images of the dataset's clean reference
run (``x_i``), pixel space [0, 1]:

* **FID**: the Frechet distance between Gaussians fitted to the Inception pool3 features of ``{p_i}`` and of
  ``{x_i}``: ``||mu_p - mu_x||^2 + tr(S_p + S_x - 2 (S_p S_x)^(1/2))``, ``S`` the unbiased covariance; the trace
  of the matrix square root equals the sum of the square roots of the eigenvalues of ``S_p S_x`` (what
  torch-fidelity computes; :func:`fid` uses an equivalent symmetric form, checked against it in the tests). A set
  against itself gives 0 up to rounding. With fewer images than feature dimensions the
  covariances are singular: FID is still defined, but it is biased upwards at small N (compare runs of equal N).
* **transport** (W2): the 2-Wasserstein distance between the empirical distributions of ``{p_i}`` and ``{x_j}``,
  uniform weights, ground cost ``||p_i - x_j||_2^2``: ``W2 = sqrt(min_pi sum_ij pi_ij ||p_i - x_j||^2)`` over
  couplings ``pi`` with marginals 1/K. With equal uniform weights an optimal coupling is a permutation (Birkhoff),
  so it is solved exactly as an assignment problem (``scipy.optimize.linear_sum_assignment``; the tests check it
  against POT's network simplex ``ot.emd2``). Unlike the mean L2 (each purified image against *its own* clean
  image) it matches purified and clean images freely: how far the purified distribution lies from the data.
  Computed on the first ``K = min(N, transport_images)`` images (the cost is O(K^3)); 0 for identical sets.
* **lpips**, **l2**: the means over the N images of LPIPS(p_i, x_i) and ||p_i - x_i||_2; **accuracy**: the
  fraction of images the classifier labels correctly from ``p_i`` (for the clean run: clean accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from cpcluster.aggregate.quality_io import SHARD_GLOB, QualityShard, read_quality_shard
from cpcluster.util.errors import InputError

DEFAULT_TRANSPORT_IMAGES = 1000


def covariance_factor(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,), F)`` of (N, D) features, N >= 2, with ``F^T F`` the unbiased covariance: ``F`` is the centred
    features over ``sqrt(N - 1)`` when N <= D, else the symmetric square root of the covariance (D, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"FID needs at least 2 images with feature vectors, got an array of shape {f.shape}")
    mu = f.mean(axis=0)
    centred = (f - mu) / np.sqrt(len(f) - 1)
    if len(f) <= f.shape[1]:
        return mu, centred
    lam, vec = np.linalg.eigh(centred.T @ centred)
    return mu, (vec * np.sqrt(np.clip(lam, 0.0, None))) @ vec.T


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two sets of (N, D) Inception features (module docstring), >= 0 up to rounding.

    With ``S = F^T F``: ``tr S = ||F||_F^2`` and ``tr (S_a S_b)^(1/2)`` is the sum of the singular values of
    ``F_a F_b^T`` (the nonzero eigenvalues of ``F_a^T F_a F_b^T F_b`` are those of ``(F_a F_b^T)(F_a F_b^T)^T``),
    an exact identity that needs only a symmetric or small problem instead of a D x D non-symmetric one.
    """
    mu_a, f_a = covariance_factor(features_a)
    mu_b, f_b = covariance_factor(features_b)
    if mu_a.shape != mu_b.shape:
        raise InputError(f"FID: feature dimensions differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
    tr_sqrt = np.linalg.svd(f_a @ f_b.T, compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.sum(f_a * f_a) + np.sum(f_b * f_b) - 2.0 * tr_sqrt)


def transport_w2(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W2 between the uniform empirical distributions of images ``a`` and ``b`` (K, ...) each (see above)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not len(a) or not len(b):
        raise InputError("transport distance: an empty set of images")
    if a.shape != b.shape:
        raise InputError(f"transport distance: image sets of shapes {a.shape} and {b.shape}; give the same number "
                         "of images of the same size")
    cost = cdist(a.reshape(len(a), -1), b.reshape(len(b), -1), "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


@dataclass
class QualityRun:
    """The shards of one run (one config hash) merged, arrays sorted by dataset index."""

    config: dict
    config_hash: str
    paths: list
    arrays: dict

    @property
    def kind(self) -> str:
        return self.config["purifier"]["kind"]


def find_shards(patterns) -> list[str]:
    """Run folders, shard files or globs (any fsspec URL) -> the quality shard files; InputError for none."""
    import fsspec

    from cpcluster.core.shards import expand_paths

    out = []
    for path in expand_paths(patterns, SHARD_GLOB):
        fs, local = fsspec.core.url_to_fs(path)
        out += expand_paths([path], SHARD_GLOB) if fs.isdir(local) else [path]  # a folder matched by a glob
    return sorted(dict.fromkeys(out))


def merge_runs(shards: list[QualityShard]) -> list[QualityRun]:
    """Group shards by config hash; each group must hold every shard ``0..total-1`` exactly once (InputError)."""
    groups: dict[str, list[QualityShard]] = {}
    for s in shards:
        groups.setdefault(s.config_hash, []).append(s)
    runs = []
    for digest, members in sorted(groups.items()):
        total = members[0].shard.get("total")
        indices = sorted(s.shard.get("index") for s in members)
        if indices != list(range(total or 0)):
            missing = sorted(set(range(total or 0)) - set(indices))
            raise InputError(f"{members[0].path}: its run has {len(indices)} of {total} shard files (missing "
                             f"{missing[:10]}, or duplicated); finish it (rerun `cpcluster quality`) first")
        arrays = {k: np.concatenate([s.arrays[k] for s in members]) for k in members[0].arrays}
        order = np.argsort(arrays["image_index"], kind="stable")
        arrays = {k: v[order] for k, v in arrays.items()}
        if not len(order):
            raise InputError(f"{members[0].path}: its run holds no images (an empty set)")
        runs.append(QualityRun(members[0].config, digest, [s.path for s in members], arrays))
    return runs


def evaluate_run(run: QualityRun, clean: QualityRun, transport_images: int) -> dict:
    """One table row: FID, W2, mean LPIPS and L2, accuracy of ``run`` against the clean reference ``clean``."""
    from cpcluster.aggregate.identity import method_name

    a, c = run.arrays, clean.arrays
    if a["images"].shape[1:] != c["images"].shape[1:]:
        raise InputError(f"{run.paths[0]}: images of size {a['images'].shape[1:]}, but the clean reference "
                         f"{clean.paths[0]} has {c['images'].shape[1:]}")
    k = min(len(a["images"]), transport_images)
    method = "clean" if run.kind == "clean" else method_name(run.config)
    return {"method": method, "sigma": run.config.get("sigma"), "images": int(len(a["image_index"])),
            "fid": fid(a["features"], c["features"]), "transport_w2": transport_w2(a["images"][:k], c["images"][:k]),
            "transport_images": int(k), "lpips": float(a["lpips"].mean()), "l2": float(a["l2"].mean()),
            "accuracy": float((a["pred"] == a["labels"]).mean()), "config_hash": run.config_hash,
            "inception": run.config.get("inception")}


def quality_tables(paths, transport_images: int = DEFAULT_TRANSPORT_IMAGES) -> dict:
    """``{dataset key: {"dataset": describe dict, "rows": [row, ...]}}`` for the quality runs found in ``paths``.

    Every purified run is compared with the clean run of the same dataset fingerprint, the same images and the
    same Inception weights; a run without one is an :class:`InputError` saying how to make it.
    """
    if transport_images < 1:
        raise InputError(f"--transport-images {transport_images}: must be at least 1")
    runs = merge_runs([read_quality_shard(p) for p in find_shards(paths)])
    tables: dict = {}
    for run in runs:
        ds = run.config["dataset"]
        key = f"{ds.get('name')} ({ds.get('spec')}, {str(ds.get('fingerprint'))[:12]})"
        tables.setdefault(key, {"dataset": ds, "runs": []})["runs"].append(run)
    for key, table in tables.items():
        cleans = [r for r in table["runs"] if r.kind == "clean"]
        rows = []
        for run in sorted(table["runs"], key=lambda r: (r.kind != "clean", r.config.get("sigma") or 0.0)):
            match = [c for c in cleans if np.array_equal(c.arrays["image_index"], run.arrays["image_index"])
                     and c.config.get("inception") == run.config.get("inception")]
            if not match:
                raise InputError(f"{run.paths[0]}: no clean reference run of dataset {key} with the same images and "
                                 "Inception weights among the inputs; `cpcluster quality` makes one (run 'clean')")
            rows.append(evaluate_run(run, match[0], transport_images))
        table["rows"] = sorted(rows, key=lambda r: (r["method"] != "clean", r["method"], r["sigma"] or 0.0))
        del table["runs"]
    return tables
