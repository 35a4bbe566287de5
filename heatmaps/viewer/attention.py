"""Read the heatmap outputs of one slide: the attention OME-Zarr and the QuPath GeoJSON.

``attention.ome.zarr`` is an NGFF 0.4 multiscale image (zarr format 2) with one channel per
attention level (slide/region, patch, token). ``hipt heatmap`` writes percentile ranks in (0, 1]
and 0 where a level has no value (outside the regions, tokens outside the top regions); 0 and
NaN both read as "no value" here. Its ``coordinateTransformations`` give each resolution's pixel
size and offset in µm (pixel centres, as NGFF defines them), so with the slide's level-0 µm/px
it maps onto level-0 pixels. Read by the NGFF layout alone, any NGFF 0.4 image with ``c, y, x``
axes works. ``attention.geojson`` is a
FeatureCollection of closed polygons in level-0 pixels with ``measurements``; a feature that
contains smaller ones is a region, the smaller ones its patches.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ZARR_NAME = "attention.ome.zarr"
GEOJSON_NAME = "attention.geojson"
HEATMAP_JSON = "heatmap.json"
TOP_PATCHES = 5


class HeatmapFormatError(ValueError):
    """The heatmap files break the format; the message names the file and what is wrong."""


# A resolution whose one channel is at most this big is read once and kept in memory: a zarr read
# costs milliseconds per call, and the coarse levels serve every zoomed-out tile.
IN_MEMORY_BYTES = 32 << 20


@dataclass
class _Resolution:
    array: object  # a zarr array
    scale_um: tuple[float, float]  # (y, x) pixel size
    offset_um: tuple[float, float]  # (y, x) translation
    in_memory: dict = field(default_factory=dict)  # channel -> ndarray, for small resolutions


def _ngff_attrs(group, path: Path) -> dict:
    attrs = dict(group.attrs)
    attrs = attrs.get("ome", attrs)  # NGFF 0.5 nests the metadata under "ome"
    if not attrs.get("multiscales"):
        raise HeatmapFormatError(f"{path}: no NGFF 'multiscales' metadata")
    return attrs


def _transform(transforms: list[dict], axes: list[str], what: str) -> tuple[list, list]:
    scale, offset = [1.0] * len(axes), [0.0] * len(axes)
    for t in transforms or []:
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            offset = [float(v) for v in t["translation"]]
    if len(scale) != len(axes) or len(offset) != len(axes):
        raise HeatmapFormatError(f"{what}: coordinateTransformations do not match the axes {axes}")
    return scale, offset


class AttentionPyramid:
    """The attention levels of one slide, sampled in level-0 pixels.

    Parameters
    ----------
    path : path-like
        The ``attention.ome.zarr`` folder.
    mpp_level0 : float
        The slide's level-0 µm/px (converts the NGFF µm scales to level-0 pixels).

    Attributes
    ----------
    channels : list of str
        One label per attention level, from the ``omero`` channel metadata.
    """

    def __init__(self, path: str | os.PathLike, mpp_level0: float) -> None:
        import zarr

        self.path = Path(path)
        try:
            group = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several kinds for a missing or broken store
            raise HeatmapFormatError(f"{self.path}: not a readable zarr group ({exc})") from None
        attrs = _ngff_attrs(group, self.path)
        ms = attrs["multiscales"][0]
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
        for name in ("c", "y", "x"):
            if name not in axes:
                raise HeatmapFormatError(f"{self.path}: axes {axes} lack {name!r}")
        self._axes = axes
        self._lock = threading.Lock()
        self.mpp_level0 = float(mpp_level0)
        top_scale, top_offset = _transform(ms.get("coordinateTransformations"), axes, str(path))
        self._levels: list[_Resolution] = []
        for ds in ms["datasets"]:
            try:
                array = group[ds["path"]]
            except KeyError:
                raise HeatmapFormatError(f"{self.path}: dataset {ds['path']!r} missing") from None
            scale, offset = _transform(ds.get("coordinateTransformations"), axes, str(path))
            iy, ix = axes.index("y"), axes.index("x")
            self._levels.append(
                _Resolution(
                    array,
                    (scale[iy] * top_scale[iy], scale[ix] * top_scale[ix]),
                    (
                        offset[iy] * top_scale[iy] + top_offset[iy],
                        offset[ix] * top_scale[ix] + top_offset[ix],
                    ),
                )
            )
        self._levels.sort(key=lambda r: r.scale_um[1])
        n_channels = int(self._levels[0].array.shape[axes.index("c")])
        labels = [c.get("label") for c in attrs.get("omero", {}).get("channels", [])]
        if len(labels) != n_channels:
            labels = [f"channel {i}" for i in range(n_channels)]
        self.channels: list[str] = [str(label) for label in labels]

    def channel_index(self, name: str) -> int:
        """Index of the channel labelled ``name``; ValueError listing the labels otherwise."""
        if name not in self.channels:
            raise ValueError(f"unknown attention level {name!r}; this slide has {self.channels}")
        return self.channels.index(name)

    def _pick_level(self, level0_per_px: float) -> _Resolution:
        """The coarsest resolution still at least as fine as one output pixel (else the finest)."""
        chosen = self._levels[0]
        for res in self._levels:
            if res.scale_um[1] / self.mpp_level0 <= level0_per_px * (1 + 1e-6):
                chosen = res
        return chosen

    def sample(
        self, channel: int, box: tuple[float, float, float, float], out_w: int, out_h: int
    ) -> np.ndarray:
        """Attention of ``channel`` at the pixel centres of an ``out_w`` × ``out_h`` image.

        ``box`` is the level-0 ``(x, y, width, height)`` the image covers. Each output pixel takes
        the value of the attention pixel nearest to its centre (no blur across region or patch
        borders); outside the attention array, and where the value is 0 (none), it is NaN.
        """
        x, y, w, h = box
        res = self._pick_level(w / out_w)
        axes = self._axes
        shape = res.array.shape
        iy_ax, ix_ax = axes.index("y"), axes.index("x")
        # NGFF coordinates are pixel centres: level-0 pixel j's centre is at j * mpp µm, attention
        # pixel i's at i * scale + translation. An output pixel takes the attention pixel whose
        # centre is nearest to its own (so borders stay sharp).
        ix, iy = (
            np.floor(
                (
                    (start + (np.arange(n) + 0.5) * (size / n) - 0.5) * self.mpp_level0
                    - res.offset_um[along]
                )
                / res.scale_um[along]
                + 0.5
            ).astype(np.int64)
            for along, start, size, n in ((1, x, w, out_w), (0, y, h, out_h))
        )
        ok_x = (ix >= 0) & (ix < shape[ix_ax])
        ok_y = (iy >= 0) & (iy < shape[iy_ax])
        out = np.full((out_h, out_w), np.nan, dtype=np.float32)
        if not ok_x.any() or not ok_y.any():
            return out
        x0, x1 = int(ix[ok_x].min()), int(ix[ok_x].max()) + 1
        y0, y1 = int(iy[ok_y].min()), int(iy[ok_y].max()) + 1
        window = self._plane(res, channel)
        if window is not None:
            window = window[y0:y1, x0:x1]
        else:
            window = self._read(res, channel, slice(y0, y1), slice(x0, x1))
        out[np.ix_(ok_y, ok_x)] = window[np.ix_(iy[ok_y] - y0, ix[ok_x] - x0)]
        out[out <= 0] = np.nan  # hipt heatmap writes 0 where a level has no value
        return out

    def _read(self, res: _Resolution, channel: int, ys: slice, xs: slice) -> np.ndarray:
        """A float32 ``[y, x]`` window of one channel from the zarr array."""
        axes = self._axes
        selection = [0] * len(axes)
        selection[axes.index("c")] = channel
        selection[axes.index("y")], selection[axes.index("x")] = ys, xs
        window = np.asarray(res.array[tuple(selection)], dtype=np.float32)
        if axes.index("y") > axes.index("x"):  # an (x, y) axis order: make it row-major in y
            window = window.T
        return window

    def _plane(self, res: _Resolution, channel: int) -> np.ndarray | None:
        """The whole channel of a small resolution, read on first use; None for large ones."""
        shape = res.array.shape
        h, w = shape[self._axes.index("y")], shape[self._axes.index("x")]
        if h * w * 4 > IN_MEMORY_BYTES:
            return None
        with self._lock:
            if channel not in res.in_memory:
                res.in_memory[channel] = self._read(res, channel, slice(0, h), slice(0, w))
            return res.in_memory[channel]

    def value_at(self, channel: int, x: float, y: float) -> float | None:
        """The finest attention value of ``channel`` at level-0 ``(x, y)``; None where unscored."""
        res = self._levels[0]
        px = res.scale_um[1] / self.mpp_level0
        v = float(self.sample(channel, (x - px / 2, y - px / 2, px, px), 1, 1)[0, 0])
        return None if math.isnan(v) else v


# ------------------------------------------------------------------------------ GeoJSON
def _measurements(props: dict) -> dict[str, float]:
    """QuPath's ``measurements``: a dict, or the older list of ``{"name", "value"}``."""
    m = props.get("measurements") or {}
    if isinstance(m, list):
        m = {str(d.get("name")): d.get("value") for d in m if isinstance(d, dict)}
    return {str(k): float(v) for k, v in m.items() if isinstance(v, int | float)}


