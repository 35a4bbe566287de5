"""The bad-input corpus: every kind of bad input, through the real ``hipt`` command in subprocesses.

Each case is one row of :data:`CASES`: an id, the command it goes to, how to make the bad input,
the expected exit code and a regex of the one line that names the file or value (``{subject}``)
and the problem. Per case the test asserts that exit code, that line, no traceback and, for the
batch commands, that the good inputs beside it finished and the earlier outputs are unchanged.

Cheap by design: the bad slides sit in one folder with good slides and one ``hipt tile`` run
covers them all; one ``hipt embed`` run covers the bad tiles files and one ``hipt inspect`` run
the bad HDF5 files. Usage errors and ``hipt train`` refusals each run as their own subprocess,
two at a time, against output folders that earlier good runs filled (hashed before and after).
The encoders are random and one block deep (``--random-weights --random-depth 1,1``).

Faults that need more than a bad input are tested where their concern lives:

- full disk (a small tmpfs, when the tests run as root): ``test_embed_faults.py``
  ``::test_disk_full_says_which_file_exits_1_and_keeps_earlier_files`` and
  ``::test_every_command_reports_a_full_disk_in_one_line``;
- SIGTERM: ``test_cli_tile.py::test_sigterm_stops_workers_and_records_what_finished``,
  ``test_embed_faults.py::test_sigterm_stops_workers_drops_temporaries_and_exits_143``,
  ``test_train_signals.py``, ``test_dino_train.py``;
- a killed worker or run: ``test_cli_tile.py::test_a_killed_worker_fails_only_its_slide``,
  ``test_embed_kill.py``, ``test_dino_train.py::test_killed_and_resumed_run_is_bit_identical...``;
- two runs on one output folder: ``test_embed_faults.py::test_two_runs_started_together_share_the_work``
  and ``::test_locks_of_dead_runs_are_taken_over_and_live_ones_left_alone``;
- the huge claimed size under a memory limit: ``test_cli_tile.py``
  ``::test_huge_claimed_size_fails_that_slide_only``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from h5_inputs import flip_a_byte, tiles_for

from hipt import synthetic
from hipt.synthetic.cohorts import make_subtyping_cohort

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
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


def hipt(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hipt.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (minus names in ``skip``), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name not in skip
    }


def matching(text: str, pattern: re.Pattern[str]) -> list[str]:
    return [ln for ln in text.splitlines() if pattern.search(ln)]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


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


# ---------------------------------------------------- usage errors and refusals, one run each
def _tile_flag(flag: str, value: str) -> Callable[[Any], tuple[list, str]]:
    return lambda u: ([u.slide, "--out", u.tile_out, flag, value], value)


def _tile_out_file(u: Any) -> tuple[list, Path]:
    return [u.slide, "--out", u.a_file / "out"], u.a_file / "out"


def _embed_args(u: Any, *extra: object, out: Path | None = None) -> list:
    return ["--tiles", u.good_tiles, "--out", out or u.embed_out, *extra]


def _weights(name: str, content: bytes | None) -> Callable[[Any], tuple[list, Path]]:
    def make(u: Any) -> tuple[list, Path]:
        path = u.root / name
        if content is not None:
            path.write_bytes(content)
        cpu = ["--device", "cpu", "--workers", "0"]
        return _embed_args(u, "--vit256", path, "--vit4k", path, *cpu), path

    return make


class RunsCode:
    """Pickled, it calls ``os.system``: a checkpoint that would run code if unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _pickled_weights(u: Any) -> tuple[list, Path]:
    import torch

    path = u.root / "evil.pth"
    # If it ran, the earlier embedding output would hold a new file (its snapshot is compared).
    torch.save({"teacher": {}, "extra": RunsCode(f"touch {u.embed_out / 'code_ran'}")}, path)
    return _embed_args(u, "--vit256", path, "--vit4k", path, "--device", "cpu"), path


