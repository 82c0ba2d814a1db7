"""Network adapters: diffusers folders, python factories, TorchScript, timm with its input transform; safe weights."""
import hashlib
import json
import os
import shutil

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from cpcluster.models.ddpm import ddpm_betas
from cpcluster.models.specs import load_classifier, load_denoiser
from cpcluster.models.transforms import InputTransform, transform_from_options
from cpcluster.util.errors import InputError
from unet_files import CM_SCHEDULER, DDPM_SCHEDULER, save_unet, unet_module

torch.set_num_threads(1)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------- test networks for python: specs


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)  # 2C outputs: the adapter keeps the first C

    def forward(self, x, time_input, class_labels=None):
        return self.conv(x) + time_input.view(-1, 1, 1, 1) * 1e-3


def make_denoiser():
    torch.manual_seed(0)
    return TinyDenoiser()


class TinyClassifier(nn.Module):
    num_classes = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make_classifier():
    torch.manual_seed(1)
    return TinyClassifier()


def make_nothing():
    return 42


# ---------------------------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def cm_folder(tmp_path_factory):
    return save_unet(str(tmp_path_factory.mktemp("cm") / "unet"), scheduler=CM_SCHEDULER, num_class_embeds=5)


def test_diffusers_folder_loads_exact_weights_and_sha(cm_folder):
    den = load_denoiser(f"diffusers:{cm_folder}")
    assert den.sha256 == sha(os.path.join(cm_folder, "diffusion_pytorch_model.safetensors"))
    assert den.meta["num_classes"] == 5 and den.meta["grid_steps"] == 40 and den.meta["c_noise"] == "openai"
    ref = unet_module(cm_folder)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([-300.0, 150.0]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(den.module(x, t, y), ref(x, t, class_labels=y).sample)
    assert not any(p.requires_grad for p in den.module.parameters()) and not den.module.training
    assert json.loads(json.dumps(den.describe()))["sha256"] == den.sha256  # JSON-able for the run config


def test_pipeline_layout_bin_weights_and_learned_sigma(tmp_path):
    root = tmp_path / "pipe"
    save_unet(str(root / "unet"), safe=False, out_channels=6)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(CM_SCHEDULER))
    den = load_denoiser(f"diffusers:{root}?grid_steps=18")  # spec options override the scheduler's N = 40
    assert den.meta["grid_steps"] == 18 and den.sha256 == sha(root / "unet" / "diffusion_pytorch_model.bin")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = den.module(x, torch.ones(2), None)
        ref = unet_module(str(root / "unet"))(x, torch.ones(2)).sample
    assert out.shape == x.shape and torch.equal(out, ref[:, :3])
    half = tmp_path / "half"
    save_unet(str(half), scheduler=CM_SCHEDULER, variant="fp16")
    assert (half / "diffusion_pytorch_model.fp16.safetensors").exists()
    den16 = load_denoiser(f"diffusers:{half}")
    assert all(p.dtype == torch.float32 for p in den16.module.parameters())


def test_sharded_weights_load_whole_and_every_shard_counts_in_the_sha(tmp_path):
    folder = tmp_path / "sharded"
    save_unet(str(folder), scheduler=CM_SCHEDULER, max_shard_size="60KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 2 and not (folder / "diffusion_pytorch_model.safetensors").exists()
    den = load_denoiser(f"diffusers:{folder}")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(den.module(x, torch.ones(2), None), unet_module(str(folder))(x, torch.ones(2)).sample)
    expected = hashlib.sha256("".join(f"{n}:{sha(folder / n)}\n" for n in shards).encode()).hexdigest()
    assert den.sha256 == expected

    (folder / shards[1]).unlink()
    with pytest.raises(InputError, match=shards[1]) as e:
        load_denoiser(f"diffusers:{folder}")
    assert "\n" not in str(e.value)
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(InputError, match="file names in the same folder"):
        load_denoiser(f"diffusers:{folder}")


def test_ddpm_folder_schedules(tmp_path):
    from diffusers import DDPMScheduler

    folder = save_unet(str(tmp_path / "d"), scheduler={**DDPM_SCHEDULER, "beta_schedule": "squaredcos_cap_v2",
                                                       "prediction_type": "v_prediction"})
    den = load_denoiser(f"diffusers:{folder}")
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double().numpy()
    assert den.kind == "ddpm" and den.meta["prediction"] == "v_prediction"
    assert np.allclose(den.meta["betas"], ref, rtol=1e-6, atol=1e-9)
    assert "betas" not in den.describe()  # 1000 numbers stay out of the printed description
    over = load_denoiser(f"diffusers:{folder}?schedule=linear&beta_end=0.03&timesteps=500")
    assert np.allclose(over.meta["betas"], ddpm_betas("linear", 500, 1e-4, 0.03))
    (tmp_path / "d" / "cpcluster.json").write_text(json.dumps({"betas": [0.01] * 10}))
    assert load_denoiser(f"diffusers:{folder}").meta["betas"] == [0.01] * 10


def test_diffusers_folder_over_fsspec(cm_folder):
    fs = fsspec.filesystem("memory")
    for name in os.listdir(cm_folder):
        fs.pipe(f"/cm_copy/{name}", open(os.path.join(cm_folder, name), "rb").read())
    den = load_denoiser("diffusers:memory://cm_copy")
    assert den.sha256 == sha(os.path.join(cm_folder, "diffusion_pytorch_model.safetensors"))


def test_diffusers_never_uses_the_hub(cm_folder, monkeypatch):
    import diffusers
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("hub or from_pretrained touched")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", boom)
    assert load_denoiser(f"diffusers:{cm_folder}").kind == "consistency"


def test_diffusers_bad_folders(tmp_path, cm_folder):
    with pytest.raises(InputError, match="no config.json"):
        load_denoiser(f"diffusers:{tmp_path}")
    plain = save_unet(str(tmp_path / "plain"))
    with pytest.raises(InputError, match=r"\?kind=consistency"):
        load_denoiser(f"diffusers:{plain}")
    assert load_denoiser(f"diffusers:{plain}?kind=consistency&c_noise=jax").meta["c_noise"] == "jax"
    bad = tmp_path / "badsched"
    shutil.copytree(cm_folder, bad)
    (bad / "scheduler_config.json").write_text(json.dumps({**CM_SCHEDULER, "sigma_max": 160.0}))
    with pytest.raises(InputError, match="sigma_max"):
        load_denoiser(f"diffusers:{bad}")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "scheduler_config.json").write_text(json.dumps(CM_SCHEDULER))
    (bad / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [16, 48]}))
    with pytest.raises(InputError, match="do not fit") as info:
        load_denoiser(f"diffusers:{bad}")
    assert "diffusion_pytorch_model.safetensors" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="unknown option 'gird_steps'"):
        load_denoiser(f"diffusers:{cm_folder}?gird_steps=18")
    with pytest.raises(InputError, match="num_class_embeds=5"):
        load_denoiser(f"diffusers:{cm_folder}?num_classes=10")
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a valid safetensors"):
        load_denoiser(f"diffusers:{bad}")


