"""``cpcluster finetune``: parse, validate, build a FinetuneConfig, submit the DDP job
(:func:`cpcluster.orchestrate.finetune.submit_training`, after the job's pre-submit checks).

The layout and submission options (:func:`cpcluster.cli.options.job_options`) are shared with
``cpcluster finetune-classifier``.
"""
from __future__ import annotations

import click

from cpcluster.cli.options import job_options, sigma_option, time_rule_option, training_progress_options
from cpcluster.core.choices import FINETUNE_LOSSES, LPIPS_NETS
from cpcluster.core.config import FinetuneConfig


@click.command("finetune", context_settings={"show_default": True, "max_content_width": 110})
@click.option("--model", required=True, help="Denoiser spec to start from (a consistency model), e.g. demo.")
@click.option("--data", required=True, help="Training images, a dataset spec, e.g. demo:train.")
@click.option("--eval-data", default=None, help="Held-out images (default: the last --eval-images of --data).")
@click.option("--out", required=True, help="Output folder or fsspec URL: checkpoints/, metrics.jsonl, final/.")
@sigma_option("--sigmas", default=("0.25,0.5,1.0",), help="Pixel-space smoothing levels the model will serve.")
@click.option("--steps", default=2000, type=int, help="Optimizer steps (rerun with more to continue a run).")
@click.option("--batch-size", default=64, type=int, help="Global batch, split evenly across all ranks.")
@click.option("--lr", default=1e-4, type=float, help="RAdam learning rate.")
@click.option("--loss", type=click.Choice(FINETUNE_LOSSES), default="lpips", help="lpips, or the l2/l1 ablations.")
@click.option("--lpips-net", type=click.Choice(LPIPS_NETS), default="vgg", help="LPIPS trunk.")
@click.option("--lpips-resize", default=224, type=int, help="Bilinear upsampling before LPIPS (0: native size).")
@click.option("--lpips-random-backbone", is_flag=True, help="Random LPIPS trunk: tests and demos ONLY.")
@click.option("--ema-decay", default=0.999, type=float, help="EMA of the weights, exported (0: off, export raw).")
@click.option("--grad-clip", default=1.0, type=float, help="Max gradient norm (0: off).")
@time_rule_option
@click.option("--purifier-label", default="random",
              help="Labels a class-conditional network sees: random or fixed:K (never the true label).")
@click.option("--classifier", default=None, help="Classifier spec: also report accuracy of clf(purify(x+noise)).")
@training_progress_options
@click.option("--seed", default=0, type=int, help="Data order, noise and the random LPIPS trunk.")
@job_options
def finetune(sigmas, gpus_per_node, ranks_per_node, submit, **options):
    """Fine-tune a consistency model with LPIPS on its purification task (multi-node DDP through submitit).

    \b
    Examples:
      cpcluster finetune --model demo-random --data demo:train --eval-data demo --steps 20 --batch-size 16 \\
          --lpips-random-backbone --lpips-net alex --lpips-resize 32 --executor local --out runs/ft-demo --wait
      cpcluster finetune --nodes 4 --gpus-per-node 8 --model diffusers:/ckpt/cd_imagenet64_lpips \\
          --data npz:/data/imagenet64_train.npz --sigma 0.25,0.5,1.0 --out /shared/runs/ft --executor slurm
    The result, <out>/final, certifies with `cpcluster certify --denoiser finetuned:<out>/final`.
    """
    from cpcluster.core.losses import RANDOM_BACKBONE_WARNING
    from cpcluster.orchestrate.finetune import layout, submit_training, training_job

    ranks, device, options["out"] = layout(gpus_per_node, ranks_per_node, options["out"])
    config = FinetuneConfig(sigmas=sigmas, ranks_per_node=ranks, device=device, **options)
    job = training_job(config)
    warning = RANDOM_BACKBONE_WARNING.format(net=config.lpips_net) if config.lpips_random_backbone else None
    submit_training(job, config, submit, gpus_per_node, "`cpcluster certify --denoiser finetuned:{final}`",
                    "cpcluster-finetune", warning, echo=click.echo, warn=_warn)


def _warn(text: str) -> None:
    click.secho(text, fg="red", bold=True, err=True)
