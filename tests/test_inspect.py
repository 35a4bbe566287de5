"""``hipt inspect``: describes tiles and features files and rejects broken ones with a reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from h5_inputs import flip_a_byte

from hipt.h5schema import FeaturesWriter, write_tiles
from hipt.inspect import format_report, inspect_file

TILES_ATTRS = dict(
    slide_id="s1",
    slide_path="slides/s1.tiff",
    slide_size=[9000, 7000],
    mpp_level0=0.25,
    mpp_source="openslide.mpp-x",
    target_mpp=0.5,
    region_size=4096,
    region_size_level0=8192,
    read_level=1,
    region_size_read_level=4096,
    patch_size=256,
    token_size=16,
)
FEAT_ATTRS = dict(
    slide_id="s1",
    target_mpp=0.5,
    vit256_sha256="ab" * 32,
    vit4k_sha256="cd" * 32,
    mean=[0.5, 0.5, 0.5],
    std=[0.5, 0.5, 0.5],
    hipt_version="0.1.0",
    random_weights=False,
)


def _tiles(path: Path) -> Path:
    coords = np.array([[0, 0], [8192, 0], [0, 8192]], dtype=np.int64)
    return write_tiles(path, coords, np.array([0.9, 0.5, 0.2]), TILES_ATTRS)


def _features(path: Path, *, patch: bool = True, region_value: float = 0.25) -> Path:
    coords = np.array([[0, 0], [8192, 0]], dtype=np.int64)
    with FeaturesWriter(path, coords, FEAT_ATTRS, patch_features=patch) as w:
        w.write(0, np.ones((2, 256, 384)) if patch else None, np.full((2, 192), region_value))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipt.cli", "inspect", *args], capture_output=True, text=True
    )


def test_tiles_file(tmp_path: Path) -> None:
    path = _tiles(tmp_path / "s1.h5")
    r = inspect_file(path)
    assert (r.kind, r.valid, r.n_regions, r.schema) == ("tiles", True, 3, "hipt.tiles/1")
    shapes = {d.name: (d.shape, d.dtype) for d in r.datasets}
    assert shapes == {"coords": ((3, 2), "int64"), "tissue_fraction": ((3,), "float32")}
    coords = next(d for d in r.datasets if d.name == "coords")
    assert coords.attrs == {
        "patch_level": 1,
        "patch_size": 4096,
        "name": "s1",
    }  # read-level pixels, as CLAM reads it; name for CLAM's stitching
    text = format_report(r)
    assert "mpp_source" in text and "openslide.mpp-x" in text and "valid:    yes" in text


def test_features_file_via_cli(tmp_path: Path) -> None:
    path = _features(tmp_path / "s1.h5")
    out = _cli(str(path))
    assert out.returncode == 0, out.stderr
    assert "kind:     features (schema hipt.features/1)" in out.stdout
    assert "patch_features" in out.stdout and "float16  [2, 256, 384]" in out.stdout
    assert "region_features" in out.stdout and "float32  [2, 192]" in out.stdout
    assert "vit256_sha256" in out.stdout and "ab" * 32 in out.stdout
    assert out.stdout.rstrip().endswith("valid:    yes")


def test_region_only_features_are_valid(tmp_path: Path) -> None:
    r = inspect_file(_features(tmp_path / "s1.h5", patch=False))
    assert r.valid and {d.name for d in r.datasets} == {"coords", "features", "region_features"}


def test_json_output(tmp_path: Path) -> None:
    out = _cli("--json", str(_tiles(tmp_path / "t.h5")), str(_features(tmp_path / "f.h5")))
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["kind"] for d in docs] == ["tiles", "features"]
    assert docs[1]["attrs"]["target_mpp"] == 0.5


def test_wrong_dtype_is_invalid_with_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "hipt.features/1"
        for k, v in FEAT_ATTRS.items():
            f.attrs[k] = v
        f["coords"] = np.zeros((2, 2), np.int64)
        f["region_features"] = np.zeros((2, 192), np.float64)  # schema says float32
    out = _cli(str(path))
    assert out.returncode == 1
    assert f"{path}: region_features is float64, expected float32" in out.stderr
    assert "valid:    NO" in out.stdout


def test_wrong_width_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with FeaturesWriter(path, np.zeros((1, 2), np.int64), FEAT_ATTRS, patch_dim=768) as w:
        w.write(0, np.zeros((1, 256, 768)), np.zeros((1, 192)))
    r = inspect_file(path)
    assert not r.valid and "patch_features shape (1, 256, 768), expected [M, 256, 384]" in r.problem


def test_missing_attr_and_unknown_schema(tmp_path: Path) -> None:
    path = tmp_path / "noattr.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "hipt.features/1"
        f["coords"] = np.zeros((1, 2), np.int64)
        f["region_features"] = np.zeros((1, 192), np.float32)
    r = inspect_file(path)
    assert not r.valid and "attrs missing" in r.problem and str(path) in r.problem

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["schema"] = "something/9"
        f["x"] = np.zeros(3)
    r = inspect_file(other)
    assert r.kind == "unknown" and not r.valid and "'something/9'" in r.problem


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    good = _features(tmp_path / "s1.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[:3000])
    r = inspect_file(cut)
    assert not r.valid and "not a readable HDF5 file" in r.problem
    r = inspect_file(tmp_path / "nope.h5")
    assert not r.valid and "no such file" in r.problem
    out = _cli(str(good), str(cut))  # one bad file makes the whole call fail, both are printed
    assert (
        out.returncode == 1
        and sum(line.startswith("file:") for line in out.stdout.splitlines()) == 2
    )


def test_check_values_finds_nan(tmp_path: Path) -> None:
    path = _features(tmp_path / "s1.h5", region_value=float("nan"))
    assert inspect_file(path).valid  # shapes are fine
    r = inspect_file(path, check_values=True)
    assert not r.valid and "region_features row 0 holds NaN or inf" in r.problem


@pytest.mark.parametrize("flag", [[], ["--check-values"]])
def test_valid_features_pass_value_scan(tmp_path: Path, flag: list[str]) -> None:
    out = _cli(*flag, str(_features(tmp_path / "s1.h5")))
    assert out.returncode == 0, out.stderr


def test_directory_and_symlink_loop_are_named_as_such(tmp_path: Path) -> None:
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.h5"
    dangling.symlink_to(tmp_path / "gone.h5")
    out = _cli(str(tmp_path), str(loop), str(dangling))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"error: {tmp_path}: is a directory; pass the .h5 files in it" in out.stderr
    assert f"error: {loop}: a symlink loop" in out.stderr
    assert f"error: {dangling}: a dangling symlink" in out.stderr


def test_bit_flip_makes_the_file_invalid_and_no_verify_skips_the_read(tmp_path: Path) -> None:
    path = _features(tmp_path / "s1.h5")
    flip_a_byte(path, "patch_features", chunk=1, offset=1000)
    out = _cli(str(path))
    assert out.returncode == 1 and "valid:    NO" in out.stdout
    assert f"{path}: patch_features rows 0-1 are damaged" in out.stderr
    assert _cli("--no-verify", str(path)).returncode == 0


def test_wrongly_typed_attr_is_invalid(tmp_path: Path) -> None:
    path = _tiles(tmp_path / "s1.h5")
    with h5py.File(path, "a") as f:
        f.attrs["target_mpp"] = "half"
    r = inspect_file(path)
    assert (
        not r.valid
        and r.problem == f"{path}: attr target_mpp is 'half'; expected a finite number > 0"
    )
