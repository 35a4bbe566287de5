"""hipt.resample.box_reduce: PIL ``Image.reduce``'s pixels, whichever path computes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hipt.resample import box_reduce, reduced_shape


def _pil(a: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).reduce(k))


def _odd_content(h: int, w: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    """Random pixels with the cases rounding gets wrong: saturated blocks, exact halves."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    a[: h // 4] = 255  # all-white blocks: must stay 255
    a[h // 4 : h // 2, : w // 2] = 0  # all-black blocks: must stay 0
    checker = (np.indices((h, w)).sum(axis=0) % 2 * 255).astype(np.uint8)
    band = slice(h // 2, h // 2 + h // 8)
    a[band] = checker[band] if channels is None else checker[band][..., None]  # sums of 510
    # Blocks averaging to x.5: two 0s and two 1s in every 2x2 block (PIL rounds half up).
    halves = (np.indices((h, w))[1] % 2).astype(np.uint8)[-h // 8 :]
    a[-h // 8 :] = halves if channels is None else halves[..., None]
    return a


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("channels", [None, 3])
def test_equals_pil_reduce(k, channels):
    a = _odd_content(96, 160, channels, seed=k)
    got = box_reduce(a, k)
    assert got.shape == reduced_shape(a.shape, k) == _pil(a, k).shape
    np.testing.assert_array_equal(got, _pil(a, k))
    if k == 2:
        assert (got[: 96 // 8] == 255).all() and (got[96 // 8 : 96 // 4, : 160 // 4] == 0).all()


@pytest.mark.parametrize("k", [2, 3])
def test_odd_sizes_average_the_partial_last_blocks_as_pil_does(k):
    a = _odd_content(101, 67, 3, seed=5)
    np.testing.assert_array_equal(box_reduce(a, k), _pil(a, k))


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::-1],  # negative column stride
        lambda a: a[::-1],  # negative row stride
        lambda a: a[..., ::-1],  # BGR view of RGB
        lambda a: a[1::2, 3::2],  # every other pixel
        lambda a: np.asfortranarray(a),
        lambda a: a[10:74, 20:148],  # a window of a larger image
    ],
)
def test_non_contiguous_sources(view):
    src = view(_odd_content(192, 320, 3, seed=7))
    assert not src.flags.c_contiguous
    np.testing.assert_array_equal(box_reduce(src, 2), _pil(src, 2))


def test_out_is_filled_and_returned_wherever_it_lies():
    a = _odd_content(256, 256, 3, seed=11)
    want = _pil(a, 2)
    # A window of a reused larger buffer: rows apart, written in place.
    big = np.zeros((300, 400, 3), np.uint8)
    window = big[7:135, 9:137]
    assert box_reduce(a, 2, window) is window
    np.testing.assert_array_equal(window, want)
    assert (big[:7] == 0).all() and (big[:, 137:] == 0).all()  # nothing written outside
    # A layout OpenCV cannot write into (every other column, channels reversed): copied in.
    sparse = np.zeros((128, 256, 3), np.uint8)[:, ::2, ::-1]
    assert box_reduce(a, 2, sparse) is sparse
    np.testing.assert_array_equal(sparse, want)
    # A slot of a shared-memory ring as the embed loader's workers receive it.
    storage = torch.UntypedStorage._new_shared(2 * 128 * 128 * 3)
    ring = torch.empty(0, dtype=torch.uint8).set_(storage).view(2, 128, 128, 3)
    slot = ring[1].numpy()
    assert box_reduce(a, 2, slot) is slot
    np.testing.assert_array_equal(ring[1].numpy(), want)
    assert (ring[0].numpy() != want).any()  # the other slot is untouched


def test_bad_input_says_what_is_wrong():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        box_reduce(a, 0)
    with pytest.raises(ValueError, match="uint8"):
        box_reduce(a.astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        box_reduce(np.zeros((8, 8, 4), np.uint8), 2)  # RGBA: PIL premultiplies alpha
    with pytest.raises(ValueError, match=r"out must be .*\(4, 4, 3\)"):
        box_reduce(a, 2, np.zeros((4, 5, 3), np.uint8))
    frozen = np.zeros((4, 4, 3), np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        box_reduce(a, 2, frozen)
