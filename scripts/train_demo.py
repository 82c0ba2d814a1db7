"""Reproducible training of the built-in demo models: ``cpcluster/demo/*.safetensors`` and ``metrics.json``.

Stages (one process, fixed seeds, a fixed number of torch threads):

1. **classifier** -- :class:`~cpcluster.demo.nets.DemoClassifier` trained on the clean ``demo:train`` digits with
   a plain Adam loop and random shifts of up to ``shift`` pixels (an off-the-shelf classifier, as in the paper: it
   never sees noise);
2. **denoiser** -- the base consistency-parameterised one-step denoiser, trained *through the project's own
   fine-tuning job* (:class:`cpcluster.jobs.finetune.FinetuneJob`, in this process) from ``demo-random`` with the
   L2 loss at the serving sigmas {0.25, 0.5, 1.0}: the purifier "before LPIPS fine-tuning" (spec ``demo``);
3. **finetuned** (when the recipe has it) -- a longer LPIPS fine-tuning of stage 2 with the same job, shipped as
   ``denoiser-finetuned.safetensors`` (spec ``demo:finetuned``);
4. **metrics** -- on the 500 test digits: clean accuracy, and per sigma the accuracy of classifier(x + noise)
   (no purifier) and, per denoiser, purified-vs-clean LPIPS and L2 and the accuracy of classifier(purify(x + noise))
   (:class:`cpcluster.jobs.finetune_eval.Evaluator`, the fine-tuning job's own held-out evaluation).

LPIPS here always runs on a seeded *randomly initialised* AlexNet trunk (``--lpips-random-backbone``): no VGG or
AlexNet ImageNet weights can be downloaded. It is not the paper's perceptual metric.

Usage::

    python scripts/train_demo.py                 # retrain the shipped files in cpcluster/demo/ (see metrics.json)
    python scripts/train_demo.py --check         # retrain into a temp folder; compare with metrics.json
    python scripts/train_demo.py --out /tmp/d --classifier-epochs 1 --denoiser-steps 5   # reduced (tests)

``--check`` exits 1 when a metric differs from the shipped one by more than :data:`TOLERANCE`. On the machine
and torch version that made the files the weights come out bit for bit identical; elsewhere floating-point
summation order differs and the metrics agree within the tolerance.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import click

# The recipe of the shipped weights. Changing it and rerunning changes the shipped files and metrics.json.
RECIPE = {
    "seed": 0,
    "threads": 1,
    "classifier": {"epochs": 20, "batch_size": 64, "lr": 1e-3, "shift": 1},
    "denoiser": {"model": "demo-random", "loss": "l2", "steps": 2000, "batch_size": 64, "lr": 2e-3,
                 "ema_decay": 0.995, "sigmas": [0.25, 0.5, 1.0]},
    "finetuned": None,
    "eval": {"images": 500, "lpips_net": "alex", "lpips_resize": 64, "batch": 250, "seed": 2024},
}
# --check: largest accepted |retrained - shipped| per metric (accuracies on 500 images: 0.02 = 10 images).
TOLERANCE = {"acc": 0.02, "l2": 0.05, "lpips": 0.05}  # acc absolute; l2 and lpips relative
SPECS = {"denoiser": "demo", "finetuned": "demo:finetuned"}
FORMAT = "cpcluster-demo-metrics"


def _setup(threads: int) -> None:
    """Fixed thread count before torch starts its pools (the fine-tuning job keeps OMP_NUM_THREADS' choice)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _save(path: str, state: dict, metadata: dict) -> str:
    """Write ``state`` as safetensors atomically, ``metadata`` as one JSON string; return the file's sha256.

    One metadata key only: safetensors writes its metadata map in a random order, so two keys would make the bytes
    (and the sha256 recorded in every run config) of identical weights differ from one save to the next.
    """
    from safetensors.torch import save

    from cpcluster.models.weights import sha256_bytes
    from cpcluster.util.fileio import write_bytes_atomic

    raw = save({k: v.detach().cpu().contiguous() for k, v in state.items()},
               metadata={"cpcluster": json.dumps(metadata, sort_keys=True)})
    write_bytes_atomic(path, raw)
    return sha256_bytes(raw)


# ------------------------------------------------------------------------------------------------------ stages
def _shift(x, shift: int, gen):
    """(B, C, H, W) images translated by one random (dy, dx) in [-shift, shift] pixels, zero padded."""
    import torch
    from torch.nn import functional as F

    if not shift:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift,) * 4)
    dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


