"""``cpcluster finetune``: parse, validate, build a FinetuneConfig, run the pre-submit checks, submit the DDP job.

The layout and submission options (:func:`job_options`, :func:`layout`) and the submit-and-wait step
(:func:`submit_job`) are shared with ``cpcluster finetune-classifier``.
"""
from __future__ import annotations

import json
import os

import click

from cpcluster.core.config import FINETUNE_LOSSES, FinetuneConfig, LPIPS_NETS
from cpcluster.orchestrate.slurm import SlurmOptions, make_executor
from cpcluster.util.errors import InputError


def parse_sigmas(text: str) -> tuple:
    """``"0.25,0.5,1.0"`` -> ``(0.25, 0.5, 1.0)``; positivity is checked by :class:`FinetuneConfig`."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return tuple(float(t) for t in items)
    except ValueError:
        raise InputError(f"--sigmas {text!r}: give comma-separated numbers, e.g. --sigmas 0.25,0.5,1.0") from None


def check_layout(kind: str, nodes: int, ranks_per_node: int) -> None:
    """What each executor can run: local is one node, debug is one process."""
    if kind == "local" and nodes != 1:
        raise InputError(f"--nodes {nodes}: the local executor runs on this machine only; use --nodes 1 or "
                         "--executor slurm")
    if kind == "debug" and nodes * ranks_per_node != 1:
        raise InputError("--executor debug runs one process inside this one: use --nodes 1 and one rank")


def build_executor(kind: str, folder: str, nodes: int, ranks_per_node: int, gpus_per_node: int,
                   job_name: str = "cpcluster-finetune", **slurm):
    """The submitit executor of one DDP job of ``nodes x ranks_per_node`` tasks (``cpcluster.orchestrate.slurm`` factory)."""
    check_layout(kind, nodes, ranks_per_node)
    options = SlurmOptions(nodes=nodes, tasks_per_node=ranks_per_node, gpus_per_node=gpus_per_node or None,
                           job_name=job_name, **slurm)
    return make_executor(folder, options, kind)


def job_options(fn):
    """The options of a DDP fine-tuning job's layout and submission (shared by ``finetune`` and
    ``finetune-classifier``); :func:`submit_job` takes them."""
    options = [
        click.option("--nodes", default=1, type=int, help="Nodes of the DDP job."),
        click.option("--gpus-per-node", default=0, type=int, help="GPUs per node, one rank each (0: CPU ranks)."),
        click.option("--ranks-per-node", default=None, type=int, help="CPU ranks per node (default: 1)."),
        click.option("--executor", type=click.Choice(["auto", "local", "slurm", "debug"]), default="auto",
                     help="auto: SLURM when its controller answers, else local."),
        click.option("--partition", default=None, help="SLURM partition."),
        click.option("--account", default=None, help="SLURM account."),
        click.option("--time-min", default=24 * 60, type=int, help="Job time limit; submitit requeues on timeout."),
        click.option("--cpus-per-task", default=None, type=int, help="CPUs per rank (SLURM)."),
        click.option("--log-dir", default=None, help="submitit logs (default: <out>/submitit, must be local/shared)."),
        click.option("--wait", is_flag=True, help="Wait for the job and print each rank's summary."),
        click.option("--dry-run", is_flag=True, help="Validate and print the config; submit nothing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def layout(gpus_per_node: int, ranks_per_node: int | None, out: str) -> tuple[int, str, str]:
    """``(ranks per node, device, absolute out)`` from the layout options (InputError for impossible ones)."""
    if gpus_per_node < 0:
        raise InputError(f"--gpus-per-node {gpus_per_node}: must be 0 (CPU) or more")
    if gpus_per_node and ranks_per_node not in (None, gpus_per_node):
        raise InputError(f"--ranks-per-node {ranks_per_node}: with GPUs there is one rank per GPU; drop it")
    if out and "://" not in out:
        out = os.path.abspath(out)  # the job may start in another working directory
    return gpus_per_node or ranks_per_node or 1, "cuda" if gpus_per_node else "cpu", out


# The options of job_options that only say where and how the job is submitted (not config fields).
SUBMIT_KEYS = ("executor", "partition", "account", "time_min", "cpus_per_task", "log_dir", "wait", "dry_run")


def submit_job(job, config, submit: dict, gpus_per_node: int, next_step: str, job_name: str,
               warning: str | None = None) -> None:
    """Choose the executor, print the plan (``--dry-run`` stops there), submit ``job``; with ``--wait`` (or the
    debug executor) wait and print every rank's summary. ``submit``: the :data:`SUBMIT_KEYS` options;
    ``next_step`` names how the result is used (``{final}`` is the result folder); ``warning`` is printed (red, on
    stderr) once every check has passed."""
    from cpcluster.orchestrate.submit import choose_executor, refuse_process_local
    from cpcluster.util.fileio import is_local, join_url

    folder = submit["log_dir"] or (join_url(config.out, "submitit") if is_local(config.out)
                                   else os.path.abspath("submitit"))
    name, reason = choose_executor(submit["executor"])
    nodes, ranks = config.nodes, config.ranks_per_node
    check_layout(name, nodes, ranks)
    refuse_process_local(config.out, name)
    if warning:
        click.secho(warning, fg="red", bold=True, err=True)
    device = f"{gpus_per_node} GPU(s) per node" if gpus_per_node else "CPU"
    click.echo(f"executor: {name} ({reason}): {nodes} node(s) x {ranks} rank(s), {device}")
    if submit["dry_run"]:
        click.echo(json.dumps({"config": config.to_dict(), "executor": name, "log_dir": folder}, indent=2))
        return
    ex = build_executor(name, os.path.join(folder, "%j") if name == "slurm" else folder, nodes, ranks,
                        gpus_per_node, job_name, partition=submit["partition"], account=submit["account"],
                        time_min=submit["time_min"], cpus_per_task=submit["cpus_per_task"])
    submitted = ex.submit(job)
    final = join_url(config.out, "final")
    logs = os.path.join(folder, str(submitted.job_id)) if name == "slurm" else folder
    click.echo(f"job {submitted.job_id} submitted; logs in {logs}")
    click.echo(f"result (when done): {final}, for {next_step.format(final=final)}")
    if submit["wait"] or name == "debug":
        try:
            results = submitted.results()
        except Exception as e:  # submitit's FailedJobError carries the job's traceback
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise click.ClickException(f"job {submitted.job_id} failed: {last[0].strip()[:300]} (logs: {folder})")
        for r in results:
            click.echo(f"rank {r['rank']}/{r['world_size']} on {r['node']} ({r['device']}): step "
                       f"{r['start_step']} -> {r['step']}, weights sha256 {r['param_sha256'][:16]}, "
                       f"{r['train_samples_per_s'] or 0:.1f} samples/s")


@click.command("finetune", context_settings={"show_default": True, "max_content_width": 110})
@click.option("--model", required=True, help="Denoiser spec to start from (a consistency model), e.g. demo.")
@click.option("--data", required=True, help="Training images, a dataset spec, e.g. demo:train.")
@click.option("--eval-data", default=None, help="Held-out images (default: the last --eval-images of --data).")
@click.option("--out", required=True, help="Output folder or fsspec URL: checkpoints/, metrics.jsonl, final/.")
@click.option("--sigmas", default="0.25,0.5,1.0", help="Pixel-space smoothing levels the model will serve.")
@click.option("--steps", default=2000, type=int, help="Optimizer steps (rerun with more to continue a run).")
@click.option("--batch-size", default=64, type=int, help="Global batch, split evenly across all ranks.")
@click.option("--lr", default=1e-4, type=float, help="RAdam learning rate.")
@click.option("--loss", type=click.Choice(FINETUNE_LOSSES), default="lpips", help="lpips, or the l2/l1 ablations.")
@click.option("--lpips-net", type=click.Choice(LPIPS_NETS), default="vgg", help="LPIPS trunk.")
@click.option("--lpips-resize", default=224, type=int, help="Bilinear upsampling before LPIPS (0: native size).")
@click.option("--lpips-random-backbone", is_flag=True, help="Random LPIPS trunk: tests and demos ONLY.")
@click.option("--ema-decay", default=0.999, type=float, help="EMA of the weights, exported (0: off, export raw).")
@click.option("--grad-clip", default=1.0, type=float, help="Max gradient norm (0: off).")
@click.option("--time-rule", type=click.Choice(["nearest", "exact"]), default="nearest", help="t_sigma rule.")
@click.option("--purifier-label", default="random",
              help="Labels a class-conditional network sees: random or fixed:K (never the true label).")
@click.option("--classifier", default=None, help="Classifier spec: also report accuracy of clf(purify(x+noise)).")
@click.option("--eval-images", default=256, type=int, help="Held-out images per evaluation (0: none).")
@click.option("--eval-every", default=500, type=int, help="Evaluate every K steps (and at the start and end).")
@click.option("--eval-batch", default=128, type=int)
@click.option("--checkpoint-every", default=500, type=int, help="Checkpoint every K steps (and at the end).")
@click.option("--log-every", default=10, type=int)
@click.option("--seed", default=0, type=int, help="Data order, noise and the random LPIPS trunk.")
@job_options
def finetune(sigmas, gpus_per_node, ranks_per_node, **options):
    """Fine-tune a consistency model with LPIPS on its purification task (multi-node DDP through submitit).

    \b
    Examples:
      cpcluster finetune --model demo-random --data demo:train --eval-data demo --steps 20 --batch-size 16 \\
          --lpips-random-backbone --lpips-net alex --lpips-resize 32 --executor local --out runs/ft-demo --wait
      cpcluster finetune --nodes 4 --gpus-per-node 8 --model diffusers:/ckpt/cd_imagenet64_lpips \\
          --data npz:/data/imagenet64_train.npz --sigmas 0.25,0.5,1.0 --out /shared/runs/ft --executor slurm
    The result, <out>/final, certifies with `cpcluster certify --denoiser finetuned:<out>/final`.
    """
    submit = {k: options.pop(k) for k in SUBMIT_KEYS}
    ranks, device, options["out"] = layout(gpus_per_node, ranks_per_node, options["out"])
    config = FinetuneConfig(sigmas=parse_sigmas(sigmas), ranks_per_node=ranks, device=device, **options)
    from cpcluster.core.losses import RANDOM_BACKBONE_WARNING
    from cpcluster.jobs.finetune import FinetuneJob, preflight

    preflight(config)
    warning = RANDOM_BACKBONE_WARNING.format(net=config.lpips_net) if config.lpips_random_backbone else None
    submit_job(FinetuneJob(config), config, submit, gpus_per_node, "`cpcluster certify --denoiser finetuned:{final}`",
               "cpcluster-finetune", warning)
