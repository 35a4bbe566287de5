"""Render every output of one slide into ``<out>/<slide_id>/``, all or nothing.

The outputs are written into a hidden temporary folder beside the final one and swapped in by
rename at the end, so a failed or killed render leaves no partial output under the final name
(and an earlier complete render stays until the new one is whole).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from heatmaps.config import HeatmapConfig, config_dict
from heatmaps.inputs import TrainedFold
from heatmaps.ngff import NgffWriter
from heatmaps.paint import paint, region_rows
from heatmaps.qupath import GeoJsonWriter
from heatmaps.render import region_panels, slide_png, title_of
from heatmaps.scores import GRID, SlideScores, percentile, region_maps, score_slide
from hipt import __version__
from hipt.h5schema import FeaturesInfo
from hipt.models.checkpoint import file_sha256
from hipt.models.region_encoder import RegionEncoder
from hipt.resample import box_reduce
from hipt.slide import Slide

__all__ = ["OUTPUTS", "SlideJob", "fingerprint", "is_rendered", "render_slide"]

OUTPUTS = ("slide.png", "top_regions", "attention.ome.zarr", "attention.geojson", "scores.h5")
RECORD = "heatmap.json"
# Config keys that change no pixel: a render made with other values still counts as done.
_LOCAL_KEYS = ("progress", "device")


@dataclass
class SlideJob:
    """One slide to render and the inputs that define it."""

    info: FeaturesInfo
    slide_path: Path
    features_sha256: str

    @property
    def slide_id(self) -> str:
        return self.info.slide_id


def fingerprint(fold: TrainedFold, job: SlideJob, cfg: HeatmapConfig) -> str:
    """SHA-256 of everything that decides a render: model, features, slide, config."""
    settings = {k: v for k, v in config_dict(cfg).items() if k not in _LOCAL_KEYS}
    blob = {
        "checkpoint_sha256": fold.checkpoint_sha256,
        "features_sha256": job.features_sha256,
        "slide_path": str(job.slide_path.resolve()),
        "config": settings,
        "hipt_version": __version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def is_rendered(folder: Path, key: str) -> bool:
    """True when ``folder`` holds a complete render whose record carries fingerprint ``key``."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("fingerprint") == key and all((folder / o).exists() for o in OUTPUTS)


