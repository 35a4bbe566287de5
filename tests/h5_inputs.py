"""Tiles files written straight with :mod:`hipt.h5schema`, and damage done to HDF5 files on purpose.

Shared by the tests that feed ``hipt embed`` and ``hipt inspect`` bad files, so each test does not
carry its own copy.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from hipt.h5schema import write_tiles


def tiles_for(folder: Path, sid: str, slide: Path, coords=((0, 0),), **attrs) -> Path:
    """``folder/<sid>.h5``: 4096 px regions at 0.5 µm/px of a 4096² px ``slide``, at ``coords``.

    Keywords replace attrs (``slide_size=[2048, 2048]`` for a smaller slide, or a bad value).
    """
    base = dict(
        slide_id=sid, slide_path=str(slide), slide_size=[4096, 4096],
        slide_file_bytes=slide.stat().st_size if slide.exists() else 1, mpp_level0=0.5, mpp_source="openslide.mpp-x",
        target_mpp=0.5, region_size=4096, region_size_level0=4096, read_level=0,
        patch_size=256, token_size=16,
    )  # fmt: skip
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    return write_tiles(folder / f"{sid}.h5", coords, np.ones(len(coords)), dict(base, **attrs))


def flip_a_byte(path: Path, dataset: str, chunk: int = 0, offset: int | None = None) -> None:
    """Flip one bit in the stored bytes of ``dataset``'s ``chunk`` (at ``offset``, or its middle)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + (info.size // 2 if offset is None else offset))
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x10]))
