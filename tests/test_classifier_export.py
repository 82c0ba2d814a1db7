"""The CLS-FT export (``finetuned:DIR`` classifiers): self-contained for data bases, code bases repeated by the user.

Stand-ins in the released formats: a timm architecture (``test_resnet``, random weights) with its checkpoint as
safetensors and a transform in the spec; a ``python:`` factory classifier.
"""
import json

import pytest
import torch

from cpcluster.models.finetuned_classifier import export_finetuned_classifier
from cpcluster.models.specs import load_classifier
from cpcluster.util.errors import InputError

torch.set_num_threads(1)
PURIFIER = {"kind": "none", "denoiser": None, "sigmas": [0.5]}


def perturbed_state(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


def test_timm_export_needs_no_base_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    save_file(net.state_dict(), str(tmp_path / "base.safetensors"))
    spec = f"timm:test_resnet:{tmp_path}/base.safetensors?num_classes=10&in_chans=1&resize=32&mean=half"
    base = load_classifier(spec)
    state = perturbed_state(base.module)
    meta = export_finetuned_classifier(str(tmp_path / "final"), state, base, "ema", 12, {"lr": 1}, PURIFIER)
    assert meta["base"] == {"spec": spec, "sha256": base.sha256, "kind": "timm", "started_from": spec}
    (tmp_path / "base.safetensors").unlink()  # the export carries every weight

    loaded = load_classifier(f"finetuned:{tmp_path}/final")
    assert all(torch.equal(v, state[k]) for k, v in loaded.module.state_dict().items())
    assert loaded.transform == base.transform and loaded.num_classes == 10
    assert loaded.finetuned["base"] == spec and loaded.finetuned["step"] == 12 and loaded.finetuned["weights"] == "ema"
    x = torch.rand(3, 1, 16, 16)
    direct = load_classifier("timm:test_resnet?num_classes=10&in_chans=1&resize=32&mean=half")
    direct.module.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), direct.module.eval()(x))
        assert not torch.equal(loaded.module(x), base.module(x))  # the resize and normalisation travel too
    # fine-tuning a fine-tuned classifier again records the architecture's root spec
    again = export_finetuned_classifier(str(tmp_path / "again"), state, loaded, "raw", 3, {}, PURIFIER)
    assert again["base"]["spec"] == spec and again["base"]["started_from"] == f"finetuned:{tmp_path}/final"
    assert load_classifier(f"finetuned:{tmp_path}/again").finetuned["step"] == 3


def test_code_bases_must_be_repeated_on_the_command_line(tmp_path):
    spec = "python:test_adapters:make_classifier"
    base = load_classifier(spec)
    state = perturbed_state(base.module)
    export_finetuned_classifier(str(tmp_path), state, base, "raw", 1, {}, PURIFIER)
    with pytest.raises(InputError, match=f"is code, which a file may not choose to run; repeat it.*{tmp_path}\\|{spec}"):
        load_classifier(f"finetuned:{tmp_path}")
    with pytest.raises(InputError, match="not 'python:test_adapters:make_denoiser'"):
        load_classifier(f"finetuned:{tmp_path}|python:test_adapters:make_denoiser")
    loaded = load_classifier(f"finetuned:{tmp_path}|{spec}")
    assert torch.equal(loaded.module.net.fc.weight, state["net.fc.weight"]) and loaded.num_classes == 4


def test_damaged_or_foreign_folders_are_refused(tmp_path):
    base = load_classifier("demo-random")
    export_finetuned_classifier(str(tmp_path), perturbed_state(base.module), base, "raw", 1, {}, PURIFIER)
    assert load_classifier(f"finetuned:{tmp_path}").finetuned["base"] == "demo-random"
    record = json.loads((tmp_path / "cpcluster.json").read_text())

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "classifier.safetensors"
    tensors = load_file(str(weights))
    tensors["head.3.bias"] += 1
    save_file(tensors, str(weights))
    with pytest.raises(InputError, match="sha256"):
        load_classifier(f"finetuned:{tmp_path}")
    (tmp_path / "cpcluster.json").write_text(json.dumps({**record, "weights": {**record["weights"], "file": "../x"}}))
    with pytest.raises(InputError, match="no weights file inside the folder"):
        load_classifier(f"finetuned:{tmp_path}")
    (tmp_path / "cpcluster.json").write_text(json.dumps({**record, "base": {"spec": "nope:x"}}))
    with pytest.raises(InputError, match="kind 'nope' cannot be rebuilt"):
        load_classifier(f"finetuned:{tmp_path}")
    (tmp_path / "cpcluster.json").write_text(json.dumps({**record, "format": "cpcluster-finetuned"}))
    with pytest.raises(InputError, match="not a cpcluster classifier fine-tuning result"):
        load_classifier(f"finetuned:{tmp_path}")
    with pytest.raises(InputError, match="no such file"):
        load_classifier(f"finetuned:{tmp_path}/nothing")
