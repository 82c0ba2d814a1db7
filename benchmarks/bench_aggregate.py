"""Benchmark ``cpcluster aggregate`` on 64 synthetic shard files, against a per-image statsmodels loop.

Cases (issue 2): 10,000 images x 10 classes, and 50,000 images x 1,000 classes; n0 = 100, n = 10,000 in one
estimation block (2 units per image), so the large case holds 100,000 count rows of 1,000 int64 (800 MB of
shard files). Counts are synthetic (a top class plus three others) and written with ``encode_shard``.

Reported per case: wall and CPU (user + system) time of ``cpcluster aggregate`` in a new process (imports, page
faults and all; CPU time is the fairer figure on a shared machine), and
of the whole aggregation (read + check + merge + decide + render + write, in this
process, best of ``--repeat``), its phases, and the reference: Cohen/locuslab's per-image bound,
``proportion_confint(k, n, alpha=2*alpha, method="beta")[0]`` then ``norm.ppf``, timed on ``--loop-images``
images and scaled to all images. Two ratios: loop time / our vectorized bound step (same work), and loop time /
our whole aggregation (which also reads 64 files).

    .venv/bin/python benchmarks/bench_aggregate.py --cases small,large --workdir /tmp/cpc-bench
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def make_case(folder: str, images: int, classes: int, files: int = 64, seed: int = 0) -> list:
    from cpcluster.core.shards import encode_shard, shard_name
    from cpcluster.util.fileio import write_bytes_atomic

    n0, n = 100, 10_000
    cfg = {"sigma": 0.5, "n0": n0, "n": n, "block_size": n, "draw_batch": 1000, "seed": 0,
           "num_classes": classes, "mode": "certify", "dataset": {"id": "bench"}, "purifier": {"kind": "consistency"},
           "denoiser": {"spec": "demo", "sha256": "0" * 64}, "classifier": {"spec": "demo", "sha256": "1" * 64}}
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    p_top = rng.uniform(0.3, 1.0, images)
    others = (labels[:, None] + rng.integers(1, classes, (images, 3))) % classes
    bounds = np.linspace(0, images, files + 1).round().astype(int)
    paths = []
    for f in range(files):
        img = np.arange(bounds[f], bounds[f + 1])
        m = len(img)
        units = np.zeros((2 * m, 4), dtype=np.int64)
        units[:, 0] = np.repeat(img, 2)
        units[1::2, 1] = 1
        units[:, 3] = np.tile([n0, n], m)
        counts = np.zeros((2 * m, classes), dtype=np.int64)
        for s, draws in ((0, n0), (1, n)):
            top = rng.binomial(draws, p_top[img])
            rest = rng.multinomial(draws - top, [0.5, 0.3, 0.2])
            rows = np.arange(m) * 2 + s
            counts[rows, labels[img]] += top
            for j in range(3):
                np.add.at(counts, (rows, others[img, j]), rest[:, j])
        path = os.path.join(folder, shard_name(f, files))
        write_bytes_atomic(path, encode_shard(cfg, {"index": f, "total": files}, units, counts, img, labels[img],
                                              complete=True))
        paths.append(path)
    return paths


def time_case(paths: list, out: str, repeat: int, loop_images: int) -> dict:
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    from cpcluster.aggregate import stats
    from cpcluster.aggregate.evaluate import evaluate_group
    from cpcluster.aggregate.merge import merge_shards
    from cpcluster.aggregate.pipeline import run_aggregate
    from cpcluster.core.config import AggregateOptions
    from cpcluster.core.shards import read_shard

    opts = AggregateOptions(paths=tuple(paths), out=out)
    import subprocess
    import sys
    cli = os.path.join(os.path.dirname(sys.executable), "cpcluster")
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([cli, "aggregate", *paths, "--out", out], check=True, capture_output=True)
    fresh = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fresh_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    walls = []
    for _ in range(repeat):
        t = time.perf_counter()
        run_aggregate(opts)
        walls.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    shards = [read_shard(p) for p in paths]
    t1 = time.perf_counter()
    (group,) = merge_shards(shards)
    t2 = time.perf_counter()
    evaluate_group(group, opts.alpha, opts.radii, False)
    t3 = time.perf_counter()
    del shards
    vec = []
    for _ in range(repeat):
        t = time.perf_counter()
        stats.certify_decision(group.counts0, group.counts, opts.alpha, group.plan.sigma)
        vec.append(time.perf_counter() - t)
    # Reference: one image at a time, as locuslab/smoothing's certify() does after sampling.
    sub = np.linspace(0, len(group.image_index) - 1, loop_images).astype(int)
    t = time.perf_counter()
    for i in sub:
        c_a = int(group.counts0[i].argmax())
        k, n = int(group.counts[i, c_a]), int(group.counts[i].sum())
        p = proportion_confint(k, n, alpha=2 * opts.alpha, method="beta")[0]
        _ = -1 if p < 0.5 else (c_a, group.plan.sigma * norm.ppf(p))
    loop = (time.perf_counter() - t) / loop_images * len(group.image_index)
    return {"fresh": fresh, "fresh_cpu": fresh_cpu, "wall": min(walls), "read": t1 - t0, "merge": t2 - t1, "evaluate": t3 - t2,
            "bound": min(vec), "loop": loop}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small,large")
    ap.add_argument("--workdir", default=None, help="where the shard files go (default: a temporary folder)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--loop-images", type=int, default=2000)
    args = ap.parse_args()
    sizes = {"small": (10_000, 10), "large": (50_000, 1_000)}
    work = args.workdir or tempfile.mkdtemp(prefix="cpc-bench-")
    print(f"| case | files | MB | CLI wall s (new process) | CLI CPU s | aggregate wall s | read | merge | decide | "
          f"vectorized bound s | statsmodels loop s | loop/bound | loop/aggregate |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for case in args.cases.split(","):
        images, classes = sizes[case]
        folder = os.path.join(work, f"{case}-{images}x{classes}")
        os.makedirs(folder, exist_ok=True)
        paths = sorted(os.path.join(folder, p) for p in os.listdir(folder) if p.endswith(".h5"))
        if len(paths) != 64:
            paths = make_case(folder, images, classes)
        mb = sum(os.path.getsize(p) for p in paths) / 2**20
        r = time_case(paths, os.path.join(work, f"{case}-out"), args.repeat, args.loop_images)
        print(f"| {images:,} x {classes:,} | 64 | {mb:.0f} | {r['fresh']:.2f} | {r['fresh_cpu']:.2f} | {r['wall']:.2f} | {r['read']:.2f} | "
              f"{r['merge']:.2f} | {r['evaluate']:.3f} | {r['bound']:.4f} | {r['loop']:.1f} | {r['loop'] / r['bound']:.0f}x | "
              f"{r['loop'] / r['wall']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
