"""``attention.ome.zarr``: attention in [0, 1] as a multiscale OME-Zarr image (NGFF 0.4, zarr v2).

Axes are ``c, y, x``; channel ``i`` is one attention level (``region``: the slide model's
attention painted over each region; ``patch``: ViT-4K over the patches of every region;
``token``: ViT-256 over the tokens of the top regions; 0 where a level has no value). Scale 0
pixel ``(i, j)`` covers level-0 pixels ``[j·D, (j+1)·D) × [i·D, (i+1)·D)`` for the stated
downsample ``D`` (``multiscales[0].metadata.downsample_level0``); scale ``s`` is ``2^s·D``. The
``coordinateTransformations`` give micrometres (``D · mpp_level0``) with the half-pixel
translation that puts every pixel's centre where its level-0 block's centre is, so the map
overlays the slide in NGFF viewers. ``omero`` gives each channel a colour and a 0–1 window.

The writer takes the base scale band by band (whole chunk rows) and builds every coarser scale
from the one above, two chunk rows at a time: memory stays a few bands whatever the slide size.
The reader here is the one the viewer uses.

Examples
--------
>>> import tempfile, pathlib, numpy as np
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a.ome.zarr"
>>> w = NgffWriter(p, ["region"], slide_size=(1000, 600), mpp_level0=0.5, downsample_level0=10,
...                chunk_px=64, min_side_px=16)
>>> w.base_shape
(1, 60, 100)
>>> w.write_rows(0, np.ones((1, 60, 100), np.float32)); w.close()
>>> z = AttentionZarr(p)
>>> z.channels, z.downsamples, float(z.read(0, "region").max())
(['region'], [10.0, 20.0, 40.0, 80.0], 1.0)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from heatmaps.colors import CHANNEL_COLORS

__all__ = ["NGFF_VERSION", "AttentionZarr", "NgffWriter"]

NGFF_VERSION = "0.4"


class NgffWriter:
    """Write an attention pyramid chunk row by chunk row (see the module docstring).

    Parameters
    ----------
    path : path
        The ``.ome.zarr`` folder to create (replaced if it exists).
    channels : list of str
        Channel labels, e.g. ``["region", "patch", "token"]``.
    slide_size : (int, int)
        Level-0 width and height of the slide.
    mpp_level0 : float
        Level-0 µm/px.
    downsample_level0 : float
        Level-0 pixels per base-scale pixel.
    chunk_px : int
        Chunk side in pixels (one channel per chunk).
    min_side_px : int
        The pyramid stops at the first scale whose longest side is at most this.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        channels: list[str],
        *,
        slide_size: tuple[int, int],
        mpp_level0: float,
        downsample_level0: float,
        chunk_px: int = 512,
        min_side_px: int = 256,
        name: str = "attention",
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.channels = list(channels)
        self.slide_size = (int(slide_size[0]), int(slide_size[1]))
        self.mpp = float(mpp_level0)
        self.d = float(downsample_level0)
        self.chunk = int(chunk_px)
        self.name, self.extra = name, dict(extra or {})
        w = max(1, math.ceil(self.slide_size[0] / self.d))
        h = max(1, math.ceil(self.slide_size[1] / self.d))
        self.shapes = [(len(self.channels), h, w)]
        while max(self.shapes[-1][1:]) > min_side_px:
            _, hh, ww = self.shapes[-1]
            self.shapes.append((len(self.channels), -(-hh // 2), -(-ww // 2)))
        self.group = zarr.open_group(str(self.path), mode="w", zarr_format=2)
        self.arrays = [
            self.group.create_array(
                str(s),
                shape=shape,
                chunks=(1, self.chunk, self.chunk),
                dtype="float32",
                fill_value=0.0,
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )
            for s, shape in enumerate(self.shapes)
        ]

    @property
    def base_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of scale 0."""
        return self.shapes[0]

    def bands(self) -> list[tuple[int, int]]:
        """Row ranges ``(r0, r1)`` of scale 0 that :meth:`write_rows` expects, one chunk row each."""
        h = self.shapes[0][1]
        return [(r, min(h, r + self.chunk)) for r in range(0, h, self.chunk)]

    def write_rows(self, r0: int, band: np.ndarray) -> None:
        """Store ``band`` ``[channels, rows, width]`` at scale-0 rows ``r0 : r0 + rows``."""
        self.arrays[0][:, r0 : r0 + band.shape[1], :] = np.asarray(band, dtype=np.float32)

    def _downscale(self, s: int) -> None:
        # Scale s+1 from scale s, one output chunk row (two input chunk rows) at a time.
        src, dst = self.arrays[s], self.arrays[s + 1]
        _, h, w = self.shapes[s + 1]
        for r0 in range(0, h, self.chunk):
            r1 = min(h, r0 + self.chunk)
            block = np.asarray(src[:, 2 * r0 : 2 * r1, :])
            c, bh, bw = block.shape
            padded = np.zeros((c, 2 * (r1 - r0), 2 * w), np.float32)
            padded[:, :bh, :bw] = block
            weight = np.zeros((1, 2 * (r1 - r0), 2 * w), np.float32)
            weight[:, :bh, :bw] = 1.0  # edge pixels average only what the slide covers
            total = padded.reshape(c, r1 - r0, 2, w, 2).sum(axis=(2, 4))
            count = weight.reshape(1, r1 - r0, 2, w, 2).sum(axis=(2, 4))
            dst[:, r0:r1, :] = total / np.maximum(count, 1.0)

    def _metadata(self) -> dict[str, Any]:
        datasets = []
        for s in range(len(self.shapes)):
            ds = self.d * 2**s
            um = ds * self.mpp
            shift = (ds - 1) / 2 * self.mpp  # pixel centre on its level-0 block's centre
            datasets.append(
                {
                    "path": str(s),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0, um, um]},
                        {"type": "translation", "translation": [0.0, shift, shift]},
                    ],
                }
            )
        multiscale = {
            "version": NGFF_VERSION,
            "name": self.name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
            "type": "mean",
            "metadata": {
                "description": "attention in [0, 1]; scale s pixel = 2^s * downsample_level0 "
                "level-0 px",
                "downsample_level0": self.d,
                "downsamples_level0": [self.d * 2**s for s in range(len(self.shapes))],
                "mpp_level0": self.mpp,
                "slide_size_level0": list(self.slide_size),
                "channels": self.channels,
                **self.extra,
            },
        }
        omero = {
            "name": self.name,
            "version": NGFF_VERSION,
            "channels": [
                {
                    "label": ch,
                    "color": CHANNEL_COLORS.get(ch, "FFFFFF"),
                    "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0},
                    "active": True,
                    "coefficient": 1.0,
                    "family": "linear",
                    "inverted": False,
                }
                for ch in self.channels
            ],
            "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
        }
        return {"multiscales": [multiscale], "omero": omero}

    def close(self) -> None:
        """Build the coarser scales and write the metadata (call once, after every band)."""
        for s in range(len(self.shapes) - 1):
            self._downscale(s)
        self.group.attrs.update(self._metadata())


class AttentionZarr:
    """Read an ``attention.ome.zarr`` written by :class:`NgffWriter` (used by the viewer too)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r")
        attrs = dict(self.group.attrs)
        try:
            ms = attrs["multiscales"][0]
            meta = ms["metadata"]
            self.channels: list[str] = list(meta["channels"])
            self.downsamples: list[float] = [float(v) for v in meta["downsamples_level0"]]
            self.mpp_level0 = float(meta["mpp_level0"])
            self.slide_size = tuple(int(v) for v in meta["slide_size_level0"])
            self.arrays = [self.group[d["path"]] for d in ms["datasets"]]
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{self.path}: not a hipt attention zarr ({exc!r} missing)") from None
        self.metadata = attrs

    def level_for(self, downsample_level0: float) -> int:
        """The coarsest scale at least as fine as ``downsample_level0``."""
        best = 0
        for s, d in enumerate(self.downsamples):
            if d <= downsample_level0 * (1 + 1e-9):
                best = s
        return best

    def read(
        self,
        scale: int,
        channel: str,
        x0: int = 0,
        y0: int = 0,
        width: int | None = None,
        height: int | None = None,
    ) -> np.ndarray:
        """Pixels ``[height, width]`` of one channel at ``scale`` (scale pixel coordinates)."""
        arr = self.arrays[scale]
        c = self.channels.index(channel)
        x1 = arr.shape[2] if width is None else x0 + width
        y1 = arr.shape[1] if height is None else y0 + height
        return np.asarray(arr[c, y0:y1, x0:x1])

    def value_at(self, channel: str, x_level0: float, y_level0: float) -> float:
        """Attention of ``channel`` at a level-0 point (scale 0)."""
        d = self.downsamples[0]
        return float(self.read(0, channel, int(x_level0 // d), int(y_level0 // d), 1, 1)[0, 0])
