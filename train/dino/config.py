"""Configuration of ``hipt pretrain stage1|stage2``: one typed schema per stage, shared sections.

Defaults are the original HIPT/DINO settings (ViT-S/16 on 256 px patches; ViT-4K on [384,16,16]
patch-embedding grids); ``train/configs/dino_*.yaml`` hold the GPU-node and tiny-CPU variants.
Every type and range is checked before any work starts; an unknown key is an error.

Examples
--------
>>> cfg = load_stage_config("stage2", overrides=["data.features_dir=features", "optim.lr=0.001"])
>>> cfg.optim.lr, cfg.model.arch, cfg.crops.global_tokens
(0.001, 'vit4k_xs', 14)
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from hipt.config import ConfigError, ConfigModel, RelPath, config_dict, load_config, save_config

__all__ = [
    "ConfigError",
    "Stage1Config",
    "Stage2Config",
    "config_dict",
    "load_stage_config",
    "save_config",
]


class ModelConfig(ConfigModel):
    """Backbone (a registered hipt encoder) and DINO projection head."""

    arch: Literal["vit256_s16", "vit4k_xs"] = "vit256_s16"
    # Builder keywords that change the architecture (e.g. {depth: 2} for tests). Widths stay,
    # so embeddings keep the features schema; they are recorded in the exported weights.
    kwargs: dict[str, Any] = Field(default_factory=dict)
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    out_dim: int = Field(65536, ge=2)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    norm_last_layer: bool = True

    @model_validator(mode="after")
    def _widths(self) -> ModelConfig:
        for key in ("embed_dim", "in_chans", "img_size", "num_classes", "global_pool"):
            if key in self.kwargs:
                raise ValueError(
                    f"model.kwargs.{key} cannot be changed: embeddings must keep the "
                    "features schema (384 / 192 wide) and the native 16x16 grid"
                )
        return self


class Vit4kModelConfig(ModelConfig):
    """:class:`ModelConfig` of stage 2: ViT-4K by default."""

    arch: Literal["vit256_s16", "vit4k_xs"] = "vit4k_xs"


class DinoConfig(ConfigModel):
    """Self-distillation: temperatures, centring, teacher EMA."""

    student_temp: float = Field(0.1, gt=0.0)
    teacher_temp: float = Field(0.04, gt=0.0)
    warmup_teacher_temp: float = Field(0.04, gt=0.0)
    warmup_teacher_temp_epochs: float = Field(0.0, ge=0.0)
    center_momentum: float = Field(0.9, ge=0.0, le=1.0)
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0)
    momentum_teacher_end: float = Field(1.0, ge=0.0, le=1.0)
    # KoLeo spreading term (dinov2) on the student's first global crop, 0 = DINO as published.
    # Short runs on small cohorts collapse towards one embedding without it.
    koleo_weight: float = Field(0.0, ge=0.0)


class OptimConfig(ConfigModel):
    """AdamW with cosine schedules (learning rate scaled by global batch / 256)."""

    lr: float = Field(5e-4, gt=0.0)  # at a global batch of 256
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_epochs: float = Field(10.0, ge=0.0)
    weight_decay: float = Field(0.04, ge=0.0)
    weight_decay_end: float = Field(0.4, ge=0.0)
    clip_grad: float = Field(3.0, ge=0.0)  # global grad-norm clip; 0 = off
    freeze_last_layer_epochs: float = Field(1.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool | Literal["auto"] = "auto"  # fused AdamW kernels (auto: on CUDA)


class TrainConfig(ConfigModel):
    """Run length, batch, devices, checkpoints and logging."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(512, ge=1)  # global, over all processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (each process takes cuda:LOCAL_RANK)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    workers: int = Field(4, ge=0)  # DataLoader processes per training process
    threads: int = Field(0, ge=0)  # torch CPU threads per process; 0 keeps torch's default
    checkpoint_every_steps: int = Field(500, ge=1)
    keep_every_steps: int = Field(0, ge=0)  # also keep checkpoint-<step>.pth every N (0: never)
    stop_at_step: int | None = Field(None, ge=1)  # end early (checkpointed), e.g. a time budget
    log_every_steps: int = Field(1, ge=1)
    progress: bool = True


class TissueConfig(ConfigModel):
    """Per-patch tissue test: glass, ink and debris are not learned."""

    min_fraction: float = Field(0.5, ge=0.0, le=1.0)  # tissue share a patch needs; 0 = off
    min_saturation: float = Field(0.07, ge=0.0, le=1.0)
    dark_max_value: float = Field(0.2, ge=0.0, le=1.0)  # darker pixels are ink or debris
    pen_min_saturation: float = Field(0.3, ge=0.0, le=1.0)
    pen_hue_range: tuple[float, float] = (70.0, 250.0)  # degrees: blue and green ink
    max_tries: int = Field(8, ge=1)  # draws before the most tissue-rich one is taken anyway


