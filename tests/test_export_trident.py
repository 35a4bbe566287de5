"""``hipt export trident``: every dataset and attr TRIDENT's loaders read, through the real CLI.

What TRIDENT reads (mahmoodlab/TRIDENT, ``trident/IO.py`` and ``trident/wsi_objects/WSI.py``):
the coordinate file ``patches/<id>_patches.h5`` is read by ``read_coords`` (``coords`` and its
attrs), then ``patch_size``, ``level0_magnification`` and ``target_magnification`` build its
patcher (a missing one sends it to the CLAM fallback); ``overlap`` and ``name`` are read for
display and naming. Slide encoders read ``features`` and ``coords`` of
``features_<encoder>/<id>.h5`` and ``coords.attrs["patch_size_level0"]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from hipt.h5schema import FeaturesWriter, write_tiles

TILES = dict(
    slide_path="slides/s.svs", slide_size=[20000, 12000], mpp_level0=0.25,
    mpp_source="openslide.mpp-x", target_mpp=0.5, region_size=4096, region_size_level0=8192,
    read_level=1, region_size_read_level=4096, patch_size=256, token_size=16,
)  # fmt: skip
FEATURES = dict(target_mpp=0.5, vit256_sha256="a" * 64, vit4k_sha256="b" * 64,
                mean=[0.5] * 3, std=[0.5] * 3, hipt_version="0.1.0")  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "hipt.cli", "export", *args],
                          capture_output=True, text=True, env=env)  # fmt: skip


def test_trident_layout_holds_what_its_loaders_read(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [8192, 0], [0, 8192]], np.int64)
    region = np.arange(3 * 192, dtype=np.float32).reshape(3, 192)
    for sid in ("s1", "s2"):
        write_tiles(tmp_path / "tiles" / f"{sid}.h5", coords, np.ones(3), dict(TILES, slide_id=sid))
    with FeaturesWriter(
        tmp_path / "features" / "s1.h5", coords, dict(FEATURES, slide_id="s1")
    ) as w:
        w.write(0, np.zeros((3, 256, 384)), region)
    out = tmp_path / "trident"
    run = _cli("trident", "--tiles", str(tmp_path / "tiles"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "exported 2 slide(s)" in run.stderr and "(1 with features)" in run.stderr

    with h5py.File(out / "patches" / "s1_patches.h5") as f:
        np.testing.assert_array_equal(f["coords"][()], coords)
        a = dict(f["coords"].attrs)
    assert a["patch_size"] == 4096  # TRIDENT: the patch side at the target magnification
    assert a["patch_size_level0"] == 8192
    assert (a["level0_magnification"], a["target_magnification"]) == (40, 20)
    assert a["overlap"] == 0 and a["name"] == "s1"
    assert (a["level0_width"], a["level0_height"]) == (20000, 12000)
    # TRIDENT's patcher: pixel size = 10 / magnification, level-0 side = round(size * ratio);
    # its writer: patch_size_level0 = patch_size * src_mag // target_mag. Both give hipt's.
    ratio = (10 / a["target_magnification"]) / (10 / a["level0_magnification"])
    assert round(a["patch_size"] * ratio) == 8192
    assert a["patch_size"] * a["level0_magnification"] // a["target_magnification"] == 8192

    with h5py.File(out / "features_hipt_vit4k" / "s1.h5") as f:
        np.testing.assert_array_equal(f["features"][()], region)
        np.testing.assert_array_equal(f["coords"][()], coords)
        assert int(f["coords"].attrs["patch_size_level0"]) == 8192
        assert f["features"].attrs["encoder"] == "hipt_vit4k"
    assert (out / "patches" / "s2_patches.h5").exists()
    assert not (out / "features_hipt_vit4k" / "s2.h5").exists()  # s2 was never embedded
    with h5py.File(tmp_path / "tiles" / "s1.h5") as f:  # the tiles file keeps CLAM's meaning
        assert f["coords"].attrs["patch_size"] == 4096 and f["coords"].attrs["patch_level"] == 1


def test_export_of_nothing_is_an_error(tmp_path: Path) -> None:
    run = _cli("trident", "--tiles", str(tmp_path), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "no tiles files" in run.stderr and "Traceback" not in run.stderr
