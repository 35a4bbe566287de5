"""DINO's networks and loss: backbone + projection head, multi-crop forward, centred cross-entropy.

The backbone is a registered hipt encoder (``vit256_s16`` or ``vit4k_xs``, any depth) built with
timm's ``dynamic_img_size`` so one model reads global and local crops; its position table keeps
the native 16×16 grid, so the exported weights load into the plain encoder unchanged.
Parameter names follow the released HIPT checkpoints (``backbone.*``, ``head.mlp.{0,2,4}.*``,
``head.last_layer.weight_g/weight_v``).

Examples
--------
>>> import torch
>>> net = DinoNet(build_backbone("vit4k_xs", {"depth": 1}), out_dim=32, hidden_dim=16,
...               bottleneck_dim=8)
>>> crops = [torch.zeros(2, 384, 14, 14), torch.zeros(2, 384, 14, 14), torch.zeros(2, 384, 6, 6)]
>>> net(crops).shape
torch.Size([6, 32])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hipt.models import create_model

__all__ = ["DinoHead", "DinoLoss", "DinoNet", "WeightNormLinear", "build_backbone"]


def build_backbone(arch: str, kwargs: dict[str, Any], drop_path: float = 0.0) -> nn.Module:
    """A hipt encoder that accepts any crop size (position table resampled per input)."""
    return create_model(arch, dynamic_img_size=True, drop_path_rate=drop_path, **kwargs)


class WeightNormLinear(nn.Module):
    """``y = x Wᵀ`` with ``W = g · v / ‖v‖`` per output row (no bias), DINO's last layer.

    Kept as two parameters named ``weight_g`` [out, 1] and ``weight_v`` [out, in], the names
    of the released checkpoints. With ``fix_norm`` the gain stays 1 (DINO's ``norm_last_layer``).
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, self.weight_v * (self.weight_g / norm))


class DinoHead(nn.Module):
    """MLP (``layers`` linear layers, GELU between) → L2-normalised bottleneck → weight-normed layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)  # indices 0, 2, 4 are the linear layers, as released
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class DinoNet(nn.Module):
    """Backbone + head over a list of crops, one backbone call per run of same-sized crops."""

    def __init__(self, backbone: nn.Module, **head_kwargs: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DinoHead(int(backbone.num_features), **head_kwargs)

    def forward(
        self, crops: list[torch.Tensor], with_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of all crops (and, ``with_features``, the backbone's embeddings too)."""
        feats = []
        start = 0
        while start < len(crops):
            stop = start
            while stop < len(crops) and crops[stop].shape[-1] == crops[start].shape[-1]:
                stop += 1
            feats.append(self.backbone(torch.cat(crops[start:stop])))
            start = stop
        embeddings = torch.cat(feats)
        out = self.head(embeddings)
        return (out, embeddings) if with_features else out


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko spreading term (dinov2): ``-mean log`` distance to the nearest neighbour.

    ``x`` is [B, D] (one crop per image); rows are L2-normalised first. Minimising it pushes
    each embedding away from its closest neighbour in the batch, so the embeddings cannot
    collapse onto one point. A batch of one row has no neighbour and gives 0.

    Examples
    --------
    >>> spread = torch.eye(4)
    >>> close = torch.eye(4) * 0.1 + 1.0
    >>> bool(koleo_loss(spread) < koleo_loss(close))
    True
    """
    if x.shape[0] < 2:
        return x.new_zeros(())
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = sims.argmax(dim=1)
    distance = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distance + eps).mean()


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over crop pairs.

    The teacher sees the ``n_global`` global crops; every student crop is compared with every
    teacher crop of another view. The centre is an EMA of the teacher's mean output over the
    global batch (all processes), kept as a buffer so checkpoints carry it.
    """

    def __init__(
        self,
        out_dim: int,
        n_global: int,
        n_crops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.n_global, self.n_crops = n_global, n_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        student = (student_out.float() / self.student_temp).chunk(self.n_crops)
        teacher_f = teacher_out.float()
        teacher = F.softmax((teacher_f - self.center) / teacher_temp, dim=-1).detach()
        teacher = teacher.chunk(self.n_global)
        total, terms = student_out.new_zeros((), dtype=torch.float32), 0
        for t_idx, t in enumerate(teacher):
            for s_idx, s in enumerate(student):
                if s_idx == t_idx:
                    continue  # same view
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_f)
        return total / max(terms, 1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_sum = teacher_out.sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center * (1 - m))
