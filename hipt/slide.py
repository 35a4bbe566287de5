"""A whole-slide image read at an exact µm/px.

:class:`Slide` wraps a pixel reader (:func:`hipt.readers.open_reader`), works out the level-0
µm/px and where that number came from, and reads any level-0 square at a target µm/px: from the
finest pyramid level that is not coarser than the target, then area-averaged down to size.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from hipt.readers import SlideReadError, open_reader
from hipt.readers.base import WHITE, check_out
from hipt.resample import box_reduce

# A level-0 µm/px outside this range is metadata nonsense (72 dpi gives 352 µm/px).
PLAUSIBLE_MPP = (0.02, 50.0)
# µm/px and objective power may disagree by this factor before we call the metadata suspicious.
SUSPICIOUS_RATIO = 1.5
# Level-0 bytes read at once when a region is reduced strip by strip (see Slide.read_region).
STRIP_BYTES = 8 << 20
# A single-level slide larger than this (longest side, px) is read slowly: warn.
NO_PYRAMID_WARN_PX = 1024


# Multi-part suffixes that are one format (OME-TIFF): ``x.ome.tiff`` is slide ``x``.
MULTI_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.btf")


def dicom_instances(folder: Path) -> list[Path]:
    """The ``.dcm`` files of a DICOM whole-slide image folder (sorted; empty if none)."""
    try:
        return sorted(q for q in folder.iterdir() if q.suffix.lower() == ".dcm" and q.is_file())
    except OSError:
        return []


def slide_id_for(path: str | os.PathLike) -> str:
    """The slide id a slide path gets: its name without the format suffix.

    ``x.svs`` → ``x``; ``x.ome.tiff`` → ``x``; a DICOM whole-slide image (a folder of ``.dcm``
    instances, or one of its instances) → the folder's name.

    Examples
    --------
    >>> slide_id_for("/data/case_1.ome.tiff"), slide_id_for("/data/case_2.svs")
    ('case_1', 'case_2')
    """
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return p.resolve().parent.name
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        return p.name
    lower = p.name.lower()
    for multi in MULTI_SUFFIXES:
        if lower.endswith(multi) and len(p.name) > len(multi):
            return p.name[: -len(multi)]
    return p.stem


class MppError(SlideReadError):
    """The slide's µm/px is missing or suspicious; the message says how to fix it (``--mpp``)."""


class SlowReadWarning(UserWarning):
    """The slide has no pyramid, so low-resolution reads decode level 0."""


def _float(props: dict[str, str], key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, ValueError, TypeError):
        return None
    return value if math.isfinite(value) and value > 0 else None


_UM_PER_UNIT = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "3": 1e4, "2": 25400.0}


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def mpp_from_properties(props: dict[str, str]) -> tuple[float | None, str | None, float | None]:
    """Find the level-0 µm/px in OpenSlide-style properties.

    Returns ``(mpp, source, objective_power)``; ``mpp`` and ``source`` are None when no usable
    value is found. Sources, in order: ``openslide.mpp-x``, the TIFF resolution tags
    (``tiff.XResolution`` with ``tiff.ResolutionUnit``), then ``openslide.objective-power``
    (µm/px ≈ 10 / power). Values outside a plausible range (e.g. a 72 dpi default) are skipped.

    Examples
    --------
    >>> mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.objective-power": "40"})
    (0.25, 'openslide.mpp-x', 40.0)
    >>> mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"})
    (None, None, None)
    """
    power = _float(props, "openslide.objective-power")
    mpp = _float(props, "openslide.mpp-x")
    if _plausible(mpp):
        return mpp, "openslide.mpp-x", power
    res = _float(props, "tiff.XResolution")
    unit = props.get("tiff.ResolutionUnit", "").strip().lower()
    if res is not None and unit in _UM_PER_UNIT:
        mpp = _UM_PER_UNIT[unit] / res
        if _plausible(mpp):
            return mpp, "tiff.XResolution", power
    if power is not None and 0.5 <= power <= 200:
        return 10.0 / power, "openslide.objective-power", power
    return None, None, power


