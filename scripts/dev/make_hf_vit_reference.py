"""Dev-time: small transformers ``ViTForImageClassification`` folders, and what transformers computes with them.

    PYTHONPATH=/tmp/hfside python scripts/dev/make_hf_vit_reference.py tests/data/hf_vit

Needs ``transformers`` importable (install it into a side folder, e.g. ``pip install --target /tmp/hfside --no-deps
transformers==4.57.1 huggingface_hub==0.36.0 tokenizers==0.22.1``; torch, numpy, safetensors and Pillow come from the
project's venv). This script contains no transformers code; it calls it.

For each case it builds ``ViTForImageClassification`` from a small ``ViTConfig``, replaces every parameter by seeded
random values of unit-scale activations (transformers initialises LayerNorms to 1/0 and linear weights with std
0.02, which would make every logit nearly equal), and writes the folder as the Hugging Face hub holds one:
``config.json`` and ``model.safetensors`` (and ``pytorch_model.bin``) from ``save_pretrained``, and
``preprocessor_config.json``. Beside it, ``NAME.npz``:

* ``images`` (B, H, W, 3) uint8 -- the test inputs as a user's images are (pixel space is ``images / 255``);
* ``pixel_values`` (B, 3, S, S) float32 -- what ``ViTImageProcessor`` (the PIL implementation) made of them;
* ``logits`` (B, num_labels) float32 -- ``model(pixel_values).logits`` in eval mode.

Cases:

* ``vit-cifar10`` -- the layout of ``aaraki/vit-base-patch16-224-in21k-finetuned-cifar10`` at toy size (hidden 32,
  2 layers, 2 heads, MLP ratio 4, patch 4, image 32, the ten CIFAR-10 labels, ``layer_norm_eps`` 1e-12); both weight
  files; ``preprocessor_config.json`` in the legacy ``ViTFeatureExtractor`` form of that repository (``size`` an int,
  ``resample`` 2, mean/std 0.5), written by hand and read back by transformers. Size 32 = image size: no resize.
* ``vit-resize`` -- what the first case does not vary: 7 labels, 3 heads (head dim 8), MLP ratio 1.25, no q/k/v bias,
  patch 8, image 48, ``layer_norm_eps`` 0.1 (a wrong epsilon changes the logits), only ``model.safetensors``, and a
  processor in today's form (``size`` {height, width} 48, bilinear) that resizes the 32x32 inputs with PIL.

``vit-b16-layout.json``: ``ViTConfig()`` (transformers' defaults: ViT-B/16 at 224) with 10 labels, as ``config.json``
would hold it, and the ``[name, shape]`` list of that ``ViTForImageClassification``'s state_dict, built on the meta
device (nothing allocated).

``--full-size DIR`` (not for the repository: 2 x 343 MB) also writes the released folder's layout at full size into
``DIR/vit-b16-cifar10`` (``ViTConfig()`` with the ten CIFAR-10 labels, random weights, both weight files, the legacy
processor with size 224) and ``DIR/vit-b16-cifar10.npz`` for two 32x32 images resized to 224 by the processor: the
CIFAR-10 route at the real size, for a check by hand (see tests/data/hf_vit/README.md).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LEGACY_PROCESSOR = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 32}
CASES = {
    "vit-cifar10": dict(config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    patch_size=4, image_size=32, id2label=dict(enumerate(CIFAR10)),
                                    label2id={n: i for i, n in enumerate(CIFAR10)}),
                        processor=None, bin=True, batch=4, seed=1),
    "vit-resize": dict(config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=30,
                                   patch_size=8, image_size=48, num_labels=7, qkv_bias=False, layer_norm_eps=0.1),
                       processor=dict(size={"height": 48, "width": 48}, resample=2), bin=False, batch=2, seed=2),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter := seeded normal values: weights 1/sqrt(fan_in), LayerNorm scales 1 + 0.2 z, biases 0.1 z."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * z)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * z)
            elif p.ndim == 3:  # cls_token, position_embeddings
                p.copy_(0.5 * z)
            else:
                p.copy_(z / np.sqrt(p[0].numel()))


def make_case(name: str, case: dict, out_dir: str, processor_size: int | None = None) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = os.path.join(out_dir, name)
    model = ViTForImageClassification(ViTConfig(**case["config"])).eval()
    randomize(model, case["seed"])
    model.save_pretrained(folder)  # config.json + model.safetensors
    if case["bin"]:
        model.save_pretrained(folder + ".bin-tmp", safe_serialization=False)
        os.replace(os.path.join(folder + ".bin-tmp", "pytorch_model.bin"), os.path.join(folder, "pytorch_model.bin"))
        os.remove(os.path.join(folder + ".bin-tmp", "config.json"))
        os.rmdir(folder + ".bin-tmp")
    if case["processor"] is None:
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as fh:
            json.dump({**LEGACY_PROCESSOR, "size": processor_size or LEGACY_PROCESSOR["size"]}, fh, indent=2,
                      sort_keys=True)
            fh.write("\n")
    else:
        ViTImageProcessor(**case["processor"]).save_pretrained(folder)
    processor = ViTImageProcessor.from_pretrained(folder)  # read back as transformers reads it
    rng = np.random.default_rng(100 + case["seed"])
    images = rng.integers(0, 256, (case["batch"], 32, 32, 3), dtype=np.uint8)
    pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    np.savez_compressed(os.path.join(out_dir, name + ".npz"), images=images, pixel_values=pixel_values.numpy(),
                        logits=logits.numpy())
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, logits {tuple(logits.shape)}, "
          f"pixel_values {tuple(pixel_values.shape)}, files {sorted(os.listdir(folder))}")


def full_size_layout(out_dir: str) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_labels=10)
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    record = {"config": json.loads(config.to_json_string()),
              "state_dict": [[k, list(v.shape)] for k, v in model.state_dict().items()]}
    with open(os.path.join(out_dir, "vit-b16-layout.json"), "w") as fh:
        json.dump(record, fh, indent=None, sort_keys=False)
        fh.write("\n")
    print(f"vit-b16-layout: {len(record['state_dict'])} tensors")


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output folder (tests/data/hf_vit)")
    parser.add_argument("--full-size", metavar="DIR", help="also write the full-size ViT-B/16 check into DIR")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for name, case in CASES.items():
        make_case(name, case, args.out)
    full_size_layout(args.out)
    if args.full_size:
        config = {k: v for k, v in CASES["vit-cifar10"]["config"].items() if k in ("id2label", "label2id")}
        make_case("vit-b16-cifar10", dict(config=config, processor=None, bin=True, batch=2, seed=3), args.full_size,
                  processor_size=224)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
