"""The parts of `hipt heatmap`: ranks, geometry of maps, the zarr pyramid, config, scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from heatmaps.config import ConfigError, load_heatmap_config
from heatmaps.ngff import AttentionZarr, NgffWriter
from heatmaps.paint import paint, region_rows
from heatmaps.scores import percentile, score_slide, token_grid
from hipt.geometry import patch_grid_to_vit4k_input
from hipt.h5schema import FeaturesWriter, read_features_info
from hipt.models import create_model
from hipt.models.attention import vit4k_attention


def test_percentile_is_the_fraction_at_or_below():
    v = np.array([0.1, 0.4, 0.2, 0.4, 0.9])
    assert percentile(v).tolist() == pytest.approx([0.2, 0.8, 0.4, 0.8, 1.0])
    assert percentile(np.array([0.3]), reference=v).tolist() == pytest.approx([0.4])


def test_token_grid_places_patch_and_token_row_major():
    patches, heads, tokens = 256, 2, 256
    k = torch.arange(patches).view(patches, 1, 1).float()
    t = torch.arange(tokens).view(1, 1, tokens).float()
    att = (k * 1000 + t).expand(patches, heads, tokens).clone()
    att[:, 1] += 0.5
    grid = token_grid(att)
    assert grid.shape == (heads, 256, 256)
    for row, col in [(0, 0), (17, 35), (255, 3), (100, 250)]:
        patch = (row // 16) * 16 + col // 16
        token = (row % 16) * 16 + col % 16
        assert grid[0, row, col] == patch * 1000 + token
        assert grid[1, row, col] == patch * 1000 + token + 0.5


def test_paint_puts_cells_at_their_level0_place():
    # Raster of 3 level-0 px per pixel; a 12 px region at (6, 3) with a 2x2 grid.
    canvas = np.zeros((8, 8), np.float32)
    mask = np.zeros((8, 8), bool)
    paint(canvas, 0, 3.0, [(6.0, 3.0, 12.0, np.array([[1.0, 2.0], [3.0, 4.0]]))], mask)
    for i in range(8):
        for j in range(8):
            cx, cy = (j + 0.5) * 3, (i + 0.5) * 3
            inside = 6 <= cx < 18 and 3 <= cy < 15
            assert mask[i, j] == inside
            if inside:
                want = [[1, 2], [3, 4]][int((cy - 3) // 6)][int((cx - 6) // 6)]
                assert canvas[i, j] == want
    # A band of the same raster starting at row 3 gets the same rows.
    band = np.zeros((2, 8), np.float32)
    paint(band, 3, 3.0, [(6.0, 3.0, 12.0, np.array([[1.0, 2.0], [3.0, 4.0]]))])
    assert (band == canvas[3:5]).all()
    coords = np.array([[0, 0], [0, 30]])
    assert region_rows(coords, 12.0, 3.0, 0, 4).tolist() == [0]
    assert region_rows(coords, 12.0, 3.0, 9, 3).tolist() == [1]


def test_ngff_pyramid_averages_and_validator_rejects_broken_metadata(tmp_path):
    from jsonschema import ValidationError
    from ngff_zarr.validate import validate

    path = tmp_path / "a.ome.zarr"
    w = NgffWriter(
        path,
        ["region", "patch"],
        slide_size=(700, 450),
        mpp_level0=0.25,
        downsample_level0=10,
        chunk_px=16,
        min_side_px=8,
    )
    rng = np.random.default_rng(0)
    full = rng.uniform(0, 1, w.base_shape).astype(np.float32)
    for r0, r1 in w.bands():
        w.write_rows(r0, full[:, r0:r1])
    w.close()
    z = AttentionZarr(path)
    assert [a.shape for a in z.arrays][:3] == [(2, 45, 70), (2, 23, 35), (2, 12, 18)]
    assert z.downsamples[:3] == [10, 20, 40]
    lvl1 = z.read(1, "patch")
    assert lvl1[3, 4] == pytest.approx(full[1, 6:8, 8:10].mean(), rel=1e-6)
    assert lvl1[22, 0] == pytest.approx(full[1, 44, 0:2].mean(), rel=1e-6)  # edge: real pixels only
    assert z.value_at("region", 25, 15) == pytest.approx(full[0, 1, 2])
    attrs = json.loads((path / ".zattrs").read_text())
    validate(attrs, version="0.4", strict=True)
    t = attrs["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    assert t[0]["scale"] == [1.0, 5.0, 5.0] and t[1]["translation"] == [0.0, 2.375, 2.375]
    broken = json.loads(json.dumps(attrs))
    del broken["multiscales"][0]["axes"]
    with pytest.raises(ValidationError):
        validate(broken, version="0.4")


def test_config_layers_and_errors(tmp_path):
    f = tmp_path / "h.yaml"
    f.write_text("top_k: 2\ncolormap: viridis\nsmoothing:\n  passes: 3\n")
    cfg = load_heatmap_config(f, ["top_k=4"], {"levels": ["token", "slide"]})
    assert (cfg.top_k, cfg.colormap, cfg.smoothing.passes) == (4, "viridis", 3)
    assert cfg.levels == ["slide", "token"]  # coarse to fine
    with pytest.raises(ConfigError) as err:
        load_heatmap_config(overrides=["region_png_px=1000", "levels=[]", "zarr.chunk_px=1"])
    lines = str(err.value).splitlines()
    assert any("region_png_px" in x for x in lines) and any("levels" in x for x in lines)
    assert any("zarr.chunk_px" in x for x in lines)


def _features(tmp_path, m=5):
    rng = np.random.default_rng(1)
    attrs = dict(
        slide_id="s",
        target_mpp=0.5,
        mpp_level0=0.25,
        vit256_sha256="random",
        vit4k_sha256="random",
        mean=[0.5] * 3,
        std=[0.5] * 3,
        hipt_version="t",
    )
    coords = np.array([[i * 8192, 0] for i in range(m)], np.int64)
    patches = rng.normal(0, 1, (m, 256, 384)).astype(np.float16)
    with FeaturesWriter(tmp_path / "s.h5", coords, attrs) as w:
        w.write(0, patches, rng.normal(0, 1, (m, 192)))
    return read_features_info(tmp_path / "s.h5"), patches


def test_hipt_lgp_scores_are_its_own_forward(tmp_path):
    """For hipt_lgp the chunked pass gives the model's own attention and its ViT-4K's maps."""
    info, patches = _features(tmp_path)
    torch.manual_seed(0)
    model = create_model(
        "hipt_lgp", n_classes=3, random_weights=True, vit4k_kwargs={"depth": 2}
    ).eval()
    scores = score_slide(
        info,
        model,
        task="subtype",
        class_names=["a", "b", "c"],
        input_key="patch_features",
        encoder=None,
        want_patches=True,
        top_k=2,
    )
    bag = torch.from_numpy(patches).float()
    with torch.no_grad():
        out = model(bag)
        want = vit4k_attention(model.local_vit, patch_grid_to_vit4k_input(bag))
    np.testing.assert_allclose(scores.slide_attention, out.attention.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores.patch_attention, want.numpy(), rtol=1e-4, atol=1e-6)
    probs = torch.softmax(out.logits, -1).numpy()
    assert list(scores.prediction["probabilities"].values()) == pytest.approx(
        probs.tolist(), rel=1e-4
    )
    assert scores.top == list(np.argsort(-out.attention.numpy())[:2])
    assert scores.region_size_level0 == 8192
    with pytest.raises(ValueError, match="larger than the slide's 5 regions"):
        score_slide(
            info,
            model,
            task="subtype",
            class_names=[],
            input_key="patch_features",
            encoder=None,
            want_patches=False,
            top_k=6,
        )


def test_survival_prediction_is_a_risk(tmp_path):
    info, _ = _features(tmp_path)
    model = create_model("abmil", task="survival", n_bins=4, hidden_dim=8).eval()
    scores = score_slide(
        info,
        model,
        task="survival",
        class_names=[],
        input_key="region_features",
        encoder=None,
        want_patches=False,
        top_k=1,
    )
    s = np.array(scores.prediction["survival_per_bin"])
    assert (np.diff(s) <= 0).all() and scores.prediction["risk"] == pytest.approx(-s.sum())
