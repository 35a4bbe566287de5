"""The usage half of the bad-input corpus: options, weights, configs and cohort tables that
``hipt tile``, ``hipt embed`` and ``hipt train`` refuse in their own run (see
``test_bad_input_corpus.py``).

A maker gets the context (folders earlier good runs filled, a scratch folder) and returns the
arguments of the run and the subject: the value or path the line must name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from corpus_batch import FAST, Case


# ---------------------------------------------------- usage errors and refusals, one run each
def _tile_flag(flag: str, value: str) -> Callable[[Any], tuple[list, str]]:
    return lambda u: ([u.slide, "--out", u.tile_out, flag, value], value)


def _tile_out_file(u: Any) -> tuple[list, Path]:
    return [u.slide, "--out", u.a_file / "out"], u.a_file / "out"


def _embed_args(u: Any, *extra: object, out: Path | None = None) -> list:
    return ["--tiles", u.good_tiles, "--out", out or u.embed_out, *extra]


def _weights(name: str, content: bytes | None) -> Callable[[Any], tuple[list, Path]]:
    def make(u: Any) -> tuple[list, Path]:
        path = u.root / name
        if content is not None:
            path.write_bytes(content)
        cpu = ["--device", "cpu", "--workers", "0"]
        return _embed_args(u, "--vit256", path, "--vit4k", path, *cpu), path

    return make


class RunsCode:
    """Pickled, it calls ``os.system``: a checkpoint that would run code if unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _pickled_weights(u: Any) -> tuple[list, Path]:
    import torch

    path = u.root / "evil.pth"
    # If it ran, the earlier embedding output would hold a new file (its snapshot is compared).
    torch.save({"teacher": {}, "extra": RunsCode(f"touch {u.embed_out / 'code_ran'}")}, path)
    return _embed_args(u, "--vit256", path, "--vit4k", path, "--device", "cpu"), path


def _embed_out_file(u: Any) -> tuple[list, Path]:
    return _embed_args(u, *FAST, out=u.a_file), u.a_file


def _embed_out_holding_features_file(u: Any) -> tuple[list, Path]:
    out = u.root / "out_with_file"
    out.mkdir()
    (out / "features").write_text("a file where the features folder goes\n")
    return _embed_args(u, *FAST, out=out), out


def _empty_tiles_folder(u: Any) -> tuple[list, Path]:
    tiles = u.root / "no_tiles"
    tiles.mkdir()
    return ["--tiles", tiles, "--out", u.embed_out, *FAST], tiles


def train_run(name: str, subject: Any = None, **config: Any) -> Callable[[Any], tuple[list, Any]]:
    """``hipt train`` with the good config changed by ``config`` (``None`` drops a key)."""

    def make(u: Any) -> tuple[list, Any]:
        cfg = {**u.train_config, **{k: v(u) if callable(v) else v for k, v in config.items()}}
        cfg = {k: v for k, v in cfg.items() if v is not None}
        path = u.train_root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        value = subject(u) if callable(subject) else subject
        return ["--config", path, "--out", u.runs], value

    return make


def _train_args(*extra: str) -> Callable[[Any], tuple[list, str]]:
    def make(u: Any) -> tuple[list, str]:
        args, _ = train_run("good_again")(u)
        return [*args, *extra], extra[-1]

    return make


def _cohort_csv(name: str, rows: Callable[[Any], str], encoding: str = "utf-8"):
    """A cohort CSV beside the good one (the good rows, changed by ``rows``)."""

    def make(u: Any) -> tuple[list, Path]:
        path = u.train_root / f"{name}.csv"
        path.write_bytes(rows(u).encode(encoding))
        args, _ = train_run(name, csv=str(path), cohort="good")(u)
        return args, path

    return make


def _good_rows(u: Any) -> str:
    rows = u.cohort.table
    return "slide_id,case_id,label\n" + "".join(
        f"{r['slide_id']},{r['case_id']},{r['label']}\n" for r in rows
    )


def _hidden_case(u: Any) -> str:
    r = u.cohort.table[0]
    return f"slide_id,case_id,label\n{r['slide_id']},.hidden,{r['label']}\n"


def _broken_features(u: Any) -> tuple[list, Path]:
    feats = u.train_root / "features_broken"
    shutil.copytree(u.cohort.features_dir, feats)
    bad = feats / f"{u.cohort.table[1]['slide_id']}.h5"
    bad.write_bytes(b"not hdf5")
    args, _ = train_run("broken_features", features_dir=str(feats))(u)
    return args, bad


def _abs_cohort(u: Any) -> str:
    return str(u.train_root / "abs")


def _bad_yaml(u: Any) -> tuple[list, Path]:
    path = u.train_root / "broken.yaml"
    path.write_text("cohort: [unclosed\n")
    return ["--config", path, "--out", u.runs], path


