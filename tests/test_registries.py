"""The registries of plug-ins, each one table in one module (name -> "module:attribute", imported on demand): every
entry loads and is what its table says, nothing is imported before it is asked for, and the choice lists commands
offer are the registries' keys."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cpcluster.models import purifiers, specs


@pytest.mark.parametrize("table", sorted(specs.TABLES))
def test_every_spec_kind_has_a_loader(table):
    for kind in specs.TABLES[table]:
        assert callable(specs.loader(table, kind)), (table, kind)
    assert specs.known_kinds(table) == sorted(specs.TABLES[table])


def test_every_purifier_is_a_purifier_of_its_name():
    from cpcluster.models.purifier_base import Purifier

    for name in purifiers.PURIFIERS:
        cls = purifiers.purifier_class(name)
        assert issubclass(cls, Purifier) and cls.kind == name
    assert purifiers.PURIFIER_NAMES == tuple(purifiers.PURIFIERS)


def test_unknown_names_are_one_line_errors():
    from cpcluster.util.errors import InputError

    with pytest.raises(InputError, match="known kinds: .*demo"):
        specs.load_denoiser("nope:x")
    with pytest.raises(InputError, match="choose one of .*pf-ode"):
        purifiers.build_purifier("nope", None, 0.5)


def _imported_after(statement: str, names) -> list:
    code = f"import sys; {statement}; print(sorted(m for m in sys.modules if m in {tuple(names)!r}))"
    return eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_registries_import_their_plug_ins_only_when_asked():
    plug_ins = ("cpcluster.demo.models", "cpcluster.models.adapters", "cpcluster.models.datasets",
                "cpcluster.models.ddpm", "cpcluster.models.purifier_base", "cpcluster.models.netfolder")
    assert _imported_after("import cpcluster.models.specs, cpcluster.models.purifiers", plug_ins) == []
    # the purifier names and the configs that check them come without torch (aggregate imports the configs)
    assert _imported_after("import cpcluster.models.purifiers, cpcluster.core.config, cpcluster.core.config_evidence",
                           ("torch",)) == []


@pytest.mark.parametrize("command", ["certify", "inspect", "quality", "grid", "finetune-classifier"])
def test_commands_offer_every_purifier(command):
    from cpcluster.cli import main

    result = CliRunner().invoke(main, [command, "--purifier", "nope", *(["--sigma", "0.5"] if command in ("quality", "grid")
                                                                       else [])])
    assert result.exit_code == 2
    assert all(name in result.output for name in purifiers.PURIFIER_NAMES if name != "none"), result.output
