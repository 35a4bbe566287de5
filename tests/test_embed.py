"""``hipt embed`` on generated slides tiled by the real tiler.

The encoders have the real widths (384 / 192, so the files follow the schema) and random seeded
weights; they are one block deep to keep a 4096 px region at a few seconds on a small CPU. One
embedded output is shared by the tests of this module; the whole module embeds 7 regions.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hipt.embed import (
    check_features,
    embed_tiles,
    features_attrs,
    read_embedding_csv,
    tiles_sha256,
)
from hipt.embed.data import RegionDataset, SlideJob, make_region_loader
from hipt.h5schema import read_features, read_tiles, write_tiles
from hipt.inspect import inspect_file
from hipt.models.region_encoder import build_region_encoder
from hipt.shard import Shard, shard_items
from hipt.slide import Slide
from hipt.synthetic import write_corrupt_tile_slide, write_generic_tiff, write_svs
from preprocessing.tiler import TileSettings, tile_slide

DEPTH = (1, 1)
TILING = TileSettings(min_tissue=0.05)


def _encoder():
    return build_region_encoder(
        None,
        None,
        random_weights=True,
        vit256_kwargs=dict(depth=DEPTH[0]),
        vit4k_kwargs=dict(depth=DEPTH[1]),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two slides (a generic TIFF with 1 region, an SVS with 2), tiled and embedded once."""
    root = tmp_path_factory.mktemp("embed")
    slides = root / "slides"
    slides.mkdir()
    # 1 µm/px scans: a 4096 px region at 0.5 µm/px is 2048 level-0 px, so the slides stay small.
    a = write_generic_tiff(slides / "a.tiff", 2048, 2048, mpp=1.0, seed=1).path
    b = write_svs(slides / "b.svs", 5120, 2048, mpp=1.0, seed=3).path
    for path in (a, b):
        result = tile_slide(path, root, TILING)
        assert result.status == "ok", result.error
    tiles = {s: read_tiles(root / "tiles" / f"{s}.h5") for s in "ab"}
    assert (len(tiles["a"]), len(tiles["b"])) == (1, 2)
    summary = embed_tiles(
        root / "tiles", root, random_weights=True, random_depth=DEPTH, device="cpu",
        batch_regions=2, workers=1, progress=False,
    )  # fmt: skip
    return dict(root=root, slides={"a": a, "b": b}, tiles=tiles, summary=summary)


def test_files_shapes_order_and_provenance(run: dict) -> None:
    summary = run["summary"]
    assert [(r.slide_id, r.status, r.n_regions) for r in summary.results] == [
        ("a", "ok", 1),
        ("b", "ok", 2),
    ]
    for sid, tiles in run["tiles"].items():
        path = run["root"] / "features" / f"{sid}.h5"
        f = read_features(path, patch_features=True)
        m = len(tiles)
        np.testing.assert_array_equal(f["coords"], tiles.coords)  # same rows, same order
        assert (
            f["patch_features"].shape == (m, 256, 384) and f["patch_features"].dtype == np.float16
        )
        assert f["region_features"].shape == (m, 192) and f["region_features"].dtype == np.float32
        assert np.isfinite(f["region_features"]).all() and np.isfinite(f["patch_features"]).all()
        with h5py.File(path, "r") as h:
            attrs = dict(h.attrs)
        assert attrs["schema"] == "hipt.features/1" and attrs["slide_id"] == sid
        assert attrs["vit256_sha256"] == attrs["vit4k_sha256"] == "random"
        assert bool(attrs["random_weights"]) and attrs["random_depth"] == "1,1"
        assert attrs["tiles_sha256"] == tiles_sha256(tiles)
        assert attrs["target_mpp"] == 0.5 and list(attrs["mean"]) == [0.5, 0.5, 0.5]
        assert attrs["reader"] in ("fast", "openslide") and attrs["precision"] == "fp32"
        report = inspect_file(path, check_values=True)
        assert report.valid and report.kind == "features", report.problem
    assert not list((run["root"] / "features").glob(".*"))  # no temporary file left
    rows = {r.slide_id: r for r in read_embedding_csv(run["root"] / "embedding.csv")}
    assert rows["a"].status == rows["b"].status == "ok"
    assert rows["a"].features_path == "features/a.h5"
    assert rows["b"].n_regions == 2 and rows["b"].regions_per_s > 0 and rows["b"].seconds > 0


