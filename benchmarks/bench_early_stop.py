"""Early stopping (``certify --early-stop``): draws and time saved on the demo protocol, full run side by side.

The demo protocol (``make demo``): every 5th of the 500 demo test digits (100 images), n0 = 100, n = 500, alpha
0.001, sigma 0.25 / 0.5 / 1.0, 3 shards per run, shipped demo models (``--denoiser demo`` by default: the
consistency purifier before fine-tuning; ``--purifier none`` for the classifier alone). Both runs use
``--block-size 100`` (the demo uses 300; block size changes no count, and early stopping decides between
blocks). For every sigma the full run and the early-stopping run (``--early-stop MAX_ALPHA``) are counted one
after the other in this process (shards in turn, one torch thread), then aggregated at alpha 0.001, and the script
prints: planned / counted draws, each shard's counted draws (the balance of the interleaved plan), padding rows
of the fixed-shape forwards (each counting round ends with one padded forward), wall and CPU seconds of each, and
both tables, whose certified-accuracy rows must be identical (it exits 1 if not).

    .venv/bin/python benchmarks/bench_early_stop.py --workdir /tmp/cpc-early
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time


def certify(cfg) -> tuple:
    """Run every shard of ``cfg`` here; ``(wall s, CPU s, draws counted, draws planned, shards)``."""
    from cpcluster.core import runs
    from cpcluster.orchestrate import rundir
    from cpcluster.core.shards import read_shard
    from cpcluster.jobs.certify import CertifyShardJob

    run = runs.resolve(cfg, runs.load_models(cfg))
    rundir.prepare_run_dir(run)
    t0, c0 = time.perf_counter(), time.process_time()
    shards = [read_shard(CertifyShardJob(cfg, k)()) for k in range(run.plan.num_shards)]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, sum(int(s.units[:, 3].sum()) for s in shards), run.plan.total_draws, shards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/cpc-early")
    ap.add_argument("--denoiser", default="demo")
    ap.add_argument("--purifier", default="consistency")
    ap.add_argument("--max-alpha", type=float, default=0.001)
    ap.add_argument("--sigmas", default="0.25,0.5,1.0")
    ap.add_argument("--shards", type=int, default=3)
    args = ap.parse_args()

    import logging

    import torch

    from cpcluster.aggregate.pipeline import run_aggregate
    from cpcluster.core.config import AggregateOptions, CertifyConfig

    torch.set_num_threads(1)
    logging.getLogger("cpcluster").addHandler(logging.NullHandler())  # the shard jobs' progress lines stay out
    shutil.rmtree(args.workdir, ignore_errors=True)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    rows = []
    for sigma in sigmas:
        for mode, early in (("full", None), ("early stop", args.max_alpha)):
            cfg = CertifyConfig(sigma=sigma, run_dir=os.path.join(args.workdir, "full" if early is None else "early",
                                                                  f"s{sigma:g}"),
                                num_shards=args.shards, n0=100, n=500, block_size=100, draw_batch=100, batch=400,
                                skip=5, dataset="demo", classifier="demo", purifier=args.purifier,
                                denoiser=None if args.purifier == "none" else args.denoiser, device="cpu",
                                threads=1, early_stop=early)
            wall, cpu, counted, planned, shards = certify(cfg)
            skipped = [r for s in shards for r in s.skipped.tolist()]
            images = {k: len({r[0] for r in skipped if r[4] == k}) for k in (1, 2)}
            per_shard = [int(s.units[:, 3].sum()) for s in shards]
            padded = sum(int(s.shard.get("padded_draws", 0)) for s in shards)
            rows.append((sigma, mode, planned, counted, wall, cpu, images[1], images[2], per_shard, padded))
            print(f"sigma {sigma:g} {mode}: {counted:,} of {planned:,} draws, {wall:.1f} s wall, {cpu:.1f} s CPU",
                  file=sys.stderr)
    tables = {}
    for name in ("full", "early"):
        res = run_aggregate(AggregateOptions(paths=tuple(os.path.join(args.workdir, name, f"s{s:g}") for s in sigmas),
                                             alpha=0.001, radii=(0.0, 0.25, 0.5, 0.75, 1.0),
                                             out=os.path.join(args.workdir, f"agg-{name}"), plot=False))
        tables[name] = res.table
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread, load "
          f"average {os.getloadavg()[0]:.1f}; purifier {args.purifier}"
          f"{'' if args.purifier == 'none' else f' ({args.denoiser})'}, --early-stop {args.max_alpha:g}")
    print("| sigma | run | draws planned | draws counted | saved | draws per shard | padding rows | wall s | CPU s | "
          "CPU s full / early | wrong-class images | cut-short images |")
    print("|--:|:--|--:|--:|--:|:--|--:|--:|--:|--:|--:|--:|")
    for k, (sigma, mode, planned, counted, wall, cpu, wrong, cut, per_shard, padded) in enumerate(rows):
        early = mode != "full"
        ratio = f"{rows[k - 1][5] / cpu:.2f}x" if early else ""
        print(f"| {sigma:g} | {mode} | {planned:,} | {counted:,} | {100 * (1 - counted / planned):.1f}% | "
              f"{' / '.join(f'{d:,}' for d in per_shard)} | {padded:,} | {wall:.1f} | {cpu:.1f} | {ratio} | "
              f"{wrong if early else ''} | {cut if early else ''} |")
    print("\nfull run:\n" + tables["full"] + "\nearly stopping:\n" + tables["early"])
    same = tables["full"].split("\n\n")[0] == tables["early"].split("\n\n")[0]  # the rows; notes and cost differ
    print(f"certified-accuracy rows identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