# ------------------------------------------------------------------------------- maps
def _ranked_top_maps(
    scores: SlideScores, top_maps: list, cfg: HeatmapConfig
) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """Percentile patch and token maps ``[heads + 1, px, px]`` (mean first) of each top region."""
    px = cfg.region_png_px
    step = max(1, px // (GRID * GRID))  # one sample per 16 px token cell for the reference

    def ranked(maps: list[np.ndarray]) -> list[np.ndarray]:
        stacks = [np.concatenate([m.mean(0, keepdims=True), m]) for m in maps]
        ref = [
            np.concatenate([s[h, ::step, ::step].ravel() for s in stacks])
            for h in range(len(stacks[0]))
        ]
        return [np.stack([percentile(s[h], ref[h]) for h in range(len(s))]) for s in stacks]

    tokens: list[np.ndarray | None] = [None] * len(top_maps)
    if top_maps and top_maps[0].token is not None:
        tokens = list(ranked([m.token for m in top_maps]))
    patches: list[np.ndarray | None] = [None] * len(top_maps)
    if top_maps and top_maps[0].patch is not None:
        patches = list(ranked([m.patch for m in top_maps]))
    elif scores.patch_attention is not None:
        heads = scores.patch_attention.shape[1]
        per_head = [scores.patch_rank()] + [scores.patch_rank(h) for h in range(heads)]
        k = px // GRID
        for j, m in enumerate(top_maps):
            grids = np.stack([r[m.index].reshape(GRID, GRID) for r in per_head])
            patches[j] = np.repeat(np.repeat(grids, k, 1), k, 2)
    return patches, tokens


def _write_zarr(
    slide_id: str,
    path: Path,
    scores: SlideScores,
    tokens: dict[int, np.ndarray],
    cfg: HeatmapConfig,
    slide: Slide,
    target_mpp: float,
) -> dict[str, Any]:
    channels = []
    if "slide" in cfg.levels:
        channels.append("region")
    if scores.patch_attention is not None:
        channels.append("patch")
    if tokens:
        channels.append("token")
    d = cfg.zarr.downsample_level0 or 16 * target_mpp / slide.mpp_level0
    writer = NgffWriter(
        path,
        channels,
        slide_size=slide.dimensions,
        mpp_level0=slide.mpp_level0,
        downsample_level0=d,
        chunk_px=cfg.zarr.chunk_px,
        min_side_px=cfg.zarr.min_side_px,
        name=slide_id,
    )
    side = scores.region_size_level0
    slide_rank = scores.slide_rank
    patch_rank = scores.patch_rank() if "patch" in channels else None
    _, _, width = writer.base_shape
    for r0, r1 in writer.bands():
        band = np.zeros((len(channels), r1 - r0, width), np.float32)
        hits = region_rows(scores.coords, side, d, r0, r1 - r0)
        xy = scores.coords[hits].astype(np.float64)
        for c, name in enumerate(channels):
            if name == "region":
                boxes = [(x, y, side, slide_rank[i]) for (x, y), i in zip(xy, hits, strict=True)]
            elif name == "patch":
                boxes = [
                    (x, y, side, patch_rank[i].reshape(GRID, GRID))
                    for (x, y), i in zip(xy, hits, strict=True)
                ]
            else:
                boxes = [
                    (x, y, side, tokens[i])
                    for (x, y), i in zip(xy, hits, strict=True)
                    if i in tokens
                ]
            paint(band[c], r0, d, boxes)
        writer.write_rows(r0, band)
    writer.close()
    return {"channels": channels, "downsample_level0": d, "scales": len(writer.shapes)}


def _write_geojson(
    slide_id: str,
    path: Path,
    scores: SlideScores,
    tokens: dict[int, np.ndarray],
    slide: Slide,
    cfg: HeatmapConfig,
) -> int:
    side = scores.region_size_level0
    ranks = scores.slide_rank
    order = {int(i): r for r, i in enumerate(np.argsort(-scores.slide_attention, kind="stable"))}
    patch_rank = scores.patch_rank() if scores.patch_attention is not None else None
    with (
        open(path, "w") as fh,
        GeoJsonWriter(fh, slide_size=slide.dimensions, name=slide_id) as gj,
    ):
        for i, (x, y) in enumerate(scores.coords):
            m = {
                "attention": float(scores.slide_attention[i]),
                "attention_rank": float(ranks[i]),
                "attention_order": order[i] + 1,
            }
            if patch_rank is not None:
                m["patch_attention_rank_max"] = float(patch_rank[i].max())
            gj.add_box(x, y, side, side, name=f"region {i}", class_name="region", measurements=m)
        if patch_rank is None or "region" not in cfg.levels:
            return gj.count
        cell = side / GRID
        for i in scores.top:
            x, y = scores.coords[i]
            tok = tokens.get(i)
            for k in range(GRID * GRID):
                r, c = divmod(k, GRID)
                m = {
                    "attention": float(scores.patch_attention[i, :, k].mean()),
                    "attention_rank": float(patch_rank[i, k]),
                    "region_attention_rank": float(ranks[i]),
                    **{
                        f"attention_head{h}": float(v)
                        for h, v in enumerate(scores.patch_attention[i, :, k])
                    },
                }
                if tok is not None:
                    t = tok.shape[0] // GRID
                    m["token_attention_rank_mean"] = float(
                        tok[r * t : (r + 1) * t, c * t : (c + 1) * t].mean()
                    )
                gj.add_box(
                    x + c * cell,
                    y + r * cell,
                    cell,
                    cell,
                    name=f"region {i} patch {k}",
                    class_name="patch",
                    measurements=m,
                )
        return gj.count


def _write_scores(path: Path, scores: SlideScores, top_maps: list, tokens_raw: bool) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "hipt.heatmap_scores/1"
        f.create_dataset("coords", data=scores.coords)
        f.create_dataset("slide_attention", data=scores.slide_attention)
        f.create_dataset("slide_attention_rank", data=scores.slide_rank)
        if scores.patch_attention is not None:
            f.create_dataset("patch_attention", data=scores.patch_attention, compression="gzip")
            f.create_dataset("patch_attention_rank", data=scores.patch_rank(), compression="gzip")
        f.create_dataset("top_regions", data=np.asarray(scores.top, np.int64))
        for m in top_maps:
            if tokens_raw and m.token is not None:
                f.create_dataset(f"token_attention/{m.index}", data=m.token, compression="gzip")


# ------------------------------------------------------------------------------- driver
def render_slide(
    fold: TrainedFold,
    job: SlideJob,
    encoder: RegionEncoder | None,
    cfg: HeatmapConfig,
    out_root: Path,
    *,
    say=print,
) -> dict[str, Any]:
    """Score and render one slide into ``out_root/<slide_id>/``; return its ``heatmap.json``.

    The caller holds the slide's lock (``out_root/.<slide_id>.lock``), so any temporary folder
    of this slide found here was left by a dead run.
    """
    t0 = time.perf_counter()
    final = out_root / job.slide_id
    escaped = glob.escape(job.slide_id)  # "s[1]" must not match (and remove) the folders of "s1"
    for stale in [*out_root.glob(f".{escaped}.tmp-*"), *out_root.glob(f".{escaped}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed render
    tmp = out_root / f".{job.slide_id}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        record = _render_into(tmp, fold, job, encoder, cfg, say)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
        _swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _render_into(
    folder: Path,
    fold: TrainedFold,
    job: SlideJob,
    encoder: RegionEncoder | None,
    cfg: HeatmapConfig,
    say,
) -> dict[str, Any]:
    """Score the slide, read its top regions, write every output into ``folder``."""
    info = job.info
    clock = _Clock()
    scores = score_slide(
        info,
        fold.model,
        task=fold.task,
        class_names=fold.class_names,
        input_key=fold.input_key,
        encoder=encoder,
        want_patches="region" in cfg.levels,
        top_k=cfg.top_k,
        device=cfg.device,
    )
    with Slide(job.slide_path) as slide:
        if not math.isclose(
            slide.mpp_level0, float(info.attrs.get("mpp_level0", slide.mpp_level0)), rel_tol=1e-3
        ):
            raise ValueError(
                f"{job.slide_path}: level-0 µm/px {slide.mpp_level0:g} differs from the features' "
                f"{info.attrs['mpp_level0']} (another scan?)"
            )
        clock.lap("score")
        top_maps = _top_region_maps(
            job.slide_id, slide, scores, fold, encoder, cfg, float(info.attrs["target_mpp"]), say
        )
        clock.lap("top_regions")
        outputs = _write_outputs(
            job.slide_id,
            folder,
            slide,
            scores,
            top_maps,
            cfg,
            float(info.attrs["target_mpp"]),
            clock,
        )
        slide_info = {
            "path": str(job.slide_path),
            "size_level0": list(slide.dimensions),
            "mpp_level0": slide.mpp_level0,
        }
    return _record(fold, job, cfg, scores, top_maps, outputs, slide_info, clock)


def _top_region_maps(
    slide_id: str,
    slide: Slide,
    scores: SlideScores,
    fold: TrainedFold,
    encoder: RegionEncoder | None,
    cfg: HeatmapConfig,
    target_mpp: float,
    say,
) -> list:
    """Pixels and (token, smoothed patch) maps of the top regions, read from the slide."""
    want_tokens = "token" in cfg.levels and cfg.top_k > 0
    if not scores.top or not (want_tokens or "region" in cfg.levels):
        return []
    region_vit = getattr(fold.model, "local_vit", None) or (encoder.vit4k if encoder else None)
    maps = []
    for r, i in enumerate(scores.top):
        say(f"{slide_id}: top region {r + 1}/{len(scores.top)}")
        xy = tuple(scores.coords[i])
        if encoder is None or not (want_tokens or cfg.smoothing.passes > 1):
            maps.append(_plain_region(slide, i, xy, target_mpp, cfg.region_png_px))
            continue
        maps.append(
            region_maps(
                slide,
                encoder,
                region_vit if cfg.smoothing.passes > 1 else None,
                i,
                xy,
                target_mpp=target_mpp,
                out_px=cfg.region_png_px,
                passes=cfg.smoothing.passes,
                want_tokens=want_tokens,
            )
        )
    return maps


def _write_outputs(
    slide_id: str,
    folder: Path,
    slide: Slide,
    scores: SlideScores,
    top_maps: list,
    cfg: HeatmapConfig,
    target_mpp: float,
    clock: _Clock,
) -> dict[str, Any]:
    """slide.png, top_regions/, the zarr, the GeoJSON and scores.h5; what they hold."""
    patches, tokens = _ranked_top_maps(scores, top_maps, cfg)
    token_mean = {m.index: t[0] for m, t in zip(top_maps, tokens, strict=True) if t is not None}
    if "slide" in cfg.levels:
        thumb, ds = slide.thumbnail(cfg.thumbnail_px)
        slide_png(
            folder / "slide.png",
            thumb,
            ds,
            scores.coords,
            scores.region_size_level0,
            scores.slide_rank,
            colormap=cfg.colormap,
            opacity=cfg.opacity,
            title=f"{slide_id}: {title_of(scores.prediction)}",
        )
    else:
        Image.new("RGB", (1, 1), "white").save(folder / "slide.png")
    clock.lap("slide_png")
    (folder / "top_regions").mkdir()
    for r, (m, p, t) in enumerate(zip(top_maps, patches, tokens, strict=True)):
        x, y = scores.coords[m.index]
        region_panels(
            folder / "top_regions",
            r + 1,
            m.pixels,
            p,
            t,
            colormap=cfg.colormap,
            opacity=cfg.opacity,
            heads=cfg.heads,
            caption=f"rank {r + 1}: region {m.index} at ({x}, {y})",
        )
    clock.lap("top_regions_png")
    outputs = {
        "zarr": _write_zarr(
            slide_id, folder / "attention.ome.zarr", scores, token_mean, cfg, slide, target_mpp
        )
    }
    clock.lap("zarr")
    outputs["geojson_features"] = _write_geojson(
        slide_id, folder / "attention.geojson", scores, token_mean, slide, cfg
    )
    clock.lap("geojson")
    want_tokens = "token" in cfg.levels and cfg.top_k > 0
    _write_scores(folder / "scores.h5", scores, top_maps, want_tokens)
    return outputs


def _record(
    fold: TrainedFold,
    job: SlideJob,
    cfg: HeatmapConfig,
    scores: SlideScores,
    top_maps: list,
    outputs: dict[str, Any],
    slide_info: dict[str, Any],
    clock: _Clock,
) -> dict[str, Any]:
    """The content of ``heatmap.json``."""
    info = job.info
    return {
        "schema": "hipt.heatmap/1",
        "slide_id": job.slide_id,
        "fingerprint": fingerprint(fold, job, cfg),
        "run": {
            "fold_dir": str(fold.fold_dir),
            "cohort": fold.cohort,
            "fold": fold.fold,
            "task": fold.task,
            "model": fold.model_name,
            "checkpoint_sha256": fold.checkpoint_sha256,
        },
        "prediction": scores.prediction,
        "weights": {
            k: info.attrs.get(k)
            for k in ("vit256_sha256", "vit4k_sha256", "random_depth", "random_seed")
        },
        "region_vit4k": scores.region_vit,
        "features": {
            "path": str(info.path),
            "sha256": job.features_sha256,
            "n_regions": info.n_regions,
        },
        "slide": slide_info,
        "region_size_level0": scores.region_size_level0,
        "top_regions": [
            {
                "rank": r + 1,
                "region": i,
                "x": int(scores.coords[i][0]),
                "y": int(scores.coords[i][1]),
                "attention": float(scores.slide_attention[i]),
                "shifts_px": top_maps[r].shifts_px if r < len(top_maps) else [],
            }
            for r, i in enumerate(scores.top)
        ],
        "outputs": outputs,
        "timings_s": {k: round(v, 3) for k, v in clock.laps.items()},
        "peak_rss_mib_after": clock.peak_mib,
        "config": config_dict(cfg),
        "hipt_version": __version__,
    }


class _Clock:
    """Seconds per phase, for the record and the benchmark."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}  # the process's peak RSS so far, after each phase
        self.lap("start")

    def lap(self, name: str) -> None:
        import resource

        now = time.perf_counter()
        if name != "start":
            self.laps[name] = now - self.t
        self.t = now
        self.peak_mib[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _plain_region(slide: Slide, index: int, xy: tuple[int, int], target_mpp: float, out_px: int):
    from heatmaps.scores import REGION_PX, RegionMaps

    region = slide.read_region(int(xy[0]), int(xy[1]), REGION_PX, target_mpp)
    return RegionMaps(
        index=index,
        pixels=box_reduce(region, REGION_PX // out_px),
        token=None,
        patch=None,
        shifts_px=[0],
    )


def features_sha256(path: Path) -> str:
    """SHA-256 of a features file (recorded in ``heatmap.json``, part of the fingerprint)."""
    return file_sha256(path)
