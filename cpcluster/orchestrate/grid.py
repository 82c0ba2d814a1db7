"""Purified-image grids (the paper's visual figures): clean / noisy / purified-by-each-purifier rows, one column per
image, the same noise in every row of a column, each tile framed green or red by whether the classifier got it right.

:func:`make_grid` computes the arrays; the noise of image ``i`` is :func:`cpcluster.jobs.quality.image_noise`'s
(a function of ``(seed, i)`` only, so a grid shows exactly the noisy images ``cpcluster quality`` measured with
the same seed). :func:`compose` lays the tiles out as an RGB canvas (pixel space; noisy images clamped for display
only) and :func:`write_grid` writes the PNG and, beside it, the raw arrays as ``.npz``:

| key | shape | meaning |
|---|---|---|
| ``clean``, ``noise``, ``noisy`` | (N, C, H, W) float32 | ``x``, ``delta = sigma z``, ``x + delta`` (unclamped) |
| ``purified`` | (P, N, C, H, W) float32 | ``purify_p(x + delta)`` for each purifier ``p`` |
| ``pred``, ``correct`` | (2 + P, N) int64 / bool | the classifier on each row's images (clean, noisy, purifiers) |
| ``labels``, ``image_index`` | (N,) int64 | true labels and dataset indices |
| ``rows`` | (2 + P,) unicode | row names; ``sigma`` () float; ``config`` () JSON |
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from cpcluster.util.errors import InputError

GREEN, RED = (0.0, 0.7, 0.0), (0.85, 0.0, 0.0)


def make_grid(dataset: str, classifier: str, purifiers: list, sigma: float, image_ids, seed: int = 0,
              time_rule: str = "nearest", purifier_label: str = "random", steps: int | None = None,
              device: str = "cpu") -> dict:
    """The grid's arrays (module docstring). ``purifiers``: ``[(row name, kind, denoiser spec or None), ...]``."""
    import torch

    from cpcluster.jobs.quality import image_noise
    from cpcluster.models.purifier_base import LabelPolicy
    from cpcluster.models.purifiers import configured_purifier
    from cpcluster.models.specs import load_classifier, load_dataset, load_denoiser

    if not purifiers:
        raise InputError("give at least one --purifier, e.g. consistency:demo")
    if not sigma > 0:
        raise InputError(f"--sigma {sigma}: must be a positive pixel-space noise level")
    ds, clf = load_dataset(dataset), load_classifier(classifier)
    if clf.num_classes != ds.num_classes:
        raise InputError(f"--classifier {classifier} has {clf.num_classes} classes but --dataset {dataset} has "
                         f"{ds.num_classes}")
    ids = np.asarray(image_ids, dtype=np.int64)
    if not len(ids) or ids.min() < 0 or ids.max() >= len(ds):
        raise InputError(f"--indices: give images in 0..{len(ds) - 1}")
    x, labels = ds.get(ids)
    x = torch.from_numpy(x)
    rows, images, describe = ["clean", f"noisy (sigma {sigma:g})"], [], []
    noise = sigma * image_noise(seed, ids, x.shape[1:], LabelPolicy(), None)[0]  # one noisy image per column
    with torch.no_grad():
        for name, kind, spec in purifiers:
            den = load_denoiser(spec) if spec else None
            pur = configured_purifier(kind, den, sigma, time_rule, purifier_label, steps).to(device).eval()
            num_classes = den.meta.get("num_classes") if den is not None else None
            drawn = image_noise(seed, ids, x.shape[1:], LabelPolicy(purifier_label), num_classes)[1]  # labels only
            out = pur((x + noise).to(device), None, None if drawn is None else drawn.to(device))
            images.append(out.float().cpu())
            rows.append(name)
            describe.append({"row": name, "kind": kind, "denoiser": spec, **pur.describe()})
        module = clf.module.to(device).eval()
        shown = [x, x + noise, *images]
        pred = torch.stack([module(t.to(device)).argmax(1).cpu() for t in shown]).numpy()
    config = {"dataset": ds.describe(), "classifier": clf.describe(), "sigma": sigma, "seed": seed,
              "purifiers": describe}
    return {"clean": x.numpy(), "noise": noise.numpy(), "noisy": (x + noise).numpy(),
            "purified": torch.stack(images).numpy(), "pred": pred.astype(np.int64),
            "correct": pred == labels[None, :], "labels": labels, "image_index": ids, "rows": np.array(rows),
            "sigma": np.float64(sigma), "config": np.array(json.dumps(config, sort_keys=True))}


