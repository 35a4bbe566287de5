"""The HDF5 schema module: round trips, refusals naming the file, atomic features writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from h5_inputs import flip_a_byte

from hipt.h5schema import (
    FEATURES_SCHEMA,
    TILES_SCHEMA,
    FeaturesWriter,
    SchemaError,
    read_features,
    read_features_info,
    read_tiles,
    write_tiles,
)

TILE_ATTRS = dict(
    slide_id="s1",
    slide_path="/data/s1.svs",
    slide_size=[10000, 8000],
    mpp_level0=0.25,
    mpp_source="openslide.mpp-x",
    target_mpp=0.5,
    region_size=4096,
    region_size_level0=8192,
    region_size_read_level=8192,
    read_level=0,
    patch_size=256,
    token_size=16,
)
FEATURE_ATTRS = dict(
    slide_id="s1",
    target_mpp=0.5,
    vit256_sha256="a" * 64,
    vit4k_sha256="b" * 64,
    mean=[0.5, 0.5, 0.5],
    std=[0.5, 0.5, 0.5],
    hipt_version="0.1.0",
)


def test_tiles_round_trip_with_clam_attrs(tmp_path):
    coords = np.array([[0, 0], [8192, 0], [0, 8192]])
    path = write_tiles(tmp_path / "s1.h5", coords, [1.0, 0.5, 0.3], TILE_ATTRS)
    tiles = read_tiles(path)
    assert tiles.coords.dtype == np.int64
    np.testing.assert_array_equal(tiles.coords, coords)
    np.testing.assert_allclose(tiles.tissue_fraction, [1.0, 0.5, 0.3])
    assert tiles.attrs["schema"] == TILES_SCHEMA
    assert tiles.attrs["slide_size"] == [10000, 8000]
    assert tiles.attrs["mpp_level0"] == 0.25 and len(tiles) == 3
    with h5py.File(path) as f:  # CLAM-style tools read these two attrs of coords
        assert f["coords"].attrs["patch_level"] == 0
        assert f["coords"].attrs["patch_size"] == 8192
    assert not list(tmp_path.glob(".*tmp*"))


def test_tiles_refusals_name_the_file(tmp_path):
    bad = dict(TILE_ATTRS)
    del bad["mpp_source"]
    with pytest.raises(SchemaError, match="mpp_source"):
        write_tiles(tmp_path / "x.h5", np.zeros((1, 2)), [1.0], bad)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["schema"] = "something/9"
    with pytest.raises(SchemaError, match="other.h5.*something/9"):
        read_tiles(other)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(SchemaError, match="notes.h5"):
        read_tiles(text)


def test_features_writer_round_trip_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 10**5, size=(5, 2))
    patch = rng.normal(size=(5, 256, 384)).astype(np.float32)
    region = rng.normal(size=(5, 192)).astype(np.float32)
    out = tmp_path / "s1.h5"
    with FeaturesWriter(out, coords, FEATURE_ATTRS) as w:
        w.write(0, patch[:2], region[:2])
        assert not out.exists()  # only the temporary file exists while writing
        w.write(2, patch[2:], region[2:])
    info = read_features_info(out)
    assert info.n_regions == 5 and info.has_patch_features
    assert info.attrs["schema"] == FEATURES_SCHEMA
    arrays = read_features(out, patch_features=True)
    np.testing.assert_array_equal(arrays["coords"], coords)
    np.testing.assert_array_equal(arrays["region_features"], region)
    assert arrays["patch_features"].dtype == np.float16
    np.testing.assert_allclose(arrays["patch_features"], patch, atol=2e-3, rtol=1e-3)


def test_features_writer_leaves_nothing_when_interrupted_or_short(tmp_path):
    out = tmp_path / "s1.h5"
    with pytest.raises(RuntimeError), FeaturesWriter(out, np.zeros((2, 2)), FEATURE_ATTRS) as w:
        w.write(0, np.zeros((1, 256, 384)), np.zeros((1, 192)))
        raise RuntimeError("killed")
    with pytest.raises(SchemaError, match="1 regions never written"):
        with FeaturesWriter(out, np.zeros((2, 2)), FEATURE_ATTRS) as w:
            w.write(0, np.zeros((1, 256, 384)), np.zeros((1, 192)))
    assert list(tmp_path.iterdir()) == []


def test_region_only_features_and_shape_check(tmp_path):
    out = tmp_path / "s1.h5"
    with FeaturesWriter(out, np.zeros((3, 2)), FEATURE_ATTRS, patch_features=False) as w:
        w.write(0, None, np.ones((3, 192)))
    assert not read_features_info(out).has_patch_features
    with pytest.raises(SchemaError, match="no patch_features"):
        read_features(out, patch_features=True)
    with h5py.File(out, "a") as f:
        del f["region_features"]
        f.create_dataset("region_features", data=np.zeros((2, 192), np.float32))
    with pytest.raises(SchemaError, match=r"s1.h5: region_features has 2 rows, coords has 3"):
        read_features_info(out)


def test_features_coords_must_be_int64_pairs(tmp_path):
    out = tmp_path / "s1.h5"
    with FeaturesWriter(out, np.zeros((2, 2)), FEATURE_ATTRS, patch_features=False) as w:
        w.write(0, None, np.ones((2, 192)))
    with h5py.File(out, "a") as f:
        del f["coords"]
        f.create_dataset("coords", data=np.zeros((2, 2), dtype=np.float64))
    with pytest.raises(SchemaError, match=r"s1.h5: coords is float64, expected int64"):
        read_features_info(out)


def test_writer_that_cannot_start_leaves_nothing(tmp_path):
    bad = dict(FEATURE_ATTRS, weird=object())  # HDF5 cannot store this attribute
    with pytest.raises(TypeError):
        with FeaturesWriter(tmp_path / "s1.h5", np.zeros((1, 2)), bad):
            pass
    assert list(tmp_path.iterdir()) == []


def test_tiles_read_above_level0_need_the_read_level_size(tmp_path):
    attrs = dict(TILE_ATTRS, read_level=1)
    del attrs["region_size_read_level"]
    with pytest.raises(SchemaError, match="region_size_read_level"):
        write_tiles(tmp_path / "s1.h5", np.zeros((1, 2)), [1.0], attrs)


@pytest.mark.parametrize("dataset", ["region_features", "patch_features", "coords"])
def test_bit_flips_are_found_by_the_checksums(tmp_path, dataset):
    from hipt.h5schema import verify_data

    out = tmp_path / "s1.h5"
    with FeaturesWriter(out, np.zeros((2, 2)), FEATURE_ATTRS) as w:
        w.write(0, np.full((2, 256, 384), 0.5), np.full((2, 192), 0.25))
    verify_data(out)  # intact
    flip_a_byte(out, dataset)  # a silent disk error
    read_features_info(out)  # the header is intact; only reading the data finds the damage
    with pytest.raises(SchemaError, match=rf"s1.h5: {dataset} rows 0-1 are damaged"):
        verify_data(out)


def test_attr_types_are_checked_naming_the_file_and_attr(tmp_path):
    path = write_tiles(tmp_path / "s1.h5", np.zeros((1, 2)), [1.0], TILE_ATTRS)
    for key, value, wanted in [
        ("target_mpp", "half", "a finite number > 0"),
        ("mpp_level0", float("nan"), "a finite number > 0"),
        ("slide_size", [10000], "a list of 2 integers >= 1"),
        ("read_level", -1, "an integer >= 0"),
    ]:
        with h5py.File(path, "a") as f:
            good = f.attrs[key]
            f.attrs[key] = value
        with pytest.raises(SchemaError, match=rf"s1.h5: attr {key} is .*; expected {wanted}"):
            read_tiles(path)
        with h5py.File(path, "a") as f:
            f.attrs[key] = good
    read_tiles(path)
    with pytest.raises(SchemaError, match="attr target_mpp is 'half'"):
        write_tiles(tmp_path / "x.h5", np.zeros((1, 2)), [1.0], dict(TILE_ATTRS, target_mpp="half"))


def test_features_carry_clam_names_and_schema_1_files_without_them_still_read(tmp_path):
    out = tmp_path / "s1.h5"
    with FeaturesWriter(out, np.zeros((2, 2)), FEATURE_ATTRS, patch_features=False) as w:
        w.write(0, None, np.arange(384, dtype=np.float32).reshape(2, 192))
    with h5py.File(out) as f:
        # CLAM's Generic_MIL_Dataset reads "features"; its stitching reads coords.attrs["name"].
        assert f["features"].id == f["region_features"].id  # a hard link: one copy on disk
        np.testing.assert_array_equal(f["features"][()], f["region_features"][()])
        assert f["coords"].attrs["name"] == "s1"
        assert f["region_features"].fletcher32 and f["coords"].fletcher32
    old = tmp_path / "old.h5"  # as hipt 0.1.0 wrote schema 1: no link, no checksums
    with h5py.File(old, "w") as f:
        f.attrs["schema"] = FEATURES_SCHEMA
        for k, v in FEATURE_ATTRS.items():
            f.attrs[k] = v
        f["coords"] = np.zeros((1, 2), np.int64)
        f["region_features"] = np.ones((1, 192), np.float32)
    assert read_features(old)["region_features"].sum() == 192
