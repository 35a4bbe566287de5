"""Checkpoint loading: released layout, hipt's own layout, plain state dicts, and refusals."""

from __future__ import annotations

import argparse
import collections
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hipt.models import create_model
from hipt.models.checkpoint import (
    CheckpointError,
    adapt_pos_embed,
    extract_state_dict,
    load_encoder_weights,
    rename_released_keys,
    resize_pos_embed_dino,
    strip_prefixes,
    to_released_layout,
)

DEPTH = 2


def released_backbone(kind: str, seed: int = 0, depth: int = DEPTH) -> dict[str, torch.Tensor]:
    """Random tensors under the released key names and shapes, ``depth`` blocks."""
    g = torch.Generator().manual_seed(seed)
    dim = 384 if kind == "vit256" else 192
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, dim), "pos_embed": (1, 197, dim)}
    if kind == "vit256":
        shapes |= {"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,)}
    else:
        shapes |= {"phi.0.weight": (dim, 384), "phi.0.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (dim,),
            p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),
            p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim),
            p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,),
            p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (4 * dim, dim),
            p + "mlp.fc1.bias": (4 * dim,),
            p + "mlp.fc2.weight": (dim, 4 * dim),
            p + "mlp.fc2.bias": (dim,),
        }
    shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    return {k: torch.randn(*s, generator=g) * 0.1 for k, s in shapes.items()}


def dino_checkpoint(backbone: dict[str, torch.Tensor]) -> dict:
    """A full DINO training checkpoint as ``main_dino*.py`` saves it (small head)."""
    teacher = {"backbone." + k: v for k, v in backbone.items()}
    teacher |= {
        "head.mlp.0.weight": torch.zeros(16, 8),
        "head.mlp.0.bias": torch.zeros(16),
        "head.last_layer.weight_g": torch.ones(32, 1),
        "head.last_layer.weight_v": torch.ones(32, 8),
    }
    student = {"module." + k: v + 1.0 for k, v in teacher.items()}
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]},
        "epoch": 10,
        # The released files pickle the training arguments; they must still load.
        "args": argparse.Namespace(arch="vit_small", global_crops_scale=(0.4, 1.0), lr=5e-4),
        "dino_loss": {"center": torch.zeros(1, 32)},
    }


def make_model(kind: str) -> torch.nn.Module:
    return create_model("vit256_s16" if kind == "vit256" else "vit4k_xs", depth=DEPTH)


# ---------------------------------------------------------------- position-table resize


