"""``hipt view`` on what ``hipt heatmap`` really writes: a planted run rendered by the heatmap CLI.

The planted region has the top region rank (1.0), the others 0.25, 0.5 and 0.75; the overlay
must show each rank's colour over its region, and the region lookup must rank the planted patch
first.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from heatmaps.planted import make_planted_run
from heatmaps.viewer.server import ViewerApp
from heatmaps.viewer.sources import Catalogue
from heatmaps.viewer.tiles import colormap_lut
from hipt.cli import main


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run = make_planted_run(tmp_path_factory.mktemp("viewer_planted"), grid=(2, 2))
    out = run.root / "heatmaps"
    args = ["--run", run.fold_dir, "--features", run.features_path]
    args += ["--vit256", run.vit256_path, "--vit4k", run.vit4k_path, "--levels", "slide,region"]
    args += ["--top-k", "1", "--set", "thumbnail_px=256", "--out", out, "--no-progress"]
    assert main(["heatmap", *map(str, args)]) == 0
    return run, out


@pytest.mark.slow
def test_viewer_shows_hipt_heatmap_output(rendered):
    run, out = rendered
    app = ViewerApp(Catalogue(run.slide_path.parent, heatmaps=out))
    try:
        info = json.loads(app.handle("/api/slides/planted").body)
        assert [o["label"] for o in info["overlays"]] == ["region", "patch"]
        assert info["overlay_error"] is None
        # The 4096 px slide at 128 px: one tile, 64 px per region.
        level = info["max_level"] - 5
        tile = np.asarray(
            Image.open(io.BytesIO(app.handle(f"/overlay/planted/0/{level}/0_0.png").body))
        )
        lut = colormap_lut("coolwarm")
        half = run.region_size_level0 / 32 / 2
        others = []
        for region, (x, y) in enumerate(run.coords):
            px = tile[int(y / 32 + half), int(x / 32 + half)]
            assert px[3] == 255
            if region == run.planted_region:
                assert (px[:3] == lut[255]).all()  # rank 1.0
            else:
                others.append(int(np.abs(lut.astype(int) - px[:3]).sum(1).argmin()))
        assert sorted(others) == [64, 128, 191]  # ranks 0.25, 0.5, 0.75
        px, py = run.planted_region_xy
        centre = run.region_size_level0 / 2
        data = json.loads(app.handle(f"/api/region/planted?x={px + centre}&y={py + centre}").body)
        assert data["values"]["region"] == pytest.approx(1.0)
        assert data["region"]["measurements"]["attention_rank"] == 1.0
        assert data["region"]["top_patches"][0]["name"].endswith(f"patch {run.planted_patch}")
    finally:
        app.close()
