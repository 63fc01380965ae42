"""sdetr visualize: token maps aligned with the image's pixels, the figure's panels and files, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_checkpoint
from PIL import Image
from typer.testing import CliRunner

from sparse_detr.cli import app
from sparse_detr.data.synthetic import render_scene
from sparse_detr.inference import load_predictor
from sparse_detr.models.scoring import keep_counts
from sparse_detr.models.token_layout import TokenLayout, TokenSelection
from sparse_detr.viz import (
    PANEL_TITLES,
    crop_to_image,
    draw_explanation,
    explain_image,
    save_explanation,
    token_view,
    upsample_to_image,
)
from sparse_detr.zoo import resolve_checkpoint

runner = CliRunner()
STRIDES = [8, 16, 32, 64]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pth")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    image, _ = render_scene(96, np.random.default_rng(5))
    path = tmp_path_factory.mktemp("images") / "scene.png"
    image.save(path)
    return path


def test_upsampling_puts_a_token_on_its_pixels():
    level_map = np.zeros((5, 7))  # stride 8 over a 37 x 50 resized image: the last row and column are partial
    level_map[2, 3] = 1.0
    level_map[4, 6] = 2.0
    at_model_size = upsample_to_image(level_map, 8, (37, 50), (37, 50))
    assert at_model_size.shape == (37, 50)
    assert np.argwhere(at_model_size == 1.0).min(0).tolist() == [16, 24]
    assert np.argwhere(at_model_size == 1.0).max(0).tolist() == [23, 31]
    assert np.argwhere(at_model_size == 2.0).min(0).tolist() == [32, 48]
    assert np.argwhere(at_model_size == 2.0).max(0).tolist() == [36, 49]
    # the original image was twice as large: every resized pixel becomes a 2 x 2 block
    at_original_size = upsample_to_image(level_map, 8, (37, 50), (74, 100))
    assert np.array_equal(at_original_size, at_model_size.repeat(2, 0).repeat(2, 1))


def test_crop_keeps_the_tokens_over_the_image():
    level_map = torch.arange(64.0).view(8, 8)  # a 64 x 64 padded batch at stride 8
    assert crop_to_image(level_map, 8, (40, 52)).shape == (5, 7)
    assert crop_to_image(level_map[:4, :4], 16, (40, 52)).shape == (3, 4)
    assert crop_to_image(level_map, 8, (64, 64)).shape == (8, 8)  # the largest image of the batch: no padding
    assert crop_to_image(level_map, 8, (40, 52))[4, 6] == level_map[4, 6]  # the top-left block


def _padded_batch_outputs(sizes, lit_scores, dam_token):
    """Outputs of a padded two-image batch at strides 8..64: image 0's saliency is high on ``lit_scores``
    (level, row, col), and its only decoder sampling point lands exactly on ``dam_token``."""
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for image_mask, (h, w) in zip(mask, sizes):
        image_mask[:h, :w] = False
    shapes = torch.tensor([[-(-height // s), -(-width // s)] for s in STRIDES])
    level_masks = [F.interpolate(mask[None].float(), size=shape.tolist()).bool()[0] for shape in shapes]
    layout = TokenLayout.of(level_masks)
    start = layout.level_start_index
    scores = torch.full(layout.padding_mask.shape, -1.0)
    for level, row, col in lit_scores:
        scores[0, start[level] + row * shapes[level, 1] + col] = 5.0
    scores = scores.masked_fill(layout.padding_mask, scores.min())
    counts = keep_counts(layout.padding_mask, 0.1)
    level, row, col = dam_token
    locations = torch.zeros(len(sizes), 1, 1, 1, len(STRIDES), 1, 2)  # (N, layers, Q, heads, L, points, 2)
    locations[0, ..., level, 0, :] = torch.tensor([col / shapes[level, 1], row / shapes[level, 0]])
    weights = torch.zeros(len(sizes), 1, 1, 1, len(STRIDES), 1)
    weights[:, ..., level, 0] = 1.0
    return {
        "layout": layout,
        "token_scores": scores,
        "selection": TokenSelection.top(scores, counts),
        "sampling_locations": locations,
        "attention_weights": weights,
    }


def test_token_view_of_a_padded_batch_lights_the_right_pixels():
    sizes = [(40, 52), (64, 64)]  # image 0 is padded, and 40 x 52 is no multiple of the strides
    outputs = _padded_batch_outputs(sizes, lit_scores=[(0, 3, 5), (0, 4, 6)], dam_token=(1, 1, 2))
    view = token_view(outputs, 0, STRIDES, sizes[0], (80, 104), keep_ratio=0.1, seconds=0.01)
    assert [level.shape for level in view.saliency] == [(5, 7), (3, 4), (2, 2), (1, 1)]
    assert view.tokens_per_level == [35, 12, 4, 1]  # unpadded tokens of image 0 in the padded batch

    saliency = view.on_image(view.saliency)[0]  # original size, 2x the resized image
    assert saliency.shape == (80, 104)
    lit = np.zeros((80, 104), dtype=bool)
    lit[48:64, 80:96] = True  # token (3, 5) covers resized rows 24..31, cols 40..47
    lit[64:80, 96:104] = True  # token (4, 6) covers resized rows 32..39, cols 48..51 (partial)
    assert np.array_equal(saliency > 0, lit)
    # both lit tokens are the best of image 0's int(52 * 0.1) + 1 = 6 selected ones
    assert view.kept_per_level[0] >= 2 and view.selected[0][3, 5] and view.selected[0][4, 6]

    dam = view.on_image(view.dam)
    assert all(level.max() == 0 for index, level in enumerate(dam) if index != 1)
    expected = np.zeros((80, 104), dtype=bool)
    expected[32:64, 64:96] = True  # level-1 token (1, 2): resized rows 16..31, cols 32..47
    assert np.array_equal(dam[1] > 0, expected)
    assert view.dam_top[1][1, 2]
    assert view.coverage == float(view.selected[1][1, 2])


@pytest.mark.slow
def test_figure_has_the_panels_and_one_row_per_rho(checkpoint, scene, tmp_path):
    predictor = load_predictor(checkpoint, device="cpu")
    image = predictor.read_image(scene)
    rows = [explain_image(predictor, image, keep_ratio, threshold=0.0) for keep_ratio in (0.1, 0.5)]
    assert rows[0][0].kept_per_level != rows[1][0].kept_per_level
    maps = rows[0][0].on_image(rows[0][0].saliency)
    assert all(level.shape == image.original_size for level in maps)

    figure = draw_explanation(image.pixels, rows, "title")
    assert len(figure.subfigs) == 2
    for row, (view, detections) in zip(figure.subfigs, rows):
        assert row.get_suptitle().startswith(f"ρ = {view.keep_ratio:g}: kept tokens per level")
        assert " ms" in row.get_suptitle()
        assert [cell.get_suptitle() for cell in row.subfigs] == list(PANEL_TITLES)
        drawn = [[ax for ax in cell.axes if ax.images] for cell in row.subfigs]
        assert [len(axes) for axes in drawn] == [1, 4, 4, 1, 4, 4]
        assert len(drawn[0][0].patches) == len(detections) > 0

    two_rows = save_explanation(figure, tmp_path / "two", ["png", "svg"])
    one_row = save_explanation(draw_explanation(image.pixels, rows[:1]), tmp_path / "one")
    assert [path.name for path in two_rows] == ["two.png", "two.svg"] and two_rows[1].stat().st_size > 0
    (width_1, height_1), (width_2, height_2) = Image.open(one_row[0]).size, Image.open(two_rows[0]).size
    assert abs(width_1 - width_2) < 0.05 * width_1 and width_1 > 1000
    assert 1.7 < height_2 / height_1 < 2.3


@pytest.mark.slow
def test_cli_draws_a_folder_of_odd_images(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    scene = render_scene(80, np.random.default_rng(2))[0].resize((90, 60))  # landscape
    scene.convert("L").save(images / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: displayed rotated 90 degrees clockwise
    scene.save(images / "rotated.jpg", exif=exif)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "figures"
    out.mkdir()
    (out / "gray_tokens.png").write_bytes(b"old")

    result = runner.invoke(app, ["visualize", str(images), "--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 2  # a usage error: --force is missing
    assert "gray_tokens.png exists" in result.output and "--force" in result.output
    assert (out / "gray_tokens.png").read_bytes() == b"old"

    args = ["visualize", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--force"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--rho", "0.2"])
    assert result.exit_code == 0, result.output
    sizes = {path.name: Image.open(path).size for path in out.glob("*.png")}
    assert set(sizes) == {"gray_tokens.png", "rotated_tokens.png"}
    # the rotated photo is drawn upright (portrait): its figure cells, hence the figure, are taller
    assert sizes["rotated_tokens.png"][1] > sizes["gray_tokens.png"][1]
    assert str(out / "rotated_tokens.png") in result.output


def test_read_image_applies_exif_and_converts_modes(checkpoint, tmp_path):
    predictor = load_predictor(checkpoint, device="cpu")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (90, 60), "red").save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("LA", (90, 60)).save(tmp_path / "gray_alpha.png")
    Image.new("RGBA", (90, 60)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (90, 60)).save(tmp_path / "cmyk.jpg")
    rotated = predictor.read_image(tmp_path / "rotated.jpg")
    assert rotated.original_size == (90, 60) and rotated.pixels.mode == "RGB"
    assert rotated.resized_size == (96, 64)  # shorter side 64, the checkpoint's training size
    for name in ("gray_alpha.png", "rgba.png", "cmyk.jpg"):
        image = predictor.read_image(tmp_path / name)
        assert image.pixels.mode == "RGB" and image.tensor.shape == (3, 64, 96)


def test_cli_errors_are_one_clear_line(checkpoint, scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["visualize", str(scene)])
    assert result.exit_code == 1 and "run `sdetr train`" in result.output and "--checkpoint" in result.output

    result = runner.invoke(app, ["visualize", str(tmp_path / "missing.png"), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 1 and "image not found" in result.output

    (tmp_path / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["visualize", "broken.png", "--checkpoint", str(checkpoint), "--out", "figs"])
    assert result.exit_code == 1 and "broken.png: cannot read image" in result.output

    result = runner.invoke(app, ["visualize", str(scene), "--checkpoint", str(checkpoint), "--rho", "1.5"])
    assert result.exit_code == 2 and "--rho must be a number in (0, 1]" in result.output  # a usage error

    dense = save_tiny_checkpoint(tmp_path / "dense.pth", keep_ratio=0.0)
    result = runner.invoke(app, ["visualize", str(scene), "--checkpoint", str(dense)])
    assert result.exit_code == 2 and "no scoring network" in result.output
    assert not (tmp_path / "visualizations").exists()


def test_without_checkpoint_the_default_training_output_is_used(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs/tiny/checkpoint.pth"):
        resolve_checkpoint(None)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "checkpoint.pth").write_bytes(checkpoint.read_bytes())
    assert load_predictor(device="cpu").checkpoint.as_posix() == "runs/tiny/checkpoint.pth"
