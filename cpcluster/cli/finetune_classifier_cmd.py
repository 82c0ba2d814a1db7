"""``cpcluster finetune-classifier``: CLS-FT as a DDP job (parse, validate, pre-submit checks, submit).

A command of its own rather than ``cpcluster finetune --target classifier``: the two jobs share their layout and
submission options (:func:`cpcluster.cli.options.job_options`) but not their training options (a classifier
run has an optimizer, a schedule, a BatchNorm mode and a frozen purifier; a purifier run has LPIPS), so one command
per target keeps every option in ``--help`` meaningful for the run it starts.
"""
from __future__ import annotations

import click

from cpcluster.cli.finetune_cmd import _warn
from cpcluster.cli.options import (job_options, sigma_option, solver_steps_option, time_rule_option,
                                   training_progress_options)
from cpcluster.core.choices import BATCHNORM_MODES, OPTIMIZERS, SCHEDULES
from cpcluster.core.config_evidence import ClassifierFinetuneConfig
from cpcluster.models.purifiers import PURIFIER_NAMES


@click.command("finetune-classifier", context_settings={"show_default": True, "max_content_width": 110})
@click.option("--classifier", required=True, help="Classifier spec to start from, e.g. demo or timm:...")
@click.option("--denoiser", default=None, help="Denoiser of the frozen purifier [default: demo]; finetuned:DIR for "
                                               "'both' (DM-FT, then CLS-FT behind it).")
@click.option("--purifier", type=click.Choice(PURIFIER_NAMES), default="consistency", help="The frozen purifier.")
@solver_steps_option("--purifier-steps", dest="purifier_steps")
@click.option("--data", required=True, help="Training images, a dataset spec, e.g. demo:train.")
@click.option("--eval-data", default=None, help="Held-out images (default: the last --eval-images of --data).")
@click.option("--out", required=True, help="Output folder or fsspec URL: checkpoints/, metrics.jsonl, final/.")
@sigma_option("--sigmas", default=("0.25,0.5,1.0",), help="Pixel-space smoothing levels (one drawn per image).")
@click.option("--steps", default=2000, type=int, help="Optimizer steps.")
@click.option("--batch-size", default=64, type=int, help="Global batch, split evenly across all ranks.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd")
@click.option("--lr", default=1e-3, type=float, help="Peak learning rate.")
@click.option("--momentum", default=0.9, type=float, help="SGD momentum.")
@click.option("--weight-decay", default=0.0, type=float)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="constant",
              help="After warm-up: constant, cosine (to 0 at --steps) or step (x --lr-gamma every --lr-step-every).")
@click.option("--warmup-steps", default=0, type=int, help="Linear warm-up steps.")
@click.option("--lr-step-every", default=1000, type=int)
@click.option("--lr-gamma", default=0.1, type=float)
@click.option("--ema-decay", default=0.0, type=float, help="EMA of the weights, exported (0: off, export raw).")
@click.option("--grad-clip", default=0.0, type=float, help="Max gradient norm (0: off).")
@click.option("--batchnorm", type=click.Choice(BATCHNORM_MODES), default="train",
              help="BatchNorm layers: per-rank statistics, frozen running statistics, or SyncBatchNorm (CUDA).")
@time_rule_option
@click.option("--purifier-label", default="random", help="Labels a class-conditional purifier sees: random or fixed:K.")
@training_progress_options
@click.option("--seed", default=0, type=int, help="Data order and noise.")
@job_options
def finetune_classifier(sigmas, gpus_per_node, ranks_per_node, submit, denoiser, purifier, **options):
    """Fine-tune a classifier on purified noisy images, the purifier frozen (CLS-FT; multi-node DDP via submitit).

    Cross-entropy of classifier(purify(x + noise)) at the --sigma levels, with the purifier that certification uses.
    Fine-tune the purifier first (`cpcluster finetune`) and pass --denoiser finetuned:<that out>/final for "both".

    \b
    Examples:
      cpcluster finetune-classifier --classifier demo --denoiser demo --data demo:train --eval-data demo \\
          --sigma 0.5 --steps 100 --batch-size 32 --lr 1e-3 --executor local --out runs/cls-ft --wait
      cpcluster finetune-classifier --nodes 2 --gpus-per-node 4 --classifier "$CLF" \\
          --denoiser finetuned:/shared/runs/ft-cifar10/final --data 'cifar10:/data/cifar-10-batches-py?split=train' \\
          --optimizer sgd --lr 0.01 --schedule cosine --warmup-steps 500 --out /shared/runs/both --executor slurm
    The result, <out>/final, certifies with `cpcluster certify --classifier finetuned:<out>/final`.
    """
    from cpcluster.orchestrate.finetune import layout, submit_training, training_job

    ranks, device, options["out"] = layout(gpus_per_node, ranks_per_node, options["out"])
    if denoiser is None and purifier != "none":
        denoiser = "demo"
    config = ClassifierFinetuneConfig(sigmas=sigmas, ranks_per_node=ranks, device=device,
                                      denoiser=denoiser, purifier=purifier, **options)
    submit_training(training_job(config), config, submit, gpus_per_node,
                    "`cpcluster certify --classifier finetuned:{final}`", "cpcluster-finetune-classifier",
                    echo=click.echo, warn=_warn)
