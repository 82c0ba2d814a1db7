"""Certification engine throughput (draws/s) against a bare batched forward and a Cohen-style per-image loop.

Three ways to get the CERTIFY counts of the same images (n0 selection + n estimation draws each), same model,
device and threads, interleaved round by round (shared machines drift; ratios come from one run):

* ``bare``   : only ``model(x)`` on a pre-built noisy batch of ``--batch`` rows, as many forwards as the draws need
               (no noise, no counting): the ceiling;
* ``engine`` : :class:`cpcluster.core.engine.CountingEngine` (seeded on-device noise, packed forwards, bincount);
* ``cohen``  : locuslab/smoothing ``Smooth._sample_noise``: one image at a time, batches of ``--batch``,
               ``randn_like`` noise, ``argmax`` then counting on the host with numpy.

It also reports the engine's own overhead (everything but the model: noise, seeding, packing, counting, copies,
Python) per forward, measured around a model that returns at once, as a share of one bare forward; shared-machine
noise hardly touches this figure, unlike the ratios.

Each configuration runs in child processes, alternately with and without the glibc allocator setting the certify
job applies at start (``mallopt``: no mmap for large buffers, no trimming; DESIGN.md section 6).

    .venv/bin/python benchmarks/bench_certify.py --model demo --threads 1 --clock cpu --rounds 4 --pairs 2
    .venv/bin/python benchmarks/bench_certify.py --model demo --threads 2 --rounds 6 --pairs 1
    .venv/bin/python benchmarks/bench_certify.py --model tiny --threads 2 --rounds 6 --pairs 1
    .venv/bin/python benchmarks/bench_certify.py --model unet --threads 2 --rounds 3 --pairs 1 --images 1 --n 700
    .venv/bin/python benchmarks/bench_certify.py --model unet --device cuda --n 10000 --batch 1000   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

METHODS = ("bare", "engine", "cohen")


def build(name: str, device: str):
    """(model, images (I, C, H, W) pixel [0,1] on device, description) for ``demo`` or ``unet``."""
    import torch

    from cpcluster.demo.models import DENOISER_META, _random
    from cpcluster.demo.nets import DemoUNet
    from cpcluster.models.loaded import LoadedClassifier, LoadedDenoiser
    from cpcluster.models.purifier_base import SmoothedBase
    from cpcluster.models.purifiers import build_purifier
    from cpcluster.models.specs import load_classifier, load_dataset, load_denoiser

    if name in ("demo", "tiny"):  # tiny: the demo classifier alone (purifier none), where overheads show most
        den, clf = load_denoiser("demo-random"), load_classifier("demo-random")
        x = torch.from_numpy(load_dataset("demo").get(list(range(8)))[0])
    else:  # a CIFAR-size UNet purifier and a CIFAR ResNet-18 (3x3 stem, no max-pool), random init
        import timm

        net = _random(DemoUNet(channels=3, width=128), seed=1)
        den = LoadedDenoiser(net.eval(), "consistency", dict(DENOISER_META))
        res = timm.create_model("resnet18", pretrained=False, num_classes=10)
        res.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        res.maxpool = torch.nn.Identity()
        clf = LoadedClassifier(res.eval(), 10)
        x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = SmoothedBase(build_purifier("none" if name == "tiny" else "consistency", den, 0.5), clf)
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, x.to(device), f"{name}: {params:.1f}M params, input {tuple(x.shape[1:])}"


def run_bare(model, x, draws, batch, sigma):
    import torch

    xb = (x[:1] + sigma * torch.randn(batch, *x.shape[1:], device=x.device))
    for _ in range(-(-draws // batch)):
        model(xb).argmax(1)


def run_engine(model, x, images, n0, n, batch, sigma):
    import numpy as np

    from cpcluster.core.engine import CountingEngine
    from cpcluster.sharding import build_units

    units = build_units(range(images), n0, n, 1000 if n % 1000 == 0 else n, "certify")
    eng = CountingEngine(model, x[:images], list(range(images)), sigma=sigma, seed=0, block_size=units[1, 3],
                         draw_batch=100, batch=batch, num_classes=10, per_batch_generator=False)
    sink = []
    eng.run(units, lambda u, c: sink.append(c))
    assert int(np.sum(sink)) == images * (n0 + n)


def run_cohen(model, x, images, n0, n, batch, sigma):
    """locuslab/smoothing ``Smooth._sample_noise`` for the selection, then the estimation, of every image."""
    import numpy as np
    import torch

    def sample_noise(img, num):
        counts = np.zeros(10, dtype=int)
        remaining = num
        while remaining:
            this_batch = min(batch, remaining)
            remaining -= this_batch
            b = img.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(b) * sigma
            predictions = model(b + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=10)
        return counts

    for i in range(images):
        sample_noise(x[i], n0)
        sample_noise(x[i], n)


def child(args) -> None:
    """Measure every method ``--rounds`` times, interleaved; print one JSON line of draws/s lists."""
    if args.malloc == "on":
        from cpcluster.jobs.certify import tune_allocator

        assert tune_allocator()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x, desc = build(args.model, args.device)
    draws = args.images * (args.n0 + args.n)
    runs = {
        "bare": lambda: run_bare(model, x, draws, args.batch, 0.5),
        "engine": lambda: run_engine(model, x, args.images, args.n0, args.n, args.batch, 0.5),
        "cohen": lambda: run_cohen(model, x, args.images, args.n0, args.n, args.batch, 0.5),
    }
    rates = {m: [] for m in METHODS}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with torch.inference_mode():
        for m in METHODS:  # warm-up
            runs[m]()
        for r in range(args.rounds):
            for m in METHODS[r % 3:] + METHODS[:r % 3]:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                runs[m]()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                rates[m].append(draws / (clock() - t0))
        overhead = engine_overhead_s(x, args.images, args.n0, args.n, args.batch, clock)
        seeding = seeding_us(x, args.device, clock)
    forward = args.batch / statistics.median(rates["bare"])
    print(json.dumps({"desc": desc, "rates": rates, "overhead": overhead / forward, "seeding": seeding}))


def seeding_us(x, device: str, clock=time.perf_counter, batches: int = 2000) -> dict:
    """Microseconds per noise batch: putting the generator into a batch's state (noise scheme counter-v2, and the
    earlier SeedSequence seed + ``manual_seed``, whose 32-bit CPU seeds collided), and drawing its 100 x C x H x W
    normals; best of 3."""
    import numpy as np
    import torch

    from cpcluster.core.noise import BatchGenerator

    gen = BatchGenerator(0, device)
    old = torch.Generator(device=device)
    buf = torch.empty((100, *x.shape[1:]), device=device)

    def old_seed(i, j):
        state = np.random.SeedSequence(0, spawn_key=(i, 1, j)).generate_state(2, np.uint32)
        old.manual_seed(((int(state[1]) << 32) | int(state[0])) & ((1 << 63) - 1))

    tasks = {"counter-v2": lambda i, j: gen.seed(i, 1, j), "old seed": old_seed,
             "normal_": lambda i, j: buf.normal_(generator=old)}
    out = {}
    for name, fn in tasks.items():
        best = float("inf")
        for _ in range(3):
            t0 = clock()
            for k in range(batches):
                fn(k % 7, k)
            best = min(best, (clock() - t0) / batches * 1e6)
        out[name] = best
    return out


def engine_overhead_s(x, images, n0, n, batch, clock=time.perf_counter) -> float:
    """Seconds per forward that the engine spends outside the model: the engine around a model that returns
    zeros at once (noise, seeding, packing, counting, host copies, Python); best of 3."""
    import torch

    class Null(torch.nn.Module):
        def forward(self, x, generator=None):
            return torch.zeros(x.shape[0], 10, device=x.device)

    best = float("inf")
    for _ in range(3):
        t0 = clock()
        forwards = -(-images * (n0 + n) // batch)
        run_engine(Null(), x, images, n0, n, batch, 0.5)
        best = min(best, (clock() - t0) / forwards)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "tiny", "unet"], default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--malloc", choices=["on", "off", "both"], default="both")
    ap.add_argument("--pairs", type=int, default=2, help="alternating on/off child processes per setting")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, which other processes on a shared machine hardly disturb; use it "
                         "with --threads 1 (with more threads it also counts threads waiting for each other)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    settings = ["on", "off"] if args.malloc == "both" else [args.malloc]
    results = {s: {m: [] for m in METHODS} for s in settings}
    ratios = {s: {"engine/bare": [], "engine/cohen": [], "cohen/bare": []} for s in settings}
    overheads = {s: [] for s in settings}
    seeding = []
    desc = ""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for _ in range(args.pairs):
        for s in settings:
            cmd = [sys.executable, __file__, "--child", "--malloc", s] + \
                  [f"--{k}={getattr(args, k)}" for k in ("model", "device", "threads", "rounds", "images", "n0", "n",
                                                         "batch", "clock")]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
            desc = out["desc"]
            overheads[s].append(out["overhead"])
            seeding.append(out["seeding"])
            for m in METHODS:
                results[s][m] += out["rates"][m]
            for a, b in (("engine", "bare"), ("engine", "cohen"), ("cohen", "bare")):
                ratios[s][f"{a}/{b}"] += [x / y for x, y in zip(out["rates"][a], out["rates"][b])]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{args.threads}, device {args.device}, {args.clock} clock; {desc}; "
          f"{args.images} images x (n0 {args.n0} + n {args.n}), "
          f"batch {args.batch}; {args.pairs} x {args.rounds} interleaved rounds per setting")
    print("| malloc tuning | bare draws/s | engine draws/s | cohen draws/s | engine/bare | engine/cohen | cohen/bare "
          "| engine overhead / forward |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    med = statistics.median
    for s in settings:
        r, q = results[s], ratios[s]
        print(f"| {s} | {med(r['bare']):,.0f} | {med(r['engine']):,.0f} | {med(r['cohen']):,.0f} | "
              f"{med(q['engine/bare']):.3f} | {med(q['engine/cohen']):.3f} | {med(q['cohen/bare']):.3f} | "
              f"{100 * med(overheads[s]):.2f}% |")
    us = {k: med(d[k] for d in seeding) for k in seeding[0]}
    print(f"per noise batch of 100 draws: setting its generator state {us['counter-v2']:.1f} us (noise scheme "
          f"counter-v2) vs {us['old seed']:.1f} us (the earlier SeedSequence seed + manual_seed); drawing its noise "
          f"{us['normal_']:.1f} us")
    if len(settings) == 2:
        on, off = results["on"]["engine"], results["off"]["engine"]
        print(f"engine with / without malloc tuning: {med(on) / med(off):.2f}x (medians)")


if __name__ == "__main__":
    main()
