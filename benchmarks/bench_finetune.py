"""Fine-tuning throughput: samples/s with 1 and 2 CPU ranks (gloo, submitit LocalExecutor) and LPIPS's share.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_finetune.py --lpips-net vgg --resize 64 --steps 30 --repeats 2

* Scaling: the same run (demo-size UNet ``demo-random``, random-backbone LPIPS, global batch ``--batch``) with 1
  rank and with 2 ranks, one thread per rank, through submitit's LocalExecutor. samples/s is the job's own figure:
  the median over log windows of 5 steps, without the first window (warm-up), evaluation and checkpoints.
  Scaling efficiency = samples/s(2 ranks) / (2 x samples/s(1 rank)).
* LPIPS share: 1 - samples/s(lpips) / samples/s(l2) ... expressed per step: the step time with ``--loss l2``
  (no LPIPS forward/backward) against the step time with ``--loss lpips``, single rank, same process order.

Runs alternate (1, 2, 1, 2 ranks...) because shared machines drift; every figure is printed, best per setting
is summarised. Prints a JSON line and Markdown rows for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def one_run(ranks: int, loss: str, args, folder: str) -> float:
    import submitit

    from cpcluster.core.config import FinetuneConfig
    from cpcluster.jobs.finetune import FinetuneJob

    config = FinetuneConfig(model="demo-random", data="demo:train", out=os.path.join(folder, f"r{ranks}-{loss}"),
                            steps=args.steps, batch_size=args.batch, lr=1e-4, loss=loss, lpips_net=args.lpips_net,
                            lpips_resize=args.resize, lpips_random_backbone=True, eval_images=0,
                            checkpoint_every=10**6, log_every=5, ranks_per_node=ranks, device="cpu")
    executor = submitit.LocalExecutor(folder=os.path.join(folder, "logs"))
    executor.update_parameters(tasks_per_node=ranks, timeout_min=60)
    results = executor.submit(FinetuneJob(config)).results()
    return float(results[0]["train_samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    parser.add_argument("--resize", type=int, default=64, help="LPIPS input size (0: native 16x16)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per rank; inherited by the job processes

    figures = {"1 rank": [], "2 ranks": [], "1 rank, l2 loss": []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.repeats):
            for label, ranks, loss in (("1 rank", 1, "lpips"), ("2 ranks", 2, "lpips"), ("1 rank, l2 loss", 1, "l2")):
                t = time.perf_counter()
                sps = one_run(ranks, loss, args, os.path.join(folder, f"rep{r}"))
                figures[label].append(sps)
                print(f"{label:>16}: {sps:8.1f} samples/s  (job {time.perf_counter() - t:.1f} s)", flush=True)
    best = {k: max(v) for k, v in figures.items()}
    efficiency = best["2 ranks"] / (2 * best["1 rank"])
    lpips_share = 1.0 - best["1 rank"] / best["1 rank, l2 loss"]
    summary = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "torch_threads_per_rank": 1,
               "lpips_net": args.lpips_net, "lpips_resize": args.resize, "global_batch": args.batch,
               "steps": args.steps, "samples_per_s": figures, "best": best,
               "scaling_efficiency_2_ranks": efficiency, "lpips_share_of_step": lpips_share}
    print(json.dumps(summary))
    print(f"| {args.lpips_net} @ {args.resize or 16}px | {args.batch} | {best['1 rank']:.1f} | "
          f"{best['2 ranks']:.1f} | {efficiency:.2f} | {best['1 rank, l2 loss']:.1f} | {100 * lpips_share:.0f}% |")


if __name__ == "__main__":
    main()
