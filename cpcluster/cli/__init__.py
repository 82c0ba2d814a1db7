"""The ``cpcluster`` command: one Click group; each subcommand lives in its own module, imported on demand.

Lazy loading keeps ``cpcluster --help`` and ``cpcluster aggregate`` free of torch imports. Every
:class:`cpcluster.util.errors.InputError` raised below a command becomes ``Error: <one line>`` and exit code 2, every
:class:`~cpcluster.util.errors.RunError` (a job failed or was stopped) ``Error: <one line>`` and exit code 1.
"""
from __future__ import annotations

import importlib

import click

from cpcluster import __version__
from cpcluster.util.errors import InputError, RunError

# Explicit registry: command name -> "module:attribute".
COMMANDS = {
    "aggregate": "cpcluster.cli.aggregate_cmd:aggregate",
    "certify": "cpcluster.cli.certify_cmd:certify",
    "inspect": "cpcluster.cli.inspect_cmd:inspect_cmd",
    "finetune": "cpcluster.cli.finetune_cmd:finetune",
    "finetune-classifier": "cpcluster.cli.finetune_classifier_cmd:finetune_classifier",
    "status": "cpcluster.cli.status_cmd:status",
    "resubmit": "cpcluster.cli.status_cmd:resubmit",
    "demo": "cpcluster.cli.demo_cmd:demo",
    "quality": "cpcluster.cli.quality_cmd:quality",
    "quality-report": "cpcluster.cli.quality_cmd:quality_report",
    "convert": "cpcluster.cli.convert_cmd:convert",
    "grid": "cpcluster.cli.grid_cmd:grid",
}


class UsageFailure(click.ClickException):
    """Bad input: printed as one line, exit code 2 (like Click's own usage errors)."""

    exit_code = 2


class OneLineUsageError(click.UsageError):
    """Click's usage errors (a bad option value, an unknown option or command) as one line, exit code 2."""

    def show(self, file=None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{hint}", file=file or click.get_text_stream("stderr"))


def _available(name: str) -> bool:
    module = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(module) is not None


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n in COMMANDS if _available(n))

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            raise UsageFailure(str(e)) from None
        except RunError as e:
            raise click.ClickException(str(e)) from None
        except click.UsageError as e:
            if isinstance(e, OneLineUsageError):
                raise
            raise OneLineUsageError(e.format_message(), e.ctx) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="cpcluster")
def main():
    """Consistency Purification at cluster scale: certify, fine-tune and aggregate.

    \b
    Typical session:
      cpcluster finetune --nodes 4 --model SPEC --data SPEC --out runs/ft
      cpcluster certify --shards 64 --sigma 1.0 --out results
      cpcluster aggregate results/*/*.h5
    """