def train_classifier(recipe: dict, path: str) -> dict:
    """Stage 1: Adam on clean ``demo:train`` (every image once per epoch, seeded order and shifts); writes ``path``.

    Each batch is translated by one random (dy, dx) in ``[-shift, shift]`` pixels (zero padding), a standard
    augmentation of clean data.
    """
    import numpy as np
    import torch
    from torch.nn import functional as F

    from cpcluster.demo.nets import DemoClassifier
    from cpcluster.models.specs import load_dataset

    cfg, seed = recipe["classifier"], recipe["seed"]
    train = load_dataset("demo:train")
    x, y = (torch.from_numpy(a) for a in train.get(np.arange(len(train))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DemoClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    tic, b = time.perf_counter(), cfg["batch_size"]
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for k in range(0, len(order) - b + 1, b):  # drop the last partial batch
            idx = order[k:k + b]
            loss = F.cross_entropy(net(_shift(x[idx], cfg["shift"], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * b
        print(f"[classifier] epoch {epoch + 1}/{cfg['epochs']} loss {total / (len(y) // b * b):.4f}", flush=True)
    seconds = time.perf_counter() - tic
    sha = _save(path, net.state_dict(), {"format": "cpcluster-demo", "stage": "classifier", "recipe": recipe})
    return {"seconds": seconds, "sha256": sha}


def finetune_stage(recipe: dict, stage: str, model: str, work: str, path: str) -> dict:
    """Stages 2 and 3: one :class:`FinetuneJob` run in this process; its exported weights are copied to ``path``."""
    from cpcluster.core.config import FinetuneConfig
    from cpcluster.jobs.finetune import FinetuneJob
    from cpcluster.models.netfolder import WEIGHTS_FILE
    from cpcluster.models.weights import load_state_dict

    cfg = dict(recipe[stage])
    cfg.pop("model", None)
    steps = cfg["steps"]
    config = FinetuneConfig(model=model, data="demo:train", out=work, seed=recipe["seed"], eval_images=0,
                            eval_every=0, checkpoint_every=steps, log_every=max(1, steps // 20), device="cpu",
                            **{**cfg, "sigmas": tuple(cfg["sigmas"])})
    tic = time.perf_counter()
    result = FinetuneJob(config)()
    seconds = time.perf_counter() - tic
    state, _ = load_state_dict(os.path.join(work, "final", WEIGHTS_FILE), "fine-tuning output")
    sha = _save(path, state, {"format": "cpcluster-demo", "stage": stage, "recipe": recipe,
                              "finetune_run": config.run_dict()})
    return {"seconds": seconds, "sha256": sha, "samples_per_s": result["train_samples_per_s"]}


# ----------------------------------------------------------------------------------------------------- metrics
def measure(recipe: dict, folder: str) -> dict:
    """Metrics of the weights in ``folder`` on the 500 test digits (see the module docstring), JSON-able."""
    import numpy as np
    import torch

    from cpcluster.core.losses import PerceptualLoss, build_lpips
    from cpcluster.demo.models import demo_classifier, demo_denoiser, shipped
    from cpcluster.jobs.finetune_eval import Evaluator
    from cpcluster.jobs.training import EVAL_STREAM, derive_seed
    from cpcluster.models.specs import load_dataset

    ev, sigmas = recipe["eval"], recipe["denoiser"]["sigmas"]
    test = load_dataset("demo")
    idx = np.arange(min(ev["images"], len(test)))
    clf = demo_classifier(shipped("classifier", folder))
    x, y = (torch.from_numpy(a) for a in test.get(idx))
    with torch.no_grad():
        clean = int((clf.module(x).argmax(1) == y).sum()) / len(idx)
    cfg = SimpleNamespace(sigmas=tuple(sigmas), time_rule="nearest", purifier_label="fixed:0",
                          eval_batch=ev["batch"], seed=ev["seed"])
    perceptual = PerceptualLoss(build_lpips(ev["lpips_net"], True, recipe["seed"]), ev["lpips_resize"])
    by_sigma = {f"{s:g}": {} for s in sigmas}
    for i, sigma in enumerate(sigmas):  # no purifier: the Evaluator's noise, straight into the classifier
        correct = 0
        for j, start in enumerate(range(0, len(idx), ev["batch"])):
            xb, yb = x[start:start + ev["batch"]], y[start:start + ev["batch"]]
            gen = torch.Generator().manual_seed(derive_seed(ev["seed"], EVAL_STREAM, i, j))
            with torch.no_grad():
                correct += int((clf.module(xb + sigma * torch.randn(xb.shape, generator=gen)).argmax(1) == yb).sum())
        by_sigma[f"{sigma:g}"]["none"] = {"acc": correct / len(idx)}
    for stage, spec in SPECS.items():
        if not os.path.exists(shipped("denoiser" if stage == "denoiser" else "denoiser-finetuned", folder)):
            continue
        den = demo_denoiser(shipped("denoiser" if stage == "denoiser" else "denoiser-finetuned", folder))
        for r in Evaluator(cfg, test, idx, perceptual, den, clf)(den.module, 0, "shipped"):
            by_sigma[f"{r['sigma']:g}"][spec] = {"acc": r["acc"], "l2": r["l2"], "lpips": r["lpips"],
                                                 "t_sigma": r["t_sigma"]}
    return {"clean_acc": clean, "images": int(len(idx)), "by_sigma": by_sigma}


def compare(shipped_metrics: dict, new: dict) -> list[str]:
    """Lines ``metric: shipped -> new (ok|FAIL)`` over every metric of ``shipped_metrics``; see :data:`TOLERANCE`."""
    lines = []

    def check(name, kind, a, b):
        if kind == "acc":
            ok = abs(a - b) <= TOLERANCE["acc"]
        else:
            ok = abs(a - b) <= TOLERANCE[kind] * max(abs(a), 1e-12)
        lines.append(f"{'ok  ' if ok else 'FAIL'} {name}: shipped {a:.4f}, retrained {b:.4f}")

    check("clean accuracy", "acc", shipped_metrics["clean_acc"], new["clean_acc"])
    for sigma, methods in shipped_metrics["by_sigma"].items():
        for method, values in methods.items():
            for key, value in values.items():
                if key in TOLERANCE:
                    check(f"sigma {sigma} {method} {key}", key, value, new["by_sigma"][sigma][method][key])
    return lines


# ---------------------------------------------------------------------------------------------------- the script
def train_all(recipe: dict, out: str, work: str | None = None) -> dict:
    """Run every stage of ``recipe`` into folder ``out``; write ``out/metrics.json``; return its content."""
    import torch

    from cpcluster import __version__
    from cpcluster.demo.models import METRICS_FILE, shipped
    from cpcluster.util.fileio import write_bytes_atomic

    os.makedirs(out, exist_ok=True)
    scratch = work or tempfile.mkdtemp(prefix="cpcluster-train-demo-")
    try:
        tic = time.perf_counter()
        stages = {"classifier": train_classifier(recipe, shipped("classifier", out))}
        stages["denoiser"] = finetune_stage(recipe, "denoiser", recipe["denoiser"]["model"],
                                            os.path.join(scratch, "denoiser"), shipped("denoiser", out))
        if recipe.get("finetuned"):
            base = f"finetuned:{os.path.join(scratch, 'denoiser', 'final')}"
            stages["finetuned"] = finetune_stage(recipe, "finetuned", base, os.path.join(scratch, "finetuned"),
                                                 shipped("denoiser-finetuned", out))
        elif os.path.exists(shipped("denoiser-finetuned", out)):
            os.remove(shipped("denoiser-finetuned", out))
        train_seconds = time.perf_counter() - tic
        metrics = measure(recipe, out)
    finally:
        if work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    record = {
        "format": FORMAT, "recipe": recipe, "tolerance": TOLERANCE, **metrics,
        "lpips": f"LPIPS v0.1 on a seeded RANDOMLY INITIALISED {recipe['eval']['lpips_net']} trunk (not the paper's "
                 f"metric), images resized to {recipe['eval']['lpips_resize']}",
        "files": {os.path.basename(shipped(k if k == "classifier" else
                                           ("denoiser" if k == "denoiser" else "denoiser-finetuned"))): v["sha256"]
                  for k, v in stages.items()},
        "train_seconds": {k: round(v["seconds"], 1) for k, v in stages.items()},
        "train_seconds_total": round(train_seconds, 1),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "processor": platform.processor() or None,
                        "python": platform.python_version(), "cpcluster": __version__},
    }
    write_bytes_atomic(os.path.join(out, METRICS_FILE), (json.dumps(record, indent=1) + "\n").encode())
    return record


def summary(record: dict) -> str:
    """A short human-readable table of a metrics record."""
    rows = [f"clean accuracy {record['clean_acc']:.3f} on {record['images']} test digits; "
            f"training {record['train_seconds_total']:.0f} s ({record['environment']['threads']} threads)"]
    for sigma, methods in record["by_sigma"].items():
        for method, v in methods.items():
            extra = f"  L2 {v['l2']:.3f}  LPIPS* {v['lpips']:.4f}" if "l2" in v else ""
            rows.append(f"sigma {sigma:>4}  {method:<15} acc {v['acc']:.3f}{extra}")
    return "\n".join(rows) + "\n(*LPIPS on a random trunk)"


@click.command()
@click.option("--out", default=None, help="Folder for the weights and metrics.json [default: cpcluster/demo].")
@click.option("--check", is_flag=True, help="Retrain into a temp folder and compare with the shipped metrics.json.")
@click.option("--classifier-epochs", type=int, default=None, help="Override the recipe (reduced runs, tests).")
@click.option("--denoiser-steps", type=int, default=None, help="Override the recipe (reduced runs, tests).")
@click.option("--finetuned-steps", type=int, default=None, help="Override the recipe (reduced runs, tests).")
@click.option("--work", default=None, help="Keep the fine-tuning runs' folders here [default: a temp folder].")
def main(out, check, classifier_epochs, denoiser_steps, finetuned_steps, work):
    """Train the demo classifier and denoiser(s) reproducibly and record their metrics.

    \b
    Examples:
      python scripts/train_demo.py --check
      python scripts/train_demo.py --out /tmp/demo-weights --classifier-epochs 1 --denoiser-steps 5
    """
    recipe = json.loads(json.dumps(RECIPE))
    for stage, key, value in (("classifier", "epochs", classifier_epochs), ("denoiser", "steps", denoiser_steps),
                              ("finetuned", "steps", finetuned_steps)):
        if value is not None and recipe.get(stage):
            recipe[stage][key] = value
    _setup(recipe["threads"])
    from cpcluster.demo.models import HERE, METRICS_FILE

    if not check:
        record = train_all(recipe, out or HERE, work)
        click.echo(summary(record))
        return
    with open(os.path.join(HERE, METRICS_FILE)) as fh:
        shipped_record = json.load(fh)
    if shipped_record["recipe"] != recipe:
        raise click.ClickException("the recipe differs from the one recorded in the shipped metrics.json; "
                                   "--check compares like with like only (drop the overrides)")
    with tempfile.TemporaryDirectory(prefix="cpcluster-demo-check-") as tmp:
        record = train_all(recipe, out or tmp, work)
    click.echo(summary(record))
    for name, digest in record["files"].items():
        same = digest == shipped_record["files"].get(name)
        click.echo(f"{name}: {'bit-identical to' if same else 'differs from'} the shipped file "
                   f"(sha256 {digest[:12]})")
    lines = compare(shipped_record, record)
    click.echo("\n".join(lines))
    bad = sum(line.startswith("FAIL") for line in lines)
    click.echo(f"{len(lines) - bad} of {len(lines)} metrics within tolerance {TOLERANCE} "
               f"(training took {record['train_seconds_total']:.0f} s)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
