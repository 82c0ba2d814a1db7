"""``cpcluster certify``: options -> one :class:`~cpcluster.core.config.CertifyConfig` per sigma -> run or submit
their shards (:func:`cpcluster.orchestrate.certify.certify_runs`).
"""
from __future__ import annotations

import click

from cpcluster.cli.options import CONTEXT, shard_submit_options, sigma_option, solver_steps_option, time_rule_option
from cpcluster.core.choices import DEVICES, DTYPES, MODES
from cpcluster.core.config import parse_indices
from cpcluster.models.purifiers import PURIFIER_NAMES
from cpcluster.orchestrate.certify import DEFAULT_NAME


@click.command(context_settings=CONTEXT)
@sigma_option(help="Pixel-space noise level (images in [0,1]), one run per sigma. Required.")
@click.option("--shards", type=int, default=1, show_default=True, help="Number of shard jobs per run.")
@click.option("--n0", type=int, default=100, show_default=True, help="Selection draws per image (CERTIFY).")
@click.option("--n", "n", type=int, default=100_000, show_default=True, help="Estimation draws per image.")
@click.option("--batch", type=int, default=1000, show_default=True, help="Draws per forward pass.")
@click.option("--block-size", type=int, default=10_000, show_default=True,
              help="Estimation draws per work unit (a multiple of --draw-batch).")
@click.option("--draw-batch", type=int, default=100, show_default=True,
              help="Draws per seeded noise batch; fixes the noise, so keep it to reproduce a run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed.")
@click.option("--skip", type=int, default=1, show_default=True, help="Every K-th image (Cohen's --skip).")
@click.option("--max-images", type=int, default=None, help="At most this many images.")
@click.option("--indices", default=None, metavar="LIST", help="Image indices to evaluate, e.g. 0,5,10-19.")
@click.option("--dataset", default="demo", show_default=True, metavar="SPEC", help="Evaluation dataset spec.")
@click.option("--denoiser", default=None, metavar="SPEC", help="Denoiser spec [default: demo].")
@click.option("--classifier", default="demo", show_default=True, metavar="SPEC", help="Classifier spec.")
@click.option("--purifier", type=click.Choice(PURIFIER_NAMES), default="consistency", show_default=True,
              help="How each noisy copy is purified before the classifier sees it.")
@solver_steps_option("--steps")
@time_rule_option
@click.option("--purifier-label", default="random", show_default=True,
              help="Labels a class-conditional purifier sees: random (uniform, from the noise seed) or fixed:K; "
                   "never the true label. Ignored for unconditional purifiers.")
@click.option("--mode", type=click.Choice(MODES), default="certify", show_default=True,
              help="certify (selection + estimation) or predict (estimation only).")
@click.option("--early-stop", "early_stop", type=float, default=None, metavar="MAX_ALPHA",
              help="Skip estimation draws that cannot change certified accuracy or ACR at any alpha <= MAX_ALPHA: "
                   "images whose selection picks a wrong class, and the rest of an image once it must abstain. "
                   "Recorded in the run; aggregate refuses a larger --alpha. Use --block-size <= n/10 so images "
                   "can stop early.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Forward precision (autocast).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where shards run: auto = CUDA when the job sees a GPU, else CPU.")
@click.option("--out", default="results", show_default=True, metavar="DIR", help="Results folder or fsspec URL.")
@click.option("--name", default=DEFAULT_NAME, show_default=True,
              help="Run folder name under --out; placeholders {sigma} {mode} {purifier} {seed} {n}.")
@shard_submit_options
@click.option("--dry-run", is_flag=True, help="Print the plan and an estimated cost; write and submit nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder holding another configuration.")
def certify(sigmas, shards, out, name, executor, workers, slurm, dry_run, overwrite, indices, denoiser, purifier,
            **fields):
    """Certify a dataset with randomized smoothing + purification, as sharded, resumable jobs.

    Each run (one per --sigma) evaluates CERTIFY (or PREDICT) for every selected image with n0 selection and n
    estimation draws, cut into --shards jobs that write per-image class counts to
    <out>/<name>/shard-*-of-*.h5. Rerunning the same command resumes unfinished shards; a different
    configuration in the same folder is refused unless --overwrite.

    \b
    Examples:
      cpcluster certify --shards 64 --sigma 1.0
      cpcluster certify --sigma 0.25 --sigma 0.5 --n 10000 --skip 20 --shards 8 --dry-run
      cpcluster certify --sigma 0.5 --n 2000 --max-images 20 --denoiser demo-random --classifier demo-random \\
          --executor local --out /tmp/cp
    """
    from cpcluster.orchestrate.certify import build_configs, certify_runs

    if denoiser is None and purifier != "none":
        denoiser = "demo"
    configs = build_configs(sigmas, out, name, num_shards=shards, indices=parse_indices(indices),
                            denoiser=denoiser, purifier=purifier, **fields)
    certify_runs(configs, executor, slurm, workers=workers, overwrite=overwrite, dry_run=dry_run, echo=click.echo)
