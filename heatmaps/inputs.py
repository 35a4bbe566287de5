"""What a heatmap is made from: a trained fold, a features file, its slide and its encoders.

Every check that can refuse an input lives here and raises :class:`InputError` with one line
naming the file and the problem: a fold without a model, features made with other weights than
the run's, a slide that moved, a slide id outside the run's cohort.

A fold folder (``runs/<cohort>/fold_k/`` from ``hipt train``) holds ``best.pt`` (the selected
model's state dict) and ``metrics.json`` (model name, builder arguments, task); its run folder
holds the resolved ``config.yaml`` (cohort CSV, features folder, label map).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from hipt.h5schema import FeaturesInfo, SchemaError, read_features_info, read_tiles
from hipt.models.checkpoint import (
    CheckpointError,
    extract_state_dict,
    file_sha256,
    read_checkpoint,
    strip_prefixes,
)
from hipt.models.region_encoder import RegionEncoder, build_region_encoder
from hipt.models.slide import input_key, load_slide_model

__all__ = [
    "ENCODER_KEYS",
    "InputError",
    "TrainedFold",
    "build_encoder",
    "check_same_encoders",
    "find_slide",
    "load_fold",
    "open_features",
]

CHECKPOINT_FILE = "best.pt"
METRICS_FILE = "metrics.json"
# Features attrs that say which encoders made them: equal values mean the same embedding.
ENCODER_KEYS = ("vit256_sha256", "vit4k_sha256", "random_seed", "random_depth", "target_mpp")


class InputError(ValueError):
    """An input that cannot make a heatmap; the message is one line naming file and problem."""


@dataclass
class TrainedFold:
    """A trained slide model and what it was trained on."""

    fold_dir: Path
    fold: int
    cohort: str
    task: str  # "subtype" or "survival"
    model_name: str
    model: torch.nn.Module
    checkpoint_sha256: str
    input_key: str  # "region_features" or "patch_features"
    class_names: list[str] = field(default_factory=list)
    cohort_csv: Path | None = None
    features_dir: Path | None = None
    slide_ids: set[str] | None = None
    encoder_attrs: dict[str, Any] | None = None  # ENCODER_KEYS of the run's training features

    def check_slide(self, slide_id: str) -> None:
        """Refuse a slide the run's cohort does not list."""
        if self.slide_ids is not None and slide_id not in self.slide_ids:
            raise InputError(
                f"slide id {slide_id!r} is not in the run's cohort ({self.cohort_csv}); "
                "heatmaps explain a model on the slides of its own cohort"
            )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    return data if isinstance(data, dict) else {}


def load_fold(fold_dir: str | os.PathLike, device: str = "cpu") -> TrainedFold:
    """Load the selected model of a fold folder and its run's cohort.

    Raises
    ------
    InputError
        No ``best.pt`` / ``metrics.json`` (not a finished fold), or a model that does not load.
    """
    fold_dir = Path(fold_dir)
    if not fold_dir.is_dir():
        raise InputError(f"{fold_dir}: no such run folder")
    if not (fold_dir / METRICS_FILE).is_file() and any(fold_dir.glob("fold_*")):
        raise InputError(f"{fold_dir}: a run folder; pass one of its folds, e.g. {fold_dir}/fold_0")
    ckpt = fold_dir / CHECKPOINT_FILE
    if not ckpt.is_file() or not (fold_dir / METRICS_FILE).is_file():
        raise InputError(
            f"{fold_dir}: no trained model ({CHECKPOINT_FILE} and {METRICS_FILE} from a finished "
            "'hipt train' fold are needed)"
        )
    metrics = _read_json(fold_dir / METRICS_FILE)
    try:
        name, args = str(metrics["model"]), dict(metrics["model_args"])
    except (KeyError, TypeError):
        raise InputError(f"{fold_dir / METRICS_FILE}: no model / model_args") from None
    try:
        model = load_slide_model(ckpt, name=name, **args).to(device)
        key = input_key(name)
    except Exception as exc:  # a foreign or damaged file surfaces as many types
        raise InputError(f"{ckpt}: cannot load the {name} model ({exc})") from None
    cfg = _run_config(fold_dir.parent)
    label_map = cfg.get("label_map") or {}
    fold = TrainedFold(
        fold_dir=fold_dir,
        fold=int(metrics.get("fold", -1)),
        cohort=str(cfg.get("cohort") or fold_dir.parent.name),
        task=str(metrics.get("task") or cfg.get("task") or "subtype"),
        model_name=name,
        model=model,
        checkpoint_sha256=file_sha256(ckpt),
        input_key=key,
        class_names=[k for k, _ in sorted(label_map.items(), key=lambda kv: int(kv[1]))],
    )
    _attach_cohort(fold, cfg)
    return fold


def _attach_cohort(fold: TrainedFold, cfg: dict[str, Any]) -> None:
    # The cohort's slide ids and the encoders its features were made with.
    if cfg.get("csv") and Path(cfg["csv"]).is_file():
        fold.cohort_csv = Path(cfg["csv"])
        try:
            ids = pd.read_csv(fold.cohort_csv, dtype=str)["slide_id"]
        except (KeyError, ValueError, OSError) as exc:
            raise InputError(f"{fold.cohort_csv}: cannot read slide_id column ({exc})") from None
        fold.slide_ids = {s.strip() for s in ids.dropna()}
    if cfg.get("features_dir") and Path(cfg["features_dir"]).is_dir():
        fold.features_dir = Path(cfg["features_dir"])
        for slide_id in sorted(fold.slide_ids or ()):
            try:
                info = read_features_info(fold.features_dir / f"{slide_id}.h5")
            except SchemaError:
                continue
            fold.encoder_attrs = {k: info.attrs.get(k) for k in ENCODER_KEYS}
            break


