"""DINO multi-crop views, built from ``torchvision.transforms.v2``.

Stage 1 turns a uint8 ``[3, 256, 256]`` patch into global and local crops with H&E-sensible
augmentations (tissue has no up or down: vertical flips and 90° turns are valid views). Stage 2
crops a ``[384, 16, 16]`` patch-embedding grid into token windows with flips (as the original).
Both take their randomness from torch's global generator, which the datasets seed per sample.

Examples
--------
>>> import torch
>>> from train.dino.config import GridCropsConfig
>>> views = GridMultiCrop(GridCropsConfig(local_crops=2))(torch.zeros(384, 16, 16))
>>> [tuple(v.shape) for v in views]
[(384, 14, 14), (384, 14, 14), (384, 6, 6), (384, 6, 6)]
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from train.dino.config import GridCropsConfig, PatchCropsConfig

__all__ = ["GridMultiCrop", "PatchMultiCrop", "RandomRot90"]


class RandomRot90(v2.Transform):
    """Turn the image by 0, 90, 180 or 270 degrees, each equally likely (exact, no resampling)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0:
            return inpt
        return torch.rot90(inpt, params["k"], dims=(-2, -1))


def _blur_kernel(px: int) -> int:
    # About a tenth of the crop, odd (23 px at 224 as in BYOL/DINO; 9 px at 96).
    k = max(3, int(round(px * 0.1)))
    return k if k % 2 else k + 1


class PatchMultiCrop:
    """uint8 ``[3, H, W]`` patch → list of float crops, the global ones first."""

    def __init__(self, cfg: PatchCropsConfig) -> None:
        self.cfg = cfg
        self.n_global, self.n_local = cfg.global_crops, cfg.local_crops
        self.global_views = [
            self._view(
                cfg.global_px,
                cfg.global_scale,
                blur=cfg.blur_global[min(i, len(cfg.blur_global) - 1)],
                solarize=cfg.solarize_global2 if i == 1 else 0.0,
            )
            for i in range(cfg.global_crops)
        ]
        self.local_view = self._view(cfg.local_px, cfg.local_scale, blur=cfg.blur_local)

    def _view(
        self, px: int, scale: tuple[float, float], blur: float, solarize: float = 0.0
    ) -> v2.Compose:
        c = self.cfg
        steps: list[Any] = [
            v2.RandomResizedCrop(
                px, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(c.hflip),
            v2.RandomVerticalFlip(c.vflip),
        ]
        if c.rotate90:
            steps.append(RandomRot90())
        j = c.color_jitter
        steps += [
            v2.RandomApply([v2.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.p),
            v2.RandomGrayscale(c.grayscale),
            v2.RandomApply([v2.GaussianBlur(_blur_kernel(px), sigma=c.blur_sigma)], p=blur),
        ]
        if solarize > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize))  # on uint8 pixels
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(c.mean, c.std)]
        return v2.Compose(steps)

    def __call__(self, patch: torch.Tensor) -> list[torch.Tensor]:
        views = [view(patch) for view in self.global_views]
        views += [self.local_view(patch) for _ in range(self.n_local)]
        return views


class GridMultiCrop:
    """float ``[C, 16, 16]`` grid → global then local token windows, flipped at random."""

    def __init__(self, cfg: GridCropsConfig) -> None:
        self.n_global, self.n_local = cfg.global_crops, cfg.local_crops

        def view(tokens: int) -> v2.Compose:
            return v2.Compose(
                [
                    v2.RandomCrop(tokens),
                    v2.RandomHorizontalFlip(cfg.hflip),
                    v2.RandomVerticalFlip(cfg.vflip),
                ]
            )

        self.global_view = view(cfg.global_tokens)
        self.local_view = view(cfg.local_tokens)

    def __call__(self, grid: torch.Tensor) -> list[torch.Tensor]:
        views = [self.global_view(grid) for _ in range(self.n_global)]
        views += [self.local_view(grid) for _ in range(self.n_local)]
        return views