def mpp_problems(props: dict[str, str]) -> list[str]:
    """The µm/px values in ``props`` that :func:`mpp_from_properties` had to skip, and why.

    Examples
    --------
    >>> mpp_problems({"openslide.mpp-x": "352.7777"})
    ['openslide.mpp-x = 352.778 µm/px is implausible (outside 0.02-50 µm/px)']
    >>> mpp_problems({"openslide.mpp-x": "0"})
    ['openslide.mpp-x = 0 is not a positive number']
    """
    out = []
    raw = props.get("openslide.mpp-x")
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            out.append(f"openslide.mpp-x = {raw} is not a positive number")
        elif not _plausible(value):
            out.append(f"openslide.mpp-x = {value:g} µm/px {_IMPLAUSIBLE}")
    res = _float(props, "tiff.XResolution")
    unit = props.get("tiff.ResolutionUnit", "").strip().lower()
    if res is not None and unit in _UM_PER_UNIT:
        mpp = _UM_PER_UNIT[unit] / res
        tag = f"tiff.XResolution = {res:g} per {unit} ({mpp:g} µm/px)"
        if not _plausible(mpp) and not any(f"{mpp:g} µm/px" in o for o in out):
            out.append(f"{tag} {_IMPLAUSIBLE}")
    return out


_IMPLAUSIBLE = f"is implausible (outside {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} µm/px)"


