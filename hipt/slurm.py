"""``hipt slurm``: submit the stages as Slurm jobs chained by dependencies, and report progress.

The sbatch templates in ``slurm/`` hold only generic defaults; everything site-specific (partition,
account, GPUs, CPUs, memory, time, the virtual environment) comes from one YAML config and is
given to ``sbatch`` as command-line options, which override the templates' ``#SBATCH`` lines.
Each stage's job waits for the jobs it needs with ``--dependency=afterok:...``, in the order
tile → pretrain stage 1 → embed → pretrain stage 2 → embed again → train per cohort → report →
heatmaps. Slurm is the engine: this module only renders command lines and calls ``sbatch``.

``hipt slurm status`` reads progress from the outputs on disk and their records (``tiling*.csv``,
``features/*.h5``, fold folders, rendered heatmaps), so it is right even when the scheduler has
forgotten the jobs.

Examples
--------
Print every script and command without submitting, then submit the chain::

    hipt slurm submit all --config cluster.yaml --dry-run
    hipt slurm submit tile,embed,train --config cluster.yaml
    hipt slurm status --config cluster.yaml
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from hipt.config import ConfigError, ConfigModel, RelPath, add_set_argument, load_config

TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"


# --------------------------------------------------------------------------- config
class Resources(ConfigModel):
    """What one stage's jobs ask the scheduler for; unset values keep the template's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # e.g. "04:00:00"
    nodes: int | None = Field(None, ge=1)
    cpus: int | None = Field(None, ge=1)  # per task
    mem: str | None = None  # e.g. "16G"
    gpus: int | None = Field(None, ge=0)  # per node; 0 = none
    array_tasks: int | None = Field(None, ge=1)  # per-slide stages: tasks of the array
    extra: list[str] = Field(default_factory=list)  # further sbatch options, e.g. --constraint=a100


class StageSettings(ConfigModel):
    """A stage's resources and extra arguments to its ``hipt`` command."""

    resources: Resources = Field(default_factory=Resources)
    args: list[str] = Field(default_factory=list)


class EmbedSettings(StageSettings):
    vit256: RelPath | None = None  # default: stage-1 pretraining's teacher, when that stage runs
    vit4k: RelPath | None = None  # default: stage-2 pretraining's teacher, when that stage runs


class PretrainSettings(StageSettings):
    config: RelPath | None = None  # the stage's pretraining YAML (train/configs/dino_*.yaml)


class TrainSettings(StageSettings):
    configs: list[RelPath] = Field(default_factory=list)  # one cohort YAML per training
    folds: int = Field(5, ge=1)  # array tasks per cohort (one fold each)


class HeatmapSettings(StageSettings):
    fold: int = Field(0, ge=0)  # which trained fold renders the overlays