def test_region_features_equal_the_encoder_on_the_slide_read(run: dict) -> None:
    # b's first region shared a batch with a's only region: check it was routed to b, row 0.
    tiles = run["tiles"]["b"]
    x, y = tiles.coords[0]
    with Slide(run["slides"]["b"], mpp=tiles.attrs["mpp_level0"]) as slide:
        pixels = slide.read_region(int(x), int(y), 4096, 0.5)
    encoder, _ = _encoder()
    patch, region = encoder.encode(
        torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].contiguous()
    )
    f = read_features(run["root"] / "features" / "b.h5", patch_features=True)
    np.testing.assert_allclose(f["region_features"][0], region[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        f["patch_features"][0].astype(np.float32),
        patch[0].half().float().numpy(),
        rtol=2e-3,
        atol=2e-3,
    )
    # Different regions give different features (a mix-up of rows would not pass the above).
    assert np.abs(f["region_features"][0] - f["region_features"][1]).max() > 1e-3
    a = read_features(run["root"] / "features" / "a.h5")
    assert np.abs(a["region_features"][0] - f["region_features"][0]).max() > 1e-3


def test_rerun_skips_valid_files_and_redoes_broken_ones_identically(
    run: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(run["root"] / "features", out / "features")
    shutil.copy(run["root"] / "embedding.csv", out / "embedding.csv")
    before = read_features(out / "features" / "a.h5", patch_features=True)
    # A half-written file under the final name (copied from elsewhere, or a disk hiccup) and a
    # temporary file left by a killed run: neither may be trusted.
    data = (out / "features" / "a.h5").read_bytes()
    (out / "features" / "a.h5").write_bytes(data[: len(data) // 2])
    (out / "features" / ".a.h5.tmp-deadbeef").write_bytes(data)
    b_mtime = (out / "features" / "b.h5").stat().st_mtime_ns

    summary = embed_tiles(
        run["root"] / "tiles", out, random_weights=True, random_depth=DEPTH, device="cpu",
        batch_regions=2, workers=0, progress=False,
    )  # fmt: skip
    assert [(r.slide_id, r.status) for r in summary.results] == [("a", "ok"), ("b", "skipped")]
    assert (out / "features" / "b.h5").stat().st_mtime_ns == b_mtime  # untouched
    assert not (out / "features" / ".a.h5.tmp-deadbeef").exists()
    after = read_features(out / "features" / "a.h5", patch_features=True)
    for key in ("coords", "region_features", "patch_features"):
        np.testing.assert_array_equal(after[key], before[key])  # embedded twice: identical
    with open(out / "embedding.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["slide_id"], r["status"]) for r in rows] == [("a", "ok"), ("b", "skipped")]


def test_check_features_names_what_changed(run: dict, tmp_path: Path) -> None:
    tiles = run["tiles"]["b"]
    _, provenance = _encoder()
    provenance = dict(provenance, seed=0, random_depth="1,1")
    expected = features_attrs(tiles, provenance)
    src = run["root"] / "features" / "b.h5"
    assert check_features(src, expected) is None
    assert check_features(tmp_path / "none.h5", expected) == "no features file"

    def mutated(name: str, **attrs) -> Path:
        path = tmp_path / f"{name}.h5"
        shutil.copy(src, path)
        with h5py.File(path, "a") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
        return path

    assert "vit256_sha256 differs" in check_features(
        mutated("w", vit256_sha256="ab" * 32), expected
    )
    assert "random_depth differs" in check_features(mutated("d", random_depth="12,6"), expected)
    assert "std differs" in check_features(mutated("s", std=[0.2, 0.2, 0.2]), expected)
    # A different tiling of the same slide (one region dropped) invalidates the features.
    changed = read_tiles(run["root"] / "tiles" / "b.h5")
    changed.coords = changed.coords[:1]
    assert "tiles_sha256 differs" in check_features(src, features_attrs(changed, provenance))
    # A region-only file serves a region-only run but not one that wants patch features.
    region_only = tmp_path / "r.h5"
    with h5py.File(src, "r") as f, h5py.File(region_only, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        g["coords"] = f["coords"][()]
        g["region_features"] = f["region_features"][()]
    assert check_features(region_only, expected, patch_features=False) is None
    assert "no patch_features" in check_features(region_only, expected, patch_features=True)


def test_failing_slides_are_recorded_and_the_rest_go_on(run: dict, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    # Same tissue as b (2 regions); the JPEG tile at level-0 (3072, 512) lies in region 2 only.
    c, _ = write_corrupt_tile_slide(slides / "c.tiff", 5120, 2048, mpp=1.0, seed=3, tile_index=16)
    assert tile_slide(c.path, tmp_path, TILING).status == "ok"
    assert len(read_tiles(tmp_path / "tiles" / "c.h5")) == 2
    shutil.copy(run["root"] / "tiles" / "a.h5", tmp_path / "tiles" / "a.h5")
    moved = dict(run["tiles"]["a"].attrs, slide_id="m", slide_path=str(tmp_path / "gone.tiff"))
    write_tiles(tmp_path / "tiles" / "m.h5", run["tiles"]["a"].coords, [1.0], moved)
    (tmp_path / "tiles" / "g.h5").write_text("not hdf5")

    summary = embed_tiles(
        tmp_path / "tiles", tmp_path, random_weights=True, random_depth=DEPTH, device="cpu",
        batch_regions=2, workers=1, patch_features=False, progress=False,
    )  # fmt: skip
    status = {r.slide_id: r for r in summary.results}
    assert {k: r.status for k, r in status.items()} == {
        "a": "ok",
        "c": "failed",
        "g": "failed",
        "m": "failed",
    }
    assert str(c.path) in status["c"].error and "corrupt tile" in status["c"].error
    assert "not found" in status["m"].error and "gone.tiff" in status["m"].error
    assert "g.h5" in status["g"].error and "not a readable HDF5 file" in status["g"].error
    # c failed after its first region was written: no final file and no temporary file.
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["a.h5"]
    # a, embedded beside the failing slide, region features only, same numbers as before.
    a = read_features(tmp_path / "features" / "a.h5")
    ref = read_features(run["root"] / "features" / "a.h5")
    np.testing.assert_allclose(a["region_features"], ref["region_features"], rtol=1e-5, atol=1e-6)
    with h5py.File(tmp_path / "features" / "a.h5", "r") as f:
        assert "patch_features" not in f
    rows = {r.slide_id: r.status for r in read_embedding_csv(tmp_path / "embedding.csv")}
    assert rows == {"a": "ok", "c": "failed", "g": "failed", "m": "failed"}


def test_shards_write_every_slide_exactly_once(run: dict, tmp_path: Path) -> None:
    # Tiles without regions: the shard logic runs end to end without any model forward pass.
    attrs = run["tiles"]["a"].attrs
    ids = [f"s{i:02d}" for i in range(9)]
    for sid in ids:
        write_tiles(
            tmp_path / "tiles" / f"{sid}.h5", np.zeros((0, 2)), [], dict(attrs, slide_id=sid)
        )
    written: list[str] = []
    for i in range(3):
        before = {p.name for p in (tmp_path / "features").glob("*.h5")}
        summary = embed_tiles(
            tmp_path / "tiles", tmp_path, random_weights=True, random_depth=DEPTH, device="cpu",
            shard=f"{i}/3", workers=0, progress=False,
        )  # fmt: skip
        new = {p.name for p in (tmp_path / "features").glob("*.h5")} - before
        mine = [r.slide_id for r in summary.results]
        assert mine == shard_items(ids, Shard(i, 3))
        assert new == {f"{s}.h5" for s in mine}
        assert summary.csv_path.name == f"embedding.shard-{i}-of-3.csv"
        assert [r.slide_id for r in read_embedding_csv(summary.csv_path)] == mine
        written += mine
    assert sorted(written) == ids and len(set(written)) == len(ids)
    assert read_features(tmp_path / "features" / "s00.h5")["region_features"].shape == (0, 192)


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hipt.cli", "embed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_without_weights_says_what_is_missing(run: dict, tmp_path: Path) -> None:
    out = _cli("--tiles", str(run["root"] / "tiles"), "--out", str(tmp_path), "--device", "cpu")
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()[-1]
    assert "ViT-256 (--vit256 PATH" in err and "vit256_small_dino.pth" in err
    assert (
        "ViT-4K (--vit4k PATH" in err and "vit4k_xs_dino.pth" in err and "--random-weights" in err
    )
    assert not (tmp_path / "features").exists() or not list((tmp_path / "features").iterdir())

    weights = tmp_path / "vit256_small_dino.pth"
    out = _cli(
        "--tiles", str(run["root"] / "tiles"), "--out", str(tmp_path), "--vit256", str(weights)
    )
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()[-1]
    assert "ViT-4K" in err and "ViT-256 (" not in err  # only the missing one is named

    out = _cli("--tiles", str(tmp_path / "nope"), "--out", str(tmp_path), "--random-weights")
    assert out.returncode == 2 and "no such tiles folder" in out.stderr
    out = _cli("--tiles", str(run["root"] / "tiles"), "--out", str(tmp_path), "--shard", "3/3")
    assert out.returncode == 2 and "shard" in out.stderr
    if not torch.cuda.is_available():
        out = _cli(
            "--tiles", str(run["root"] / "tiles"), "--out", str(tmp_path), "--device", "cuda"
        )
        assert out.returncode == 2 and "no CUDA device" in out.stderr


def test_region_loader_keeps_order_and_reads_like_the_slide(run: dict, tmp_path: Path) -> None:
    jobs = [
        SlideJob(
            s, run["slides"][s], run["tiles"][s].coords, 0.5, run["tiles"][s].attrs["mpp_level0"]
        )
        for s in "ba"
    ]
    jobs.append(SlideJob("gone", tmp_path / "gone.tiff", np.zeros((2, 2), np.int64), 0.5, 1.0))
    loader = make_region_loader(RegionDataset(jobs), workers=2)
    items = list(loader)
    assert [(i["job"], i["row"]) for i in items] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    for item in items[:3]:
        job = jobs[item["job"]]
        x, y = job.coords[item["row"]]
        with Slide(job.slide_path, mpp=job.mpp_level0) as slide:
            want = slide.read_region(int(x), int(y), 4096, 0.5)
        assert item["error"] == "" and item["pixels"].dtype == torch.uint8
        assert item["pixels"].shape == (4096, 4096, 3)
        # Read by a worker straight into shared memory: handed over without a copy.
        assert item["pixels"].is_shared()
        np.testing.assert_array_equal(item["pixels"].numpy(), want)
    # A slide that cannot be opened yields an error per region, naming the file, not an exception.
    assert all("gone.tiff" in i["error"] and i["pixels"].numel() == 0 for i in items[3:])


def test_rerun_skips_and_overwrite_redoes(run: dict, tmp_path: Path) -> None:
    tiles = tmp_path / "tiles" / "e.h5"
    write_tiles(tiles, np.zeros((0, 2)), [], dict(run["tiles"]["a"].attrs, slide_id="e"))

    def go(**kw) -> str:
        kw.setdefault("random_depth", DEPTH)
        summary = embed_tiles(
            tiles, tmp_path, random_weights=True, device="cpu", workers=0, progress=False, **kw
        )
        return summary.results[0].status

    assert go() == "ok"
    first = (tmp_path / "features" / "e.h5").stat().st_mtime_ns
    assert go() == "skipped"
    assert go(overwrite=True) == "ok"
    assert (tmp_path / "features" / "e.h5").stat().st_mtime_ns != first
    # Other weights (here: a deeper random ViT-4K) make the file stale: redone without asking.
    assert go(random_depth=(1, 2)) == "ok"
    with h5py.File(tmp_path / "features" / "e.h5", "r") as f:
        assert f.attrs["random_depth"] == "1,2"


def test_tiles_of_another_region_size_fail_that_slide_only(run: dict, tmp_path: Path) -> None:
    # A --region-px 2048 tiling cannot feed the 16x16-patch encoder: that slide fails with a
    # message saying so, before any read or model call, and the other slides go on.
    attrs = run["tiles"]["a"].attrs
    small = dict(attrs, slide_id="h", region_size=2048, slide_path=str(tmp_path / "h.tiff"))
    write_tiles(tmp_path / "tiles" / "h.h5", np.zeros((1, 2)), [1.0], small)
    write_tiles(tmp_path / "tiles" / "e.h5", np.zeros((0, 2)), [], dict(attrs, slide_id="e"))
    summary = embed_tiles(
        tmp_path / "tiles", tmp_path, random_weights=True, random_depth=DEPTH, device="cpu",
        workers=0, progress=False,
    )  # fmt: skip
    status = {r.slide_id: r for r in summary.results}
    assert status["e"].status == "ok"
    assert status["h"].status == "failed"
    assert "2048 px" in status["h"].error and "--region-px 4096" in status["h"].error
    assert not (tmp_path / "features" / "h.h5").exists()


def test_stale_temporaries_of_other_slides_are_kept(tmp_path: Path) -> None:
    from hipt.embed.plan import _drop_stale_temps

    mine = tmp_path / ".s[1].h5.tmp-0badf00d"
    other = tmp_path / ".s1.h5.tmp-12345678"  # another slide, maybe being written by a shard
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    _drop_stale_temps(tmp_path, "s[1]")
    assert not mine.exists()
    assert other.exists()


def test_a_features_file_that_cannot_be_created_fails_only_its_slide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hipt.embed.stream as stream
    from hipt.embed.plan import EmbedJob

    class Items(torch.utils.data.Dataset):
        # Tiny fake regions whose pixels carry the slide index; the stub encoder echoes it.
        def __init__(self, jobs: list[SlideJob], **kwargs) -> None:
            self.index = [(k, r) for k, j in enumerate(jobs) for r in range(j.n_regions)]

        def __len__(self) -> int:
            return len(self.index)

        def __getitem__(self, i: int) -> dict:
            k, r = self.index[i]
            pixels = torch.full((3, 2, 2), k, dtype=torch.uint8)
            return dict(job=k, row=r, slot=-1, pixels=pixels, error="", reader="fake")

        def close(self) -> None:
            pass

    class Echo(torch.nn.Module):
        def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v = regions[:, 0, 0, 0].float() + 1
            b = len(v)
            return v.view(b, 1, 1).expand(b, 256, 384), v.view(b, 1).expand(b, 192)

    real_open = stream.FeaturesWriter.open

    def open_(self):
        if self.path.stem == "y":
            raise OSError("File name too long")
        return real_open(self)

    monkeypatch.setattr(stream, "RegionDataset", Items)
    monkeypatch.setattr(stream.FeaturesWriter, "open", open_)
    base = dict(
        target_mpp=0.5, vit256_sha256="a", vit4k_sha256="b", mean=[0.5] * 3, std=[0.5] * 3,
        hipt_version="0", reader="auto",
    )  # fmt: skip
    jobs = []
    for sid, n in (("x", 2), ("y", 2), ("z", 1)):
        coords = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
        job = SlideJob(sid, f"{sid}.tiff", coords, region_px=2)
        jobs.append(EmbedJob(job, dict(base, slide_id=sid), tmp_path / f"{sid}.h5"))
    records: list = []
    # One batch of 4 holds regions of x and y: y fails, x and z are written.
    settings = stream.StreamSettings(batch_regions=4, workers=0)
    bar = _NoBar()
    stream.stream_regions(jobs, Echo(), torch.device("cpu"), settings, bar, records.append)
    status = {r.slide_id: r for r in records}
    assert {k: r.status for k, r in status.items()} == {"x": "ok", "y": "failed", "z": "ok"}
    assert "cannot create" in status["y"].error and "File name too long" in status["y"].error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5", "z.h5"]
    assert np.all(read_features(tmp_path / "x.h5")["region_features"] == 1.0)
    assert np.all(read_features(tmp_path / "z.h5", patch_features=True)["patch_features"] == 3.0)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def write(self, line: str) -> None:
        pass


def test_an_empty_slide_whose_file_cannot_be_created_fails_alone(
    run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hipt.h5schema import FeaturesWriter

    real_open = FeaturesWriter.open

    def open_(self):
        if self.path.stem == "y":
            raise OSError("File name too long")
        return real_open(self)

    monkeypatch.setattr(FeaturesWriter, "open", open_)
    attrs = run["tiles"]["a"].attrs
    for sid in ("x", "y", "z"):
        write_tiles(
            tmp_path / "tiles" / f"{sid}.h5", np.zeros((0, 2)), [], dict(attrs, slide_id=sid)
        )
    summary = embed_tiles(
        tmp_path / "tiles", tmp_path, random_weights=True, random_depth=DEPTH, device="cpu",
        workers=0, progress=False,
    )  # fmt: skip
    status = {r.slide_id: r for r in summary.results}
    assert {k: r.status for k, r in status.items()} == {"x": "ok", "y": "failed", "z": "ok"}
    assert "File name too long" in status["y"].error
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["x.h5", "z.h5"]
