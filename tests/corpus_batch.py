"""The batch half of the bad-input corpus: bad slides, tiles files and HDF5 files, and what
``hipt tile``, ``hipt embed`` and ``hipt inspect`` must say about each (see
``test_bad_input_corpus.py``).

A maker gets the batch (its folders and good inputs) and returns the subject: the path the line
must name.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5_inputs import flip_a_byte, tiles_for

from hipt import synthetic

FAST = ["--random-weights", "--random-depth", "1,1", "--device", "cpu", "--workers", "0"]


@dataclass(frozen=True)
class Case:
    """One bad input: where it goes, how it is made, and what the command must say."""

    id: str
    command: str  # tile | embed | inspect | train
    batch: bool  # made inside the command's shared batch run (True) or run on its own
    make: Callable[[Any], Any]  # batch: returns the subject; own run: (arguments, subject)
    code: int  # the exit code of the run
    line: str  # regex of the one line; {subject} stands for the file or value, escaped
    status: str | None = "failed"  # batch: the record's status for it (None: no row of its own)

    def pattern(self, subject: object) -> re.Pattern[str]:
        return re.compile(self.line.replace("{subject}", re.escape(str(subject))))


# ------------------------------------------------------------------------- makers: hipt tile
def _fixture_copy(attr: str, name: str) -> Callable[[Any], Path]:
    return lambda b: Path(shutil.copy(getattr(b.fixtures, attr), b.slides / name))


def _tiff_with_mpp(mpp: float) -> Callable[[Any], Path]:
    # Resolution tags saying `mpp`; the tissue is drawn at a real scale (it is never looked at).
    def make(b: Any) -> Path:
        model = synthetic.TissueModel(width_um=256, height_um=256, seed=1)
        name = f"tags_{mpp:g}.tiff".replace("+", "")
        return synthetic.write_generic_tiff(b.slides / name, 512, 512, mpp=mpp, model=model).path

    return make


def _svs_with_mpp(mpp: float, name: str) -> Callable[[Any], Path]:
    # An SVS at 0.5 µm/px (AppMag 20) whose description records MPP = `mpp`.
    def make(b: Any) -> Path:
        path = b.slides / f"{name}.svs"
        synthetic.write_svs(path, 1024, 1024, mpp=0.5, app_mag=20, description_mpp=mpp, seed=4)
        return path

    return make


def _huge(width_px: int) -> Callable[[Any], Path]:
    return lambda b: synthetic.write_huge_claim_tiff(
        b.slides / f"huge_{width_px}.tiff", width_px, width_px, mpp=0.5
    )


def _coarse_scan(b: Any) -> Path:
    return synthetic.write_generic_tiff(b.slides / "coarse.tiff", 512, 512, mpp=2.0, seed=6).path


def _empty_file(b: Any) -> Path:
    path = b.slides / "empty.svs"
    path.write_bytes(b"")
    return path


def _folder_named_like_a_slide(b: Any) -> Path:
    path = b.slides / "folder.svs"
    path.mkdir()
    return path


def _dangling(b: Any) -> Path:
    path = b.slides / "dangling.tiff"
    path.symlink_to(b.root / "gone.tiff")
    return path


def _loop(b: Any) -> Path:
    path = b.slides / "loop.tiff"
    path.symlink_to(path)
    return path


def _fifo(b: Any) -> Path:
    path = b.slides / "fifo.svs"
    os.mkfifo(path)
    return path


def _id_taken(b: Any) -> Path:
    # Another slide whose file name gives the id of a good slide, from a second folder.
    other = b.root / "other"
    other.mkdir()
    path = synthetic.write_tiny_biopsy(other / "good_b.tiff", 800, 600, seed=7).path
    b.extra.append(path)
    return path


def _given_twice(b: Any) -> Path:
    b.extra.append(b.slides / "good_b.tiff")
    return b.slides / "good_b.tiff"


def _missing_input(b: Any) -> Path:
    b.extra.append(b.root / "nowhere.svs")
    return b.root / "nowhere.svs"


def _empty_folder_input(b: Any) -> Path:
    (b.root / "empty_dir").mkdir()
    b.extra.append(b.root / "empty_dir")
    return b.root / "empty_dir"


FAILED = r"^failed: {subject}: "
NOTED = r"^  \S+: {subject}: "
WARNED = r"^warning: {subject}: "
TILE_BATCH = [
    Case("tile-not-a-slide", "tile", True, _fixture_copy("not_a_slide", "notes.svs"), 1,
         FAILED + r".*not a slide"),
    Case("tile-empty-file", "tile", True, _empty_file, 1, FAILED + r".*(empty|not a slide)"),
    Case("tile-truncated", "tile", True, _fixture_copy("truncated_tiff", "truncated.tiff"), 1,
         FAILED + r".*truncated"),
    Case("tile-no-mpp", "tile", True, _fixture_copy("no_mpp_tiff", "no_mpp.tiff"), 1,
         FAILED + r"no µm/px in its metadata.*pass --mpp"),
    Case("tile-tiff-mpp-5000", "tile", True, _tiff_with_mpp(5000), 1,
         FAILED + r"no plausible µm/px in its metadata: .*5000 µm/px is implausible"),
    Case("tile-tiff-mpp-1e-5", "tile", True, _tiff_with_mpp(1e-5), 1,
         FAILED + r"no plausible µm/px in its metadata: .*1e-05 µm/px is implausible"),
    Case("tile-tiff-mpp-352.8", "tile", True, _tiff_with_mpp(352.8), 1,
         FAILED + r"no plausible µm/px in its metadata: .*352.8 µm/px is implausible"),
    Case("tile-svs-mpp-0", "tile", True, _svs_with_mpp(0, "svs_mpp_0"), 1,
         WARNED + r"µm/px 0.5 guessed from the objective power 20x alone \(.*mpp-x = 0 is not a "
         r"positive number", status="ok"),
    Case("tile-svs-mpp-negative", "tile", True, _svs_with_mpp(-0.5, "svs_mpp_neg"), 1,
         WARNED + r"µm/px 0.5 guessed from the objective power 20x alone \(.*-0.5", status="ok"),
    Case("tile-svs-mpp-absurd", "tile", True, _svs_with_mpp(1e6, "svs_mpp_huge"), 1,
         WARNED + r"µm/px 0.5 guessed from the objective power 20x alone \(.*1e\+06 µm/px is "
         r"implausible", status="ok"),
    Case("tile-suspicious-mpp", "tile", True, _fixture_copy("suspicious_svs", "suspicious.svs"),
         1, FAILED + r"suspicious µm/px: 0.25 .* objective power 10x.*--trust-metadata"),
    Case("tile-coarse-scan", "tile", True, _coarse_scan, 1,
         FAILED + r"the scan is 2 µm/px, coarser than --target-mpp 0.5.*--allow-upsampling"),
    Case("tile-blank", "tile", True, _fixture_copy("blank_slide", "blank.tiff"), 1,
         FAILED + r".*no tissue found"),
    Case("tile-corrupt-lowres-level", "tile", True,
         _fixture_copy("corrupt_lowres_slide", "corrupt_lowres.tiff"), 1,
         WARNED + r".*cannot be decoded", status="ok"),
    Case("tile-huge-over-limit", "tile", True, _huge(300_000), 1,
         FAILED + r"claims 300000x300000 px \(90.0 gigapixels\), over the limit .*--max-slide-px"),
    Case("tile-huge-small-file", "tile", True, _huge(100_000), 1,
         FAILED + r"claims 100000x100000 px but the file holds only \d+ bytes.*cannot be this "
         r"small"),
    Case("tile-hidden-name", "tile", True, _fixture_copy("tiny_biopsy", ".hidden.tiff"), 1,
         FAILED + r"slide id '\.hidden': .*rename the file"),
    Case("tile-dotdot-name", "tile", True, _fixture_copy("tiny_biopsy", "..tiff"), 1,
         FAILED + r"slide id '\.': .*rename the file"),
    Case("tile-id-taken", "tile", True, _id_taken, 1,
         FAILED + r"slide id 'good_b' is already used by .*good_b.tiff; rename one of them"),
    Case("tile-missing-input", "tile", True, _missing_input, 1, FAILED + r"no such file or folder"),
    Case("tile-empty-folder", "tile", True, _empty_folder_input, 1,
         FAILED + r"folder holds no slides"),
    Case("tile-given-twice", "tile", True, _given_twice, 1,
         NOTED + r"same slide given twice", status=None),
    Case("tile-folder-named-like-a-slide", "tile", True, _folder_named_like_a_slide, 1,
         NOTED + r"a folder named like a slide, not processed", status="not_processed"),
    Case("tile-dangling-symlink", "tile", True, _dangling, 1,
         NOTED + r"dangling symlink, not processed", status="not_processed"),
    Case("tile-symlink-loop", "tile", True, _loop, 1,
         NOTED + r"symlink loop, not processed", status="not_processed"),
    Case("tile-fifo", "tile", True, _fifo, 1,
         NOTED + r"not a regular file, not processed", status="not_processed"),
]  # fmt: skip


# ------------------------------------------------------------------------ makers: hipt embed
SMALL = dict(slide_size=[2048, 2048])  # the good slide of the embed batch is 2048² px


def _tiles(sid: str, **attrs: Any) -> Callable[[Any], Path]:
    return lambda b: tiles_for(b.tiles, sid, b.slide, **{**SMALL, **attrs})


def _retyped(sid: str, key: str, value: Any) -> Callable[[Any], Path]:
    def make(b: Any) -> Path:
        path = tiles_for(b.tiles, sid, b.slide, **SMALL)
        with h5py.File(path, "a") as f:
            f.attrs[key] = value
        return path

    return make


def _text_h5(b: Any) -> Path:
    path = b.tiles / "e_text.h5"
    path.write_text("not an HDF5 file\n")
    return path


def _truncated_tiles(b: Any) -> Path:
    path = tiles_for(b.tiles, "e_cut", b.slide, **SMALL)
    path.write_bytes(path.read_bytes()[:1500])
    return path


def _moved_slide(b: Any) -> Path:
    return tiles_for(b.tiles, "e_moved", b.root / "moved_away.tiff", **SMALL)


def _damaged_features(b: Any) -> Path:
    # The features file of an earlier run took a bit flip: found by the checksums, redone.
    path = b.out / "features" / "e_flip.h5"
    flip_a_byte(path, "region_features")
    return path


def _replaced_slide(b: Any) -> Path:
    return tiles_for(b.tiles, "e_replaced", b.slide, slide_file_bytes=123, **SMALL)


EMBED_FAILED = r"^\S+: FAILED: {subject}"
EMBED_BATCH = [
    Case("embed-attr-typed", "embed", True, _retyped("e_typed", "target_mpp", "half"), 1,
         EMBED_FAILED + r": attr target_mpp is 'half'; expected a finite number > 0$"),
    Case("embed-mpp-zero", "embed", True, _retyped("e_mpp0", "mpp_level0", 0.0), 1,
         EMBED_FAILED + r": attr mpp_level0 is 0(\.0)?; expected a finite number > 0$"),
    Case("embed-mpp-nan", "embed", True, _retyped("e_mppnan", "mpp_level0", float("nan")), 1,
         EMBED_FAILED + r": attr mpp_level0 is nan; expected a finite number > 0$"),
    Case("embed-slide-size-typed", "embed", True, _retyped("e_size", "slide_size", [2048]), 1,
         EMBED_FAILED + r": attr slide_size is .*; expected a list of 2 integers"),
    Case("embed-read-level-negative", "embed", True, _retyped("e_level", "read_level", -1), 1,
         EMBED_FAILED + r": attr read_level is -1; expected an integer >= 0"),
    Case("embed-other-schema", "embed", True, _retyped("e_schema", "schema", "something/9"), 1,
         EMBED_FAILED + r": .*'something/9'"),
    Case("embed-id-differs", "embed", True, _retyped("e_id", "slide_id", "someone_else"), 1,
         EMBED_FAILED + r": slide_id attr 'someone_else' differs from the file name"),
    Case("embed-unsafe-id", "embed", True, _tiles("x..y"), 1,
         EMBED_FAILED + r": slide id 'x\.\.y'"),
    Case("embed-region-px", "embed", True, _tiles("e_2048", region_size=2048), 1,
         EMBED_FAILED + r": regions are 2048 px; hipt embed needs 4096 px"),
    Case("embed-not-hdf5", "embed", True, _text_h5, 1,
         EMBED_FAILED + r": not a readable HDF5 file"),
    Case("embed-truncated", "embed", True, _truncated_tiles, 1,
         EMBED_FAILED + r": not a readable HDF5 file"),
    Case("embed-region-outside", "embed", True, _tiles("e_out", coords=[(0, 0), (8192, 0)]), 1,
         EMBED_FAILED + r": region 1 at \[8192, 0\] lies outside the 2048x2048 px slide"),
    Case("embed-slide-replaced", "embed", True, _replaced_slide, 1,
         EMBED_FAILED + r": slide .* bytes, the tiled slide was 123 \(another slide"),
    Case("embed-slide-size-differs", "embed", True, _tiles("e_bigger", slide_size=[4096, 4096]), 1,
         EMBED_FAILED + r": slide .* is 2048x2048 px, the tiled slide was 4096x4096"),
    Case("embed-slide-missing", "embed", True, _moved_slide, 1,
         EMBED_FAILED + r": slide .*moved_away.tiff not found .*pass --slides DIR"),
    Case("embed-features-bit-flip", "embed", True, _damaged_features, 1,
         r"^e_flip: redoing e_flip.h5: {subject}: region_features rows? .*damaged", status="ok"),
]  # fmt: skip


# ---------------------------------------------------------------------- makers: hipt inspect
def _copy_of(kind: str, name: str, damage: Callable[[Path], None]) -> Callable[[Any], Path]:
    """A copy of the good tiles or features file, then ``damage`` done to it."""

    def make(b: Any) -> Path:
        path = Path(shutil.copy(getattr(b, f"good_{kind}"), b.folder / name))
        damage(path)
        return path

    return make


def _set_attr(key: str, value: Any) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with h5py.File(path, "a") as f:
            f.attrs[key] = value

    return damage


def _del_attr(key: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with h5py.File(path, "a") as f:
            del f.attrs[key]

    return damage


def _nan_region(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f["region_features"][0, 0] = np.nan


def _float64_regions(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        values = f["region_features"][()]
        del f["region_features"], f["features"]
        f["region_features"] = values.astype(np.float64)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:3000])


def _made(make: Callable[[Path], Path]) -> Callable[[Any], Path]:
    return lambda b: make(b.folder)


def _made_dir(folder: Path) -> Path:
    (folder / "a_folder").mkdir()
    return folder / "a_folder"


def _made_loop(folder: Path) -> Path:
    (folder / "loop.h5").symlink_to(folder / "loop.h5")
    return folder / "loop.h5"


def _made_dangling(folder: Path) -> Path:
    (folder / "dangling.h5").symlink_to(folder / "gone.h5")
    return folder / "dangling.h5"


def _made_text(folder: Path) -> Path:
    (folder / "text.h5").write_text("not an HDF5 file\n")
    return folder / "text.h5"


def _made_other_schema(folder: Path) -> Path:
    with h5py.File(folder / "other.h5", "w") as f:
        f.attrs["schema"] = "something/9"
        f["x"] = np.zeros(3)
    return folder / "other.h5"


INSPECTED = r"^error: {subject}: "
INSPECT_BATCH = [
    Case("inspect-directory", "inspect", True, _made(_made_dir), 1,
         INSPECTED + r"is a directory; pass the \.h5 files in it"),
    Case("inspect-symlink-loop", "inspect", True, _made(_made_loop), 1,
         INSPECTED + r"a symlink loop"),
    Case("inspect-dangling-symlink", "inspect", True, _made(_made_dangling), 1,
         INSPECTED + r"a dangling symlink"),
    Case("inspect-missing", "inspect", True, lambda b: b.folder / "nowhere.h5", 1,
         INSPECTED + r"no such file"),
    Case("inspect-not-hdf5", "inspect", True, _made(_made_text), 1,
         INSPECTED + r"not a readable HDF5 file"),
    Case("inspect-truncated", "inspect", True, _copy_of("features", "cut.h5", _cut), 1,
         INSPECTED + r"not a readable HDF5 file"),
    Case("inspect-other-schema", "inspect", True, _made(_made_other_schema), 1,
         INSPECTED + r".*'something/9'"),
    Case("inspect-bit-flip", "inspect", True,
         _copy_of("features", "flipped.h5", lambda p: flip_a_byte(p, "region_features")), 1,
         INSPECTED + r"region_features rows? .*damaged"),
    Case("inspect-nan", "inspect", True, _copy_of("features", "nan.h5", _nan_region), 1,
         INSPECTED + r"region_features row 0 holds NaN or inf"),
    Case("inspect-wrong-dtype", "inspect", True,
         _copy_of("features", "float64.h5", _float64_regions), 1,
         INSPECTED + r"region_features is float64, expected float32"),
    Case("inspect-attr-typed", "inspect", True,
         _copy_of("tiles", "typed.h5", _set_attr("target_mpp", "half")), 1,
         INSPECTED + r"attr target_mpp is 'half'; expected a finite number > 0$"),
    Case("inspect-mpp-zero", "inspect", True,
         _copy_of("tiles", "mpp0.h5", _set_attr("mpp_level0", 0.0)), 1,
         INSPECTED + r"attr mpp_level0 is 0(\.0)?; expected a finite number > 0$"),
    Case("inspect-attr-missing", "inspect", True,
         _copy_of("tiles", "noattr.h5", _del_attr("mpp_level0")), 1,
         INSPECTED + r"tiles attrs missing \['mpp_level0'\]"),
]  # fmt: skip
