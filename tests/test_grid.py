"""``cpcluster grid``: the same noise down each column (checked on the arrays) and frames that follow the classifier."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_finetune_cli import assert_one_line_error

from cpcluster.cli import main
from cpcluster.orchestrate.grid import GREEN, RED, compose, make_grid

torch.set_num_threads(1)
IDS = [0, 7, 21, 40, 55, 63]
ROWS = [("cd", "consistency", "demo"), ("none", "none", None)]


@pytest.fixture(scope="module")
def grid():
    return make_grid("demo", "demo", ROWS, 1.0, IDS, seed=3)


def test_noise_is_identical_down_each_column(grid):
    from cpcluster.jobs.quality import image_noise
    from cpcluster.models.purifier_base import LabelPolicy
    from cpcluster.models.purifiers import build_purifier
    from cpcluster.models.specs import load_denoiser

    assert grid["purified"].shape == (2, len(IDS), 1, 16, 16) and list(grid["rows"][2:]) == ["cd", "none"]
    np.testing.assert_array_equal(grid["noisy"], grid["clean"] + grid["noise"])
    np.testing.assert_array_equal(grid["purified"][1], grid["noisy"])  # `none` shows the noisy input itself
    with torch.no_grad():  # the consistency row is the purifier applied to exactly that noisy input
        again = build_purifier("consistency", load_denoiser("demo"), 1.0)(torch.from_numpy(grid["noisy"]))
    np.testing.assert_array_equal(grid["purified"][0], again.numpy())
    z, _ = image_noise(3, IDS, (1, 16, 16), LabelPolicy(), None)
    np.testing.assert_array_equal(grid["noise"], 1.0 * z.numpy())  # a function of (seed, image) only ...
    fewer = make_grid("demo", "demo", ROWS[1:], 1.0, IDS[::-1], seed=3)
    np.testing.assert_array_equal(fewer["noise"], grid["noise"][::-1])  # ... not of the rows or the column order
    assert not np.array_equal(make_grid("demo", "demo", ROWS[1:], 1.0, IDS, seed=4)["noise"], grid["noise"])


def test_frames_follow_the_classifier(grid):
    from cpcluster.models.specs import load_classifier

    clf = load_classifier("demo").module
    tiles = np.concatenate([grid["clean"][None], grid["noisy"][None], grid["purified"]])
    with torch.no_grad():
        pred = np.stack([clf(torch.from_numpy(t)).argmax(1).numpy() for t in tiles])
    np.testing.assert_array_equal(grid["pred"], pred)
    np.testing.assert_array_equal(grid["correct"], pred == grid["labels"][None])
    assert grid["correct"].any() and not grid["correct"].all()  # sigma 1.0: both colours appear
    scale, border, gap = 3, 2, 1
    canvas = compose(tiles, grid["correct"], scale, border, gap)
    h, w = 16 * scale + 2 * border, 16 * scale + 2 * border
    for r in range(tiles.shape[0]):
        for n in range(tiles.shape[1]):
            top, left = r * (h + gap), n * (w + gap)
            colour = GREEN if grid["correct"][r, n] else RED
            for y, x in ((top, left), (top + h - 1, left + w // 2), (top + h // 2, left + w - 1)):
                assert tuple(canvas[y, x]) == colour, (r, n)
            inner = canvas[top + border:top + h - border, left + border:left + w - border, 0]
            np.testing.assert_array_equal(inner[::scale, ::scale], np.clip(tiles[r, n, 0], 0, 1))


def test_cli_writes_png_and_arrays_and_refuses_bad_input(tmp_path):
    out = tmp_path / "figs" / "grid.png"
    res = CliRunner().invoke(main, ["grid", "--purifier", "consistency:demo", "--sigma", "0.5", "--indices", "0-3",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG" and "consistency-demo: classifier right on" in res.output
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as z:
        assert z["purified"].shape == (1, 4, 1, 16, 16) and float(z["sigma"]) == 0.5
    for args, needle in ((["--out", str(tmp_path / "g.jpg")], "name a .png file"),
                         (["--indices", "9999"], "--indices: give images in 0..499"),
                         (["--purifier", "magic:demo"], "start with one of")):
        res = CliRunner().invoke(main, ["grid", "--purifier", "none", "--sigma", "0.5", *args])
        assert_one_line_error(res.exit_code, res.output, needle)
