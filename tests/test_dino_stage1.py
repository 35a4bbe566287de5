"""Stage 1 on generated slides: patches read from tiled slides in DataLoader workers, tissue test,
an unreadable slide skipped, the image-folder source, and the teacher fed to ``hipt embed``."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from dino_data import tile_slides
from PIL import Image

from hipt.distributed import DistEnv
from hipt.models import create_model
from hipt.models.checkpoint import load_encoder_weights
from hipt.slide import Slide
from hipt.synthetic import write_generic_tiff
from train.dino.config import TissueConfig, load_stage_config
from train.dino.data import MultiCropDataset, SampleKey, SlidePatches, tissue_fraction
from train.dino.engine import pretrain

SINGLE = DistEnv("single")
TINY1 = [
    "model.kwargs={depth: 1}",
    "model.out_dim=256",
    "model.hidden_dim=64",
    "model.bottleneck_dim=32",
    "model.drop_path=0.0",
    "crops.global_px=64",
    "crops.local_px=32",
    "crops.local_crops=2",
    "dino.center_momentum=0.99",
    "optim.lr=0.01",
    "optim.warmup_epochs=0.1",
    "optim.freeze_last_layer_epochs=0",
    "train.batch_size=8",
    "train.device=cpu",
    "train.threads=1",
    "train.workers=1",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage1")
    slides = [
        write_generic_tiff(root / "a.tiff", 4096, 4096, mpp=0.5, seed=21).path,
        write_generic_tiff(
            root / "pen.tiff", 4096, 4096, mpp=0.5, seed=22, n_blobs=2, pen_marks=True
        ).path,
    ]
    return tile_slides(slides, root / "out")


def stage1(tiles: Path, out: Path, *extra: str):
    return load_stage_config(
        "stage1", overrides=[f"data.tiles_dir={tiles}", f"out={out}", *TINY1, *extra]
    )


def test_patches_pass_the_tissue_test_glass_and_ink_are_not_learned(tiled):
    source = SlidePatches(tiled)
    assert len(source) == sum(256 * len(s.coords) for s in source.slides) > 0
    raw = MultiCropDataset(source, lambda p: [p], seed=0)  # no tissue test
    tested = MultiCropDataset(source, lambda p: [p], seed=0, tissue=TissueConfig(min_fraction=0.5))
    keys = [SampleKey(0, i, (i * 37) % len(source)) for i in range(40)]
    untested = [tissue_fraction(raw[k][0].permute(1, 2, 0).numpy()) for k in keys]
    kept = [tissue_fraction(tested[k][0].permute(1, 2, 0).numpy()) for k in keys]
    assert min(untested) < 0.5  # the regions do hold glass or ink patches ...
    assert min(kept) >= 0.5  # ... and none of them is trained on


def test_stage1_learns_and_its_teacher_gives_the_same_embeddings_in_hipt_embed(tiled, tmp_path):
    out = tmp_path / "run"
    outcome = pretrain(stage1(tiled, out, "train.stop_at_step=30"), SINGLE)
    assert outcome.status == "stopped" and outcome.step == 30
    first, last = np.mean(outcome.losses[:6]), np.mean(outcome.losses[-6:])
    assert last < first - 0.3, outcome.losses
    from hipt.embed import embed_tiles

    tiles_file = sorted(tiled.glob("*.h5"))[0]
    summary = embed_tiles(
        tiles_file, tmp_path / "emb", vit256=out / "teacher.pth", random_weights=True,
        device="cpu", workers=0, progress=False,
    )  # fmt: skip
    assert summary.n_failed == 0
    with h5py.File(tmp_path / "emb" / "features" / f"{tiles_file.stem}.h5") as f:
        coords, got = f["coords"][0], f["patch_features"][0, :6].astype(np.float32)
    # The teacher's EMA backbone, straight from the training checkpoint, on the same patches.
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    teacher = create_model("vit256_s16", depth=1)
    teacher.load_state_dict(
        {k[9:]: v for k, v in ckpt["teacher_native"].items() if k.startswith("backbone.")}
    )
    with Slide(tiled.parent.parent / "a.tiff") as s:
        patches = [
            s.read_region(int(coords[0]) + 256 * k, int(coords[1]), 256, 0.5) for k in range(6)
        ]
    x = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        expected = teacher.eval()((x - 0.5) / 0.5)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=2e-2, rtol=1e-2)
    vit = create_model("vit256_s16", depth=1)
    load_encoder_weights(vit, out / "checkpoint.pth")  # the full checkpoint loads the same way


def test_an_unreadable_slide_is_reported_once_and_skipped(tiled, tmp_path, capfd):
    tiles = tmp_path / "tiles"
    shutil.copytree(tiled, tiles)
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(tiled.parent.parent / "a.tiff", slides / "a.tiff")
    (slides / "pen.tiff").write_bytes(b"not a slide any more")
    out = tmp_path / "run"
    cfg = stage1(tiles, out, f"data.slides_dir={slides}", "train.stop_at_step=6")
    assert pretrain(cfg, SINGLE).status == "stopped"
    err = capfd.readouterr().err
    assert err.count("skipping slide pen") == 1, err
    assert len(list((out / "skipped_slides").iterdir())) == 1


def test_image_folder_source_trains(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
            pixels[..., 0] = 200  # reddish, saturated: passes the tissue test
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    cfg = load_stage_config(
        "stage1",
        overrides=[f"data.image_folder={tmp_path / 'imgs'}", f"out={tmp_path / 'run'}", *TINY1,
                   "train.epochs=2", "train.workers=0"],
    )  # fmt: skip
    outcome = pretrain(cfg, SINGLE)
    assert outcome.status == "complete" and outcome.step == 2
    assert all(np.isfinite(outcome.losses))
