"""Heatmap inputs for the viewer tests, written to the heatmap formats of the architecture notes.

``attention.ome.zarr``: NGFF 0.4 multiscales in a zarr format 2 group, axes ``c, y, x`` (y and
x in micrometres), one channel per attention level (``region``, ``patch``, ``token``), float32
values in [0, 1] and NaN where nothing was scored, resolution k a 2^k downsample of the finest,
``coordinateTransformations`` scale in µm per pixel, ``omero`` channel metadata (colour, 0–1
window). ``attention.geojson``: a QuPath FeatureCollection, one closed polygon per region
(``objectType`` ``detection``) and per patch of the given regions (``tile``), ``measurements`` a
dict, ``classification`` with ``name`` and ``color``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

CHANNELS = ("region", "patch", "token")
COLOURS = ("FF0000", "00FF00", "0000FF")


def write_attention_zarr(
    path: Path, volume: np.ndarray, pixel_level0: float, mpp_level0: float, levels: int = 3
) -> Path:
    """Write ``volume`` (float32 ``[channels, h, w]``, one pixel = ``pixel_level0`` level-0 px).

    Coarser resolutions take the NaN-aware mean of 2 × 2 blocks.
    """
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    data = volume.astype(np.float32)
    for k in range(levels):
        array = group.create_array(
            str(k), shape=data.shape, chunks=(1, 256, 256), dtype="float32", fill_value=np.nan
        )
        array[...] = data
        um = pixel_level0 * mpp_level0 * 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, um, um]}],
            }
        )
        c, h, w = data.shape
        padded = np.full((c, h + h % 2, w + w % 2), np.nan, dtype=np.float32)
        padded[:, :h, :w] = data
        blocks = padded.reshape(c, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2)
        with np.errstate(all="ignore"), _quiet():
            data = np.nanmean(blocks, axis=(2, 4)).astype(np.float32)
    labels = CHANNELS[: volume.shape[0]]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": "attention",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
            "type": "mean",
        }
    ]
    group.attrs["omero"] = {
        "name": "attention",
        "version": "0.4",
        "channels": [
            {
                "label": label,
                "color": COLOURS[i],
                "active": True,
                "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0},
            }
            for i, label in enumerate(labels)
        ],
        "rdefs": {"model": "color"},
    }
    return path


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _square(x: float, y: float, side: float) -> list[list[list[float]]]:
    return [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]


def write_attention_geojson(
    path: Path,
    regions: list[tuple[int, int, float]],
    region_side_level0: float,
    patch_values: dict[int, np.ndarray] | None = None,
) -> Path:
    """One ``detection`` per region ``(x, y, attention)``; ``tile`` patches for regions in
    ``patch_values`` (index into ``regions`` -> 16 × 16 patch attention, row-major)."""
    features = []
    for i, (x, y, value) in enumerate(regions):
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": _square(x, y, region_side_level0)},
                "properties": {
                    "objectType": "detection",
                    "name": f"region {i}",
                    "classification": {"name": "region", "color": [255, 0, 0]},
                    "measurements": {"region attention": float(value)},
                },
            }
        )
        patches = (patch_values or {}).get(i)
        if patches is None:
            continue
        side = region_side_level0 / 16
        for k in range(256):
            r, c = divmod(k, 16)
            features.append(
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": _square(x + c * side, y + r * side, side),
                    },
                    "properties": {
                        "objectType": "tile",
                        "name": f"region {i} patch {k}",
                        "classification": {"name": "patch", "color": [0, 255, 0]},
                        "measurements": {"patch attention": float(patches[r, c])},
                    },
                }
            )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def planted_heatmap(
    folder: Path,
    slide_id: str,
    slide_w: int,
    slide_h: int,
    mpp_level0: float,
    scored: dict[tuple[int, int], float],
    target_mpp: float = 0.5,
) -> dict:
    """A heatmap folder for a slide whose regions ``(col, row)`` in ``scored`` carry attention.

    Region attention is the given value; inside a region, patch attention rises left to right
    (0 .. 1 over the 16 columns) and token attention is the region value (so a region reads as
    one block at every level). Unscored regions are NaN. Returns the geometry used.
    """
    region_l0 = 4096 * target_mpp / mpp_level0
    token_l0 = region_l0 / 256  # the zarr's pixel: one token
    h_px, w_px = int(np.ceil(slide_h / token_l0)), int(np.ceil(slide_w / token_l0))
    volume = np.full((3, h_px, w_px), np.nan, dtype=np.float32)
    per_region = 256
    for (col, row), value in scored.items():
        ys = slice(row * per_region, (row + 1) * per_region)
        xs = slice(col * per_region, (col + 1) * per_region)
        block = volume[:, ys, xs]  # a view; regions at the slide's edge are cut off
        patch_cols = np.repeat(np.linspace(0, 1, 16, dtype=np.float32), 16)
        block[0] = value
        block[1] = patch_cols[None, : block.shape[2]]
        block[2] = value
    out = folder / slide_id
    out.mkdir(parents=True, exist_ok=True)
    write_attention_zarr(out / "attention.ome.zarr", volume, token_l0, mpp_level0)
    regions = [(col * region_l0, row * region_l0, v) for (col, row), v in scored.items()]
    patches = {i: np.tile(np.linspace(0, 1, 16), (16, 1)) for i in range(len(regions))}
    write_attention_geojson(out / "attention.geojson", regions, region_l0, patches)
    (out / "heatmap.json").write_text(json.dumps({"run": "test", "fold": 0}))
    return {"region_level0": region_l0, "token_level0": token_l0}
