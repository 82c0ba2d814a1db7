"""Forward throughput of purifier + classifier at CIFAR-10 size: fp32 vs channels_last / autocast / torch.compile.

Purifier: the consistency purifier around a random-init diffusers ``UNet2DModel`` at a CIFAR-like config
(3x32x32, 4 levels, attention at 16x16). Classifier: CIFAR ResNet-18 (timm ``resnet18`` with a 3x3 stride-1 stem
and no max-pool) behind a mean/std input transform. Variants go through
:func:`cpcluster.models.speed.optimize_for_inference`; calls are interleaved round by round (shared machines drift),
the speedup is the ratio of the fastest round of each (contention only ever adds time, so the minimum is the best
estimate of a quiet machine; the median is printed too). The process CPU time of the same calls ("cpu s", min) is
less sensitive to other jobs on the machine; its ratio is printed as "cpu vs". Each variant's agreement with fp32
is given as top-1 agreement and max |logit difference|.

    .venv/bin/python benchmarks/bench_forward.py --threads 2 --batch 32 --rounds 5
    .venv/bin/python benchmarks/bench_forward.py --device cuda --batch 400 --rounds 10   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def build(width: int, device: str):
    import timm
    import torch
    from diffusers import UNet2DModel
    from torch import nn

    from cpcluster.models.loaded import LoadedClassifier, LoadedDenoiser
    from cpcluster.models.purifier_base import SmoothedBase
    from cpcluster.models.purifiers import build_purifier
    from cpcluster.models.transforms import InputTransform, TransformedClassifier, transform_from_options
    from cpcluster.models.archs.diffusers_unet import DiffusersUNet

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(width, 2 * width, 2 * width, 2 * width),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()
    den = LoadedDenoiser(DiffusersUNet(unet), "consistency", {"c_noise": "openai", "grid_steps": 18,
                                                              "num_classes": None})
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    transform = transform_from_options({"mean": "cifar10"}, "bench")
    clf = LoadedClassifier(TransformedClassifier(InputTransform(transform), net.eval()), 10)
    model = SmoothedBase(build_purifier("consistency", den, 0.5), clf)
    params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in net.parameters())
    return model, params


VARIANTS = {  # name -> optimize_for_inference keyword arguments
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16": {"autocast": "bf16"},
    "bf16+channels_last": {"autocast": "bf16", "channels_last": True},
    "compile": {"compile": True},
    "compile+bf16": {"compile": True, "autocast": "bf16"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--width", type=int, default=64, help="UNet base channels (128 = DDPM-CIFAR10 size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="fp32,channels_last,bf16,bf16+channels_last,compile",
                    help=f"comma-separated subset of {','.join(VARIANTS)} (the first is the reference)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import copy

    import torch

    from cpcluster.models.speed import optimize_for_inference

    torch.set_num_threads(args.threads)
    base, (p_unet, p_clf) = build(args.width, args.device)
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(args.device)
    x = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    names = args.variants.split(",")
    models, first_call, outputs = {}, {}, {}
    for name in names:
        models[name] = optimize_for_inference(copy.deepcopy(base), args.device, **VARIANTS[name])
        with torch.inference_mode():
            t0 = time.perf_counter()
            outputs[name] = models[name](x)  # warm-up; includes compilation for compiled variants
            sync()
            first_call[name] = time.perf_counter() - t0
    times, cpu_times = {n: [] for n in names}, {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:  # interleaved: drift hits every variant alike
            with torch.inference_mode():
                t0, c0 = time.perf_counter(), time.process_time()
                models[name](x)
                sync()
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
    ref = outputs["fp32"] if "fp32" in outputs else outputs[names[0]]
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({"variant": name, "median_s": med, "min_s": min(times[name]), "images_per_s": args.batch / med,
                     "speedup_vs_fp32": min(times[names[0]]) / min(times[name]), "first_call_s": first_call[name],
                     "cpu_s_min": min(cpu_times[name]),
                     "cpu_speedup_vs_fp32": min(cpu_times[names[0]]) / min(cpu_times[name]),
                     "top1_agreement": float((outputs[name].argmax(1) == ref.argmax(1)).float().mean()),
                     "max_abs_logit_diff": float((outputs[name] - ref).abs().max())})
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    header = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0), "cpu": cpu,
              "threads": args.threads, "batch": args.batch, "rounds": args.rounds, "torch": torch.__version__,
              "unet_params": p_unet, "classifier_params": p_clf}
    print(json.dumps(header))
    print(f"{'variant':<20} {'median s':>9} {'min s':>7} {'img/s':>8} {'vs fp32':>8} {'cpu s':>7} {'cpu vs':>7} "
          f"{'1st call s':>10} {'top1 =':>7} {'max|dlogit|':>11}")
    for r in rows:
        print(f"{r['variant']:<20} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['images_per_s']:8.1f} "
              f"{r['speedup_vs_fp32']:8.2f} {r['cpu_s_min']:7.3f} {r['cpu_speedup_vs_fp32']:7.2f} "
              f"{r['first_call_s']:10.1f} {r['top1_agreement']:7.3f} {r['max_abs_logit_diff']:11.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
