"""Cohort and split CSV rows quoted in messages: the one formatter every refusal uses.

Examples
--------
>>> import pandas as pd
>>> df = pd.DataFrame({"case_id": ["a", "b"], "fold": [0, 1]})
>>> print(format_rows(df, quote=False))
    row 2: case_id=a, fold=0
    row 3: case_id=b, fold=1
>>> print(format_rows(df, ["case_id"], notes=["no features file", "ok"], limit=1))
    row 2: case_id='a': no features file
    ... and 1 more
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


def format_rows(
    df: pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    notes: Sequence[str] | None = None,
    quote: bool = True,
    limit: int = 20,
    indent: str = "    ",
) -> str:
    """One ``row N: col=value, ...[: note]`` line per row of ``df``, at most ``limit`` of them.

    ``N`` is the line number in the CSV file: its header is line 1, so the data row with index
    ``i`` (0-based, as pandas reads it) is line ``i + 2``. ``quote`` writes values as Python
    literals (``slide_id=''`` shows an empty cell); ``notes`` adds a reason per row.
    """
    columns = list(df.columns) if columns is None else list(columns)
    notes = list(notes) if notes is not None else [None] * len(df)
    lines = []
    for (i, r), note in zip(df.head(limit).iterrows(), notes[:limit], strict=False):
        cells = ", ".join(f"{c}={r[c]!r}" if quote else f"{c}={r[c]}" for c in columns)
        lines.append(f"{indent}row {int(i) + 2}: {cells}" + (f": {note}" if note else ""))
    if len(df) > limit:
        lines.append(f"{indent}... and {len(df) - limit} more")
    return "\n".join(lines)
