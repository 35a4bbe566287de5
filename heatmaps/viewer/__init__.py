"""``hipt view``: a zoomable browser viewer of slides with their attention overlays.

The server (:mod:`heatmaps.viewer.server`) cuts Deep Zoom tiles of the slide and renders
attention overlay tiles on demand from ``attention.ome.zarr``; the page beside it
(``static/``) shows them with OpenSeadragon, installed from the npm registry by ``make setup``.
"""