def _embed_out_file(u: Any) -> tuple[list, Path]:
    return _embed_args(u, *FAST, out=u.a_file), u.a_file


def _embed_out_holding_features_file(u: Any) -> tuple[list, Path]:
    out = u.root / "out_with_file"
    out.mkdir()
    (out / "features").write_text("a file where the features folder goes\n")
    return _embed_args(u, *FAST, out=out), out


def _empty_tiles_folder(u: Any) -> tuple[list, Path]:
    tiles = u.root / "no_tiles"
    tiles.mkdir()
    return ["--tiles", tiles, "--out", u.embed_out, *FAST], tiles


def _train(name: str, subject: Any = None, **config: Any) -> Callable[[Any], tuple[list, Any]]:
    """``hipt train`` with the good config changed by ``config`` (``None`` drops a key)."""

    def make(u: Any) -> tuple[list, Any]:
        cfg = {**u.train_config, **{k: v(u) if callable(v) else v for k, v in config.items()}}
        cfg = {k: v for k, v in cfg.items() if v is not None}
        path = u.train_root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        value = subject(u) if callable(subject) else subject
        return ["--config", path, "--out", u.runs], value

    return make


def _train_args(*extra: str) -> Callable[[Any], tuple[list, str]]:
    def make(u: Any) -> tuple[list, str]:
        args, _ = _train("good_again")(u)
        return [*args, *extra], extra[-1]

    return make


def _cohort_csv(name: str, rows: Callable[[Any], str], encoding: str = "utf-8"):
    """A cohort CSV beside the good one (the good rows, changed by ``rows``)."""

    def make(u: Any) -> tuple[list, Path]:
        path = u.train_root / f"{name}.csv"
        path.write_bytes(rows(u).encode(encoding))
        args, _ = _train(name, csv=str(path), cohort="good")(u)
        return args, path

    return make


def _good_rows(u: Any) -> str:
    rows = u.cohort.table
    return "slide_id,case_id,label\n" + "".join(
        f"{r['slide_id']},{r['case_id']},{r['label']}\n" for r in rows
    )


def _hidden_case(u: Any) -> str:
    r = u.cohort.table[0]
    return f"slide_id,case_id,label\n{r['slide_id']},.hidden,{r['label']}\n"


def _broken_features(u: Any) -> tuple[list, Path]:
    feats = u.train_root / "features_broken"
    shutil.copytree(u.cohort.features_dir, feats)
    bad = feats / f"{u.cohort.table[1]['slide_id']}.h5"
    bad.write_bytes(b"not hdf5")
    args, _ = _train("broken_features", features_dir=str(feats))(u)
    return args, bad


def _abs_cohort(u: Any) -> str:
    return str(u.train_root / "abs")


def _bad_yaml(u: Any) -> tuple[list, Path]:
    path = u.train_root / "broken.yaml"
    path.write_text("cohort: [unclosed\n")
    return ["--config", path, "--out", u.runs], path


