"""hipt: Hierarchical Image Pyramid Transformer for whole-slide images."""

__version__ = "0.1.0"
