"""Heatmap folders with known attention for the viewer's tests and benchmark.

Written with ``hipt heatmap``'s own writers (:class:`heatmaps.ngff.NgffWriter` for
``attention.ome.zarr``, :class:`heatmaps.qupath.GeoJsonWriter` for ``attention.geojson``), so the
viewer is tested on the files users get, with values chosen here instead of by a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from heatmaps.ngff import NgffWriter
from heatmaps.qupath import GeoJsonWriter

CHANNELS = ["region", "patch", "token"]
PATCH_VALUES = np.arange(1, 17, dtype=np.float32) / 16  # patch column k of a region: (k + 1) / 16


def planted_heatmap(
    folder: Path,
    slide_id: str,
    slide_w: int,
    slide_h: int,
    mpp_level0: float,
    scored: dict[tuple[int, int], float],
    target_mpp: float = 0.5,
) -> dict:
    """Write ``folder/slide_id/`` for a slide whose regions ``(col, row)`` in ``scored`` carry attention.

    Region attention is the given value (in (0, 1]); inside a region, patch attention rises with
    the patch column (``PATCH_VALUES``) and token attention equals the region's, so a region reads
    as one block at the region and token levels. Unscored regions hold 0 (no value), as
    ``hipt heatmap`` writes them. The zarr's base pixel is one token. Returns the geometry used.
    """
    region_l0 = 4096 * target_mpp / mpp_level0
    token_l0 = region_l0 / 256
    out = folder / slide_id
    out.mkdir(parents=True, exist_ok=True)
    writer = NgffWriter(
        out / "attention.ome.zarr",
        CHANNELS,
        slide_size=(slide_w, slide_h),
        mpp_level0=mpp_level0,
        downsample_level0=token_l0,
        chunk_px=256,
        min_side_px=64,
    )
    _, h, w = writer.base_shape
    volume = np.zeros((3, h, w), dtype=np.float32)
    for (col, row), value in scored.items():
        block = volume[:, row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256]  # a view
        block[0] = value
        block[1] = np.repeat(PATCH_VALUES, 16)[None, : block.shape[2]]
        block[2] = value
    for r0, r1 in writer.bands():
        writer.write_rows(r0, volume[:, r0:r1])
    writer.close()
    with (
        open(out / "attention.geojson", "w") as fh,
        GeoJsonWriter(fh, slide_size=(slide_w, slide_h), name=slide_id) as gj,
    ):
        side = region_l0 / 16
        for i, ((col, row), value) in enumerate(scored.items()):
            x, y = col * region_l0, row * region_l0
            gj.add_box(
                x, y, region_l0, region_l0, name=f"region {i}", class_name="region",
                measurements={"attention": value},
            )  # fmt: skip
            for k in range(256):
                r, c = divmod(k, 16)
                gj.add_box(
                    x + c * side, y + r * side, side, side, name=f"region {i} patch {k}",
                    class_name="patch", measurements={"attention": float(PATCH_VALUES[c])},
                )  # fmt: skip
    (out / "heatmap.json").write_text(json.dumps({"run": "test", "fold": 0}))
    return {"region_level0": region_l0, "token_level0": token_l0}
