"""hipt stage: attention heatmaps of trained slide models (``hipt heatmap``).

- :mod:`heatmaps.inputs`: the fold, features, slide and encoders a heatmap is made from, and the
  checks that refuse bad ones;
- :mod:`heatmaps.scores`: attention at slide, region and token level;
- :mod:`heatmaps.pipeline`: one slide's outputs, written all or nothing;
- :mod:`heatmaps.render` (PNGs), :mod:`heatmaps.ngff` (OME-Zarr writer and reader),
  :mod:`heatmaps.qupath` (GeoJSON), :mod:`heatmaps.colors` and :mod:`heatmaps.paint`: the pieces
  the browser viewer shares;
- :mod:`heatmaps.planted`: a generated run with known attention (tests, benchmark, docs).
"""