ARGPARSE = r"^hipt {cmd}: error: argument {flag}: "
TILE_USAGE = [
    Case("tile-target-mpp-inf", "tile", False, _tile_flag("--target-mpp", "inf"), 2,
         ARGPARSE.format(cmd="tile", flag="--target-mpp") + r"must be a positive finite number, got {subject}$"),
    Case("tile-target-mpp-tiny", "tile", False, _tile_flag("--target-mpp", "1e-9"), 2,
         ARGPARSE.format(cmd="tile", flag="--target-mpp") + r"{subject} µm/px is implausible"),
    Case("tile-target-mpp-text", "tile", False, _tile_flag("--target-mpp", "half"), 2,
         ARGPARSE.format(cmd="tile", flag="--target-mpp") + r"must be a number, got '{subject}'"),
    Case("tile-mpp-1e-300", "tile", False, _tile_flag("--mpp", "1e-300"), 2,
         ARGPARSE.format(cmd="tile", flag="--mpp") + r"{subject} µm/px is implausible"),
    Case("tile-mpp-1000", "tile", False, _tile_flag("--mpp", "1000"), 2,
         ARGPARSE.format(cmd="tile", flag="--mpp") + r"{subject} µm/px is implausible"),
    Case("tile-mpp-nan", "tile", False, _tile_flag("--mpp", "nan"), 2,
         ARGPARSE.format(cmd="tile", flag="--mpp") + r"must be a positive finite number, got {subject}$"),
    Case("tile-region-px-1", "tile", False, _tile_flag("--region-px", "1"), 2,
         ARGPARSE.format(cmd="tile", flag="--region-px") + r"must be a positive multiple of the 256 px patch, got {subject}$"),
    Case("tile-region-px-0", "tile", False, _tile_flag("--region-px", "0"), 2,
         ARGPARSE.format(cmd="tile", flag="--region-px") + r"must be a positive integer, got {subject}$"),
    Case("tile-min-tissue-2", "tile", False, _tile_flag("--min-tissue", "2"), 2,
         ARGPARSE.format(cmd="tile", flag="--min-tissue") + r"must be in \[0, 1\], got {subject}$"),
    Case("tile-seg-mpp-negative", "tile", False, _tile_flag("--seg-mpp", "-8"), 2,
         ARGPARSE.format(cmd="tile", flag="--seg-mpp") + r"must be a positive finite number, got {subject}$"),
    Case("tile-max-slide-px-0", "tile", False, _tile_flag("--max-slide-px", "0"), 2,
         ARGPARSE.format(cmd="tile", flag="--max-slide-px") + r"must be a positive integer, got {subject}$"),
    Case("tile-shard-out-of-range", "tile", False, _tile_flag("--shard", "3/2"), 2,
         r"^hipt tile: shard '{subject}': need N >= 1 and 0 <= I < N$"),
    Case("tile-out-under-a-file", "tile", False, _tile_out_file, 2,
         r"^hipt tile: {subject}: output folder is not writable"),
]  # fmt: skip
EMBED_USAGE = [
    Case("embed-out-is-a-file", "embed", False, _embed_out_file, 2,
         r"^hipt embed: error: --out {subject}: is a file; pass a folder"),
    Case("embed-out-holds-features-file", "embed", False, _embed_out_holding_features_file, 2,
         r"^hipt embed: error: --out {subject}: .*features is a file, not the features folder"),
    Case("embed-weights-text", "embed", False, _weights("text.pth", b"not a checkpoint\n"), 2,
         r"^hipt embed: error: .*{subject}: not a torch checkpoint \(a text"),
    Case("embed-weights-empty", "embed", False, _weights("empty.pth", b""), 2,
         r"^hipt embed: error: .*{subject}: an empty file \(0 bytes\)"),
    Case("embed-weights-missing", "embed", False, _weights("nowhere.pth", None), 2,
         r"^hipt embed: error: --vit256 {subject}: no such weights file$"),
    Case("embed-weights-pickled-code", "embed", False, _pickled_weights, 2,
         r"^hipt embed: error: .*{subject}: refused: it pickles posix\.system"),
    Case("embed-tiles-empty-folder", "embed", False, _empty_tiles_folder, 2,
         r"^hipt embed: error: --tiles {subject}: no tiles files \(\*\.h5\)"),
]  # fmt: skip
TRAIN_USAGE = [
    Case("train-cohort-dotdot", "train", False, _train("dotdot", "../../../x", cohort="../../../x"), 2,
         r"^hipt train: invalid config: cohort '{subject}': a name that becomes a file or folder name"),
    Case("train-cohort-absolute", "train", False,
         _train("absolute", _abs_cohort, cohort=_abs_cohort), 2,
         r"^hipt train: invalid config: cohort '{subject}': a name that becomes a file or folder name"),
    Case("train-csv-name-hidden", "train", False,
         _train("csv_name", ".hidden", cohort=None, csv=lambda u: str(u.train_root / ".hidden.csv")), 2,
         r"^hipt train: invalid config: .*cohort \(the CSV's name\) '{subject}': a name that becomes"),
    Case("train-slide-id-escapes", "train", False,
         _cohort_csv("slide_escape", lambda u: _good_rows(u) + "../outside,TCGA-A1-0000,A\n"), 2,
         r"^\s*row \d+: slide_id='\.\./outside', case_id='TCGA-A1-0000'$"),
    Case("train-case-id-hidden", "train", False,
         _cohort_csv("case_hidden", _hidden_case), 2,
         r"^\s*row 2: slide_id='TCGA-A1-0000-00', case_id='\.hidden'$"),
    Case("train-csv-not-utf8", "train", False,
         _cohort_csv("latin1", lambda u: _good_rows(u) + "extra,Ramón,A\n", "latin-1"), 2,
         r"^hipt train: {subject}: not UTF-8 text \(byte 0xf3 on line \d+\)"),
    Case("train-features-not-hdf5", "train", False, _broken_features, 2,
         r"^\s*row 3: slide_id='[^']+': {subject}: not a readable HDF5 file"),
    Case("train-lr-text", "train", False, _train_args("--set", "train.lr=fast"), 2,
         r"^hipt train: invalid config: train\.lr = 'fast': Input should be a valid number"),
    Case("train-config-not-yaml", "train", False, _bad_yaml, 2, r"^hipt train: .*{subject}"),
]  # fmt: skip
USAGE = TILE_USAGE + EMBED_USAGE + TRAIN_USAGE
CASES = TILE_BATCH + EMBED_BATCH + INSPECT_BATCH + USAGE


