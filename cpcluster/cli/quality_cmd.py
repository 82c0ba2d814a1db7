"""``cpcluster quality`` (sharded jobs) and ``cpcluster quality-report`` (aggregation): purification quality.

``quality`` makes one run per (purifier, sigma) plus the dataset's clean reference run (``clean``), each cut into
``--shards`` jobs of :class:`cpcluster.jobs.quality.QualityShardJob`, checked before anything is submitted (spec
kinds and paths, the Inception weights file, the LPIPS trunk, run folders holding other runs). ``quality-report``
turns the finished runs into one table and one plot per dataset (``aggregate/quality_report.py``).
"""
from __future__ import annotations

import os
import re

import click

from cpcluster.cli.certify_cmd import array_slurm_options, parse_indices, shard_submit_options
from cpcluster.core.config_evidence import PURIFIER_KINDS, QualityConfig
from cpcluster.util.errors import InputError


def parse_purifier(text: str) -> tuple[str, str, str | None]:
    """``[NAME=]KIND[:DENOISER SPEC]`` -> ``(run name prefix, kind, denoiser spec or None)``."""
    name, eq, body = text.partition("=") if re.match(r"^[A-Za-z0-9._-]+=", text) else ("", "", text)
    kind, _, denoiser = body.partition(":")
    if kind not in PURIFIER_KINDS:
        raise InputError(f"--purifier {text!r}: start with one of {', '.join(PURIFIER_KINDS)}, e.g. consistency:demo "
                         "or none (an optional NAME= prefix names its runs)")
    if kind != "none" and not denoiser:
        raise InputError(f"--purifier {text!r}: name the denoiser, e.g. {kind}:demo")
    prefix = name or re.sub(r"[^A-Za-z0-9.=-]+", "-", f"{kind}-{denoiser}" if denoiser else kind).strip("-")
    return prefix, kind, denoiser or None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_configs(purifiers, sigmas, out: str, **fields) -> list[QualityConfig]:
    """The clean reference run, then one run per (purifier, sigma), each in ``<out>/<name>``; names unique."""
    from cpcluster.util.fileio import join_url

    if not purifiers or not sigmas:
        raise InputError("give at least one --purifier (e.g. consistency:demo) and one --sigma")
    configs = [QualityConfig(run_dir=join_url(out, "clean"), purifier="clean", **fields)]
    for text in purifiers:
        prefix, kind, denoiser = parse_purifier(text)
        for sigma in sigmas:
            configs.append(QualityConfig(run_dir=join_url(out, f"{prefix}-sigma{sigma:g}"), purifier=kind,
                                         denoiser=denoiser, sigma=sigma, **fields))
    dirs = [c.run_dir for c in configs]
    if len(set(dirs)) != len(dirs):
        raise InputError("two --purifier values give runs the same folder name; prefix them with NAME=")
    return configs


def preflight(configs: list[QualityConfig]) -> None:
    """Spec kinds and local paths, the Inception weights and the LPIPS trunk, before anything runs (InputError)."""
    from cpcluster.core.fid import check_inception
    from cpcluster.jobs.finetune import check_specs

    first = configs[0]
    check_specs([("dataset", "--dataset", first.dataset), ("classifier", "--classifier", first.classifier)]
                + [("denoiser", "--purifier", c.denoiser) for c in configs])
    if not first.inception_random_weights:
        check_inception(first.inception_weights)
    if not first.lpips_random_backbone:
        from cpcluster.core.losses import check_backbone

        check_backbone(first.lpips_net)


def prepare(config: QualityConfig, overwrite: bool) -> list[int]:
    """Check or write ``<run_dir>/run.json``; returns the indices of its shards still to compute."""
    import json

    import fsspec

    from cpcluster.aggregate.quality_io import SHARD_GLOB, shard_name
    from cpcluster.jobs.quality import RUN_FILE, Models, read_run, shard_config
    from cpcluster.util.fileio import config_hash, exists, join_url, write_bytes_atomic

    digest = config_hash(shard_config(config, Models(config)))
    record = read_run(config.run_dir)
    fs, path = fsspec.core.url_to_fs(config.run_dir)
    if record is not None and (record.get("config_hash"), record.get("num_shards")) != (digest, config.num_shards):
        if not overwrite:
            raise InputError(f"{config.run_dir} holds another quality run (settings, models or data differ); use "
                             "another --out, or --overwrite to replace it")
        for old in fs.glob(path.rstrip("/") + "/" + SHARD_GLOB):
            fs.rm(old)
    write_bytes_atomic(join_url(config.run_dir, RUN_FILE), (json.dumps(
        {"config": config.to_dict(), "config_hash": digest, "num_shards": config.num_shards}, indent=1) + "\n").encode())
    return [k for k in range(config.num_shards) if not exists(join_url(config.run_dir, shard_name(k, config.num_shards)))]


@click.command("quality", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--purifier", "purifiers", multiple=True, metavar="[NAME=]KIND[:DENOISER]",
              help="A purifier to measure, e.g. consistency:demo or onestep-ddpm:diffusers:/ckpt/ddpm or none; "
                   "repeat for several.")
