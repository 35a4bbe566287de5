"""Settings of ``hipt heatmap``: one typed schema, loaded through the shared config mechanism.

Defaults, then ``--config FILE`` (YAML), then the named flags, then ``--set key=value``; the
resolved config is recorded in every ``heatmap.json``.

Examples
--------
>>> cfg = load_heatmap_config(overrides=["top_k=3", "smoothing.passes=2"])
>>> cfg.top_k, cfg.smoothing.passes, cfg.colormap
(3, 2, 'turbo')
>>> try:
...     load_heatmap_config(overrides=["opacity=2"])
... except ConfigError as exc:
...     print(str(exc).split(":")[1].strip())
opacity = 2
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

try:
    from hipt.config import ConfigError, ConfigModel, config_dict, load_config
except ImportError:  # until the shared config module lands: the same API, minimal
    from heatmaps._config_fallback import ConfigError, ConfigModel, config_dict, load_config

__all__ = [
    "LEVELS",
    "HeatmapConfig",
    "SmoothingConfig",
    "ZarrConfig",
    "ConfigError",
    "config_dict",
    "load_heatmap_config",
]

#: The attention levels, coarse to fine: slide model over regions, ViT-4K over the patches of
#: every region, ViT-256 over the tokens of every patch of the top regions.
LEVELS = ("slide", "region", "token")
Level = Literal["slide", "region", "token"]


class SmoothingConfig(ConfigModel):
    """Averaging over shifted grids (off with ``passes: 1``).

    Pass ``i`` of ``n`` reads the top regions again from the slide, shifted right and down by
    ``i/n`` of a patch plus ``i/n`` of a token, so neither grid's edges line up between passes.
    """

    passes: int = Field(1, ge=1, le=8, description="1 = no smoothing")


class ZarrConfig(ConfigModel):
    """Layout of ``attention.ome.zarr``."""

    downsample_level0: float | None = Field(
        None, gt=0, description="level-0 px per base-scale pixel; default: one token's size"
    )
    chunk_px: int = Field(512, ge=64, le=4096)
    min_side_px: int = Field(256, ge=16, description="stop the pyramid below this longest side")


class HeatmapConfig(ConfigModel):
    """Everything ``hipt heatmap`` can be told (see the README's heatmap section)."""

    levels: list[Level] = Field(default_factory=lambda: list(LEVELS))
    top_k: int = Field(5, ge=0, description="regions rendered at token level")
    colormap: str = "turbo"
    opacity: float = Field(0.5, ge=0.0, le=1.0)
    thumbnail_px: int = Field(2048, ge=128, le=16384, description="longest side of slide.png")
    region_png_px: int = Field(1024, ge=256, le=4096, description="side of a top region panel")
    heads: bool = Field(True, description="also draw every head, not only the mean")
    smoothing: SmoothingConfig = SmoothingConfig()
    zarr: ZarrConfig = ZarrConfig()
    device: str = "cpu"
    patch_batch: int = Field(64, ge=1, description="patches per ViT-256 call")
    progress: bool = True

    @field_validator("levels")
    @classmethod
    def _known_unique_levels(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one of {', '.join(LEVELS)}")
        return [lv for lv in LEVELS if lv in value]  # coarse to fine, duplicates dropped

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, value: str) -> str:
        import matplotlib

        if value not in matplotlib.colormaps:
            raise ValueError(f"unknown colormap {value!r} (any matplotlib name, e.g. turbo, jet)")
        return value

    @field_validator("region_png_px")
    @classmethod
    def _divides_region(cls, value: int) -> int:
        if 4096 % value:
            raise ValueError("must divide 4096 (256, 512, 1024, 2048 or 4096)")
        return value


def load_heatmap_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> HeatmapConfig:
    """Resolve the heatmap config (defaults → YAML ``path`` → ``flags`` → ``overrides``).

    Raises
    ------
    hipt.config.ConfigError
        One line per problem, naming the dotted key, the value and what is allowed.
    """
    return load_config(HeatmapConfig, path, overrides, flags)
