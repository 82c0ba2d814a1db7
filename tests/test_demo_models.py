"""The shipped demo models: they load, they are the files metrics.json describes, and they measure as recorded;
``scripts/train_demo.py`` is deterministic (reduced recipe) and its --check comparison flags real differences."""
import copy
import hashlib
import importlib.util
import json
import os

import pytest
import torch

from cpcluster.demo.models import HERE, METRICS_FILE, WEIGHT_FILES, shipped
from cpcluster.models.specs import load_classifier, load_dataset, load_denoiser
from cpcluster.util.errors import InputError

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", os.path.join(ROOT, "scripts", "train_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def record():
    with open(os.path.join(HERE, METRICS_FILE)) as fh:
        return json.load(fh)


def sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_shipped_files_are_the_recorded_ones_and_small(record):
    assert record["recipe"] == train_demo().RECIPE  # the script's recipe is the one that made the files
    names = set(record["files"])
    assert {"classifier.safetensors", "denoiser.safetensors"} <= names <= set(WEIGHT_FILES.values())
    for name, digest in record["files"].items():
        path = os.path.join(HERE, name)
        assert sha256(path) == digest
        assert os.path.getsize(path) < 3 * 2**20
    finetuned = os.path.exists(shipped("denoiser-finetuned"))
    assert finetuned == ("denoiser-finetuned.safetensors" in names) == bool(record["recipe"]["finetuned"])


def test_specs_resolve_to_the_shipped_weights(record):
    den, clf = load_denoiser("demo"), load_classifier("demo")
    assert den.sha256 == record["files"]["denoiser.safetensors"] and den.spec == "demo"
    assert clf.sha256 == record["files"]["classifier.safetensors"] and clf.num_classes == 10
    assert den.kind == "consistency" and den.meta == {"c_noise": "openai", "grid_steps": 18, "num_classes": None}
    # trained weights differ from the seeded random init of the same architecture
    rand = load_denoiser("demo-random").module.state_dict()
    assert any(not torch.equal(v, rand[k]) for k, v in den.module.state_dict().items())
    if "denoiser-finetuned.safetensors" in record["files"]:
        assert load_denoiser("demo:finetuned").sha256 == record["files"]["denoiser-finetuned.safetensors"]
    else:
        with pytest.raises(InputError, match="ships no longer-trained demo denoiser"):
            load_denoiser("demo:finetuned")


@pytest.mark.parametrize("table, spec, match", [
    ("denoiser", "demo:best", "use 'demo' or 'demo:finetuned'"),
    ("classifier", "demo:finetuned", "one classifier"),
    ("dataset", "demo:val", "demo:train"),
])
def test_bad_demo_specs_are_one_line_input_errors(table, spec, match):
    load = {"denoiser": load_denoiser, "classifier": load_classifier, "dataset": load_dataset}[table]
    with pytest.raises(InputError, match=match):
        load(spec)


def test_missing_weights_say_how_to_build_them(tmp_path):
    from cpcluster.demo.models import demo_denoiser

    with pytest.raises(InputError, match="scripts/train_demo.py"):
        demo_denoiser(str(tmp_path / "denoiser.safetensors"))


def test_shipped_weights_measure_as_recorded(record):
    """Recompute metrics.json's numbers from the shipped files (same noise): the record describes these weights."""
    td = train_demo()
    again = td.measure(record["recipe"], HERE)
    assert again["images"] == record["images"] == 500
    assert again["clean_acc"] == pytest.approx(record["clean_acc"], abs=1e-9)
    for sigma, methods in record["by_sigma"].items():
        assert set(methods) == set(again["by_sigma"][sigma])
        for method, values in methods.items():
            for key, value in values.items():  # inference only: equal up to float summation order
                assert again["by_sigma"][sigma][method][key] == pytest.approx(value, rel=1e-4, abs=2e-3), \
                    (sigma, method, key)


def test_compare_applies_the_stated_tolerance(record):
    td = train_demo()
    same = td.compare(record, copy.deepcopy(record))
    assert same and all(line.startswith("ok") for line in same)
    shifted = copy.deepcopy(record)
    shifted["clean_acc"] -= td.TOLERANCE["acc"] * 2
    sigma = next(iter(shifted["by_sigma"]))
    shifted["by_sigma"][sigma]["demo"]["l2"] *= 1 + td.TOLERANCE["l2"] * 2
    shifted["by_sigma"][sigma]["demo"]["acc"] += td.TOLERANCE["acc"] / 2  # inside the tolerance
    lines = td.compare(record, shifted)
    bad = [line for line in lines if line.startswith("FAIL")]
    assert len(bad) == 2 and "clean accuracy" in bad[0] and f"sigma {sigma} demo l2" in bad[1]


def _reduced(td, seed=0):
    recipe = copy.deepcopy(td.RECIPE)
    recipe["seed"] = seed
    recipe["classifier"]["epochs"] = 1
    recipe["denoiser"]["steps"] = 4
    recipe["eval"]["images"] = 40
    if recipe.get("finetuned"):
        recipe["finetuned"]["steps"] = 2
    return recipe


def test_training_is_deterministic_and_loads(tmp_path):
    """Same recipe and seed -> bit-identical weight files and metrics; another seed -> other weights."""
    from cpcluster.demo.models import demo_classifier, demo_denoiser

    td = train_demo()
    td._setup(1)
    a = td.train_all(_reduced(td), str(tmp_path / "a"))
    b = td.train_all(_reduced(td), str(tmp_path / "b"))
    c = td.train_all(_reduced(td, seed=1), str(tmp_path / "c"))
    assert a["files"] == b["files"] and a["by_sigma"] == b["by_sigma"] and a["clean_acc"] == b["clean_acc"]
    assert a["files"]["denoiser.safetensors"] != c["files"]["denoiser.safetensors"]
    assert a["files"]["classifier.safetensors"] != c["files"]["classifier.safetensors"]
    for name, digest in a["files"].items():
        assert sha256(tmp_path / "a" / name) == digest
    assert json.loads((tmp_path / "a" / METRICS_FILE).read_text())["files"] == a["files"]
    den = demo_denoiser(shipped("denoiser", str(tmp_path / "a")))
    clf = demo_classifier(shipped("classifier", str(tmp_path / "a")))
    x = torch.rand(2, 1, 16, 16)
    assert clf.module(x).shape == (2, 10) and den.module(2 * x - 1, torch.zeros(2)).shape == (2, 1, 16, 16)
    assert set(a["by_sigma"]) == {"0.25", "0.5", "1"}
    for methods in a["by_sigma"].values():
        assert "none" in methods and "demo" in methods
        assert all(0 <= v["acc"] <= 1 for v in methods.values())