def test_every_case_has_its_own_id_and_every_command_a_case() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c.command for c in CASES} == {"tile", "embed", "inspect", "train"}


# --------------------------------------------------------------------------------- the runs
def _said(case: Case, run: subprocess.CompletedProcess, subject: object) -> None:
    """The exit code, exactly one line naming the subject and the problem, no traceback."""
    both = run.stdout + "\n" + run.stderr
    assert run.returncode == case.code, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    assert "weights_only=False" not in both  # never advice to load pickles
    lines = matching(both, case.pattern(subject))
    assert len(lines) == 1, (case.line, subject, both[-3000:])


def _unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    assert {k: after.get(k) for k in before} == before


@pytest.fixture(scope="module")
def tile_batch(
    tmp_path_factory, tiff_050, tiny_biopsy, not_a_slide, truncated_tiff, no_mpp_tiff,
    suspicious_svs, blank_slide, corrupt_lowres_slide,
) -> SimpleNamespace:  # fmt: skip
    """Good slides tiled once; then the bad ones added to their folder and the folder tiled again."""
    root = tmp_path_factory.mktemp("tile_batch")
    fixtures = SimpleNamespace(
        not_a_slide=not_a_slide, truncated_tiff=truncated_tiff, no_mpp_tiff=no_mpp_tiff.path,
        suspicious_svs=suspicious_svs.path, blank_slide=blank_slide.path,
        corrupt_lowres_slide=corrupt_lowres_slide.path, tiny_biopsy=tiny_biopsy.path,
    )  # fmt: skip
    b = SimpleNamespace(root=root, slides=root / "slides", out=root / "out", fixtures=fixtures)
    b.extra = []
    b.slides.mkdir()
    shutil.copy(tiff_050.path, b.slides / "good_a.tiff")
    first = hipt("tile", b.slides, "--out", b.out, "--no-progress")
    assert first.returncode == 0, first.stderr
    b.earlier = snapshot(b.out, skip=("tiling.csv",))
    shutil.copy(tiny_biopsy.path, b.slides / "good_b.tiff")
    b.subjects = {c.id: c.make(b) for c in TILE_BATCH}
    b.run = hipt("tile", b.slides, *b.extra, "--out", b.out, "--no-progress")
    b.rows = read_rows(b.out / "tiling.csv")
    b.after = snapshot(b.out, skip=("tiling.csv",))
    return b


