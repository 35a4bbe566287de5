"""Generated whole-slide images for tests, demos and benchmarks.

Every slide is rendered from one procedural *tissue model* defined in physical units (µm), so
two scans of the same model at different µm/px show the same tissue. Levels are rendered tile by
tile straight into the TIFF writer, so memory stays bounded whatever the slide size (a
100,000 × 100,000 px slide is written without a full-size array).

The writers return a :class:`SyntheticSlide` that knows the true tissue mask, so tests can
check segmentation, region counts and coordinates against the real geometry.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> s = write_generic_tiff(d / "a.tiff", 2048, 1536, mpp=0.5, seed=1)
>>> s.width_px, s.height_px, s.mpp
(2048, 1536, 0.5)
>>> s.tissue_mask(mask_mpp=16.0).shape
(48, 64)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

# Colours of the stains and the glass (RGB).
GLASS_RGB = np.array([242.0, 241.0, 244.0], dtype=np.float32)
EOSIN_RGB = np.array([232.0, 150.0, 190.0], dtype=np.float32)
HEMATOXYLIN_RGB = np.array([155.0, 95.0, 175.0], dtype=np.float32)
NUCLEUS_RGB = np.array([75.0, 35.0, 120.0], dtype=np.float32)
PEN_RGB = {
    "blue": np.array([35.0, 60.0, 190.0], dtype=np.float32),
    "green": np.array([30.0, 140.0, 70.0], dtype=np.float32),
    "black": np.array([25.0, 25.0, 30.0], dtype=np.float32),
}

NUCLEUS_CELL_UM = 14.0  # one candidate nucleus per cell of this side
FIELD_STEP_UM = 64.0  # grid spacing of the smooth tissue/stain fields
EDGE_SOFTNESS_UM = 1.0  # anti-aliasing width of nuclei and pen edges


# ------------------------------------------------------------------------------ tissue model
def _hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A deterministic uniform [0, 1) value per integer cell (splitmix64-style mixing)."""
    with np.errstate(over="ignore"):
        h = (ix.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            iy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        h ^= np.uint64((seed * 0x165667B19E3779F9 + salt * 0x27D4EB2F165667C5) & (2**64 - 1))
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _interp_index(
    centres_um: np.ndarray, step_um: float, n_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left node index and weight of the right node for linear interpolation on a 1-D grid."""
    pos = np.clip(centres_um / step_um, 0, n_nodes - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_nodes - 2)
    return i0, (pos - i0).astype(np.float32)


@dataclass
class PenStroke:
    """A straight pen stroke in µm: from ``p0`` to ``p1``, ``width_um`` wide."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    width_um: float
    colour: str


@dataclass
class TissueModel:
    """Procedural H&E-like tissue on glass over ``width_um`` × ``height_um``, fixed by ``seed``.

    Tissue is where a smooth field (a few elliptical blobs plus low-frequency noise, on a
    ``FIELD_STEP_UM`` grid, linearly interpolated) is positive. Stain density is a second smooth
    field; nuclei sit on a hashed cell grid. Everything is a function of physical position, so
    any µm/px renders the same tissue.
    """

    width_um: float
    height_um: float
    seed: int = 0
    n_blobs: int = 3
    blank: bool = False
    pen_marks: bool = False
    nuclei: bool = True
    blob_scale: float = 1.0
    strokes: list[PenStroke] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.nx = int(math.ceil(self.width_um / FIELD_STEP_UM)) + 2
        self.ny = int(math.ceil(self.height_um / FIELD_STEP_UM)) + 2
        gx = np.arange(self.nx) * FIELD_STEP_UM
        gy = np.arange(self.ny) * FIELD_STEP_UM
        xx, yy = np.meshgrid(gx, gy)
        f = np.full(xx.shape, -1.0)
        if not self.blank:
            for _ in range(self.n_blobs):
                # Blobs stay well inside the slide so the glass border is real.
                cx = rng.uniform(0.3, 0.7) * self.width_um
                cy = rng.uniform(0.3, 0.7) * self.height_um
                a = rng.uniform(0.12, 0.25) * self.width_um * self.blob_scale
                b = rng.uniform(0.12, 0.25) * self.height_um * self.blob_scale
                t = rng.uniform(0, math.pi)
                dx, dy = xx - cx, yy - cy
                u = (dx * math.cos(t) + dy * math.sin(t)) / a
                v = (-dx * math.sin(t) + dy * math.cos(t)) / b
                f = np.maximum(f, 1.0 - u * u - v * v)
            f = f + 0.25 * rng.standard_normal(f.shape)
        self.tissue_field = f
        self.stain_field = rng.uniform(0.0, 1.0, size=(self.ny, self.nx))
        if self.pen_marks and not self.strokes:
            for colour in ("blue", "green", "black"):
                x0 = rng.uniform(0.05, 0.95) * self.width_um
                y0 = rng.uniform(0.05, 0.95) * self.height_um
                ang = rng.uniform(0, math.pi)
                length = rng.uniform(0.15, 0.3) * min(self.width_um, self.height_um)
                self.strokes.append(
                    PenStroke(
                        (x0, y0),
                        (x0 + length * math.cos(ang), y0 + length * math.sin(ang)),
                        width_um=0.01 * min(self.width_um, self.height_um) + 20.0,
                        colour=colour,
                    )
                )

    # The fields are sampled at pixel centres: (i + 0.5) * mpp µm.
    def _centres(self, start_px: int, n: int, mpp: float) -> np.ndarray:
        return (np.arange(start_px, start_px + n) + 0.5) * mpp

    def _smooth(self, grid: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of a node grid at pixel centres (separable, no BLAS)."""
        iy, fy = _interp_index(ys, FIELD_STEP_UM, self.ny)
        ix, fx = _interp_index(xs, FIELD_STEP_UM, self.nx)
        g = grid.astype(np.float32, copy=False)
        rows = g[iy] * (1 - fy)[:, None] + g[iy + 1] * fy[:, None]
        return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx

    def tissue_alpha(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """Tissue coverage in [0, 1] of the pixels of a rectangle at ``mpp`` (soft edge)."""
        xs, ys = self._centres(x0_px, w, mpp), self._centres(y0_px, h, mpp)
        inside = (xs < self.width_um)[None, :] & (ys < self.height_um)[:, None]
        f = self._smooth(self.tissue_field, xs, ys)
        # Soft edge about 4 µm wide, so differently sampled scans agree after averaging.
        alpha = np.clip(f / np.float32(0.02) + np.float32(0.5), 0.0, 1.0)
        return np.where(inside, alpha, 0.0)

    def tile_class(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> str:
        """``"glass"``, ``"interior"`` (all tissue) or ``"edge"``, from the field's grid nodes.

        Bilinear interpolation never leaves the range of the surrounding nodes, so the nodes
        bound the tile's tissue field without rendering it.
        """
        xs, ys = self._centres(x0_px, w, mpp), self._centres(y0_px, h, mpp)
        ix, _ = _interp_index(xs[[0, -1]], FIELD_STEP_UM, self.nx)
        iy, _ = _interp_index(ys[[0, -1]], FIELD_STEP_UM, self.ny)
        nodes = self.tissue_field[iy[0] : iy[1] + 2, ix[0] : ix[1] + 2]
        # alpha = clip(f / 0.02 + 0.5): 0 for f <= -0.01, 1 for f >= 0.01
        if nodes.max() <= -0.01 or xs[0] >= self.width_um or ys[0] >= self.height_um:
            return "glass"
        if nodes.min() >= 0.01 and xs[-1] < self.width_um and ys[-1] < self.height_um:
            return "interior"
        return "edge"

    def mask(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """True tissue mask (boolean) of a rectangle sampled at ``mpp``."""
        return self.tissue_alpha(x0_px, y0_px, w, h, mpp) >= 0.5

    def render(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]`` of the rectangle whose top-left pixel is ``(x0_px, y0_px)``."""
        xs, ys = self._centres(x0_px, w, mpp), self._centres(y0_px, h, mpp)
        alpha = self.tissue_alpha(x0_px, y0_px, w, h, mpp).astype(np.float32)
        if alpha.any():
            # Composited in place (x += a * (colour - x)) to keep temporaries few.
            stain = np.clip(self._smooth(self.stain_field, xs, ys), 0, 1)[..., None]
            img = stain * (HEMATOXYLIN_RGB - EOSIN_RGB)
            img += EOSIN_RGB
            if self.nuclei and mpp < 4.0:
                nuc = self._nuclei_alpha(xs, ys)[..., None]
                img += nuc * (NUCLEUS_RGB - img)
            img -= GLASS_RGB
            img *= alpha[..., None]
            img += GLASS_RGB
        else:
            img = np.empty((h, w, 3), dtype=np.float32)
            img[:] = GLASS_RGB
        for s in self.strokes:
            pen = self._stroke_alpha(s, xs, ys)
            if pen is not None:
                img += pen.astype(np.float32)[..., None] * (PEN_RGB[s.colour] - img)
        img += 0.5
        np.clip(img, 0, 255, out=img)
        return img.astype(np.uint8, order="C")

    def _nuclei_alpha(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        cell = NUCLEUS_CELL_UM
        cx, cy = np.floor(xs / cell).astype(np.int64), np.floor(ys / cell).astype(np.int64)
        # Hash once per cell (few per tile), then gather per pixel.
        ux, uy = np.arange(cx[0], cx[-1] + 1), np.arange(cy[0], cy[-1] + 1)
        gx, gy = np.meshgrid(ux, uy)
        present = _hash_uniform(gx, gy, self.seed, 1) < 0.55
        radius = 2.5 + 1.5 * _hash_uniform(gx, gy, self.seed, 2)
        # The centre keeps the nucleus inside its own cell, so one cell lookup per pixel suffices.
        ox = gx * cell + radius + (cell - 2 * radius) * _hash_uniform(gx, gy, self.seed, 3)
        oy = gy * cell + radius + (cell - 2 * radius) * _hash_uniform(gx, gy, self.seed, 4)
        radius = np.where(present, radius, -10.0).astype(np.float32)
        jx, jy = (cx - cx[0])[None, :], (cy - cy[0])[:, None]
        dx = xs.astype(np.float32)[None, :] - ox.astype(np.float32)[jy, jx]
        dy = ys.astype(np.float32)[:, None] - oy.astype(np.float32)[jy, jx]
        d = np.sqrt(dx * dx + dy * dy)
        return np.clip((radius[jy, jx] - d) / EDGE_SOFTNESS_UM + 0.5, 0.0, 1.0) * np.float32(0.85)

    def _stroke_alpha(self, s: PenStroke, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
        half = s.width_um / 2 + EDGE_SOFTNESS_UM
        (ax, ay), (bx, by) = s.p0, s.p1
        if (
            xs[-1] < min(ax, bx) - half
            or xs[0] > max(ax, bx) + half
            or ys[-1] < min(ay, by) - half
            or ys[0] > max(ay, by) + half
        ):
            return None
        px, py = xs[None, :] - ax, ys[:, None] - ay
        vx, vy = bx - ax, by - ay
        t = np.clip((px * vx + py * vy) / (vx * vx + vy * vy), 0, 1)
        d = np.hypot(px - t * vx, py - t * vy)
        return np.clip((s.width_um / 2 - d) / EDGE_SOFTNESS_UM + 0.5, 0.0, 1.0)

    def pen_mask(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """Where pen strokes cover the rectangle (boolean)."""
        xs, ys = self._centres(x0_px, w, mpp), self._centres(y0_px, h, mpp)
        out = np.zeros((h, w), dtype=bool)
        for s in self.strokes:
            a = self._stroke_alpha(s, xs, ys)
            if a is not None:
                out |= a >= 0.5
        return out


# ------------------------------------------------------------------------------ written slides
@dataclass
class SyntheticSlide:
    """A generated slide on disk and the truth about it.

    ``mpp`` is the true level-0 µm/px (what the scan really is), even when the file does not
    record it. ``level_downsamples`` are the pyramid levels written.
    """

    path: Path
    width_px: int
    height_px: int
    mpp: float
    model: TissueModel
    level_downsamples: tuple[int, ...] = (1,)
    kind: str = "generic-tiff"

    @property
    def slide_id(self) -> str:
        return self.path.stem

    def tissue_mask(self, mask_mpp: float = 16.0) -> np.ndarray:
        """The true tissue mask sampled at ``mask_mpp`` over the whole slide (row = y)."""
        w = int(math.ceil(self.width_px * self.mpp / mask_mpp))
        h = int(math.ceil(self.height_px * self.mpp / mask_mpp))
        return self.model.mask(0, 0, w, h, mask_mpp)

    def tissue_bbox_level0(self, mask_mpp: float = 4.0) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` level-0 bounding box of the true tissue (``x1``/``y1`` exclusive)."""
        m = self.tissue_mask(mask_mpp)
        if not m.any():
            raise ValueError(f"{self.path}: has no tissue")
        ys, xs = np.nonzero(m)
        f = mask_mpp / self.mpp
        return (
            int(xs.min() * f),
            int(ys.min() * f),
            min(self.width_px, int(math.ceil((xs.max() + 1) * f))),
            min(self.height_px, int(math.ceil((ys.max() + 1) * f))),
        )


JPEG_QUALITY = 90


def _encode_jpeg(tile: np.ndarray) -> bytes:
    """Encode one RGB tile exactly as tifffile does for ``compression='jpeg'`` (YCbCr 2x2)."""
    return tifffile.TIFF.COMPRESSORS[7](
        tile, level=JPEG_QUALITY, subsampling=(2, 2), colorspace="RGB", outcolorspace="YCBCR"
    )


def _tiles(
    model: TissueModel, width: int, height: int, mpp: float, tile: int, reuse_interior: bool = False
) -> Iterator[bytes]:
    """Row-major JPEG tiles of one level, each a full ``tile`` square (edges padded with glass).

    Tiles of bare glass are encoded once. With ``reuse_interior``, tiles wholly inside tissue
    (and away from pen strokes) repeat one rendered texture tile: much faster for huge slides,
    at the price of a periodic texture.
    """
    glass: bytes | None = None
    interior: bytes | None = None
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            kind = model.tile_class(tx, ty, tile, tile, mpp)
            if kind != "edge" and model.strokes:
                xs, ys = model._centres(tx, tile, mpp), model._centres(ty, tile, mpp)
                if any(model._stroke_alpha(s, xs, ys) is not None for s in model.strokes):
                    kind = "edge"
            if kind == "glass":
                if glass is None:
                    blank = np.empty((tile, tile, 3), np.uint8)
                    blank[:] = np.round(GLASS_RGB).astype(np.uint8)
                    glass = _encode_jpeg(blank)
                yield glass
            elif kind == "interior" and reuse_interior:
                if interior is None:
                    interior = _encode_jpeg(model.render(tx, ty, tile, tile, mpp))
                yield interior
            else:
                yield _encode_jpeg(model.render(tx, ty, tile, tile, mpp))


def _levels(width: int, height: int, factor: int, min_side: int) -> list[int]:
    """Downsamples 1, f, f², ... while the level's shorter side stays at least ``min_side``."""
    out = [1]
    while min(width, height) // (out[-1] * factor) >= min_side:
        out.append(out[-1] * factor)
    return out


def _write_level(
    tif: tifffile.TiffWriter,
    model: TissueModel,
    width: int,
    height: int,
    mpp: float,
    tile: int,
    reuse_interior: bool = False,
    **kwargs,
) -> None:
    tif.write(
        _tiles(model, width, height, mpp, tile, reuse_interior),
        shape=(height, width, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": JPEG_QUALITY},
        metadata=None,
        **kwargs,
    )


def _model_for(width_px: int, height_px: int, mpp: float, seed: int, **kw) -> TissueModel:
    return TissueModel(width_um=width_px * mpp, height_um=height_px * mpp, seed=seed, **kw)


def write_generic_tiff(
    path: str | os.PathLike,
    width_px: int,
    height_px: int,
    *,
    mpp: float = 0.5,
    seed: int = 0,
    resolution_tags: bool = True,
    pyramid: bool = True,
    tile_px: int = 512,
    level_factor: int = 2,
    min_level_side_px: int = 256,
    reuse_interior: bool = False,
    model: TissueModel | None = None,
    **model_kw,
) -> SyntheticSlide:
    """Write a JPEG-tiled pyramidal TIFF that OpenSlide reads as ``generic-tiff``.

    Every level is a top-level IFD (``subfiletype`` 0 then 1); resolution tags in pixels per cm
    carry ``mpp`` unless ``resolution_tags`` is False. ``pyramid=False`` writes level 0 only.
    ``reuse_interior`` repeats one texture tile inside the tissue (fast, for huge benchmark
    slides). Extra keywords go to :class:`TissueModel` (``pen_marks``, ``blank``, ``n_blobs``...).
    """
    path = Path(path)
    model = model or _model_for(width_px, height_px, mpp, seed, **model_kw)
    downs = _levels(width_px, height_px, level_factor, min_level_side_px) if pyramid else [1]
    bigtiff = width_px * height_px > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for i, d in enumerate(downs):
            w, h = -(-width_px // d), -(-height_px // d)
            res: dict = {}
            if resolution_tags:
                px_per_cm = 1e4 / (mpp * d)
                res = dict(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            _write_level(
                tif,
                model,
                w,
                h,
                mpp * d,
                tile_px,
                reuse_interior,
                subfiletype=0 if i == 0 else 1,
                **res,
            )
    return SyntheticSlide(path, width_px, height_px, mpp, model, tuple(downs), "generic-tiff")


def write_svs(
    path: str | os.PathLike,
    width_px: int,
    height_px: int,
    *,
    mpp: float = 0.25,
    seed: int = 0,
    app_mag: float | None = None,
    description_mpp: float | None = None,
    level_factor: int = 4,
    min_level_side_px: int = 256,
    reuse_interior: bool = False,
    model: TissueModel | None = None,
    **model_kw,
) -> SyntheticSlide:
    """Write an Aperio-style SVS: ImageDescription with ``MPP`` and ``AppMag``, 256 px tiles.

    Layout: level 0 (tiled), a stripped thumbnail, the lower levels (tiled), then a label image.
    ``app_mag`` defaults to ``10 / mpp`` (40 for 0.25 µm/px); ``description_mpp`` overrides the
    recorded MPP (to make suspicious metadata).
    """
    path = Path(path)
    model = model or _model_for(width_px, height_px, mpp, seed, **model_kw)
    app_mag = round(10.0 / mpp) if app_mag is None else app_mag
    rec_mpp = mpp if description_mpp is None else description_mpp
    downs = _levels(width_px, height_px, level_factor, min_level_side_px)
    head = "Aperio Image Library v12.0.15 \r\n"
    bigtiff = width_px * height_px > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for i, d in enumerate(downs):
            w, h = -(-width_px // d), -(-height_px // d)
            if i == 0:
                desc = (
                    f"{head}{width_px}x{height_px} [0,0 {width_px}x{height_px}] (256x256) "
                    f"JPEG/RGB Q=90|AppMag = {app_mag:g}|MPP = {rec_mpp:g}"
                )
            else:
                desc = f"{head}{width_px}x{height_px} -> {w}x{h} - |AppMag = {app_mag:g}|MPP = {rec_mpp * d:g}"
            _write_level(tif, model, w, h, mpp * d, 256, reuse_interior, description=desc)
            if i == 0:
                # Aperio's second IFD is a small stripped thumbnail.
                scale = max(width_px, height_px) / 512
                tw, th = max(1, int(width_px / scale)), max(1, int(height_px / scale))
                thumb = model.render(0, 0, tw, th, mpp * width_px / tw)
                tif.write(thumb, photometric="rgb", description=f"{head}{tw}x{th}", metadata=None)
        label = np.full((128, 128, 3), 255, dtype=np.uint8)
        tif.write(
            label,
            photometric="rgb",
            subfiletype=1,
            description=f"{head}label 128x128",
            metadata=None,
        )
    return SyntheticSlide(path, width_px, height_px, mpp, model, tuple(downs), "aperio")


# ------------------------------------------------------------------------------ special cases
def write_no_mpp_tiff(
    path: str | os.PathLike, width_px: int = 2048, height_px: int = 2048, **kw
) -> SyntheticSlide:
    """A pyramidal TIFF with no µm/px anywhere (no resolution tags, no description)."""
    return write_generic_tiff(path, width_px, height_px, resolution_tags=False, **kw)


def write_tiny_biopsy(
    path: str | os.PathLike, width_px: int = 1600, height_px: int = 1200, *, mpp: float = 0.5, **kw
) -> SyntheticSlide:
    """A slide smaller than one 4096 px region at 0.5 µm/px, with one small tissue fragment."""
    kw.setdefault("n_blobs", 1)
    return write_generic_tiff(path, width_px, height_px, mpp=mpp, **kw)


def write_single_level_tiff(
    path: str | os.PathLike, width_px: int = 2048, height_px: int = 2048, **kw
) -> SyntheticSlide:
    """A non-pyramidal tiled TIFF (level 0 only)."""
    return write_generic_tiff(path, width_px, height_px, pyramid=False, **kw)


def write_blank_slide(
    path: str | os.PathLike, width_px: int = 2048, height_px: int = 2048, **kw
) -> SyntheticSlide:
    """A pyramidal TIFF of bare glass: no tissue anywhere."""
    return write_generic_tiff(path, width_px, height_px, blank=True, **kw)


def write_suspicious_mpp_svs(
    path: str | os.PathLike, width_px: int = 2048, height_px: int = 2048, **kw
) -> SyntheticSlide:
    """An SVS whose MPP (0.25) disagrees with its AppMag (10×, i.e. about 1 µm/px) by 4×."""
    kw.setdefault("mpp", 0.25)
    kw.setdefault("app_mag", 10)
    return write_svs(path, width_px, height_px, **kw)


def write_not_a_slide(path: str | os.PathLike) -> Path:
    """A text file with a slide's extension (e.g. ``notes.svs``)."""
    path = Path(path)
    path.write_text("This is not a slide; it is a text file with a .svs name.\n")
    return path


def write_truncated_tiff(
    path: str | os.PathLike, width_px: int = 2048, height_px: int = 2048, keep: float = 0.5, **kw
) -> Path:
    """A pyramidal TIFF cut to ``keep`` of its bytes, as after an interrupted copy."""
    path = Path(path)
    write_generic_tiff(path, width_px, height_px, **kw)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    return path


def write_corrupt_tile_slide(
    path: str | os.PathLike,
    width_px: int = 2048,
    height_px: int = 2048,
    *,
    level: int = 0,
    tile_index: int | None = None,
    **kw,
) -> tuple[SyntheticSlide, tuple[int, int]]:
    """A valid pyramid in which one JPEG tile of ``level`` is overwritten with garbage.

    Returns the slide and the level-0 ``(x, y)`` of the damaged tile's top-left corner. By default
    the damaged tile is the middle one of the level.
    """
    slide = write_generic_tiff(path, width_px, height_px, **kw)
    with tifffile.TiffFile(slide.path) as tif:
        page = tif.pages[level]
        offsets, counts = page.dataoffsets, page.databytecounts
        tiles_across = -(-page.imagewidth // page.tilewidth)
        tiles_down = -(-page.imagelength // page.tilelength)
        if tile_index is None:
            tile_index = (tiles_down // 2) * tiles_across + tiles_across // 2
        off, count = offsets[tile_index], counts[tile_index]
        d = slide.level_downsamples[level]
        xy = (
            (tile_index % tiles_across) * page.tilewidth * d,
            (tile_index // tiles_across) * page.tilelength * d,
        )
    # Keep the SOI marker; garble the rest so every decoder gives up on this tile.
    garbage = np.random.default_rng(0).integers(0, 256, size=count - 2, dtype=np.uint8)
    garbage[::7] = 0xFF
    with open(slide.path, "r+b") as fh:
        fh.seek(off + 2)
        fh.write(garbage.tobytes())
    return slide, xy


def write_huge_claim_tiff(
    path: str | os.PathLike,
    width_px: int = 300_000,
    height_px: int = 300_000,
    tile_px: int = 512,
    *,
    mpp: float | None = None,
) -> Path:
    """A tiled JPEG TIFF whose header claims ``width_px`` × ``height_px`` but holds one tile.

    Every entry of its tile table points at the same small JPEG tile, so OpenSlide opens it
    as a generic TIFF of the claimed size while the file stays a few MB: the shape of a
    damaged or forged header, for memory-bound tests. No µm/px is recorded unless ``mpp`` is
    given (then as resolution tags in pixels per cm, like :func:`write_generic_tiff`).
    """
    import struct

    import imagecodecs

    path = Path(path)
    tile = np.full((tile_px, tile_px, 3), 240, np.uint8)
    data = imagecodecs.jpeg8_encode(tile, level=90, colorspace="RGB", outcolorspace="RGB")
    n_tiles = -(-width_px // tile_px) * -(-height_px // tile_px)
    entries = [  # (tag, type, count, value or bytes); types 3 SHORT, 4 LONG
        (256, 4, 1, width_px),
        (257, 4, 1, height_px),
        (258, 3, 3, struct.pack("<3H", 8, 8, 8)),
        (259, 3, 1, 7),  # JPEG
        (262, 3, 1, 2),  # RGB
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 3, 1, tile_px),
        (323, 3, 1, tile_px),
        (324, 4, n_tiles, None),  # TileOffsets, filled below
        (325, 4, n_tiles, struct.pack(f"<{n_tiles}I", *([len(data)] * n_tiles))),
    ]
    entries = sorted(entries + _resolution_entries(mpp), key=lambda e: e[0])  # in tag order
    ifd_at = 8
    ifd_size = 2 + 12 * len(entries) + 4
    blob_at = ifd_at + ifd_size
    tile_at = blob_at
    blobs = b""
    fields = []
    # The tile bytes first, then each out-of-line value; offsets follow from the order.
    blobs += data
    offsets = struct.pack(f"<{n_tiles}I", *([tile_at] * n_tiles))
    for tag, typ, count, value in entries:
        if tag == 324:
            value = offsets
        if isinstance(value, bytes) and len(value) > 4:
            fields.append((tag, typ, count, struct.pack("<I", blob_at + len(blobs))))
            blobs += value
        elif isinstance(value, bytes):
            fields.append((tag, typ, count, value.ljust(4, b"\0")))
        else:
            packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
            fields.append((tag, typ, count, packed))
    with open(path, "wb") as fh:
        fh.write(b"II*\0" + struct.pack("<I", ifd_at))
        fh.write(struct.pack("<H", len(fields)))
        for tag, typ, count, value in fields:
            fh.write(struct.pack("<HHI", tag, typ, count) + value)
        fh.write(struct.pack("<I", 0))
        fh.write(blobs)
    return path


def _resolution_entries(mpp: float | None) -> list[tuple]:
    """X/YResolution (RATIONAL, type 5) and ResolutionUnit (cm) IFD entries; none without ``mpp``."""
    import struct

    if mpp is None:
        return []
    per_cm = struct.pack("<II", round(1e4 / mpp * 1000), 1000)
    return [(282, 5, 1, per_cm), (283, 5, 1, per_cm), (296, 3, 1, 3)]