ARGPARSE = r"^hipt {cmd}: error: argument {flag}: "
TILE_USAGE = [
    Case("tile-target-mpp-inf", "tile", False, _tile_flag("--target-mpp", "inf"), 2,
         ARGPARSE.format(cmd="tile", flag="--target-mpp") + r"must be a positive finite number, got {subject}$"),
    Case("tile-target-mpp-tiny", "tile", False, _tile_flag("--target-mpp", "1e-9"), 2,
         ARGPARSE.format(cmd="tile", flag="--target-mpp") + r"{subject} µm/px is implausible"),
    Case("tile-target-mpp-text", "tile", False, _tile_flag("--target-mpp", "half"), 2,
         ARGPARSE.format(cmd="tile", flag="--target-mpp") + r"must be a number, got '{subject}'"),
    Case("tile-mpp-1e-300", "tile", False, _tile_flag("--mpp", "1e-300"), 2,
         ARGPARSE.format(cmd="tile", flag="--mpp") + r"{subject} µm/px is implausible"),
    Case("tile-mpp-1000", "tile", False, _tile_flag("--mpp", "1000"), 2,
         ARGPARSE.format(cmd="tile", flag="--mpp") + r"{subject} µm/px is implausible"),
    Case("tile-mpp-nan", "tile", False, _tile_flag("--mpp", "nan"), 2,
         ARGPARSE.format(cmd="tile", flag="--mpp") + r"must be a positive finite number, got {subject}$"),
    Case("tile-region-px-1", "tile", False, _tile_flag("--region-px", "1"), 2,
         ARGPARSE.format(cmd="tile", flag="--region-px") + r"must be a positive multiple of the 256 px patch, got {subject}$"),
    Case("tile-region-px-0", "tile", False, _tile_flag("--region-px", "0"), 2,
         ARGPARSE.format(cmd="tile", flag="--region-px") + r"must be a positive integer, got {subject}$"),
    Case("tile-min-tissue-2", "tile", False, _tile_flag("--min-tissue", "2"), 2,
         ARGPARSE.format(cmd="tile", flag="--min-tissue") + r"must be in \[0, 1\], got {subject}$"),
    Case("tile-seg-mpp-negative", "tile", False, _tile_flag("--seg-mpp", "-8"), 2,
         ARGPARSE.format(cmd="tile", flag="--seg-mpp") + r"must be a positive finite number, got {subject}$"),
    Case("tile-max-slide-px-0", "tile", False, _tile_flag("--max-slide-px", "0"), 2,
         ARGPARSE.format(cmd="tile", flag="--max-slide-px") + r"must be a positive integer, got {subject}$"),
    Case("tile-shard-out-of-range", "tile", False, _tile_flag("--shard", "3/2"), 2,
         r"^hipt tile: shard '{subject}': need N >= 1 and 0 <= I < N$"),
    Case("tile-out-under-a-file", "tile", False, _tile_out_file, 2,
         r"^hipt tile: {subject}: output folder is not writable"),
]  # fmt: skip
EMBED_USAGE = [
    Case("embed-out-is-a-file", "embed", False, _embed_out_file, 2,
         r"^hipt embed: error: --out {subject}: is a file; pass a folder"),
    Case("embed-out-holds-features-file", "embed", False, _embed_out_holding_features_file, 2,
         r"^hipt embed: error: --out {subject}: .*features is a file, not the features folder"),
    Case("embed-weights-text", "embed", False, _weights("text.pth", b"not a checkpoint\n"), 2,
         r"^hipt embed: error: .*{subject}: not a torch checkpoint \(a text"),
    Case("embed-weights-empty", "embed", False, _weights("empty.pth", b""), 2,
         r"^hipt embed: error: .*{subject}: an empty file \(0 bytes\)"),
    Case("embed-weights-missing", "embed", False, _weights("nowhere.pth", None), 2,
         r"^hipt embed: error: --vit256 {subject}: no such weights file$"),
    Case("embed-weights-pickled-code", "embed", False, _pickled_weights, 2,
         r"^hipt embed: error: .*{subject}: refused: it pickles posix\.system"),
    Case("embed-tiles-empty-folder", "embed", False, _empty_tiles_folder, 2,
         r"^hipt embed: error: --tiles {subject}: no tiles files \(\*\.h5\)"),
]  # fmt: skip
TRAIN_USAGE = [
    Case("train-cohort-dotdot", "train", False, train_run("dotdot", "../../../x", cohort="../../../x"), 2,
         r"^hipt train: invalid config: cohort '{subject}': a name that becomes a file or folder name"),
    Case("train-cohort-absolute", "train", False,
         train_run("absolute", _abs_cohort, cohort=_abs_cohort), 2,
         r"^hipt train: invalid config: cohort '{subject}': a name that becomes a file or folder name"),
    Case("train-csv-name-hidden", "train", False,
         train_run("csv_name", ".hidden", cohort=None, csv=lambda u: str(u.train_root / ".hidden.csv")), 2,
         r"^hipt train: invalid config: .*cohort \(the CSV's name\) '{subject}': a name that becomes"),
    Case("train-slide-id-escapes", "train", False,
         _cohort_csv("slide_escape", lambda u: _good_rows(u) + "../outside,TCGA-A1-0000,A\n"), 2,
         r"^\s*row \d+: slide_id='\.\./outside', case_id='TCGA-A1-0000'$"),
    Case("train-case-id-hidden", "train", False,
         _cohort_csv("case_hidden", _hidden_case), 2,
         r"^\s*row 2: slide_id='TCGA-A1-0000-00', case_id='\.hidden'$"),
    Case("train-csv-not-utf8", "train", False,
         _cohort_csv("latin1", lambda u: _good_rows(u) + "extra,Ramón,A\n", "latin-1"), 2,
         r"^hipt train: {subject}: not UTF-8 text \(byte 0xf3 on line \d+\)"),
    Case("train-features-not-hdf5", "train", False, _broken_features, 2,
         r"^\s*row 3: slide_id='[^']+': {subject}: not a readable HDF5 file"),
    Case("train-lr-text", "train", False, _train_args("--set", "train.lr=fast"), 2,
         r"^hipt train: invalid config: train\.lr = 'fast': Input should be a valid number"),
    Case("train-config-not-yaml", "train", False, _bad_yaml, 2, r"^hipt train: .*{subject}"),
]  # fmt: skip
USAGE = TILE_USAGE + EMBED_USAGE + TRAIN_USAGE