def open_features(path: str | os.PathLike, fold: TrainedFold) -> FeaturesInfo:
    """Read a features file's header and check it against the fold (encoders, cohort, inputs)."""
    try:
        info = read_features_info(path)
    except SchemaError as exc:
        raise InputError(str(exc)) from None
    fold.check_slide(info.slide_id)
    if fold.encoder_attrs is not None:
        for key in ENCODER_KEYS:
            have, want = info.attrs.get(key), fold.encoder_attrs.get(key)
            if str(have) != str(want):
                raise InputError(
                    f"{info.path}: made with other encoders than the run's training features "
                    f"({key} {have!r}, the run's {want!r}); embed the slide with the run's weights"
                )
    if fold.input_key == "patch_features" and not info.has_patch_features:
        raise InputError(f"{info.path}: {fold.model_name} needs patch_features; the file has none")
    return info


def find_slide(
    info: FeaturesInfo,
    slide: str | os.PathLike | None = None,
    tiles_dir: str | os.PathLike | None = None,
    slides_dir: str | os.PathLike | None = None,
) -> Path:
    """The slide of a features file: ``slide`` if given, else from the provenance.

    The features file's own ``slide_path`` attr when it has one, else its tiles file
    (``tiles_dir/<slide_id>.h5`` or ``tiles/`` beside the features folder; its hash must match
    the features' ``tiles_sha256``) and that file's recorded slide path (``slides_dir`` first).
    """
    from hipt.embed import resolve_slide_path, tiles_sha256

    if slide is not None:
        if not Path(slide).is_file():
            raise InputError(f"{slide}: slide not found")
        return Path(slide)
    recorded = info.attrs.get("slide_path")
    if recorded and Path(str(recorded)).is_file():
        return Path(str(recorded))
    places = [Path(tiles_dir)] if tiles_dir else []
    places.append(info.path.parent.parent / "tiles")
    tiles_path = next(
        (p / f"{info.slide_id}.h5" for p in places if (p / f"{info.slide_id}.h5").is_file()), None
    )
    if tiles_path is None:
        raise InputError(
            f"{info.path}: no slide path recorded and no tiles file {info.slide_id}.h5 in "
            f"{', '.join(map(str, places))}; pass --slide or --tiles"
        )
    try:
        tiles = read_tiles(tiles_path)
    except SchemaError as exc:
        raise InputError(str(exc)) from None
    want = info.attrs.get("tiles_sha256")
    if want and tiles_sha256(tiles) != want:
        raise InputError(f"{tiles_path}: not the tiling {info.path.name} was embedded from")
    found, looked = resolve_slide_path(tiles, slides_dir)
    if found is None:
        raise InputError(
            f"{info.path}: slide {tiles.attrs['slide_path']} not found (moved? looked at "
            f"{', '.join(map(str, looked))}); pass --slide or --slides DIR"
        )
    return found


def _file_depth(path: Path) -> int | None:
    # Blocks in a weights file, so shallow encoders (tests, ablations) load strictly.
    try:
        state = strip_prefixes(extract_state_dict(read_checkpoint(path)))
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    return max(blocks) + 1 if blocks else None


def _random_depths(attrs: dict[str, Any]) -> tuple[int, int]:
    text = str(attrs.get("random_depth") or "12,6")
    a, b = text.split(",")
    return int(a), int(b)


def build_encoder(
    attrs: dict[str, Any],
    vit256: str | os.PathLike | None,
    vit4k: str | os.PathLike | None,
    *,
    device: str = "cpu",
    patch_batch: int = 64,
) -> RegionEncoder:
    """The region encoder a features file was made with (its attrs name the weights' hashes).

    Encoders recorded as ``random`` are rebuilt from the recorded seed and depths; the others
    load from ``vit256`` / ``vit4k`` and must hash to the recorded values.
    """
    depth256, depth4k = _random_depths(attrs)
    files = {"vit256": vit256, "vit4k": vit4k}
    kwargs: dict[str, Any] = {}
    for name, default in (("vit256", depth256), ("vit4k", depth4k)):
        recorded = str(attrs.get(f"{name}_sha256"))
        path = files[name]
        if recorded == "random":
            if path is not None:
                raise InputError(
                    f"{attrs.get('slide_id')}: features were made with a random {name}, "
                    f"not with --{name} {path}"
                )
            kwargs[f"{name}_kwargs"] = {"depth": default}
            continue
        if path is None:
            raise InputError(
                f"{attrs.get('slide_id')}: features were embedded with {name} weights sha256 "
                f"{recorded[:12]}…; pass that file with --{name}"
            )
        depth = _file_depth(Path(path))
        if depth is not None:
            kwargs[f"{name}_kwargs"] = {"depth": depth}
    random = "random" in (str(attrs.get("vit256_sha256")), str(attrs.get("vit4k_sha256")))
    try:
        encoder, provenance = build_region_encoder(
            vit256,
            vit4k,
            random_weights=random,
            device=device,
            patch_batch=patch_batch,
            seed=int(attrs.get("random_seed", 0)) if random else 0,
            **kwargs,
        )
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    check_same_encoders(attrs, provenance)
    return encoder


def check_same_encoders(attrs: dict[str, Any], provenance: dict[str, Any]) -> None:
    """Refuse weights whose hashes differ from the ones a features file records."""
    for key in ("vit256_sha256", "vit4k_sha256"):
        if str(provenance[key]) != str(attrs.get(key)):
            raise InputError(
                f"{attrs.get('slide_id')}: {key} of the given weights is "
                f"{str(provenance[key])[:12]}…, the features were made with "
                f"{str(attrs.get(key))[:12]}…"
            )
