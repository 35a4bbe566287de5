"""``hipt embed``: every tiled region through ViT-256 and ViT-4K into ``features/<slide_id>.h5``.

Regions stream from the slides through a DataLoader into a ring of reused shared-memory buffers
(:mod:`hipt.embed.data`), are grouped into batches that may span several small slides, go
through the :class:`~hipt.models.region_encoder.RegionEncoder` on the device, and each row is
routed to its slide's features file by a writer thread, so writing overlaps the next batch
(:mod:`hipt.embed.stream`). A slide's file is written under a temporary name and renamed when
its last region is in, so a killed run leaves no file that looks complete.

Before anything streams, each slide is planned (:mod:`hipt.embed.plan`): a rerun skips every
slide whose features file passes the reuse check (:mod:`hipt.embed.reuse`: intact data, the same
coordinates, tiling, weights, normalisation, µm/px and reader); a slide whose tiles file or
slide is wrong fails alone with one line; a slide another live process is embedding (its lock,
:mod:`hipt.runlock`) is left to it. ``--shard I/N`` restricts a run to the slides
:mod:`hipt.shard` assigns to shard ``I``. Every run merges one row per slide into
``embedding.csv`` (``embedding.shard-I-of-N.csv`` for a shard; :mod:`hipt.embed.records`).

Layout: :mod:`~hipt.embed.driver` (:func:`embed_tiles`), :mod:`~hipt.embed.plan`,
:mod:`~hipt.embed.reuse`, :mod:`~hipt.embed.stream`, :mod:`~hipt.embed.data`,
:mod:`~hipt.embed.records`, :mod:`~hipt.embed.cli` (the ``hipt embed`` options).

Examples
--------
Embed a folder of tiles on the GPU (the released weights' file names)::

    hipt embed --tiles out/tiles --out out \\
        --vit256 checkpoints/vit256_small_dino.pth --vit4k checkpoints/vit4k_xs_dino.pth

The same from Python, with random weights for a dry run::

    from hipt.embed import embed_tiles
    summary = embed_tiles("out/tiles", "out", random_weights=True, device="cpu")
    print(summary.n_failed, summary.csv_path)
"""

from hipt.embed.cli import add_arguments, main
from hipt.embed.driver import RELEASED_FILES, embed_tiles, missing_weights_message
from hipt.embed.plan import list_tiles, resolve_slide_path
from hipt.embed.records import EmbedSummary, SlideResult, csv_name, read_embedding_csv
from hipt.embed.reuse import MATCH_KEYS, check_features, features_attrs, tiles_sha256

__all__ = [
    "SlideResult",
    "EmbedSummary",
    "embed_tiles",
    "tiles_sha256",
    "features_attrs",
    "check_features",
    "list_tiles",
    "resolve_slide_path",
    "csv_name",
    "missing_weights_message",
    "read_embedding_csv",
    "add_arguments",
    "main",
    "MATCH_KEYS",
    "RELEASED_FILES",
]
