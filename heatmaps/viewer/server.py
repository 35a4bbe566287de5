"""The ``hipt view`` web server: Deep Zoom slide tiles, attention overlay tiles and a small JSON API.

Routes (all GET or HEAD)::

    /                                      the page (static/index.html)
    /static/<file>                         the page's own files
    /osd/<file>                            OpenSeadragon, from the npm-installed package
    /api/slides                            the cohort: one row per slide
    /api/slides/<id>                       one slide: size, µm/px, Deep Zoom layout, overlays
    /api/colormap/<name>                   256 RGB colours of a matplotlib colormap
    /api/region/<id>?x=X&y=Y               the GeoJSON region under level-0 (X, Y), its top patches
    /dzi/<id>.dzi                          the Deep Zoom descriptor (for other viewers)
    /tiles/<id>/<level>/<col>_<row>.jpeg   a slide tile
    /overlay/<id>/<c>/<level>/<col>_<row>.png?cmap=NAME&min=T   an attention tile of channel c

Every request that cannot be answered gets a 4xx status and a one-line plain-text reason; no
traceback ever reaches the client. URLs name slides by id; files are served only from the
catalogue (:mod:`heatmaps.viewer.sources`) and the two static folders, and a static path is
refused when it holds ``..``, an encoded separator, an empty segment (an absolute path) or
resolves, through a symlink, outside its folder.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from heatmaps.viewer.attention import AttentionPyramid, HeatmapFormatError, RegionIndex
from heatmaps.viewer.sources import Catalogue, SlideEntry, inside
from heatmaps.viewer.tiles import (
    OVERLAP,
    TILE_SIZE,
    SlideTiles,
    TileCache,
    TileRequestError,
    colorize,
    colormap_lut,
    encode_jpeg,
    encode_png,
)
from hipt.readers import SlideReadError

VIEWER_DIR = Path(__file__).resolve().parent
STATIC_DIR = VIEWER_DIR / "static"
OSD_SUBDIR = Path("node_modules/openseadragon/build/openseadragon")
TILE_MAX_AGE_S = 86400
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".map": "application/json",
}
_WHOLE = re.compile(r"^[0-9]{1,9}$")
_TILE_NAME = re.compile(r"^(-?[0-9]+)_(-?[0-9]+)\.(jpeg|png)$")


class HttpError(Exception):
    """A request the server refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = int(status)
        self.reason = " ".join(str(reason).split())  # always one line


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def find_openseadragon() -> Path | None:
    """The folder of the npm-installed OpenSeadragon build (``make setup`` puts it there).

    ``HIPT_OPENSEADRAGON_DIR`` names another ``node_modules``' parent folder (for installs made
    without the source tree).
    """
    bases = [VIEWER_DIR, VIEWER_DIR.parents[1]]
    if os.environ.get("HIPT_OPENSEADRAGON_DIR"):
        bases.insert(0, Path(os.environ["HIPT_OPENSEADRAGON_DIR"]))
    for base in bases:
        d = base / OSD_SUBDIR
        if (d / "openseadragon.min.js").is_file():
            return d
    return None


def _whole(value: str, what: str) -> int:
    if not _WHOLE.match(value):
        raise HttpError(400, f"{what} {value!r} must be a whole number >= 0")
    return int(value)


def _number_param(query: dict[str, list[str]], name: str, low: float, high: float) -> float:
    raw = query[name][-1]
    try:
        value = float(raw)
    except ValueError:
        raise HttpError(400, f"parameter {name}={raw!r} is not a number") from None
    if not low <= value <= high:  # also refuses NaN
        raise HttpError(400, f"parameter {name}={raw!r} must lie in [{low:g}, {high:g}]")
    return value


def _check_query(query: dict[str, list[str]], allowed: set[str]) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise HttpError(
            400, f"unknown parameter {unknown[0]!r}; allowed: {sorted(allowed) or 'none'}"
        )


