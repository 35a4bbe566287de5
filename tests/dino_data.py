"""Generated inputs for the pretraining tests: structured patch-feature grids and tiled slides.

Feature grids have something to learn: each region blends two of a few "tissue type" prototypes
along a smooth spatial field, plus noise, so views of one region agree and views of different
regions differ. Slides come from :mod:`hipt.synthetic`, tiled by the project's tiler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hipt.h5schema import FeaturesWriter

ATTRS = {
    "target_mpp": 0.5,
    "vit256_sha256": "synthetic",
    "vit4k_sha256": "synthetic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "hipt_version": "test",
}


def write_feature_grids(
    folder: str | Path, n_files: int = 3, regions: int = 8, seed: int = 0, n_types: int = 4
) -> Path:
    """Write ``folder/f{i}.h5`` features files with structured ``patch_features`` [M, 256, 384]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((n_types, 384)).astype(np.float32) * 2.0
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    for i in range(n_files):
        grids = []
        for _ in range(regions):
            a, b = rng.choice(n_types, size=2, replace=False)
            angle = rng.uniform(0, np.pi)
            field = np.cos(angle) * xx + np.sin(angle) * yy
            w = (field - field.min()) / max(np.ptp(field), 1e-6)
            g = w[..., None] * protos[a] + (1 - w[..., None]) * protos[b]
            g = g + 0.5 * rng.standard_normal(g.shape)
            grids.append(g.reshape(256, 384))
        coords = np.stack([np.arange(regions) * 8192, np.zeros(regions)], 1).astype(np.int64)
        with FeaturesWriter(folder / f"f{i}.h5", coords, {**ATTRS, "slide_id": f"f{i}"}) as w:
            w.write(0, np.stack(grids).astype(np.float16), np.zeros((regions, 192), np.float32))
    return folder


def tile_slides(slides: list[Path], out: Path) -> Path:
    """Tile ``slides`` with the project's tiler; returns the ``tiles/`` folder."""
    from preprocessing.tiler import TileSettings, tile_slide

    for p in slides:
        result = tile_slide(p, out, TileSettings())
        assert result.status == "ok", result
    return out / "tiles"
