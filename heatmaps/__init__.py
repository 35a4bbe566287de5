"""hipt stage: heatmaps."""
