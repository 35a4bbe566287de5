"""A generated trained run whose attention is known: for tests, the demo picture and benchmarks.

:func:`make_planted_run` writes a slide (:mod:`hipt.synthetic` tissue with one black token-sized
square planted in it), its tiles and features files (written directly, no embedding) and a fold
folder laid out as ``hipt train`` writes it, with weights set by hand so that:

- the slide model (``abmil``, no projection) attends almost only to the *planted region*, whose
  region feature has a large first component;
- the ViT-4K (1 block) [CLS] attends to the *planted patch* (the same patch index in every
  region), whose patch feature has a large first component;
- the ViT-256 (1 block) [CLS] attends to dark tokens, so the *planted token* (the black square)
  wins inside the planted patch of the planted region.

With ``encoders="random"`` the features record seeded random encoders instead (benchmarks).

Examples
--------
>>> import tempfile, pathlib
>>> run = make_planted_run(pathlib.Path(tempfile.mkdtemp()), grid=(2, 2))  # doctest: +SKIP
>>> run.planted_region_xy  # doctest: +SKIP
(2048, 0)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from hipt.geometry import GRID, PATCH_PX, REGION_PX, TOKEN_PX
from hipt.h5schema import FeaturesWriter, read_tiles, write_tiles
from hipt.models import create_model
from hipt.models.checkpoint import file_sha256
from hipt.synthetic import TissueModel, write_generic_tiff

__all__ = ["PlantedRun", "PlantedTissue", "make_planted_run", "planted_slide_model"]


@dataclass
class PlantedTissue(TissueModel):
    """Synthetic tissue with one black square ``[x, x + side) × [y, y + side)`` in µm."""

    square_um: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _square_px(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float):
        x, y, side = self.square_um
        cols = np.nonzero(np.abs(self._centres(x0_px, w, mpp) - (x + side / 2)) < side / 2)[0]
        rows = np.nonzero(np.abs(self._centres(y0_px, h, mpp) - (y + side / 2)) < side / 2)[0]
        return rows, cols

    def tile_class(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> str:
        rows, cols = self._square_px(x0_px, y0_px, w, h, mpp)
        if rows.size and cols.size:
            return "edge"  # rendered, never the shared glass or interior tile
        return super().tile_class(x0_px, y0_px, w, h, mpp)

    def render(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        img = super().render(x0_px, y0_px, w, h, mpp)
        rows, cols = self._square_px(x0_px, y0_px, w, h, mpp)
        if rows.size and cols.size:
            img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 0
        return img


@dataclass
class PlantedRun:
    """Paths of a planted run and where its planted region, patch and token are."""

    root: Path
    slide_path: Path
    tiles_path: Path
    features_path: Path
    fold_dir: Path
    vit256_path: Path | None
    vit4k_path: Path | None
    coords: np.ndarray
    region_size_level0: float
    planted_region: int
    planted_patch: int
    planted_token: int
    mpp_level0: float

    @property
    def planted_region_xy(self) -> tuple[int, int]:
        return int(self.coords[self.planted_region][0]), int(self.coords[self.planted_region][1])

    def patch_box(self, region: int | None = None) -> tuple[float, float, float]:
        """Level-0 ``(x, y, side)`` of the planted patch in ``region`` (default: the planted one)."""
        x, y = self.coords[self.planted_region if region is None else region]
        cell = self.region_size_level0 / GRID
        r, c = divmod(self.planted_patch, GRID)
        return float(x + c * cell), float(y + r * cell), cell

    def token_box(self) -> tuple[float, float, float]:
        """Level-0 ``(x, y, side)`` of the planted token."""
        px, py, cell = self.patch_box()
        tok = cell / GRID
        r, c = divmod(self.planted_token, GRID)
        return px + c * tok, py + r * tok, tok


def planted_slide_model(feature_dim: int = 192, n_classes: int = 2) -> torch.nn.Module:
    """``abmil`` (no projection) whose attention score is ``20·tanh(x[0])``: the largest first
    feature component wins the softmax."""
    model = create_model(
        "abmil", n_classes=n_classes, in_dim=feature_dim, hidden_dim=0, dropout=0.0
    )
    att = model.head.attention
    with torch.no_grad():
        for p in att.parameters():
            p.zero_()
        att.tanh_branch[0].weight[0, 0] = 1.0
        att.sigmoid_branch[0].bias.fill_(10.0)  # gate ≈ 1
        att.score.weight[0, 0] = 20.0
    return model.eval()


def _planted_vit(name: str, dark: bool) -> dict[str, torch.Tensor]:
    # One block whose [CLS] query looks at the first component of the normalised tokens; the
    # patch embedding puts "darkness" (ViT-256) or feature 0 (ViT-4K) there, plus a constant
    # component so LayerNorm keeps the contrast.
    model = create_model(name, depth=1)
    state = model.state_dict()
    with torch.no_grad():
        for key in ("cls_token", "pos_embed"):
            state[key].zero_()
        qkv_w, qkv_b = state["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.bias"]
        dim = qkv_w.shape[1]
        heads, head_dim = 6, dim // 6
        qkv_w.zero_()
        qkv_b.zero_()
        for h in range(heads):
            qkv_b[h * head_dim] = 1.0  # q of every token: e_0 of each head
            qkv_w[dim + h * head_dim, 0] = 6.0 * (1 + 0.1 * h)  # k: component 0, head-dependent
        if dark:
            w, b = state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]
            w.zero_()
            b.zero_()
            w[0] = -1.0 / w[0].numel()  # minus the mean normalised pixel: black → +1
            b[1] = 1.0
        else:
            w, b = state["patch_embed.phi.0.weight"], state["patch_embed.phi.0.bias"]
            w.zero_()
            b.zero_()
            w[0, 0] = 1.0
            b[1] = 1.0
    return state


def _write_slide(
    root: Path, slide_id: str, size: tuple[int, int], mpp: float, square_um, seed: int
):
    (root / "slides").mkdir(parents=True, exist_ok=True)
    model = PlantedTissue(
        width_um=size[0] * mpp, height_um=size[1] * mpp, seed=seed, square_um=square_um
    )
    return write_generic_tiff(
        root / "slides" / f"{slide_id}.tiff",
        size[0],
        size[1],
        mpp=mpp,
        model=model,
        reuse_interior=max(size) > 20000,
    ).path


def make_planted_run(
    root: Path,
    *,
    grid: tuple[int, int] = (3, 2),
    mpp_level0: float = 1.0,
    target_mpp: float = 0.5,
    planted_region: int = 1,
    planted_patch: int = 37,
    planted_token: int = 150,
    encoders: str = "planted",
    slide_id: str = "planted",
    seed: int = 0,
    slide_size: tuple[int, int] | None = None,
) -> PlantedRun:
    """Write a planted slide, tiles, features and a fold folder under ``root`` (see module doc).

    ``grid`` is regions across and down (all of them tiled); ``slide_size`` defaults to the grid.
    """
    root = Path(root)
    side = REGION_PX * target_mpp / mpp_level0
    cols, rows = grid
    size = slide_size or (int(math.ceil(cols * side)), int(math.ceil(rows * side)))
    coords = np.array(
        [(int(c * side), int(r * side)) for r in range(rows) for c in range(cols)], np.int64
    )
    # The black square: the planted token of the planted patch of the planted region, in µm.
    x, y = coords[planted_region]
    pr, pc = divmod(planted_patch, GRID)
    tr, tc = divmod(planted_token, GRID)
    tok_um = TOKEN_PX * target_mpp
    sx = x * mpp_level0 + (pc * PATCH_PX + tc * TOKEN_PX) * target_mpp
    sy = y * mpp_level0 + (pr * PATCH_PX + tr * TOKEN_PX) * target_mpp
    slide_path = _write_slide(root, slide_id, size, mpp_level0, (sx, sy, tok_um), seed)

    tiles_path = write_tiles(
        root / "tiles" / f"{slide_id}.h5",
        coords,
        np.ones(len(coords), np.float32),
        {
            "slide_id": slide_id,
            "slide_path": str(slide_path),
            "slide_size": list(size),
            "mpp_level0": mpp_level0,
            "mpp_source": "tiff.XResolution",
            "target_mpp": target_mpp,
            "region_size": REGION_PX,
            "region_size_level0": side,
            "read_level": 0,
            "patch_size": PATCH_PX,
            "token_size": TOKEN_PX,
        },
    )
    vit256_path = vit4k_path = None
    if encoders == "planted":
        vit256_path, vit4k_path = (
            root / "weights" / "vit256_planted.pth",
            root / "weights" / "vit4k_planted.pth",
        )
        vit256_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_planted_vit("vit256_s16", dark=True), vit256_path)
        torch.save(_planted_vit("vit4k_xs", dark=False), vit4k_path)
        hashes = {
            "vit256_sha256": file_sha256(vit256_path),
            "vit4k_sha256": file_sha256(vit4k_path),
            "random_weights": False,
            "random_seed": -1,
            "random_depth": "",
        }
    else:
        hashes = {
            "vit256_sha256": "random",
            "vit4k_sha256": "random",
            "random_weights": True,
            "random_seed": 0,
            "random_depth": "12,6",
        }
    features_path = _write_features(
        root,
        slide_id,
        coords,
        tiles_path,
        target_mpp,
        mpp_level0,
        hashes,
        planted_region,
        planted_patch,
        seed,
    )
    fold_dir = _write_fold(root, slide_id, features_path.parent)
    return PlantedRun(
        root,
        slide_path,
        tiles_path,
        features_path,
        fold_dir,
        vit256_path,
        vit4k_path,
        coords,
        side,
        planted_region,
        planted_patch,
        planted_token,
        mpp_level0,
    )


def _write_features(
    root,
    slide_id,
    coords,
    tiles_path,
    target_mpp,
    mpp_level0,
    hashes,
    planted_region,
    planted_patch,
    seed,
) -> Path:
    from hipt.embed import tiles_sha256

    rng = np.random.default_rng(seed)
    attrs = {
        "slide_id": slide_id,
        "target_mpp": target_mpp,
        "mpp_level0": mpp_level0,
        "region_size": REGION_PX,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "hipt_version": "planted",
        "tiles_sha256": tiles_sha256(read_tiles(tiles_path)),
        "reader": "auto",
        "precision": "fp32",
        **hashes,
    }
    path = root / "features" / f"{slide_id}.h5"
    m = len(coords)
    with FeaturesWriter(path, coords, attrs) as w:
        for start in range(0, m, 64):
            n = min(64, m - start)
            patches = rng.normal(0, 0.1, (n, 256, 384)).astype(np.float16)
            patches[:, planted_patch, 0] = 5.0
            region = rng.normal(0, 0.1, (n, 192)).astype(np.float32)
            if start <= planted_region < start + n:
                region[planted_region - start, 0] = 3.0
            w.write(start, patches, region)
    return path


def _write_fold(root: Path, slide_id: str, features_dir: Path) -> Path:
    run_dir = root / "runs" / "planted"
    fold_dir = run_dir / "fold_0"
    fold_dir.mkdir(parents=True, exist_ok=True)
    csv = root / "cohort.csv"
    csv.write_text(f"slide_id,case_id,label\n{slide_id},case_{slide_id},tumour\n")
    cfg = {
        "cohort": "planted",
        "task": "subtype",
        "csv": str(csv),
        "features_dir": str(features_dir),
        "label_map": {"normal": 0, "tumour": 1},
        "model": {"name": "abmil", "kwargs": {"hidden_dim": 0, "dropout": 0.0}},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.save(planted_slide_model().state_dict(), fold_dir / "best.pt")
    metrics = {
        "status": "complete",
        "fold": 0,
        "task": "subtype",
        "model": "abmil",
        "model_args": {
            "hidden_dim": 0,
            "dropout": 0.0,
            "in_dim": 192,
            "n_classes": 2,
            "task": "classification",
            "n_bins": 4,
        },
        "checkpoint": "best.pt",
        "test": {},
    }
    (fold_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return fold_dir