@pytest.mark.parametrize("case", TILE_BATCH, ids=lambda c: c.id)
def test_tile_batch(case: Case, tile_batch: SimpleNamespace) -> None:
    b = tile_batch
    subject = b.subjects[case.id]
    _said(case, b.run, subject)
    rows = [r for r in b.rows if r["slide_path"] == str(subject)]
    if case.status is None:
        assert len(rows) == 1  # reported, but no second row beside the slide's own
    else:
        assert [r["status"] for r in rows] == [case.status], rows
        assert str(subject) in rows[0]["error"]
        tiled = (b.out / "tiles" / f"{rows[0]['slide_id']}.h5").exists()
        assert tiled == (case.status == "ok") or case.id == "tile-id-taken"  # good_b's own file
    status = {r["slide_path"]: r["status"] for r in b.rows}
    assert status[str(b.slides / "good_a.tiff")] == "skipped"  # tiled by the first run
    assert status[str(b.slides / "good_b.tiff")] == "ok"  # the batch went on
    assert (b.out / "tiles" / "good_b.h5").is_file() and (b.out / "qc" / "good_b.png").is_file()
    _unchanged(b.earlier, b.after)


@pytest.fixture(scope="module")
def embed_batch(tmp_path_factory, tiff_050) -> SimpleNamespace:
    """Two slides embedded once; then bad tiles files added and one features file damaged."""
    root = tmp_path_factory.mktemp("embed_batch")
    b = SimpleNamespace(root=root, tiles=root / "tiles", out=root / "out")
    b.tiles.mkdir()
    b.slide = Path(shutil.copy(tiff_050.path, root / "slide.tiff"))
    for sid in ("e_good", "e_flip"):
        tiles_for(b.tiles, sid, b.slide, **SMALL)
    first = hipt("embed", "--tiles", b.tiles, "--out", b.out, *FAST, "--no-progress")
    assert first.returncode == 0, first.stderr
    b.earlier = snapshot(b.out / "features", skip=("e_flip.h5",))
    b.subjects = {c.id: c.make(b) for c in EMBED_BATCH}
    b.run = hipt("embed", "--tiles", b.tiles, "--out", b.out, *FAST)  # progress: says 'redoing'
    b.rows = {r["slide_id"]: r for r in read_rows(b.out / "embedding.csv")}
    b.after = snapshot(b.out / "features")
    return b


@pytest.mark.parametrize("case", EMBED_BATCH, ids=lambda c: c.id)
def test_embed_batch(case: Case, embed_batch: SimpleNamespace) -> None:
    b = embed_batch
    subject = b.subjects[case.id]
    _said(case, b.run, subject)
    row = b.rows[subject.stem]
    assert row["status"] == case.status, row
    if case.status == "failed":
        assert str(subject) in row["error"]
        assert not (b.out / "features" / f"{subject.stem}.h5").exists()
    # The batch went on: the damaged e_flip was embedded again (each region costs seconds of
    # CPU, so it is the one good slide this run embeds), e_good was reused as it was.
    assert b.rows["e_flip"]["status"] == "ok" and b.rows["e_good"]["status"] == "skipped"
    assert "e_flip.h5" in b.after
    _unchanged(b.earlier, b.after)


@pytest.fixture(scope="module")
def inspect_batch(tmp_path_factory, embed_batch) -> SimpleNamespace:
    """A good tiles and a good features file of the embed batch, and the bad files beside them."""
    folder = tmp_path_factory.mktemp("inspect_batch")
    b = SimpleNamespace(folder=folder)
    b.good_tiles = Path(shutil.copy(embed_batch.tiles / "e_good.h5", folder / "tiles.h5"))
    features = embed_batch.out / "features" / "e_good.h5"
    b.good_features = Path(shutil.copy(features, folder / "features.h5"))
    b.subjects = {c.id: c.make(b) for c in INSPECT_BATCH}
    b.earlier = snapshot(folder)
    files = [b.good_tiles, b.good_features, *b.subjects.values()]
    b.run = hipt("inspect", "--check-values", *files)
    b.after = snapshot(folder)
    return b