def _sort_key(measurements: dict[str, float]) -> float:
    """The value patches are ranked by: the first measurement naming attention, else the first."""
    for name, value in measurements.items():
        if "attention" in name.lower():
            return value
    return next(iter(measurements.values()), float("-inf"))


class RegionIndex:
    """The GeoJSON's polygons, looked up by a level-0 point.

    Examples
    --------
    >>> square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    >>> fc = {"type": "FeatureCollection", "features": [{"type": "Feature",
    ...     "geometry": {"type": "Polygon", "coordinates": square},
    ...     "properties": {"objectType": "tile", "measurements": {"attention": 0.7}}}]}
    >>> RegionIndex(fc, "a.geojson").region_at(5, 5)["measurements"]
    {'attention': 0.7}
    """

    def __init__(self, collection: dict, source: str) -> None:
        if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
            raise HeatmapFormatError(f"{source}: not a GeoJSON FeatureCollection")
        self._features: list[dict] = []
        self._rings: list[np.ndarray] = []
        boxes = []
        for i, feature in enumerate(collection.get("features") or []):
            geom = (feature or {}).get("geometry") or {}
            if geom.get("type") != "Polygon" or not geom.get("coordinates"):
                continue  # points and lines are not regions
            ring = np.asarray(geom["coordinates"][0], dtype=np.float64)
            if ring.ndim != 2 or ring.shape[0] < 4 or ring.shape[1] != 2:
                raise HeatmapFormatError(f"{source}: feature {i} has a malformed polygon ring")
            props = feature.get("properties") or {}
            self._features.append(
                {
                    "objectType": props.get("objectType"),
                    "name": props.get("name"),
                    "classification": props.get("classification"),
                    "measurements": _measurements(props),
                    "bbox": [float(v) for v in (*ring.min(0), *ring.max(0))],
                }
            )
            self._rings.append(ring)
            boxes.append((*ring.min(0), *ring.max(0)))
        self._boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self._areas = (self._boxes[:, 2] - self._boxes[:, 0]) * (
            self._boxes[:, 3] - self._boxes[:, 1]
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> RegionIndex:
        path = Path(path)
        try:
            collection = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise HeatmapFormatError(f"{path}: cannot read GeoJSON ({exc})") from None
        return cls(collection, str(path))

    def __len__(self) -> int:
        return len(self._features)

    def _containing(self, x: float, y: float) -> list[int]:
        b = self._boxes
        hits = np.nonzero((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3]))[0]
        return [int(i) for i in hits]

    def region_at(self, x: float, y: float) -> dict | None:
        """The largest polygon containing ``(x, y)`` with its top patches, or None."""
        from matplotlib.path import Path as PolygonPath

        in_box = self._containing(x, y)
        # A point on a polygon's edge may test outside; the bounding box then decides.
        hits = [i for i in in_box if PolygonPath(self._rings[i]).contains_point((x, y))] or in_box
        if not hits:
            return None
        region = max(hits, key=lambda i: self._areas[i])
        x0, y0, x1, y1 = self._boxes[region]
        b = self._boxes
        inside = np.nonzero(
            (b[:, 0] >= x0)
            & (b[:, 1] >= y0)
            & (b[:, 2] <= x1)
            & (b[:, 3] <= y1)
            & (self._areas < self._areas[region])
        )[0]
        patches = sorted(
            (self._features[int(i)] for i in inside),
            key=lambda f: _sort_key(f["measurements"]),
            reverse=True,
        )
        return {**self._features[region], "top_patches": patches[:TOP_PATCHES]}
