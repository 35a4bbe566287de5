"""``attention.geojson``: regions and patches as QuPath objects with attention measurements.

A FeatureCollection of closed rectangular polygons in level-0 pixels (clipped to the slide),
each with the properties QuPath reads on import: ``objectType`` (``"tile"``), ``name``,
``classification`` with both ``name`` and ``color`` (QuPath drops a class without a colour),
and ``measurements`` as a dict of numbers (QuPath's "measurement maps" colour objects by them).
Features are written one at a time, so a slide with many patches needs no list in memory.

Examples
--------
>>> import io, json
>>> buf = io.StringIO()
>>> with GeoJsonWriter(buf, slide_size=(100, 100)) as gj:
...     gj.add_box(0, 0, 64, 64, name="region 0", class_name="region",
...                measurements={"attention": 0.2})
>>> f = json.loads(buf.getvalue())["features"][0]
>>> f["geometry"]["coordinates"][0][0] == f["geometry"]["coordinates"][0][-1]
True
>>> f["properties"]["classification"]["color"]
[255, 64, 64]
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import IO, Any

from heatmaps.colors import CHANNEL_COLORS, rgb_ints

__all__ = ["GeoJsonWriter", "box_ring"]

_NAMESPACE = uuid.UUID("6d1f2c3a-4b5e-4f60-8a71-92b3c4d5e6f7")


def box_ring(
    x: float, y: float, w: float, h: float, slide_size: tuple[int, int]
) -> list[list[float]] | None:
    """Closed counter-clockwise ring of the box clipped to the slide, or None if nothing is left."""
    x0, y0 = max(0.0, float(x)), max(0.0, float(y))
    x1, y1 = min(float(slide_size[0]), float(x + w)), min(float(slide_size[1]), float(y + h))
    if x1 <= x0 or y1 <= y0:
        return None
    return [[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]


class GeoJsonWriter:
    """Stream a QuPath-importable FeatureCollection to an open text file (context manager)."""

    def __init__(self, fh: IO[str], *, slide_size: tuple[int, int], name: str = "") -> None:
        self.fh, self.slide_size, self.name = fh, slide_size, name
        self.count = 0

    def __enter__(self) -> GeoJsonWriter:
        self.fh.write('{"type": "FeatureCollection", "features": [\n')
        return self

    def add_box(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        *,
        name: str,
        class_name: str,
        measurements: Mapping[str, float],
        object_type: str = "tile",
    ) -> bool:
        """Add one rectangle (level-0 px); False when it lies wholly outside the slide."""
        ring = box_ring(x, y, w, h, self.slide_size)
        if ring is None:
            return False
        clean = {
            k: (float(v) if math.isfinite(float(v)) else None) for k, v in measurements.items()
        }
        feature: dict[str, Any] = {
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{self.name}/{name}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": object_type,
                "name": name,
                "classification": {
                    "name": class_name,
                    "color": rgb_ints(CHANNEL_COLORS.get(class_name, "FFFFFF")),
                },
                "isLocked": False,
                "measurements": clean,
            },
        }
        self.fh.write((",\n" if self.count else "") + json.dumps(feature))
        self.count += 1
        return True

    def __exit__(self, exc_type, exc, tb) -> None:
        self.fh.write("\n]}\n")