class SlurmConfig(ConfigModel):
    """Every setting of ``hipt slurm`` (paths relative to this file's folder)."""

    out: RelPath  # the hipt output root: tiles/, features/, pretrain/, runs/, heatmaps/
    slides: RelPath | None = None  # the slide folder (tile stage)
    venv: RelPath | None = None  # virtual environment each job activates
    templates: RelPath | None = None  # folder of the sbatch templates (default: slurm/)
    logs: RelPath | None = None  # job logs (default: OUT/slurm-logs)
    defaults: Resources = Field(default_factory=Resources)
    tile: StageSettings = Field(default_factory=StageSettings)
    pretrain_stage1: PretrainSettings = Field(default_factory=PretrainSettings)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    pretrain_stage2: PretrainSettings = Field(default_factory=PretrainSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    heatmap: HeatmapSettings = Field(default_factory=HeatmapSettings)


# --------------------------------------------------------------------------- jobs
STAGES = ("tile", "pretrain_stage1", "embed", "pretrain_stage2", "train", "heatmap")


@dataclass
class Job:
    """One ``sbatch`` call: a template (or ``--wrap`` command), options, and what it waits for
    (names of earlier jobs of the same plan). ``env`` holds the template's variables; sbatch
    passes the submitting environment on to the job (its default ``--export=ALL``), which keeps
    values with commas or spaces intact."""

    name: str
    script: Path | None
    options: list[str]
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    after_kind: str = "afterok"
    wrap: str | None = None

    def command(self, job_ids: dict[str, str]) -> list[str]:
        """The sbatch argv, with the ids of the jobs this one waits for."""
        argv = ["sbatch", "--parsable", f"--job-name=hipt-{self.name}", *self.options]
        waits = [job_ids[n] for n in self.after if n in job_ids]
        if waits:
            argv.append(f"--dependency={self.after_kind}:{':'.join(waits)}")
        if self.wrap is not None:
            return [*argv, "--wrap", self.wrap]
        return [*argv, str(self.script), *self.args]


def resource_options(defaults: Resources, own: Resources) -> list[str]:
    """sbatch options for a stage: its own resources over the config's defaults."""
    merged = defaults.model_copy(update=own.model_dump(exclude_unset=True, exclude={"extra"}))
    opts = []
    for attr, option in (
        ("partition", "--partition"),
        ("account", "--account"),
        ("qos", "--qos"),
        ("time", "--time"),
        ("nodes", "--nodes"),
        ("cpus", "--cpus-per-task"),
        ("mem", "--mem"),
    ):
        value = getattr(merged, attr)
        if value is not None:
            opts.append(f"{option}={value}")
    if merged.gpus:
        opts.append(f"--gres=gpu:{merged.gpus}")
    return [*opts, *defaults.extra, *own.extra]


def plan_jobs(cfg: SlurmConfig, stages: Sequence[str]) -> list[Job]:
    """The jobs of the chosen stages, in chain order, each waiting for the stage before it."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    logs = logs_dir(cfg)
    common = {"OUT": str(cfg.out), "HIPT_VENV": cfg.venv or ""}
    jobs: list[Job] = []
    previous: list[str] = []
    for stage in (s for s in STAGES if s in stages):
        built = _BUILDERS[stage](cfg, stages, common, logs)
        for job in built:
            if not job.after:
                job.after = list(previous)
        jobs += built
        previous = [j.name for j in built if j.after_kind == "afterok"] or previous
    return jobs


def logs_dir(cfg: SlurmConfig) -> Path:
    """Where the jobs' logs go (``logs``, default ``OUT/slurm-logs``)."""
    return Path(cfg.logs) if cfg.logs else Path(cfg.out) / "slurm-logs"


def _template(cfg: SlurmConfig, name: str) -> Path:
    path = Path(cfg.templates or TEMPLATES) / name
    if not path.is_file():
        raise ConfigError(f"{path}: sbatch template not found (templates: {cfg.templates})")
    return path


def _array(settings: StageSettings, cfg: SlurmConfig) -> list[str]:
    tasks = settings.resources.array_tasks or cfg.defaults.array_tasks
    return [f"--array=0-{tasks - 1}"] if tasks else []


def _log(logs: Path, array: bool) -> str:
    return f"--output={logs}/%x-%A_%a.out" if array else f"--output={logs}/%x-%j.out"


def _tile_jobs(cfg: SlurmConfig, stages, common, logs) -> list[Job]:
    if not cfg.slides:
        raise ConfigError("slides: required for the tile stage (the slide folder)")
    array = _array(cfg.tile, cfg)
    options = [*resource_options(cfg.defaults, cfg.tile.resources), *array, _log(logs, True)]
    env = {**common, "SLIDES": cfg.slides, "HIPT_TILE_ARGS": shlex.join(cfg.tile.args)}
    return [Job("tile", _template(cfg, "tile.sbatch"), options, env)]


def _pretrain_jobs(stage: str) -> Callable[..., list[Job]]:
    def build(cfg: SlurmConfig, stages, common, logs) -> list[Job]:
        settings: PretrainSettings = getattr(cfg, stage)
        if not settings.config:
            raise ConfigError(f"{stage}.config: required (a pretraining YAML)")
        options = [*resource_options(cfg.defaults, settings.resources), _log(logs, False)]
        # The pretraining templates write to $OUT itself (checkpoint.pth, teacher.pth, state.json)
        # and pass their arguments (e.g. --set key=value) on to 'hipt pretrain'.
        env = {**common, "CONFIG": settings.config, "OUT": str(pretrain_dir(cfg, stage))}
        return [
            Job(stage, _template(cfg, f"{stage}.sbatch"), options, env, args=list(settings.args))
        ]

    return build


def pretrain_dir(cfg: SlurmConfig, stage: str) -> Path:
    """Where a pretraining stage writes its checkpoints (``OUT/pretrain/stage1`` or ``stage2``)."""
    return Path(cfg.out) / "pretrain" / stage.removeprefix("pretrain_").replace("_", "")


def _embed_weights(cfg: SlurmConfig, stages: Sequence[str], which: str) -> str:
    given = getattr(cfg.embed, which)
    source = "pretrain_stage1" if which == "vit256" else "pretrain_stage2"
    if given:
        return given
    if source in stages:
        return str(pretrain_dir(cfg, source) / "teacher.pth")
    raise ConfigError(f"embed.{which}: required unless the {source} stage runs in the same chain")


def _embed_jobs(cfg: SlurmConfig, stages, common, logs) -> list[Job]:
    array = _array(cfg.embed, cfg)
    options = [*resource_options(cfg.defaults, cfg.embed.resources), *array, _log(logs, True)]
    vit256 = _embed_weights(cfg, stages, "vit256")
    args = shlex.join(cfg.embed.args)
    if "pretrain_stage2" in stages and not cfg.embed.vit4k:
        if _pretrain_complete(pretrain_dir(cfg, "pretrain_stage2")):
            # Stage 2 is done: a first embedding (random ViT-4K) would only undo the final one.
            return []
        # Stage 2 learns from the patch features of a first embedding; the region features are
        # then computed again with the new ViT-4K (patch features unchanged, same file schema).
        first = Job(
            "embed-patches",
            _template(cfg, "embed.sbatch"),
            options,
            {
                **common,
                "VIT256": vit256,
                "VIT4K": "",
                "HIPT_EMBED_ARGS": f"--random-weights {args}",
            },
        )
        return [first]
    env = {**common, "VIT256": vit256, "VIT4K": _embed_weights(cfg, stages, "vit4k")}
    return [Job("embed", _template(cfg, "embed.sbatch"), options, {**env, "HIPT_EMBED_ARGS": args})]


def _pretrain_complete(folder: Path) -> bool:
    """Whether a pretraining run finished (``state.json`` says so and ``teacher.pth`` exists)."""
    import json

    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("status") == "complete" and (folder / "teacher.pth").is_file()


def _embed_again_jobs(cfg: SlurmConfig, stages, common, logs) -> list[Job]:
    """After stage 2: embed with both pretrained encoders (the features the slide models read)."""
    if "embed" not in stages or cfg.embed.vit4k:
        return []
    array = _array(cfg.embed, cfg)
    options = [*resource_options(cfg.defaults, cfg.embed.resources), *array, _log(logs, True)]
    env = {
        **common,
        "VIT256": _embed_weights(cfg, stages, "vit256"),
        "VIT4K": str(pretrain_dir(cfg, "pretrain_stage2") / "teacher.pth"),
        "HIPT_EMBED_ARGS": shlex.join(cfg.embed.args),
    }
    return [Job("embed", _template(cfg, "embed.sbatch"), options, env)]


def _pretrain2_and_embed_jobs(cfg: SlurmConfig, stages, common, logs) -> list[Job]:
    jobs = _pretrain_jobs("pretrain_stage2")(cfg, stages, common, logs)
    again = _embed_again_jobs(cfg, stages, common, logs)
    for job in again:
        job.after = [j.name for j in jobs]
    return jobs + again


def _train_jobs(cfg: SlurmConfig, stages, common, logs) -> list[Job]:
    if not cfg.train.configs:
        raise ConfigError("train.configs: required for the train stage (cohort YAML files)")
    jobs = []
    array = [f"--array=0-{cfg.train.folds - 1}"]
    options = [*resource_options(cfg.defaults, cfg.train.resources), *array, _log(logs, True)]
    runs = Path(cfg.out) / "runs"
    for config in cfg.train.configs:
        cohort = Path(config).stem
        train = Job(
            f"train-{cohort}",
            _template(cfg, "train.sbatch"),
            options,
            {**common, "HIPT_TRAIN_ARGS": shlex.join(["--out", str(runs), *cfg.train.args])},
            args=[config],
        )
        report = Job(
            f"report-{cohort}",
            None,
            [
                *resource_options(cfg.defaults, Resources(cpus=1, time="00:30:00")),
                _log(logs, False),
            ],
            dict(common),
            after=[train.name],
            after_kind="afterany",  # a report of the folds that finished, even if one failed
            wrap=_activate(cfg)
            + shlex.join(
                ["hipt", "train", "--config", config, "--out", str(runs), "--report-only"]
            ),
        )
        jobs += [train, report]
    return jobs


def _activate(cfg: SlurmConfig) -> str:
    return f"source {shlex.quote(cfg.venv)}/bin/activate && " if cfg.venv else ""


def _heatmap_jobs(cfg: SlurmConfig, stages, common, logs) -> list[Job]:
    if not cfg.train.configs:
        raise ConfigError("train.configs: required for the heatmap stage (it renders their runs)")
    array = _array(cfg.heatmap, cfg)
    options = [*resource_options(cfg.defaults, cfg.heatmap.resources), *array, _log(logs, True)]
    jobs = []
    for config in cfg.train.configs:
        cohort = Path(config).stem
        # Token- and patch-level maps run the encoders again: the weights the features came from.
        weights = []
        for which in ("vit256", "vit4k"):
            try:
                weights += [f"--{which}", _embed_weights(cfg, stages, which)]
            except ConfigError:
                pass  # unknown here: region-level maps still render, and hipt heatmap says so
        env = {
            **common,
            "RUN": str(run_dir(cfg, config) / f"fold_{cfg.heatmap.fold}"),
            "HIPT_HEATMAP_ARGS": shlex.join([*weights, *cfg.heatmap.args]),
        }
        after = [f"train-{cohort}"] if "train" in stages else []
        jobs.append(
            Job(f"heatmap-{cohort}", _template(cfg, "heatmap.sbatch"), options, env, after=after)
        )
    return jobs


def run_dir(cfg: SlurmConfig, cohort_config: str) -> Path:
    """A cohort's runs folder: ``OUT/runs/<cohort>`` (the train jobs are given ``--out OUT/runs``)."""
    from hipt.config import read_config_file

    data = read_config_file(cohort_config)
    cohort = data.get("cohort") or Path(str(data.get("csv", cohort_config))).stem
    return Path(cfg.out) / "runs" / str(cohort)


_BUILDERS: dict[str, Callable[..., list[Job]]] = {
    "tile": _tile_jobs,
    "pretrain_stage1": _pretrain_jobs("pretrain_stage1"),
    "embed": _embed_jobs,
    "pretrain_stage2": _pretrain2_and_embed_jobs,
    "train": _train_jobs,
    "heatmap": _heatmap_jobs,
}


# --------------------------------------------------------------------------- submit
def submit(
    jobs: Sequence[Job],
    *,
    dry_run: bool = False,
    run: Callable[[list[str], dict[str, str]], str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, str]:
    """Submit the jobs in order (or print them); returns job name → Slurm job id.

    In a dry run the ids are placeholders (``<tile>``) and each template's text is printed with
    its command, so the whole chain can be read before anything is queued.
    """
    run = run or _sbatch
    ids: dict[str, str] = {}
    for job in jobs:
        argv = job.command(ids)
        if dry_run:
            ids[job.name] = f"<{job.name}>"
            variables = [f"{k}={v}" for k, v in job.env.items()]
            echo(f"# {job.name}\n{shlex.join(['env', *variables, *argv])}")
            if job.script is not None:
                echo(_indent(job.script.read_text()))
            continue
        ids[job.name] = run(argv, job.env)
        echo(f"{job.name}: job {ids[job.name]}")
    return ids


def _sbatch(argv: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    if res.returncode != 0:
        reason = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeError(f"sbatch refused {argv[2]}: {reason[-1] if reason else res.returncode}")
    return res.stdout.strip().split(";")[0]


def _indent(text: str) -> str:
    return "\n".join(f"    | {line}" for line in text.rstrip().splitlines())


# --------------------------------------------------------------------------- status
def status(cfg: SlurmConfig) -> list[tuple[str, int, int, str]]:
    """Per stage: (stage, finished, total, note), read from the outputs and records on disk."""
    out = Path(cfg.out)
    rows = [_tile_status(cfg, out), _embed_status(out)]
    for stage in ("pretrain_stage1", "pretrain_stage2"):
        rows.append(_pretrain_status(stage, pretrain_dir(cfg, stage)))
    for config in cfg.train.configs:
        rows.append(_train_status(cfg, config))
    rows.append(_heatmap_status(out))
    return rows


def _files(folder: Path, pattern: str) -> list[Path]:
    # Temporary files of atomic writes start with a dot and are never counted.
    return (
        [p for p in folder.glob(pattern) if not p.name.startswith(".")] if folder.is_dir() else []
    )


def _tile_status(cfg: SlurmConfig, out: Path) -> tuple[str, int, int, str]:
    import pandas as pd

    total = len(_files(Path(cfg.slides), "*")) if cfg.slides else 0
    records = _files(out, "tiling*.csv")
    table = pd.concat([pd.read_csv(r) for r in records]) if records else pd.DataFrame()
    if table.empty:
        return ("tile", 0, total, "no tiling records yet")
    latest = table.drop_duplicates("slide_id", keep="last")
    done = int(latest["status"].isin(["ok", "skipped"]).sum())
    failed = int((latest["status"] == "failed").sum())
    return ("tile", done, max(total, len(latest)), f"{failed} failed" if failed else "")


def _embed_status(out: Path) -> tuple[str, int, int, str]:
    tiles = {p.stem for p in _files(out / "tiles", "*.h5")}
    features = {p.stem for p in _files(out / "features", "*.h5")}
    return ("embed", len(features & tiles), len(tiles), "features files of tiled slides")


def _pretrain_status(stage: str, folder: Path) -> tuple[str, int, int, str]:
    import json

    log = folder / "log.jsonl"
    if not log.is_file():
        return (stage, 0, 1, "not started")
    last = {}
    for line in log.read_text().splitlines():
        try:
            last = json.loads(line) or last
        except ValueError:
            continue  # a line cut by a kill
    step, total = int(last.get("step", 0)), int(last.get("total_steps", 0) or 0)
    finished = (folder / "teacher.pth").is_file() and (total == 0 or step >= total)
    return (stage, step, total or step, "finished" if finished else "running or stopped")


def _train_status(cfg: SlurmConfig, config: str) -> tuple[str, int, int, str]:
    import json

    run = run_dir(cfg, config)
    done = 0
    for metrics in _files(run, "fold_*/metrics.json"):
        try:
            done += json.loads(metrics.read_text()).get("status") == "complete"
        except ValueError:
            continue
    report = "report written" if (run / "report.md").is_file() else "no report yet"
    return (f"train {run.name}", done, cfg.train.folds, report)


def _heatmap_status(out: Path) -> tuple[str, int, int, str]:
    rendered = len(_files(out / "heatmaps", "*/heatmap.json"))
    return ("heatmap", rendered, len(_files(out / "features", "*.h5")), "slides rendered")


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt slurm``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="submit|status")
    p = sub.add_parser("submit", help="submit stages chained by --dependency=afterok")
    p.add_argument("stages", help=f"'all' or a comma-separated list of: {', '.join(STAGES)}")
    p.add_argument("--dry-run", action="store_true", help="print every script and command only")
    s = sub.add_parser("status", help="how much of each stage is finished, from the outputs")
    for q in (p, s):
        q.add_argument(
            "--config", required=True, help="cluster YAML (see slurm/cluster.example.yaml)"
        )
        add_set_argument(q, "defaults.partition=gpu")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hipt slurm``."""
    try:
        cfg = load_config(SlurmConfig, args.config, args.overrides)
        if args.action == "status":
            for stage, done, total, note in status(cfg):
                print(f"{stage:<16} {done:>6} / {total:<6} {note}")
            return 0
        stages = list(STAGES) if args.stages == "all" else args.stages.split(",")
        jobs = plan_jobs(cfg, [s.strip() for s in stages])
        if not args.dry_run:
            logs_dir(cfg).mkdir(parents=True, exist_ok=True)  # Slurm does not create it
        submit(jobs, dry_run=args.dry_run)
    except (ConfigError, RuntimeError, OSError) as exc:
        print(f"hipt slurm: {exc}", file=sys.stderr)
        return 2
    return 0