class Slide:
    """One whole-slide image with a known level-0 µm/px.

    Parameters
    ----------
    path : path-like
        The slide file (any format the reader opens).
    mpp : float, optional
        Level-0 µm/px given by the user; overrides the metadata (``mpp_source == "user"``).
    trust_metadata : bool
        Accept a µm/px that disagrees with the objective power by more than 1.5×.
    reader : {"auto", "openslide", "fast"}
        Which pixel reader to use (see :func:`hipt.readers.open_reader`).

    Raises
    ------
    SlideReadError
        The file cannot be opened; :class:`MppError` if its µm/px is missing or suspicious.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from hipt.synthetic import write_svs
    >>> p = write_svs(pathlib.Path(tempfile.mkdtemp()) / "s.svs", 2048, 2048, mpp=0.25).path
    >>> with Slide(p) as s:
    ...     print(s.mpp_level0, s.mpp_source, s.best_level_for(0.5))
    ...     print(s.read_region(0, 0, size_px=256, target_mpp=0.5).shape)
    0.25 openslide.mpp-x 0
    (256, 256, 3)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        mpp: float | None = None,
        trust_metadata: bool = False,
        reader: str = "auto",
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id_for(self.path)
        self._reader_choice = reader
        self._reader = open_reader(self.path, reader)
        try:
            self._init_geometry(mpp, trust_metadata)
        except BaseException:
            self.close()
            raise

    def _init_geometry(self, mpp: float | None, trust_metadata: bool) -> None:
        r = self._reader
        self.reader_name: str = r.name
        self.properties: dict[str, str] = dict(r.properties)
        self.level_count: int = int(r.level_count)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in r.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in r.level_downsamples)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self._init_mpp(mpp, trust_metadata)
        if self.level_count == 1 and max(self.dimensions) > NO_PYRAMID_WARN_PX:
            warnings.warn(
                f"{self.path}: has no pyramid (one level of {self.dimensions[0]}x"
                f"{self.dimensions[1]} px); low-resolution reads decode level 0 and are slow",
                SlowReadWarning,
                stacklevel=3,
            )

    def _init_mpp(self, mpp: float | None, trust_metadata: bool) -> None:
        """Set ``mpp_level0`` and ``mpp_source``; raise or warn about what the metadata says."""
        found, source, power = mpp_from_properties(self.properties)
        self.objective_power: float | None = power
        if mpp is not None:
            if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
                raise MppError(f"{self.path}: --mpp must be a positive number, got {mpp!r}")
            self.mpp_level0, self.mpp_source = float(mpp), "user"
        elif found is None:
            problems = mpp_problems(self.properties)
            if problems:
                raise MppError(
                    f"{self.path}: no plausible µm/px in its metadata: {'; '.join(problems)}; "
                    "pass --mpp with the scan's level-0 µm/px"
                )
            raise MppError(
                f"{self.path}: no µm/px in its metadata (no openslide.mpp-x, resolution tags or "
                "objective power); pass --mpp with the scan's level-0 µm/px"
            )
        else:
            self.mpp_level0, self.mpp_source = float(found), str(source)
            problems = mpp_problems(self.properties)
            if source == "openslide.objective-power":
                why = "; ".join(problems) if problems else "no µm/px or resolution tags"
                warnings.warn(
                    f"{self.path}: µm/px {found:g} guessed from the objective power {power:g}x "
                    f"alone ({why}); pass --mpp if the scan's µm/px differs",
                    stacklevel=4,
                )
            elif problems:
                warnings.warn(
                    f"{self.path}: ignored {'; '.join(problems)}; using {found:g} µm/px from "
                    f"{source}",
                    stacklevel=4,
                )
            mpp_y = _float(self.properties, "openslide.mpp-y")
            if source == "openslide.mpp-x" and mpp_y and abs(mpp_y / found - 1) > 0.02:
                warnings.warn(
                    f"{self.path}: pixels are not square ({found:g} x {mpp_y:g} µm); using the "
                    "x value",
                    stacklevel=4,
                )
            if power is not None and source != "openslide.objective-power":
                expected = 10.0 / power
                ratio = max(found / expected, expected / found)
                if ratio > SUSPICIOUS_RATIO:
                    msg = (
                        f"{self.path}: suspicious µm/px: {found:g} from {source} but objective "
                        f"power {power:g}x implies about {expected:g}"
                    )
                    if not trust_metadata:
                        raise MppError(
                            msg + "; pass --mpp to set it or --trust-metadata to accept it"
                        )
                    warnings.warn(msg + "; trusted (--trust-metadata)", stacklevel=4)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the reader (safe to call twice)."""
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()
            self._reader = None

    def reopen(self) -> None:
        """Open the file again: OpenSlide refuses every read after its first decode error."""
        self.close()
        self._reader = open_reader(self.path, self._reader_choice)

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]} px, "
            f"{self.mpp_level0:g} µm/px from {self.mpp_source}, reader={self.reader_name})"
        )

    # ------------------------------------------------------------------ geometry
    def level_mpp(self, level: int) -> float:
        """µm/px of ``level``."""
        return self.mpp_level0 * self.level_downsamples[level]

    def best_level_for(self, target_mpp: float) -> int:
        """The finest level not coarser than ``target_mpp`` (the closest one from below).

        Level 0 when the target is finer than level 0 (the read is then upsampled).

        A level's downsample comes from its whole-pixel size (OpenSlide averages ``w0 / w`` and
        ``h0 / h``), so a 2x level of an odd-sized scan reports e.g. 2.00002. Such a level still
        counts as not coarser: the tolerance is that rounding, one pixel in its shorter side
        (at most 0.1 %), and never less than float noise.
        """
        best = 0
        for level in range(self.level_count):
            short = max(1, min(self.level_dimensions[level]))
            tol = max(1e-6, min(1e-3, 1.0 / short))
            if self.level_mpp(level) <= target_mpp * (1 + tol):
                best = level
        return best

    def region_size_level0(self, size_px: int = 4096, target_mpp: float = 0.5) -> float:
        """Level-0 side (px) of a ``size_px`` square at ``target_mpp``."""
        return size_px * target_mpp / self.mpp_level0

    def thumbnail_level(self, max_px: int) -> int:
        """The finest level whose longest side is at most ``max_px`` (else the coarsest level)."""
        for level in range(self.level_count):
            if max(self.level_dimensions[level]) <= max_px:
                return level
        return self.level_count - 1

    # ------------------------------------------------------------------ pixels
    def _require_open(self) -> None:
        if self._reader is None:
            raise SlideReadError(f"{self.path}: slide is closed")

    def read_level(
        self,
        level: int,
        x0: int,
        y0: int,
        width: int,
        height: int,
        *,
        out: np.ndarray | None = None,
        fill: int = WHITE,
    ) -> np.ndarray:
        """See :meth:`hipt.readers.base.LevelReader.read_level` (this slide's reader does it)."""
        self._require_open()
        return self._reader.read_level(
            level, int(x0), int(y0), int(width), int(height), out=out, fill=int(fill)
        )

    def read_region(
        self,
        x0: int,
        y0: int,
        size_px: int = 4096,
        target_mpp: float = 0.5,
        *,
        out: np.ndarray | None = None,
        fill: int = WHITE,
    ) -> np.ndarray:
        """Read the level-0 square at ``(x0, y0)`` as ``size_px`` × ``size_px`` at ``target_mpp``.

        The square's level-0 side is ``size_px * target_mpp / mpp_level0``. It is read from
        :meth:`best_level_for` and area-averaged down (:func:`hipt.resample.box_reduce`, PIL
        ``Image.reduce``'s pixels, for integer factors; a box filter otherwise). Outside the
        slide is ``fill`` (255, white, by default).

        A level-0 read reduced by an integer factor (a 40× scan read at 20×) goes strip by
        strip into the output, so it never holds the full-resolution square (8192² px, 192 MiB
        for a 0.25 µm/px scan): at most ``STRIP_BYTES`` above the output.

        Parameters
        ----------
        out
            Optional writable uint8 ``[size_px, size_px, 3]`` array to fill and return, e.g. a
            view of shared memory that a DataLoader worker hands over without a copy. When no
            resampling is needed the reader decodes straight into it.
        fill
            Grey value of pixels outside the slide.

        Returns
        -------
        ndarray
            uint8 ``[size_px, size_px, 3]`` RGB.
        """
        check_out(out, size_px, size_px)
        level = self.best_level_for(target_mpp)
        ds = self.level_downsamples[level]
        side_level = self.region_size_level0(size_px, target_mpp) / ds
        n = int(math.ceil(side_level - 1e-6))
        if n == size_px and abs(side_level - size_px) < 1e-6:
            return self.read_level(level, x0, y0, n, n, out=out, fill=fill)
        factor = side_level / size_px
        k = round(factor)
        if out is None:
            out = np.empty((size_px, size_px, 3), dtype=np.uint8)
        integer = k >= 2 and abs(factor - k) < 1e-6 and n == k * size_px
        if integer and level == 0:
            return self._read_reduced_strips(x0, y0, size_px, k, out, fill)
        pixels = self.read_level(level, x0, y0, n, n, fill=fill)
        if integer:
            return box_reduce(pixels, k, out)
        small = Image.fromarray(pixels).resize(
            (size_px, size_px), Image.Resampling.BOX, box=(0, 0, side_level, side_level)
        )
        np.copyto(out, np.asarray(small))
        return out

    def _read_reduced_strips(
        self, x0: int, y0: int, size_px: int, k: int, out: np.ndarray, fill: int
    ) -> np.ndarray:
        """``out`` = the level-0 square at ``(x0, y0)`` of side ``k * size_px``, reduced by ``k``.

        Level 0 only, so every strip starts on a whole pixel and the strips join seamlessly.
        Strips end on the slide's tile rows, so no tile is decoded twice; the one to ``k - 1``
        level rows left over at a strip's end (when ``y0`` is not a multiple of ``k``) are carried
        to the next strip.
        """
        width = k * size_px
        tile_h = self.tile_height(0)
        rows = max(tile_h, (STRIP_BYTES // (3 * width)) // tile_h * tile_h)
        buf = np.empty((rows + k, width, 3), dtype=np.uint8)  # reused: no page faults per strip
        carry, done, y, end = 0, 0, y0, y0 + width
        while y < end:
            stop = min(end, (y // tile_h + 1) * tile_h + rows - tile_h)
            self.read_level(0, x0, y, width, stop - y, out=buf[carry : carry + stop - y], fill=fill)
            have = carry + stop - y
            usable = have // k * k
            if usable:
                box_reduce(buf[:usable], k, out[done : done + usable // k])
                done += usable // k
            carry = have - usable
            buf[:carry] = buf[usable:have]
            y = stop
        return out

    def tile_height(self, level: int) -> int:
        """The height of ``level``'s tiles as the slide states it (1 when it does not)."""
        try:
            value = int(self.properties.get(f"openslide.level[{level}].tile-height", "1"))
        except ValueError:
            return 1
        return max(1, value)

    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]:
        """A low-resolution RGB image of the whole slide and its level-0 downsample.

        Reads :meth:`thumbnail_level`; if that level is still larger than ``max_px`` (no pyramid),
        it is area-averaged down strip by strip, so memory stays bounded.

        Returns
        -------
        image : ndarray
            uint8 ``[h, w, 3]``, longest side at most ``max_px``.
        downsample : float
            Level-0 pixels per image pixel (same on both axes).
        """
        level = self.thumbnail_level(max_px)
        k = max(1, math.ceil(max(self.level_dimensions[level]) / max_px))
        return self.read_level_reduced(level, k)

    def read_level_reduced(self, level: int, factor: int) -> tuple[np.ndarray, float]:
        """The whole of ``level`` area-averaged by an integer ``factor``, read in strips.

        Returns the image and its level-0 downsample (``level_downsamples[level] * factor``).
        The last row and column average in white where the level does not fill the block.
        """
        w, h = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        k = int(factor)
        if k <= 1:
            return self.read_level(level, 0, 0, w, h), ds
        out_w, out_h = -(-w // k), -(-h // k)
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        # Strips of at most STRIP_BYTES of the level (one output row at least), so a slide whose
        # level is huge (or claims to be) never needs a full-width band of thousands of rows.
        rows_per_strip = max(1, STRIP_BYTES // (3 * out_w * k * k))
        for r0 in range(0, out_h, rows_per_strip):
            r1 = min(out_h, r0 + rows_per_strip)
            strip = self.read_level(level, 0, int(round(r0 * k * ds)), out_w * k, (r1 - r0) * k)
            box_reduce(strip, k, out[r0:r1])
        return out, ds * k