def cubic_kernel(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel, the one bicubic interpolation uses (a = -0.75)."""
    x = np.abs(x)
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, scale: float) -> np.ndarray:
    """Rows: output samples of a 1-D bicubic resize by ``scale`` (half-pixel centres, edge clamp)."""
    n_out = math.floor(n_in * scale)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            m[i, min(max(j, 0), n_in - 1)] += cubic_kernel(np.array(src - j))
    return m


def original_resize_numpy(pos: np.ndarray, grid: int) -> np.ndarray:
    """The original run-time rule, scale factor (grid + 0.1) / 14, computed by hand in float64."""
    n = math.isqrt(pos.shape[1] - 1)
    m = bicubic_matrix(n, (grid + 0.1) / n)
    table = pos[0, 1:].reshape(n, n, -1)
    out = np.einsum("ai,bj,ijd->abd", m, m, table).reshape(1, grid * grid, -1)
    return np.concatenate([pos[:, :1], out], axis=1)


@pytest.mark.parametrize("grid", [16, 6])
def test_resize_matches_the_original_formula(grid):
    pos = torch.randn(1, 197, 24, generator=torch.Generator().manual_seed(0))
    got = resize_pos_embed_dino(pos, grid)
    expected = original_resize_numpy(pos.double().numpy(), grid)
    assert got.shape == (1, 1 + grid * grid, 24)
    assert np.abs(got.double().numpy() - expected).max() < 1e-5
    assert torch.equal(got[:, 0], pos[:, 0])  # [CLS] row untouched
    # The scale-factor rule is not the same as resizing to the target size.
    by_size = F.interpolate(
        pos[:, 1:].reshape(1, 14, 14, 24).permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic"
    )
    by_size = by_size.permute(0, 2, 3, 1).reshape(1, -1, 24)
    assert (by_size - got[:, 1:]).abs().max() > 1e-3


def test_resize_same_grid_is_identity_and_bad_tables_fail():
    pos = torch.randn(1, 257, 8)
    assert torch.equal(resize_pos_embed_dino(pos, 16), pos)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed_dino(torch.randn(1, 200, 8), 16)
    # adapt_pos_embed leaves a table of another width to the shape check
    assert adapt_pos_embed({"pos_embed": torch.randn(1, 197, 7)}, (1, 257, 8))[
        "pos_embed"
    ].shape == (
        1,
        197,
        7,
    )


# ---------------------------------------------------------------- key adapters


def test_key_adapters_are_pure_and_invertible():
    sd = {"module.backbone.phi.0.weight": torch.ones(2), "module.head.mlp.0.bias": torch.ones(1)}
    frozen = dict(sd)
    stripped = strip_prefixes(sd)
    assert stripped.keys() == {"phi.0.weight"} and sd == frozen
    renamed = rename_released_keys(stripped)
    assert renamed.keys() == {"patch_embed.phi.0.weight"}
    assert to_released_layout(renamed).keys() == {"backbone.phi.0.weight"}
    # A plain (non-DINO) dict keeps every key, minus a DataParallel prefix.
    assert strip_prefixes({"module.norm.weight": torch.ones(1)}).keys() == {"norm.weight"}
    with pytest.raises(CheckpointError, match="top-level keys: 'epoch'"):
        extract_state_dict({"epoch": 3})


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", ["vit256", "vit4k"])
def test_released_layout_loads_bit_identical(tmp_path, kind):
    backbone = released_backbone(kind, seed=3)
    path = tmp_path / "released.pth"
    torch.save(dino_checkpoint(backbone), path)
    model = make_model(kind)
    sha = load_encoder_weights(model, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()

    state = model.state_dict()
    for key, value in backbone.items():
        if key == "pos_embed":
            continue
        model_key = "patch_embed." + key if key.startswith("phi.") else key
        assert torch.equal(state[model_key], value), key
    assert state["pos_embed"].shape[1] == 257
    assert torch.equal(state["pos_embed"], resize_pos_embed_dino(backbone["pos_embed"], 16))

    # The student (``module.`` prefixed) is there too, on request.
    student_model = make_model(kind)
    load_encoder_weights(student_model, path, checkpoint_key="student")
    assert torch.equal(student_model.state_dict()["norm.weight"], backbone["norm.weight"] + 1.0)


@pytest.mark.parametrize("kind", ["vit256", "vit4k"])
def test_plain_and_own_layout_round_trip(tmp_path, kind):
    source = make_model(kind)
    plain, own = tmp_path / "plain.pth", tmp_path / "own.pth"
    torch.save(source.state_dict(), plain)
    torch.save({"teacher": to_released_layout(source.state_dict()), "epoch": 1}, own)
    for path in (plain, own):
        target = make_model(kind)
        load_encoder_weights(target, path)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (path.name, key)
    # hipt's own output is readable by a loader of the released layout.
    assert "backbone.pos_embed" in torch.load(own, weights_only=True)["teacher"]


@pytest.mark.parametrize(
    "kind,name,depth", [("vit256", "vit256_s16", 12), ("vit4k", "vit4k_xs", 6)]
)
def test_full_depth_released_layout_loads_strictly(tmp_path, kind, name, depth):
    backbone = released_backbone(kind, seed=6, depth=depth)
    path = tmp_path / f"{name}.pth"
    torch.save(dino_checkpoint(backbone), path)
    model = create_model(name)  # the real architecture, no overrides
    load_encoder_weights(model, path)
    last = f"blocks.{depth - 1}.mlp.fc2.weight"
    assert torch.equal(model.state_dict()[last], backbone[last])
    assert model.pos_embed.shape == (1, 257, 384 if kind == "vit256" else 192)


def _refused(tmp_path, kind, edit, match):
    backbone = released_backbone(kind, seed=4)
    edit(backbone)
    path = tmp_path / "broken.pth"
    torch.save(dino_checkpoint(backbone), path)
    model = make_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match) as info:
        load_encoder_weights(model, path)
    assert str(path) in str(info.value)
    # Nothing was half-loaded.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return str(info.value)


def test_missing_key_is_refused(tmp_path):
    msg = _refused(tmp_path, "vit256", lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "missing keys")
    assert "blocks.1.mlp.fc2.bias" in msg


def test_extra_key_is_refused(tmp_path):
    def add(sd):
        sd["blocks.2.norm1.weight"] = torch.ones(192)

    msg = _refused(tmp_path, "vit4k", add, "unexpected keys")
    assert "blocks.2.norm1.weight" in msg


def test_wrong_shape_is_refused(tmp_path):
    def shrink(sd):
        sd["blocks.0.attn.qkv.weight"] = torch.zeros(3 * 192, 100)

    msg = _refused(tmp_path, "vit4k", shrink, "wrong shapes")
    assert "blocks.0.attn.qkv.weight (file [576, 100], model [576, 192])" in msg


class NotATensor:
    def __init__(self) -> None:
        self.payload = "anything"


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    ckpt = dino_checkpoint(released_backbone("vit4k"))
    ckpt["extra"] = NotATensor()
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"refused: it pickles .*NotATensor") as info:
        load_encoder_weights(make_model("vit4k"), path)
    assert str(path) in str(info.value)
    # One clear line, not torch's multi-paragraph advice.
    assert "\n" not in str(info.value)


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_code_running_pickle_names_the_global_and_never_suggests_the_unsafe_load(tmp_path):
    path = tmp_path / "evil.pth"
    ckpt = dino_checkpoint(released_backbone("vit4k"))
    ckpt["extra"] = RunsCode()
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder_weights(make_model("vit4k"), path)
    message = str(info.value)
    assert "refused: it pickles posix.system" in message and str(path) in message
    assert "False" not in message and "\n" not in message  # torch's advice is weights_only=False


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk.pth: not a torch checkpoint \(a text file"):
        load_encoder_weights(make_model("vit4k"), junk)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth: an empty file \(0 bytes\)"):
        load_encoder_weights(make_model("vit4k"), empty)
    with pytest.raises(CheckpointError, match="nowhere.pth: weights file not found"):
        load_encoder_weights(make_model("vit4k"), tmp_path / "nowhere.pth")
    odd = tmp_path / "odd.pth"
    torch.save(collections.OrderedDict(epoch=3, lr=0.1), odd)
    with pytest.raises(CheckpointError, match="odd.pth: no 'teacher' entry"):
        load_encoder_weights(make_model("vit4k"), odd)


def test_non_strict_loads_what_fits(tmp_path):
    backbone = released_backbone("vit4k", seed=5)
    backbone.pop("norm.bias")
    backbone["blocks.9.norm1.weight"] = torch.ones(192)
    path = tmp_path / "partial.pth"
    torch.save(dino_checkpoint(backbone), path)
    model = make_model("vit4k")
    load_encoder_weights(model, path, strict=False)
    assert torch.equal(model.state_dict()["norm.weight"], backbone["norm.weight"])