def compose(tiles: np.ndarray, correct: np.ndarray, scale: int = 1, border: int = 2, gap: int = 2) -> np.ndarray:
    """An RGB canvas (pixel space [0, 1]) of ``tiles`` (R, N, C, H, W), tile ``(r, n)`` upsampled ``scale`` times
    (nearest), clamped, grey repeated to RGB, inside a ``border``-pixel frame: green where ``correct[r, n]``, else
    red; white ``gap`` between tiles. Tile ``(r, n)`` starts at row ``r (h + g)``, column ``n (w + g)``, where
    ``h = H scale + 2 border``, ``w = W scale + 2 border``, ``g = gap``."""
    r_count, n_count, channels, height, width = tiles.shape
    if channels not in (1, 3):
        raise InputError(f"grid: images with {channels} channels; expected 1 or 3")
    h, w = height * scale + 2 * border, width * scale + 2 * border
    canvas = np.ones((r_count * (h + gap) - gap, n_count * (w + gap) - gap, 3))
    for r in range(r_count):
        for n in range(n_count):
            img = np.clip(tiles[r, n], 0.0, 1.0).repeat(scale, axis=1).repeat(scale, axis=2)
            img = np.repeat(img, 3, axis=0) if channels == 1 else img
            top, left = r * (h + gap), n * (w + gap)
            canvas[top:top + h, left:left + w] = GREEN if correct[r, n] else RED
            canvas[top + border:top + h - border, left + border:left + w - border] = img.transpose(1, 2, 0)
    return canvas


def grid_png(arrays: dict, scale: int = 4) -> bytes:
    """The PNG: :func:`compose` of the rows, row names on the left, ``#index (label)`` under each column."""
    from matplotlib.figure import Figure  # no pyplot: no backend selection, no global state

    tiles = np.concatenate([arrays["clean"][None], arrays["noisy"][None], arrays["purified"]])
    border, gap = 2, 2
    canvas = compose(tiles, arrays["correct"], scale, border, gap)
    h, w = tiles.shape[3] * scale + 2 * border + gap, tiles.shape[4] * scale + 2 * border + gap
    fig = Figure(figsize=(2.5 + canvas.shape[1] / 60, 0.8 + canvas.shape[0] / 60))
    ax = fig.add_axes((0.3 if len(max(arrays["rows"], key=len)) > 20 else 0.2, 0.12, 0.78, 0.82))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([r * h + h / 2 for r in range(len(arrays["rows"]))], [str(r) for r in arrays["rows"]], fontsize=7)
    ax.set_xticks([n * w + w / 2 for n in range(tiles.shape[1])],
                  [f"#{i} ({y})" for i, y in zip(arrays["image_index"], arrays["labels"])], fontsize=6, rotation=90)
    ax.set_title("frame: classifier right (green) / wrong (red)", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_grid(arrays: dict, png: str, scale: int = 4) -> tuple[str, str]:
    """Write ``png`` and ``<png without .png>.npz`` (atomically); returns both paths."""
    from cpcluster.util.fileio import write_bytes_atomic

    if not png.endswith(".png"):
        raise InputError(f"--out {png}: name a .png file (the arrays go beside it as .npz)")
    raw = io.BytesIO()
    np.savez(raw, **arrays)
    npz = png[:-len(".png")] + ".npz"
    folder = os.path.dirname(os.path.abspath(png))
    os.makedirs(folder, exist_ok=True)
    image = grid_png(arrays, scale)
    write_bytes_atomic(npz, raw.getvalue())
    write_bytes_atomic(png, image)
    return png, npz


def draw_grid(purifiers, sigma: float, image_ids, out: str, dataset: str = "demo", classifier: str = "demo",
              seed: int = 0, time_rule: str = "nearest", purifier_label: str = "random", steps: int | None = None,
              device: str = "cpu", scale: int = 4, echo=print) -> tuple[str, str]:
    """``cpcluster grid``: the grid of ``purifiers`` (``[NAME=]KIND[:DENOISER]`` texts, one row each) written to
    ``out`` (PNG) and beside it (``.npz``); says per row how often the classifier is right. Returns both paths."""
    from cpcluster.orchestrate.quality import parse_purifier

    rows = [parse_purifier(p) for p in purifiers]
    arrays = make_grid(dataset, classifier, rows, sigma, image_ids, seed, time_rule, purifier_label, steps, device)
    png, npz = write_grid(arrays, out, scale)
    for name, k in zip(arrays["rows"], arrays["correct"].sum(axis=1)):
        echo(f"{name}: classifier right on {k} of {arrays['correct'].shape[1]}")
    echo(f"wrote {png} and {npz}")
    return png, npz