@pytest.mark.parametrize("case", INSPECT_BATCH, ids=lambda c: c.id)
def test_inspect_batch(case: Case, inspect_batch: SimpleNamespace) -> None:
    b = inspect_batch
    subject = b.subjects[case.id]
    _said(case, b.run, subject)
    reports = b.run.stdout.split("\n\n")
    mine = [r for r in reports if r.startswith(f"file:     {subject}\n")]
    assert len(mine) == 1 and "valid:    NO: " in mine[0]
    for good in (b.good_tiles, b.good_features):  # the other files were described too
        ok = [r for r in reports if r.startswith(f"file:     {good}\n")]
        assert len(ok) == 1 and ok[0].rstrip().endswith("valid:    yes")
    _unchanged(b.earlier, b.after)


@pytest.fixture(scope="module")
def usage_runs(tmp_path_factory, tile_batch, embed_batch) -> SimpleNamespace:
    """Every usage case as its own run, two at a time, against folders earlier runs filled."""
    root = tmp_path_factory.mktemp("usage")
    u = SimpleNamespace(root=root, slide=tile_batch.slides / "good_a.tiff", tile_out=tile_batch.out)
    u.a_file = root / "a_file"
    u.a_file.write_text("a file, not a folder\n")
    u.good_tiles = root / "good_tiles"
    u.good_tiles.mkdir()
    shutil.copy(embed_batch.tiles / "e_good.h5", u.good_tiles)
    u.embed_out = embed_batch.out
    _train_good_run(u, tmp_path_factory.mktemp("train"))
    made = {c.id: c.make(u) for c in USAGE}
    watched = (u.tile_out, u.embed_out, u.train_root, u.a_file.parent)
    u.before = [snapshot(w) for w in watched]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: import time is most of each run
        runs = pool.map(lambda c: hipt(c.command, *made[c.id][0]), USAGE)
        u.runs_by_id = {c.id: (run, made[c.id][1]) for c, run in zip(USAGE, runs, strict=True)}
    u.after = [snapshot(w) for w in watched]
    return u


def _train_good_run(u: Any, train_root: Path) -> None:
    """A finished tiny ``hipt train`` run in ``u.runs``: the earlier output the refusals must keep."""
    u.train_root = train_root / "deep" / "er"  # so '../../../x' from runs/ stays inside
    u.cohort = make_subtyping_cohort(u.train_root / "cohort", n_cases=8, regions=(2, 3), seed=0)
    u.runs = u.train_root / "runs"
    u.train_config = {
        "cohort": "good",
        "csv": str(u.cohort.csv_path),
        "features_dir": str(u.cohort.features_dir),
        "model": {"name": "abmil", "kwargs": {"hidden_dim": 8}},
        "splits": {"folds": 2},
        "train": {"epochs": 1, "progress": False},
    }
    args, _ = _train("good")(u)
    good = hipt("train", *args)
    assert good.returncode == 0, good.stderr
    assert (u.runs / "good" / "fold_1" / "metrics.json").is_file()
    u.train_root = train_root  # watched as a whole: nothing may appear anywhere in it


@pytest.mark.parametrize("case", USAGE, ids=lambda c: c.id)
def test_usage(case: Case, usage_runs: SimpleNamespace) -> None:
    run, subject = usage_runs.runs_by_id[case.id]
    _said(case, run, subject)
    for before, after in zip(usage_runs.before, usage_runs.after, strict=True):
        assert after == before  # no output written, no earlier output changed