# ---------------------------------------------------------------------------------------- python / torchscript


def test_python_denoiser_with_weights_and_crop(tmp_path):
    net = make_denoiser()
    torch.nn.init.normal_(net.conv.weight)
    save_file({"module." + k: v for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = f"python:test_adapters:make_denoiser:{tmp_path}/w.safetensors?kind=consistency&grid_steps=18"
    den = load_denoiser(spec)
    assert den.kind == "consistency" and den.sha256 == sha(tmp_path / "w.safetensors") and den.spec == spec
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(den.module(x, torch.zeros(2), None), net(x, torch.zeros(2))[:, :3])
    with pytest.raises(InputError, match="kind"):
        load_denoiser("python:test_adapters:make_denoiser")
    with pytest.raises(InputError, match="not an nn.Module"):
        load_denoiser("python:test_adapters:make_nothing?kind=edm")
    with pytest.raises(InputError, match="cannot import"):
        load_denoiser("python:no_such_module_xyz:f?kind=edm")


def test_unsafe_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"conv.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="weights_only"):
        load_denoiser(f"python:test_adapters:make_denoiser:{tmp_path}/evil.pt?kind=edm")
    assert not (tmp_path / "pwned").exists()


def test_torchscript_denoiser_and_classifier(tmp_path):
    den_net, clf_net = make_denoiser(), make_classifier()
    torch.jit.trace(den_net, (torch.randn(1, 3, 8, 8), torch.ones(1))).save(str(tmp_path / "d.pt"))
    torch.jit.script(clf_net).save(str(tmp_path / "c.pt"))
    den = load_denoiser(f"torchscript:{tmp_path}/d.pt?kind=ddpm&schedule=cosine")
    assert den.sha256 == sha(tmp_path / "d.pt") and den.meta["schedule"].startswith("cosine")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(den.module(x, torch.ones(2), None), den_net(x, torch.ones(2))[:, :3])
    with pytest.raises(InputError, match="num_classes"):
        load_classifier(f"torchscript:{tmp_path}/c.pt")
    clf = load_classifier(f"torchscript:{tmp_path}/c.pt?num_classes=4&mean=0.5&std=0.25")
    with torch.no_grad():
        assert torch.allclose(clf.module(x.sigmoid()), clf_net((x.sigmoid() - 0.5) / 0.25), atol=1e-6)
    with pytest.raises(InputError, match="no such file"):
        load_classifier(f"torchscript:{tmp_path}/missing.pt?num_classes=4")
    (tmp_path / "junk.pt").write_bytes(b"PK junk")
    with pytest.raises(InputError, match="not a TorchScript"):
        load_classifier(f"torchscript:{tmp_path}/junk.pt?num_classes=4")


def test_python_classifier_reads_num_classes_attribute():
    clf = load_classifier("python:test_adapters:make_classifier")
    assert clf.num_classes == 4 and clf.sha256 is None and clf.transform["mean"] is None


# ----------------------------------------------------------------------------------------------- timm + transform


def test_timm_checkpoint_transform_and_sha(tmp_path):
    import timm

    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    save_file({"module." + k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    spec = f"timm:resnet18:{tmp_path}/r18.safetensors?num_classes=10&resize=40&interp=bicubic&mean=cifar10"
    clf = load_classifier(spec)
    assert clf.num_classes == 10 and clf.sha256 == sha(tmp_path / "r18.safetensors")
    assert clf.transform["resize"] == [40, 40] and clf.transform["interp"] == "bicubic"
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    ref_in = (TF.resize(x, [40, 40], interpolation=InterpolationMode.BICUBIC, antialias=True) - mean) / std
    with torch.no_grad():
        assert torch.allclose(clf.module(x), net(ref_in), atol=1e-4)
    default = load_classifier("timm:resnet18?num_classes=10")  # no checkpoint: random init, timm's own mean/std
    assert default.transform["random_init"] and default.transform["mean"] == list(net.pretrained_cfg["mean"])
    assert default.transform["normalization_source"] == "timm pretrained_cfg"
    with pytest.raises(InputError, match="not a timm architecture"):
        load_classifier("timm:resnet_does_not_exist")
    with pytest.raises(InputError, match="do not fit"):
        load_classifier(f"timm:resnet34:{tmp_path}/r18.safetensors?num_classes=10")


def test_input_transform_quantize_resize_normalize():
    spec = transform_from_options({"quantize": "uint8", "resize": "8x12", "interp": "nearest", "mean": "0.2,0.4,0.6",
                                   "std": "0.5"}, "t")
    x = torch.rand(2, 3, 4, 6) * 1.4 - 0.2  # out of range: quantization clamps
    y = InputTransform(spec)(x)
    q = np.round(np.clip(x.numpy(), 0, 1) * 255) / 255
    q = q.repeat(2, axis=2).repeat(2, axis=3)  # nearest 4x6 -> 8x12 doubles every pixel
    ref = (q - np.array([0.2, 0.4, 0.6]).reshape(1, 3, 1, 1)) / 0.5
    assert y.shape == (2, 3, 8, 12) and np.allclose(y.numpy(), ref, atol=1e-6)
    plain = InputTransform(transform_from_options({}, "t"))
    assert torch.equal(plain(x), x)  # default: no clamp, so plain smoothing sees x + delta unchanged
    up = InputTransform(transform_from_options({"resize": "8"}, "t"))(x)
    assert torch.allclose(up, F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True))


@pytest.mark.parametrize("antialias", ["1", "0"])
def test_quantize_floor_is_the_papers_vit_input(antialias):
    """The paper's code feeds its ViT F.interpolate(((y + 1) / 2 * 255).int().float(), 224, bilinear) / 255 * 2 - 1
    for a purified model-space y in [-1, 1]; quantize=floor, bilinear resize to 224 and mean=half give the same
    (antialias makes no difference when upsampling)."""
    spec = transform_from_options({"quantize": "floor", "resize": "224", "interp": "bilinear", "mean": "half",
                                   "antialias": antialias}, "t")
    y = torch.rand(3, 3, 32, 32) * 2 - 1  # purified, model space
    paper = F.interpolate(((y + 1) * 0.5 * 255).int().float(), size=(224, 224), mode="bilinear") / 255 * 2 - 1
    ours = InputTransform(spec)((y + 1) / 2)
    torch.testing.assert_close(ours, paper, rtol=0, atol=1e-5)
    rounded = InputTransform(dict(spec, quantize="uint8"))((y + 1) / 2)
    assert (rounded - paper).abs().max() > 1e-3  # rounding is another classifier input


@pytest.mark.parametrize("options, message", [
    ({"resize": "0"}, ">= 1"), ({"resize": "2x3x4"}, "HxW"), ({"interp": "lanczos"}, "interp"),
    ({"mean": "0.5"}, "std"), ({"std": "0,1"}, "positive"), ({"quantize": "uint16"}, "uint8"),
    ({"mean": "abc"}, "preset")])
def test_bad_transform_options(options, message):
    with pytest.raises(InputError, match=message):
        transform_from_options(options, "--classifier x")


def make_loaded():
    from cpcluster.models.loaded import LoadedDenoiser

    torch.manual_seed(0)
    return LoadedDenoiser(TinyDenoiser(), "ddpm", {"betas": [0.01] * 20, "schedule": "mine", "prediction": "epsilon",
                                                   "num_classes": None, "note": "kept"})


def test_python_factory_returning_loaded_denoiser():
    plain = load_denoiser("python:test_adapters:make_loaded")
    assert plain.meta["schedule"] == "mine" and plain.meta["betas"] == [0.01] * 20
    over = load_denoiser("python:test_adapters:make_loaded?prediction=v_prediction")
    assert over.meta["prediction"] == "v_prediction" and over.meta["betas"] == [0.01] * 20
    assert over.meta["note"] == "kept" and over.meta["schedule"] == "mine"
    cos = load_denoiser("python:test_adapters:make_loaded?schedule=cosine&timesteps=50")
    assert len(cos.meta["betas"]) == 50 and cos.meta["schedule"] == "cosine(T=50)"