def split_path(raw_path: str) -> list[str]:
    """The decoded segments of a URL path, refusing every traversal trick with a 400.

    Examples
    --------
    >>> split_path("/static/viewer.js")
    ['static', 'viewer.js']
    >>> split_path("/static/%2e%2e/secret")
    Traceback (most recent call last):
    ...
    heatmaps.viewer.server.HttpError: path segment '..' is not allowed
    """
    if "\\" in raw_path or "\x00" in raw_path or not raw_path.startswith("/"):
        raise HttpError(400, "path must start with '/' and hold no backslash or NUL")
    segments = raw_path.split("/")[1:]
    if segments and segments[-1] == "":
        segments = segments[:-1]
    decoded = []
    for seg in segments:
        value = unquote(seg, errors="strict") if "%" in seg else seg
        if seg == "" or value == "":
            raise HttpError(400, "empty path segment (an absolute path inside the URL?)")
        if value in (".", ".."):
            raise HttpError(400, f"path segment {value!r} is not allowed")
        if "/" in value or "\\" in value or "\x00" in value:
            raise HttpError(400, f"path segment {seg!r} encodes a separator")
        if value.startswith("."):
            raise HttpError(400, f"path segment {value!r}: hidden files are not served")
        decoded.append(value)
    return decoded


class ViewerApp:
    """Answers viewer requests; independent of the HTTP plumbing (see :func:`make_server`).

    Parameters
    ----------
    catalogue : Catalogue
        The slides, heatmaps and run named on the command line.
    reader : str
        Pixel reader for slides (``auto``, ``openslide``, ``fast``).
    mpp : float, optional
        Level-0 µm/px for slides whose metadata has none.
    cmap : str
        Default matplotlib colormap of the overlays.
    cache_mb : float
        Size bound of the tile cache (encoded tiles).
    static_dir, osd_dir : Path, optional
        Where the page and OpenSeadragon are served from.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        reader: str = "auto",
        mpp: float | None = None,
        cmap: str = "coolwarm",
        cache_mb: float = 256,
        max_open_slides: int = 8,
        static_dir: Path = STATIC_DIR,
        osd_dir: Path | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.reader = reader
        self.mpp = mpp
        colormap_lut(cmap)  # refuse an unknown default before serving anything
        self.cmap = cmap
        self.cache = TileCache(int(cache_mb * (1 << 20)))
        self.static_dir = Path(static_dir).resolve()
        found = osd_dir if osd_dir is not None else find_openseadragon()
        self.osd_dir = Path(found).resolve() if found is not None else None
        # Imports that take up to a second, paid at start-up rather than by the first page.
        import hipt.readers.tiff_jpeg  # noqa: F401

        if any(e.zarr_path is not None for e in catalogue.slides.values()):
            import zarr  # noqa: F401
        self._max_open = int(max_open_slides)
        self._open: dict[str, tuple[SlideTiles, AttentionPyramid | None, str | None]] = {}
        self._regions: dict[str, RegionIndex | None] = {}
        self._luts: dict[str, object] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ dispatch
    def handle(self, raw_url: str) -> Response:
        """Answer one GET; raises :class:`HttpError` for every refusal."""
        url = urlsplit(raw_url)
        query = parse_qs(url.query, keep_blank_values=True)
        parts = split_path(url.path)
        if not parts:  # the page; ?slide=ID opens one slide, read by the page itself
            _check_query(query, {"slide"})
            return self._file(self.static_dir, ["index.html"], {})
        head, rest = parts[0], parts[1:]
        if head == "static":
            return self._file(self.static_dir, rest, query)
        if head == "osd":
            if self.osd_dir is None:
                raise HttpError(
                    404, "OpenSeadragon is not installed: run 'make setup' (npm install)"
                )
            return self._file(self.osd_dir, rest, query)
        if head == "api":
            return self._api(rest, query)
        if head == "dzi" and len(rest) == 1 and rest[0].endswith(".dzi"):
            _check_query(query, {"v"})
            tiles, _, _ = self._open_slide(self._entry(rest[0][: -len(".dzi")]))
            xml = tiles.dz.get_dzi("jpeg").encode()
            return Response(200, xml, "application/xml", {"Cache-Control": "no-cache"})
        if head == "tiles" and len(rest) == 3:
            return self._slide_tile(rest, query)
        if head == "overlay" and len(rest) == 4:
            return self._overlay_tile(rest, query)
        raise HttpError(404, f"no such page: {url.path}")

    def _api(self, rest: list[str], query: dict) -> Response:
        if rest == ["slides"]:
            _check_query(query, set())
            return _json(self.cohort())
        if len(rest) == 2 and rest[0] == "slides":
            _check_query(query, set())
            return _json(self.slide_info(self._entry(rest[1])))
        if len(rest) == 2 and rest[0] == "colormap":
            _check_query(query, set())
            lut = self._lut(rest[1])
            return _json({"name": rest[1], "colors": lut.tolist()}, cache=True)
        if len(rest) == 2 and rest[0] == "region":
            _check_query(query, {"x", "y"})
            for name in ("x", "y"):
                if name not in query:
                    raise HttpError(400, f"parameter {name} is required (level-0 pixels)")
            x = _number_param(query, "x", -1e9, 1e9)
            y = _number_param(query, "y", -1e9, 1e9)
            return _json(self.region_info(self._entry(rest[1]), x, y))
        raise HttpError(404, f"no such API call: /api/{'/'.join(rest)}")

    # ------------------------------------------------------------------ files
    def _file(self, root: Path, parts: list[str], query: dict) -> Response:
        _check_query(query, {"v"})
        if not parts:
            raise HttpError(404, "no file named")
        path = root.joinpath(*parts)
        if not path.exists():
            raise HttpError(404, f"no such file: {'/'.join(parts)}")
        if not inside(path, root):
            raise HttpError(
                403, f"{'/'.join(parts)}: resolves (through a link) outside the served folder"
            )
        if not path.is_file():
            raise HttpError(404, f"not a file: {'/'.join(parts)}")
        kind = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return Response(200, path.read_bytes(), kind, {"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ slides
    def _entry(self, slide_id: str) -> SlideEntry:
        entry = self.catalogue.get(slide_id)
        if entry is None:
            raise HttpError(404, f"unknown slide {slide_id!r}")
        return entry

    def _open_slide(
        self, entry: SlideEntry
    ) -> tuple[SlideTiles, AttentionPyramid | None, str | None]:
        """The open tiles of a slide and its attention pyramid (or why there is none)."""
        with self._lock:
            opened = self._open.pop(entry.slide_id, None)
            if opened is None:
                opened = self._load(entry)
            self._open[entry.slide_id] = opened  # most recently used last
            while len(self._open) > self._max_open:
                old_id = next(iter(self._open))
                self._open.pop(old_id)[0].close()
            return opened

    def _load(self, entry: SlideEntry) -> tuple[SlideTiles, AttentionPyramid | None, str | None]:
        try:
            tiles = SlideTiles(entry.path, self.reader, self.mpp)
        except (SlideReadError, OSError, ValueError) as exc:
            raise HttpError(422, f"slide {entry.slide_id!r} cannot be opened: {exc}") from None
        zarr_path = entry.zarr_path
        if zarr_path is None:
            return tiles, None, None
        if tiles.mpp_level0 is None:
            return tiles, None, "the slide has no µm/px, so its attention cannot be aligned (--mpp)"
        try:
            return tiles, AttentionPyramid(zarr_path, tiles.mpp_level0), None
        except HeatmapFormatError as exc:
            return tiles, None, str(exc)

    def _region_index(self, entry: SlideEntry) -> RegionIndex | None:
        with self._lock:
            if entry.slide_id not in self._regions:
                path = entry.geojson_path
                try:
                    self._regions[entry.slide_id] = RegionIndex.load(path) if path else None
                except HeatmapFormatError as exc:
                    raise HttpError(422, str(exc)) from None
            return self._regions[entry.slide_id]

    def _lut(self, name: str):
        with self._lock:
            if name not in self._luts:
                try:
                    self._luts[name] = colormap_lut(name)
                except ValueError as exc:
                    raise HttpError(400, str(exc)) from None
            return self._luts[name]

    def cohort(self) -> dict:
        rows = []
        for entry in self.catalogue.slides.values():
            rows.append(
                {
                    "slide_id": entry.slide_id,
                    "heatmap": entry.zarr_path is not None,
                    **entry.info,
                }
            )
        return {"slides": rows, "run": self.catalogue.has_run}

    def slide_info(self, entry: SlideEntry) -> dict:
        tiles, pyramid, overlay_error = self._open_slide(entry)
        version = entry.version()
        sid = entry.slide_id
        overlays = []
        if pyramid is not None:
            overlays = [
                {
                    "index": i,
                    "label": label,
                    "url": f"/overlay/{sid}/{i}/{{level}}/{{col}}_{{row}}.png?v={version}",
                }
                for i, label in enumerate(pyramid.channels)
            ]
        return {
            "slide_id": sid,
            "width": tiles.dimensions[0],
            "height": tiles.dimensions[1],
            "mpp": tiles.mpp_level0,
            "reader": tiles.reader_name,
            "tile_size": TILE_SIZE,
            "overlap": OVERLAP,
            "max_level": tiles.level_count - 1,
            "tile_url": f"/tiles/{sid}/{{level}}/{{col}}_{{row}}.jpeg?v={version}",
            "overlays": overlays,
            "overlay_error": overlay_error,
            "cmap": self.cmap,
            "regions": entry.geojson_path is not None,  # read on the first region query
            "info": entry.info,
            "heatmap": self.catalogue.heatmap_meta(entry),
        }

    def region_info(self, entry: SlideEntry, x: float, y: float) -> dict:
        _, pyramid, _ = self._open_slide(entry)
        regions = self._region_index(entry)
        values = {}
        if pyramid is not None:
            values = {label: pyramid.value_at(i, x, y) for i, label in enumerate(pyramid.channels)}
        region = regions.region_at(x, y) if regions is not None else None
        return {"x": x, "y": y, "values": values, "region": region}

    # ------------------------------------------------------------------ tiles
    def _address(self, tiles: SlideTiles, level: str, name: str, ext: str) -> tuple[int, int, int]:
        lv = _whole(level, "level")
        m = _TILE_NAME.match(name)
        if not m or m.group(3) != ext:
            raise HttpError(400, f"tile name {name!r} must be <col>_<row>.{ext}")
        col, row = (_whole(m.group(i), what) for i, what in ((1, "tile column"), (2, "tile row")))
        try:
            tiles.check_address(lv, col, row)
        except TileRequestError as exc:
            raise HttpError(404, str(exc)) from None
        return lv, col, row

    def _tile_response(self, key: tuple, version: str, make) -> Response:
        try:
            body = self.cache.get_or_make((version, *key), make)
        except (SlideReadError, OSError) as exc:
            raise HttpError(422, f"tile cannot be read: {exc}") from None
        kind = "image/jpeg" if key[1] == "slide" else "image/png"
        etag = f'"{version}-{"-".join(map(str, key[2:]))}"'
        headers = {"Cache-Control": f"public, max-age={TILE_MAX_AGE_S}", "ETag": etag}
        return Response(200, body, kind, headers)

    def _slide_tile(self, rest: list[str], query: dict) -> Response:
        _check_query(query, {"v"})
        entry = self._entry(rest[0])
        tiles, _, _ = self._open_slide(entry)
        level, col, row = self._address(tiles, rest[1], rest[2], "jpeg")
        return self._tile_response(
            (entry.slide_id, "slide", level, col, row),
            entry.version(),
            lambda: encode_jpeg(tiles.tile(level, col, row)),
        )

    def _overlay_tile(self, rest: list[str], query: dict) -> Response:
        _check_query(query, {"v", "cmap", "min"})
        entry = self._entry(rest[0])
        tiles, pyramid, overlay_error = self._open_slide(entry)
        if pyramid is None:
            raise HttpError(
                404,
                f"slide {entry.slide_id!r} has no attention overlay"
                + (f": {overlay_error}" if overlay_error else ""),
            )
        channel = _whole(rest[1], "attention channel")
        if channel >= len(pyramid.channels):
            raise HttpError(
                404, f"attention channel {channel} out of range 0..{len(pyramid.channels) - 1}"
            )
        level, col, row = self._address(tiles, rest[2], rest[3], "png")
        cmap = query["cmap"][-1] if "cmap" in query else self.cmap
        lut = self._lut(cmap)
        threshold = _number_param(query, "min", 0.0, 1.0) if "min" in query else 0.0

        def render() -> bytes:
            box = tiles.tile_level0_box(level, col, row)
            w, h = tiles.tile_size(level, col, row)
            return encode_png(colorize(pyramid.sample(channel, box, w, h), lut, threshold))

        key = (entry.slide_id, "overlay", channel, level, col, row, cmap, threshold)
        return self._tile_response(key, entry.version(), render)

    def close(self) -> None:
        with self._lock:
            for tiles, _, _ in self._open.values():
                tiles.close()
            self._open.clear()


def _json(data: object, cache: bool = False) -> Response:
    body = json.dumps(data, allow_nan=False, default=str).encode()
    headers = {"Cache-Control": f"public, max-age={TILE_MAX_AGE_S}" if cache else "no-cache"}
    return Response(200, body, "application/json", headers)


# ------------------------------------------------------------------------------ HTTP
def is_loopback(host: str) -> bool:
    """True for an address or name of this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Handler(BaseHTTPRequestHandler):
    server_version = "hipt-view"
    protocol_version = "HTTP/1.1"  # keep-alive: a screen of tiles over a few connections
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK (40 ms per tile here).
    disable_nagle_algorithm = True
    app: ViewerApp
    verbose = False
    host_guard = True

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _refuse_method(self) -> None:
        self._send(
            Response(
                405,
                b"only GET and HEAD are served\n",
                "text/plain; charset=utf-8",
                {"Allow": "GET, HEAD"},
            )
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    def _host_allowed(self) -> bool:
        # Bound to loopback, only loopback names may appear in Host: a web page elsewhere cannot
        # reach the server through a DNS name that resolves to 127.0.0.1 (DNS rebinding).
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        return is_loopback(name)

    def _answer(self, send_body: bool) -> None:
        try:
            if self.host_guard and not self._host_allowed():
                raise HttpError(
                    403,
                    f"host {self.headers.get('Host')!r} is not served (use 127.0.0.1 or localhost)",
                )
            response = self.app.handle(self.path)
            if response.status == 200 and (etag := response.headers.get("ETag")):
                if self.headers.get("If-None-Match") == etag:
                    response = Response(304, b"", response.content_type, response.headers)
        except HttpError as exc:
            response = Response(exc.status, f"{exc.reason}\n".encode(), "text/plain; charset=utf-8")
        except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
            print(
                f"hipt view: {self.path}: internal error\n{traceback.format_exc()}", file=sys.stderr
            )
            reason = f"internal error: {type(exc).__name__}: {exc}".replace("\n", " ")
            response = Response(500, f"{reason}\n".encode(), "text/plain; charset=utf-8")
        self._send(response, send_body)

    def _send(self, response: Response, send_body: bool = True) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in response.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if send_body and response.status != 304:
            self.wfile.write(response.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's own refusals (bad request line, headers too long) in the same one-line form.
        self.close_connection = True
        reason = " ".join((message or HTTPStatus(code).phrase).split())
        self._send(Response(code, f"{reason}\n".encode(), "text/plain; charset=utf-8"))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
        if self.verbose:
            super().log_message(format, *args)


def make_server(
    app: ViewerApp, host: str = "127.0.0.1", port: int = 0, verbose: bool = False
) -> ThreadingHTTPServer:
    """A threaded HTTP server for ``app`` on ``host:port`` (port 0: any free port).

    Examples
    --------
    >>> import tempfile, pathlib, threading, urllib.request
    >>> from hipt.synthetic import write_generic_tiff
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_generic_tiff(d / "s.tiff", 1024, 1024)
    >>> srv = make_server(ViewerApp(Catalogue(d)))
    >>> threading.Thread(target=srv.serve_forever, daemon=True).start()
    >>> url = f"http://127.0.0.1:{srv.server_address[1]}/api/slides"
    >>> [s["slide_id"] for s in json.load(urllib.request.urlopen(url))["slides"]]
    ['s']
    >>> srv.shutdown(); srv.server_close()
    """
    handler = type(
        "ViewerHandler",
        (_Handler,),
        {"app": app, "verbose": verbose, "host_guard": is_loopback(host)},
    )
    server_class = type("ViewerServer", (ThreadingHTTPServer,), {"request_queue_size": 64})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    return server