class SlideDataConfig(ConfigModel):
    """Stage 1 input: patches streamed from the tiled slides (or a folder of images)."""

    tiles_dir: RelPath | None = None  # tiles/*.h5 from hipt tile
    slides_dir: RelPath | None = None  # where the slides are now, if they moved since tiling
    image_folder: RelPath | None = None  # instead: a folder of patch images (ImageFolder-style)
    reader: Literal["auto", "openslide", "fast"] = "auto"
    tissue: TissueConfig = Field(default_factory=TissueConfig)

    @model_validator(mode="after")
    def _one_source(self) -> SlideDataConfig:
        if (self.tiles_dir is None) == (self.image_folder is None):
            raise ValueError("set exactly one of data.tiles_dir and data.image_folder")
        return self


class FeatureDataConfig(ConfigModel):
    """Stage 2 input: ``patch_features`` [M, 256, 384] of ``features/*.h5``."""

    features_dir: RelPath


class ColorJitterConfig(ConfigModel):
    p: float = Field(0.8, ge=0.0, le=1.0)
    brightness: float = Field(0.4, ge=0.0)
    contrast: float = Field(0.4, ge=0.0)
    saturation: float = Field(0.2, ge=0.0)
    hue: float = Field(0.1, ge=0.0, le=0.5)


class PatchCropsConfig(ConfigModel):
    """Stage 1 multi-crop (DINO): 2 global and N local crops, flips, colour, blur, solarisation.

    The flips and 90° rotations are valid for tissue (no up or down on a slide); the blur and
    solarisation probabilities follow DINO (first global crop always blurred, second sometimes
    solarised).
    """

    global_crops: int = Field(2, ge=1)
    global_px: int = Field(224, ge=16)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = Field(8, ge=0)
    local_px: int = Field(96, ge=16)
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.5, ge=0.0, le=1.0)
    rotate90: bool = True
    color_jitter: ColorJitterConfig = Field(default_factory=ColorJitterConfig)
    grayscale: float = Field(0.2, ge=0.0, le=1.0)
    blur_global: tuple[float, float] = (1.0, 0.1)  # probability for global crop 1, 2 (and on)
    blur_local: float = Field(0.5, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_global2: float = Field(0.2, ge=0.0, le=1.0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # hipt's ViT-256 input normalisation
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @model_validator(mode="after")
    def _ranges(self) -> PatchCropsConfig:
        for name in ("global_scale", "local_scale", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"crops.{name} must be 0 < low <= high, got {(lo, hi)}")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"crops.{name} is a share of the patch: at most 1")
        if self.global_px % 16 or self.local_px % 16:
            raise ValueError("crops.global_px and crops.local_px must be multiples of 16 (tokens)")
        return self


class GridCropsConfig(ConfigModel):
    """Stage 2 crops of the [384, 16, 16] grid, in tokens (the original: 14 and 6, flips)."""

    global_crops: int = Field(2, ge=1)
    global_tokens: int = Field(14, ge=1)
    local_crops: int = Field(8, ge=0)
    local_tokens: int = Field(6, ge=1)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)


class _StageConfig(ConfigModel):
    out: RelPath = "pretrain/run"  # type: ignore[assignment]
    resume: RelPath | None = None  # a checkpoint to resume from (default: OUT/checkpoint.pth)
    dino: DinoConfig = Field(default_factory=DinoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class Stage1Config(_StageConfig):
    """``hipt pretrain stage1``: ViT-256 on 256 px patches."""

    stage: Literal["stage1"] = "stage1"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: SlideDataConfig
    crops: PatchCropsConfig = Field(default_factory=PatchCropsConfig)

    @model_validator(mode="after")
    def _stage(self) -> Stage1Config:
        if self.model.arch != "vit256_s16":
            raise ValueError("stage 1 trains model.arch vit256_s16")
        if max(self.crops.global_px, self.crops.local_px) > 256:
            raise ValueError(
                f"crops larger than the 256 px patch: global_px {self.crops.global_px}, "
                f"local_px {self.crops.local_px}"
            )
        return self


class Stage2Config(_StageConfig):
    """``hipt pretrain stage2``: ViT-4K on [384, 16, 16] patch-embedding grids."""

    stage: Literal["stage2"] = "stage2"
    model: Vit4kModelConfig = Field(default_factory=Vit4kModelConfig)
    data: FeatureDataConfig
    crops: GridCropsConfig = Field(default_factory=GridCropsConfig)

    @model_validator(mode="after")
    def _stage(self) -> Stage2Config:
        if self.model.arch != "vit4k_xs":
            raise ValueError("stage 2 trains model.arch vit4k_xs")
        if max(self.crops.global_tokens, self.crops.local_tokens) > 16:
            raise ValueError(
                f"crops larger than the 16x16 grid: global_tokens {self.crops.global_tokens}, "
                f"local_tokens {self.crops.local_tokens}"
            )
        return self


SCHEMAS: dict[str, type[_StageConfig]] = {"stage1": Stage1Config, "stage2": Stage2Config}


def load_stage_config(
    stage: str,
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict | None = None,
) -> Stage1Config | Stage2Config:
    """Defaults → YAML ``path`` → ``flags`` → ``--set`` ``overrides``, checked for ``stage``.

    Raises
    ------
    ConfigError
        One line per problem, naming the dotted key.
    """
    if stage not in SCHEMAS:
        raise ConfigError(f"stage {stage!r}: choose stage1 or stage2")
    return load_config(SCHEMAS[stage], path, overrides, flags)
