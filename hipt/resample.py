"""Area-averaging an image down by a whole factor: the one box reduction every stage uses.

The pixels are PIL's ``Image.reduce``: each output pixel is the mean of a ``k`` × ``k`` block,
rounded half up, and a last partial row or column of blocks averages the pixels it has.

For ``k == 2`` on uint8 images of even size, OpenCV's ``INTER_AREA`` resize computes exactly
that (``(sum + 2) >> 2``, bit-identical) 6–9× faster: PIL first copies RGB to RGBX and back,
OpenCV reduces in SIMD straight into the caller's buffer and releases the GIL. For other
factors OpenCV multiplies by ``1 / k²`` in floating point and rounds to nearest, which differs
from PIL by one grey level on 1–11 % of values, so those stay with PIL and the two paths never
give different pixels for the same request.

Threads: OpenCV's thread pool is process-wide (``cv2.setNumThreads``) and would start one
thread per core in every DataLoader worker, on top of the workers themselves; hipt decides its
parallelism itself (decode threads per reader, one inside a worker). So the first reduction sets
OpenCV to one thread for the process, and the reduction runs on the calling thread. Measured
on a 2-vCPU VM, 32 strips of 256 × 8192 px (one 40× region): 0.022 s on one thread, 0.025 s
split over two threads of hipt's, 0.018–0.021 s on OpenCV's own two threads; PIL 0.14–0.17 s.
The reduction is memory-bound: more threads would buy at most 1 % of a region read.
"""

from __future__ import annotations

import numpy as np

__all__ = ["box_reduce", "reduced_shape"]

_cv2 = None


def reduced_shape(shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    """Shape of ``box_reduce`` of an image of ``shape``: each side divided by ``k``, rounded up."""
    return (-(-shape[0] // k), -(-shape[1] // k), *shape[2:])


def box_reduce(src: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """``src`` area-averaged down by the whole factor ``k`` (PIL ``Image.reduce``'s pixels).

    Parameters
    ----------
    src : ndarray
        uint8 ``[H, W]`` or ``[H, W, 3]``; any strides. (No alpha: PIL averages RGBA with
        premultiplied alpha, which a plain box mean does not reproduce.)
    k : int
        Reduction factor, >= 1 (1 copies).
    out : ndarray, optional
        uint8 array of :func:`reduced_shape` to fill and return, e.g. a slice of a reused or
        shared-memory buffer.

    Returns
    -------
    ndarray
        ``out``, or a new array, of shape ``reduced_shape(src.shape, k)``.
    """
    k = int(k)
    _check(src, k, out)
    if out is None:
        out = np.empty(reduced_shape(src.shape, k), np.uint8)
    h, w = src.shape[:2]
    if k == 1:
        np.copyto(out, src)
    elif k == 2 and h % 2 == 0 and w % 2 == 0:
        _halve(src, out)
    else:
        np.copyto(out, _pil_reduce(src, k))
    return out


def _check(src: np.ndarray, k: int, out: np.ndarray | None) -> None:
    if k < 1:
        raise ValueError(f"reduction factor must be >= 1, not {k}")
    if src.dtype != np.uint8 or not (src.ndim == 2 or (src.ndim == 3 and src.shape[2] == 3)):
        raise ValueError(f"box_reduce takes uint8 [H, W] or [H, W, 3], not {src.dtype} {src.shape}")
    want = reduced_shape(src.shape, k)
    if out is not None and (out.shape != want or out.dtype != np.uint8 or not out.flags.writeable):
        raise ValueError(
            f"out must be a writable uint8 array of shape {want}, not {out.dtype} {out.shape}"
        )


def _pil_reduce(src: np.ndarray, k: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(src)).reduce(k))


def _halve(src: np.ndarray, out: np.ndarray) -> None:
    cv2 = _opencv()
    h, w = src.shape[:2]
    if not _mat_layout(out):  # OpenCV refuses such a ``dst``: reduce aside, then copy in
        np.copyto(out, cv2.resize(src, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
        return
    got = cv2.resize(src, (w // 2, h // 2), dst=out, interpolation=cv2.INTER_AREA)
    if got is not out:  # it wrote elsewhere after all (a layout rule of a later OpenCV)
        np.copyto(out, got)


def _mat_layout(a: np.ndarray) -> bool:
    """Whether OpenCV can write into ``a`` as it is: rows apart by any positive step, the pixels
    of a row and their channels packed."""
    packed = a.ndim == 2 or a.strides[2] == 1
    return (
        packed
        and a.strides[1] == a.itemsize * (a.shape[2] if a.ndim == 3 else 1)
        and a.strides[0] > 0
    )


def _opencv():
    global _cv2
    if _cv2 is None:
        import cv2

        cv2.setNumThreads(1)  # no pool per DataLoader worker: see the module docstring
        _cv2 = cv2
    return _cv2
