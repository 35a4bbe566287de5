"""The region encoder: ViT-256 over every 256 px patch, then ViT-4K over the 16×16 patch grid.

Patches of all regions in a batch go through ViT-256 together, in chunks of ``patch_batch``
(bounding memory), instead of one region per call as in the original code. On CUDA both ViTs run
under bf16 autocast with timm's fused attention (``scaled_dot_product_attention``); on CPU in fp32.
The input normalisation travels with the weights (:class:`hipt.models.ModelInfo`), not the code.

Examples
--------
>>> import torch
>>> encoder, provenance = build_region_encoder(None, None, random_weights=True)
>>> provenance["vit256_sha256"]
'random'
>>> patches, region = encoder.encode(torch.zeros(1, 3, 4096, 4096, dtype=torch.uint8))  # doctest: +SKIP
>>> patches.shape, region.shape  # doctest: +SKIP
(torch.Size([1, 256, 384]), torch.Size([1, 192]))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hipt.geometry import GRID, PATCH_PX, patch_grid_to_vit4k_input, region_to_patches
from hipt.models.checkpoint import arch_kwargs, load_encoder_weights
from hipt.models.registry import create_model, model_info

__all__ = ["RegionEncoder", "build_region_encoder"]


class RegionEncoder(nn.Module):
    """ViT-256 → ViT-4K over whole regions.

    Parameters
    ----------
    vit256 : nn.Module
        ``[N, 3, 256, 256]`` normalised → ``[N, D256]``.
    vit4k : nn.Module
        ``[B, D256, 16, 16]`` → ``[B, D4k]``.
    mean, std : sequence of 3 floats
        Per-channel normalisation of pixels in [0, 1] (from the weights' metadata).
    patch_batch : int
        Patches per ViT-256 call (across regions), bounding activation memory.
    amp : bool or None
        bf16 autocast; ``None`` (default) turns it on for CUDA and off elsewhere.

    Examples
    --------
    >>> import torch
    >>> from hipt.models import create_model
    >>> enc = RegionEncoder(create_model("vit256_s16", depth=1), create_model("vit4k_xs", depth=1),
    ...                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    >>> enc.patch_batch
    256
    """

    def __init__(
        self,
        vit256: nn.Module,
        vit4k: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        patch_batch: int = 256,
        *,
        amp: bool | None = None,
    ) -> None:
        super().__init__()
        if patch_batch < 1:
            raise ValueError(f"patch_batch must be >= 1, got {patch_batch}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need 3 channel values each")
        self.vit256 = vit256
        self.vit4k = vit4k
        self.patch_batch = int(patch_batch)
        self.amp = amp
        # Folded into one multiply-add: x/255 then (x - mean)/std = x * scale + shift.
        mean_t = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        std_t = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self.register_buffer("_scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("_shift", -mean_t / std_t, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _autocast(self) -> torch.autocast:
        dev = self.device.type
        enabled = (dev == "cuda") if self.amp is None else bool(self.amp)
        return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=enabled)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` → normalised float32 on the encoder's device."""
        if pixels.dtype != torch.uint8:
            # Floats would be divided by 255 again (and, already float32 on the device, be
            # overwritten in place by the multiply-add below).
            raise ValueError(f"pixels must be uint8 in [0, 255], got {pixels.dtype}")
        x = pixels.to(self.device, non_blocking=True).float()
        return x.mul_(self._scale).add_(self._shift)

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """ViT-256 [CLS] of uint8 patches ``[N, 3, 256, 256]`` → float32 ``[N, D256]``, chunked."""
        n = patches.shape[0]
        out: torch.Tensor | None = None
        for start in range(0, n, self.patch_batch):
            chunk = self.normalize(patches[start : start + self.patch_batch])
            with self._autocast():
                feats = self.vit256(chunk)
            if out is None:
                out = torch.empty(n, feats.shape[-1], dtype=torch.float32, device=feats.device)
            out[start : start + feats.shape[0]] = feats.float()
        if out is None:
            raise ValueError("no patches to encode")
        return out

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode uint8 regions ``[B, 3, 4096, 4096]``.

        Returns
        -------
        patch_features : Tensor
            float32 ``[B, 256, D256]``, patch ``k`` at row ``k // 16``, column ``k % 16``.
        region_features : Tensor
            float32 ``[B, D4k]``.
        """
        if regions.dim() != 4 or regions.shape[1] != 3:
            raise ValueError(f"regions must be [B, 3, H, W], got {list(regions.shape)}")
        if regions.dtype != torch.uint8:
            raise ValueError(f"regions must be uint8 pixels, got {regions.dtype}")
        b, _, h, w = regions.shape
        side = GRID * PATCH_PX
        if (h, w) != (side, side):
            # ViT-4K reads a GRID x GRID grid of patches; say so rather than fail in a reshape.
            raise ValueError(
                f"regions must be {side}x{side} px ({GRID}x{GRID} patches of {PATCH_PX} px), "
                f"got {h}x{w}"
            )
        # Cut on the target device: one uint8 transfer, and the reordering copy runs there.
        regions = regions.to(self.device, non_blocking=True)
        patches = region_to_patches(regions)  # [B, N, 3, 256, 256]
        n = patches.shape[1]
        feats = self.encode_patches(patches.reshape(b * n, 3, PATCH_PX, PATCH_PX))
        feats = feats.view(b, n, -1)
        with self._autocast():
            region = self.vit4k(patch_grid_to_vit4k_input(feats))
        return feats, region.float()

    def encode(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` in eval and inference mode (no autograd bookkeeping)."""
        self.eval()
        with torch.inference_mode():
            return self(regions)


def _weights_hint(name: str, argument: str) -> str:
    info = model_info(name)
    released = info.extra.get("released_file", "")
    return (
        f"{argument}: no weights given for {name}; download the released HIPT checkpoint "
        f"{released!r} (or use your own pretraining output), put it e.g. in ./checkpoints/, and "
        f"pass its path, or ask for random weights (random_weights=True) for a test run"
    )


def build_region_encoder(
    vit256_weights: str | os.PathLike[str] | None,
    vit4k_weights: str | os.PathLike[str] | None,
    *,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
    patch_batch: int = 256,
    seed: int = 0,
    **model_kwargs: Any,
) -> tuple[RegionEncoder, dict[str, Any]]:
    """Build a :class:`RegionEncoder` from weight files, with provenance.

    Parameters
    ----------
    vit256_weights, vit4k_weights : str, PathLike or None
        Weight files (released HIPT format, hipt pretraining output, or plain state dicts),
        loaded strictly.
    random_weights : bool
        Let a model without a file keep its (seeded) random initialisation; its provenance
        hash is then ``"random"``. A model with a file is loaded either way (e.g. the paper's
        ablation: pretrained ViT-256, random ViT-4K).
    device : str or torch.device
        Where the encoder runs.
    patch_batch : int
        Patches per ViT-256 call.
    seed : int
        Seed of the random initialisation, so random encoders are reproducible.
    **model_kwargs
        ``vit256_kwargs`` / ``vit4k_kwargs`` dicts passed to the builders (tiny test configs).

    Returns
    -------
    encoder : RegionEncoder
        In eval mode, parameters frozen, on ``device``.
    provenance : dict
        ``vit256_sha256``, ``vit4k_sha256`` (hex, or ``"random"``), ``mean``, ``std`` (lists).

    Raises
    ------
    ValueError
        When weights are missing and ``random_weights`` is false (says which and where to put them).
    hipt.models.checkpoint.CheckpointError
        When a file cannot be loaded.

    Examples
    --------
    >>> enc, prov = build_region_encoder(None, None, random_weights=True)
    >>> prov["mean"], prov["vit4k_sha256"]
    ([0.5, 0.5, 0.5], 'random')
    """
    # A file that records its architecture (hipt pretraining output) rebuilds it; explicit wins.
    vit256_kwargs = {
        **arch_kwargs(vit256_weights, "vit256_s16"),
        **(model_kwargs.pop("vit256_kwargs", {}) or {}),
    }
    vit4k_kwargs = {
        **arch_kwargs(vit4k_weights, "vit4k_xs"),
        **(model_kwargs.pop("vit4k_kwargs", {}) or {}),
    }
    if model_kwargs:
        raise TypeError(f"unknown arguments: {', '.join(sorted(model_kwargs))}")
    missing = [
        _weights_hint(name, arg)
        for name, arg, path in (
            ("vit256_s16", "vit256_weights", vit256_weights),
            ("vit4k_xs", "vit4k_weights", vit4k_weights),
        )
        if path is None
    ]
    if missing and not random_weights:
        raise ValueError("; ".join(missing))

    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: fork_rng restores nothing else, and the models are built on
        # the CPU. torch.manual_seed would also reset the caller's CUDA generators for good.
        torch.random.default_generator.manual_seed(seed)
        vit256 = create_model("vit256_s16", **vit256_kwargs)
        vit4k = create_model("vit4k_xs", **vit4k_kwargs)
    provenance: dict[str, Any] = {}
    for key, model, path in (
        ("vit256_sha256", vit256, vit256_weights),
        ("vit4k_sha256", vit4k, vit4k_weights),
    ):
        provenance[key] = "random" if path is None else load_encoder_weights(model, Path(path))
    info = model_info("vit256_s16")
    if info.mean is None or info.std is None:
        raise ValueError("vit256_s16 metadata has no mean/std")
    provenance["mean"] = [float(v) for v in info.mean]
    provenance["std"] = [float(v) for v in info.std]

    encoder = RegionEncoder(vit256, vit4k, info.mean, info.std, patch_batch=patch_batch)
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder.to(device), provenance
