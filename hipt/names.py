"""Names that become file or folder names (slide ids, case ids, cohorts, run names).

A name read from a CSV, a config or a slide's file name must never lead a write or a read out of
the folder it belongs to, nor hide as a dot-file. :func:`check_name` is the one check every stage
applies before it joins such a name to a path.

Examples
--------
>>> check_name("TCGA-05-4244-01Z", "slide id")
'TCGA-05-4244-01Z'
>>> check_name("../outside", "slide id")
Traceback (most recent call last):
...
ValueError: slide id '../outside': a name that becomes a file or folder name must not contain '/', '\\', '..' or start with '.'
"""

from __future__ import annotations

_RULE = (
    "a name that becomes a file or folder name must not contain '/', '\\', '..' or start with '.'"
)


def is_safe_name(value: object) -> bool:
    """True when ``value`` is a non-empty string that is safe as one path component."""
    return (
        isinstance(value, str)
        and value.strip() == value
        and value != ""
        and not value.startswith(".")
        and "/" not in value
        and "\\" not in value
        and ".." not in value
        and "\x00" not in value
    )


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is safe as one path component, else raise ``ValueError``.

    Parameters
    ----------
    value : str
        The name (e.g. a slide id from a cohort CSV).
    what : str
        What the name is, for the message (``"slide id"``, ``"cohort"``...).

    Raises
    ------
    ValueError
        ``"<what> '<value>': ..."``: empty, leading/trailing blanks, a separator, ``..``, a
        leading dot or a NUL byte.
    """
    if not is_safe_name(value):
        if isinstance(value, str) and (value == "" or value.strip() != value):
            raise ValueError(f"{what} {value!r}: empty or surrounded by blanks")
        raise ValueError(f"{what} {value!r}: {_RULE}")
    return value
