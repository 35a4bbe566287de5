"""Generated data for tests, the demo and the benchmarks: slides and cohorts, in one place.

- :mod:`hipt.synthetic.slides`: whole-slide images (pyramidal TIFF and SVS) rendered from a
  procedural tissue model, with the truth about them, and the bad inputs the tests feed in.
  Its public names are re-exported here, so ``from hipt import synthetic;
  synthetic.write_svs(...)`` works.
- :mod:`hipt.synthetic.cohorts`: cohorts of region-features files with a known signal plus
  their cohort CSV, for slide-level training (``python -m hipt.synthetic.cohorts``).
"""

from hipt.synthetic.slides import (
    EOSIN_RGB,
    GLASS_RGB,
    HEMATOXYLIN_RGB,
    JPEG_QUALITY,
    NUCLEUS_RGB,
    PEN_RGB,
    PenStroke,
    SyntheticSlide,
    TissueModel,
    write_blank_slide,
    write_corrupt_tile_slide,
    write_generic_tiff,
    write_huge_claim_tiff,
    write_no_mpp_tiff,
    write_not_a_slide,
    write_single_level_tiff,
    write_suspicious_mpp_svs,
    write_svs,
    write_tiny_biopsy,
    write_truncated_tiff,
)

__all__ = [
    "EOSIN_RGB",
    "GLASS_RGB",
    "HEMATOXYLIN_RGB",
    "JPEG_QUALITY",
    "NUCLEUS_RGB",
    "PEN_RGB",
    "PenStroke",
    "SyntheticSlide",
    "TissueModel",
    "write_blank_slide",
    "write_corrupt_tile_slide",
    "write_generic_tiff",
    "write_huge_claim_tiff",
    "write_no_mpp_tiff",
    "write_not_a_slide",
    "write_single_level_tiff",
    "write_suspicious_mpp_svs",
    "write_svs",
    "write_tiny_biopsy",
    "write_truncated_tiff",
]
