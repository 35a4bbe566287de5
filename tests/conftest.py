"""Shared, session-scoped generated slides (written once per test session with tifffile).

Fixtures (each a :class:`hipt.synthetic.SyntheticSlide` unless noted; all small):

- ``slide_dir``: the session folder the slides below live in.
- ``svs_025``: Aperio SVS, 4096×4096 px at 0.25 µm/px (AppMag 40), seed 3.
- ``tiff_050``: generic pyramidal JPEG TIFF, 2048×2048 px at 0.5 µm/px, the *same tissue* as
  ``svs_025`` (same physical extent and seed).
- ``tiff_pen``: generic TIFF, 4096×3072 px at 0.5 µm/px, four tissue blobs and pen marks, seed 2.
- ``no_mpp_tiff``: pyramidal TIFF without any µm/px (true value 0.5).
- ``tiny_biopsy``: 1600×1200 px at 0.5 µm/px, smaller than one 4096 px region.
- ``single_level_tiff``: non-pyramidal tiled TIFF, 2048×2048 px at 0.5 µm/px.
- ``blank_slide``: pyramidal TIFF of bare glass.
- ``suspicious_svs``: SVS whose MPP (0.25) disagrees with its AppMag (10×).
- ``not_a_slide``: a text file named ``*.svs`` (a ``Path``).
- ``truncated_tiff``: a pyramidal TIFF cut to half its bytes (a ``Path``).
- ``corrupt_tile_slide``: ``(SyntheticSlide, (x, y))``, one level-0 JPEG tile garbled at
  level-0 ``(x, y)``.
- ``corrupt_lowres_slide``: a pyramidal TIFF whose level 2 (512 px, what the tiler segments on)
  has a garbled tile.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hipt import synthetic


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def svs_025(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_svs(slide_dir / "svs_025.svs", 4096, 4096, mpp=0.25, seed=3)


@pytest.fixture(scope="session")
def tiff_050(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_generic_tiff(slide_dir / "tiff_050.tiff", 2048, 2048, mpp=0.5, seed=3)


@pytest.fixture(scope="session")
def tiff_pen(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_generic_tiff(
        slide_dir / "tiff_pen.tiff", 4096, 3072, mpp=0.5, seed=2, n_blobs=4, pen_marks=True
    )


@pytest.fixture(scope="session")
def no_mpp_tiff(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_no_mpp_tiff(slide_dir / "no_mpp.tiff", 2048, 2048, seed=11)


@pytest.fixture(scope="session")
def tiny_biopsy(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_tiny_biopsy(slide_dir / "tiny_biopsy.tiff", 1600, 1200, seed=12)


@pytest.fixture(scope="session")
def single_level_tiff(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_single_level_tiff(slide_dir / "single_level.tiff", 2048, 2048, seed=13)


@pytest.fixture(scope="session")
def blank_slide(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_blank_slide(slide_dir / "blank.tiff", 2048, 2048, seed=14)


@pytest.fixture(scope="session")
def suspicious_svs(slide_dir: Path) -> synthetic.SyntheticSlide:
    return synthetic.write_suspicious_mpp_svs(slide_dir / "suspicious.svs", 2048, 2048, seed=15)


@pytest.fixture(scope="session")
def not_a_slide(slide_dir: Path) -> Path:
    return synthetic.write_not_a_slide(slide_dir / "notes.svs")


@pytest.fixture(scope="session")
def truncated_tiff(slide_dir: Path) -> Path:
    return synthetic.write_truncated_tiff(slide_dir / "truncated.tiff", 2048, 2048, seed=16)


@pytest.fixture(scope="session")
def corrupt_tile_slide(slide_dir: Path) -> tuple[synthetic.SyntheticSlide, tuple[int, int]]:
    return synthetic.write_corrupt_tile_slide(slide_dir / "corrupt_l0.tiff", 2048, 2048, seed=17)


@pytest.fixture(scope="session")
def corrupt_lowres_slide(slide_dir: Path) -> synthetic.SyntheticSlide:
    # 2048 px at 0.5 µm/px: the tiler segments on level 2 (512 px, one tile); garble that tile.
    slide, _ = synthetic.write_corrupt_tile_slide(
        slide_dir / "corrupt_lowres.tiff", 2048, 2048, level=2, tile_index=0, seed=18
    )
    return slide