@click.option("--sigma", "sigmas", type=float, multiple=True, metavar="SIGMA", help="Pixel-space noise; repeat.")
@click.option("--dataset", default="demo", show_default=True, metavar="SPEC")
@click.option("--classifier", default="demo", show_default=True, metavar="SPEC", help="For the accuracy column.")
@click.option("--skip", type=int, default=1, show_default=True, help="Every K-th image.")
@click.option("--max-images", type=int, default=None)
@click.option("--indices", default=None, metavar="LIST", help="Image indices, e.g. 0,5,10-19.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (the same noise for every purifier).")
@click.option("--shards", "num_shards", type=int, default=1, show_default=True, help="Shard jobs per run.")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per forward.")
@click.option("--time", "time_rule", type=click.Choice(["nearest", "exact"]), default="nearest", show_default=True)
@click.option("--purifier-label", default="random", show_default=True,
              help="Labels a class-conditional purifier sees: random or fixed:K (never the true label).")
@click.option("--purifier-steps", type=int, default=None, help="Solver steps (pf-ode).")
@click.option("--lpips-net", type=click.Choice(["vgg", "alex"]), default="vgg", show_default=True)
@click.option("--lpips-resize", type=int, default=224, show_default=True, help="Upsampling before LPIPS (0: none).")
@click.option("--lpips-random-backbone", is_flag=True, help="Random LPIPS trunk: tests and demos ONLY.")
@click.option("--inception-weights", default=None, metavar="FILE",
              help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth [default: in $TORCH_HOME/hub/checkpoints].")
@click.option("--inception-random-weights", is_flag=True, help="Random-weight Inception: tests and demos ONLY.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", default="results/quality", show_default=True, metavar="DIR")
@shard_submit_options
@click.option("--overwrite", is_flag=True, help="Replace run folders holding another configuration.")
def quality(purifiers, sigmas, out, indices, executor, workers, partition, account, time_min, array_parallelism,
            sbatch_extra, overwrite, **fields):
    """Measure purification quality: FID, transport distance, LPIPS and L2 to the clean image, accuracy.

    One run per --purifier and --sigma, plus the clean reference run, in <out>/<name>/quality-*.npz; every
    purifier sees the same noisy images. Then `cpcluster quality-report <out>/*` prints the table.

    \b
    Examples:
      cpcluster quality --purifier consistency:demo --purifier none --sigma 0.5 --max-images 32 \\
          --lpips-random-backbone --inception-random-weights --executor local --out /tmp/quality
      cpcluster quality --dataset cifar10:/data/cifar-10-batches-py --skip 20 --classifier "$CLF" \\
          --purifier cd=consistency:diffusers:/ckpt/cd --purifier ft=consistency:finetuned:/runs/ft/final \\
          --sigma 0.25 --sigma 0.5 --sigma 1.0 --shards 10 --executor slurm --out /shared/quality
    """
    from cpcluster.orchestrate.submit import Task, choose_executor, run_debug, run_local, submit_slurm
    from cpcluster.util.fileio import is_local

    from cpcluster.jobs.quality import QualityShardJob

    if is_local(out):
        out = os.path.abspath(out.removeprefix("file://"))
    configs = build_configs(purifiers, sigmas, out, indices=parse_indices(indices), **fields)
    preflight(configs)
    kind, reason = choose_executor(executor)
    workers = workers or 1
    on_cpu = fields["device"] == "cpu" or (fields["device"] == "auto" and not _cuda())
    threads = max(1, (os.cpu_count() or 1) // workers) if kind == "local" and on_cpu else None  # cores shared
    tasks = []
    for c in configs:
        todo = prepare(c, overwrite)
        click.echo(f"run {c.run_dir}: {c.num_shards - len(todo)} of {c.num_shards} shards complete")
        job_config = QualityConfig(**{**c.to_dict(), "indices": c.indices, "threads": threads})
        logs = os.path.join(c.run_dir, "logs") if is_local(c.run_dir) else os.path.abspath("cpcluster-logs")
        tasks += [Task(QualityShardJob(job_config, k), logs, {"run": os.path.basename(c.run_dir), "shard": k})
                  for k in todo]
    click.echo(f"executor: {kind} ({reason})" + (f", {workers} shard(s) at a time" if kind == "local" else ""))
    if kind == "slurm":
        jobs = submit_slurm([Task(t.fn, os.path.join(t.folder, "%j"), t.tags) for t in tasks],
                            array_slurm_options(fields["device"], dict(
                                partition=partition, account=account, time_min=time_min,
                                array_parallelism=array_parallelism, sbatch_extra=sbatch_extra), "cpcluster-quality"))
        click.echo(f"submitted {len(jobs)} shard jobs")
    elif kind == "local" and tasks:
        run_local(tasks, workers=workers)
    elif tasks:
        run_debug(tasks)
    when = "when the jobs have finished" if kind == "slurm" else "next"
    click.echo(f"{when}: cpcluster quality-report {' '.join(c.run_dir for c in configs)}")


@click.command("quality-report", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", default=None, metavar="DIR", help="Output folder [default: <first input's parent>/report].")
@click.option("--transport-images", type=int, default=1000, show_default=True,
              help="Images per set for the W2 transport distance (exact, O(K^3)).")
@click.option("--plot/--no-plot", default=True, show_default=True)
def quality_report(paths, out, transport_images, plot):
    """One table and one plot per dataset from `cpcluster quality` runs: FID, W2, LPIPS, L2, accuracy.

    \b
    Example:
      cpcluster quality-report /tmp/quality/* --out /tmp/quality-report
    """
    from cpcluster.aggregate.quality_report import write_report

    out = out or os.path.join(os.path.dirname(os.path.abspath(paths[0].rstrip("/"))), "report")
    text, written = write_report(paths, out, transport_images, plot)
    click.echo(text, nl=False)
    click.echo(f"wrote {len(written)} files to {out}", err=True)
