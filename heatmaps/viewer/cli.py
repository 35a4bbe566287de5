"""``hipt view SLIDE_OR_FOLDER [--heatmaps DIR] [--run DIR] [--port P] [--host H]``.

Serves a slide (or a folder of slides, listed as a cohort) with its attention overlays to a
browser. Binds to 127.0.0.1 unless ``--host`` is given; stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hipt.readers import READERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", type=Path, metavar="SLIDE_OR_FOLDER", help="a slide file or a folder of slides"
    )
    p.add_argument(
        "--heatmaps",
        type=Path,
        metavar="DIR",
        help="folder of <slide_id>/attention.ome.zarr (hipt heatmap's output)",
    )
    p.add_argument(
        "--run",
        type=Path,
        metavar="DIR",
        help="a hipt train run folder: its predictions label the cohort list",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument(
        "--reader", choices=READERS, default="auto", help="slide pixel reader (default auto)"
    )
    p.add_argument("--mpp", type=float, help="level-0 µm/px for slides whose metadata has none")
    p.add_argument(
        "--cmap", default="coolwarm", help="matplotlib colormap of the overlays (default coolwarm)"
    )
    p.add_argument(
        "--cache-mb", type=float, default=256, help="tile cache size in MiB (default 256)"
    )
    p.add_argument("--verbose", action="store_true", help="log every request")


def main(args: argparse.Namespace) -> int:
    from heatmaps.viewer.server import ViewerApp, find_openseadragon, is_loopback, make_server
    from heatmaps.viewer.sources import Catalogue

    if not 0 <= args.port <= 65535:
        print(f"hipt view: --port {args.port} must lie in 0..65535", file=sys.stderr)
        return 2
    if args.mpp is not None and not args.mpp > 0:
        print(f"hipt view: --mpp {args.mpp} must be positive", file=sys.stderr)
        return 2
    try:
        catalogue = Catalogue(args.source, heatmaps=args.heatmaps, run=args.run)
        app = ViewerApp(
            catalogue, reader=args.reader, mpp=args.mpp, cmap=args.cmap, cache_mb=args.cache_mb
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"hipt view: {exc}", file=sys.stderr)
        return 2
    if not catalogue.slides:
        print(f"hipt view: {args.source}: no slides found", file=sys.stderr)
        return 1
    if find_openseadragon() is None:
        print(
            "hipt view: OpenSeadragon is not installed; run 'make setup' (it runs npm install)",
            file=sys.stderr,
        )
    try:
        server = make_server(app, args.host, args.port, verbose=args.verbose)
    except OSError as exc:
        print(
            f"hipt view: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr
        )
        return 1
    host, port = server.server_address[:2]
    if not is_loopback(host):
        print(
            f"hipt view: listening on {host}: other machines can reach it (there is no login)",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    page = f"?slide={next(iter(catalogue.slides))}" if len(catalogue.slides) == 1 else ""
    print(
        f"hipt view: {len(catalogue.slides)} slide(s) at http://{shown}:{port}/{page}  "
        "(Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
    return 0
