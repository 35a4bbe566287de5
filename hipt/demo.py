"""``hipt demo``: the whole HIPT flow on a generated cohort, from slides to heatmaps, on a laptop CPU.

1. **cohort**: slides of two subtypes (gland-like rings or solid sheets) whose survival depends on
   the lesions in them (:mod:`hipt.synthetic.demo`); the generator records where the lesions are.
2. ``hipt tile``: tissue masks, 4096 px regions at 0.5 µm/px, QC thumbnails.
3. ``hipt pretrain stage1``: a short DINO pretraining of a shallow ViT-256 on the slides' patches.
4. ``hipt embed`` with that ViT-256: patch features of every region.
5. ``hipt pretrain stage2``: a short DINO pretraining of a shallow ViT-4K on those features.
6. ``hipt train``: subtyping and survival, k-fold by case, with HIPT_LGP, which runs the
   self-pretrained ViT-4K on the cached patch features (so no second embedding pass is needed).
7. ``hipt heatmap``: region-level attention of every test slide (hit rate of the top-attended
   region on the lesions) and full overlays for a few slides of each class.
8. ``report.html``: one self-contained page of all of it (:mod:`hipt.demo_report`).

Every stage runs through the ``hipt`` command, exactly as a user would type it, and each stage
skips work already done, so a second run only redoes what is missing. Model sizes and training
lengths are reduced to fit a laptop CPU (see :data:`SIZES`); the report says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

__all__ = ["SIZES", "DemoSize", "add_arguments", "main"]


@dataclass(frozen=True)
class DemoSize:
    """How big one demo run is: cohort, encoders, training lengths."""

    cases: int
    vit256_depth: int  # full ViT-256 has 12 blocks
    vit4k_depth: int  # full ViT-4K has 6 blocks
    stage1_steps: int
    stage1_batch: int
    stage2_epochs: int
    folds: int
    epochs: int
    heatmap_slides_per_class: int


SIZES: dict[str, DemoSize] = {
    # For tests and CI: the same stages on a cohort too small to say much.
    "tiny": DemoSize(8, 1, 1, 6, 16, 2, 2, 40, 1),
    # The README's first command: under 15 minutes on 2 CPU cores.
    "small": DemoSize(24, 1, 2, 30, 16, 10, 4, 50, 2),
    # Longer pretraining and a larger cohort; tens of minutes on a CPU.
    "full": DemoSize(60, 2, 2, 400, 32, 30, 5, 30, 3),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt demo``."""
    parser.add_argument("--out", default="demo_out", type=Path, help="output folder (demo_out)")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="small (default, minutes on a laptop), full (longer), tiny (tests)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated cohort")
    parser.add_argument(
        "--workers", type=int, default=2, help="processes for writing and tiling slides (2)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class Demo:
    """Paths and settings of one demo run."""

    out: Path
    size: DemoSize
    size_name: str
    seed: int
    workers: int
    progress: bool
    times: dict[str, float]
    cpu_times: dict[str, float]

    @property
    def stage1(self) -> Path:
        return self.out / "pretrain" / "stage1"

    @property
    def stage2(self) -> Path:
        return self.out / "pretrain" / "stage2"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def hipt(self, stage: str, argv: list[str], *, quiet_ok: bool = False) -> None:
        """Run ``hipt ARGV`` in this process; a non-zero exit stops the demo, naming the stage."""
        import torch

        from hipt.cli import main as hipt_main

        if not self.progress and "--no-progress" not in argv and argv[0] != "inspect":
            argv = [*argv, "--no-progress"]
        print(f"$ hipt {shlex.join(argv)}", flush=True)
        # The stages run in this process, and a stage's ``threads`` setting (pretraining and
        # training use one thread) would otherwise carry over into the next: embed on one core.
        threads = torch.get_num_threads()
        try:
            code = hipt_main(argv)
        finally:
            torch.set_num_threads(threads)
        if code != 0:
            raise SystemExit(
                f"hipt demo: stage {stage} failed: 'hipt {shlex.join(argv)}' -> {code}"
            )


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stage(demo: Demo, name: str, what: str, fn) -> None:
    # CPU seconds are recorded beside wall seconds: on a shared machine the wall time says more
    # about the neighbours than about hipt.
    print(f"\n== {name}: {what}", flush=True)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn(demo)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    demo.times[name] = wall
    demo.cpu_times[name] = cpu
    print(f"-- {name}: {wall:.1f} s ({cpu:.1f} CPU s)", flush=True)


# ----------------------------------------------------------------------------- stages
def stage_cohort(demo: Demo) -> None:
    from hipt.synthetic.demo import write_demo_cohort

    cohort = write_demo_cohort(
        demo.out / "cohort",
        n_cases=demo.size.cases,
        seed=demo.seed,
        workers=demo.workers,
        progress=lambda sid: print(f"   writing {sid}", flush=True),
    )
    n_cases = len({s.case_id for s in cohort.slides})
    print(f"   {len(cohort.slides)} slides of {n_cases} cases in {cohort.slides_dir}")


def stage_tile(demo: Demo) -> None:
    demo.hipt(
        "tile",
        ["tile", str(demo.out / "cohort" / "slides"), "--out", str(demo.out),
         "--workers", str(demo.workers)],
    )  # fmt: skip


def _pretrain_done(folder: Path) -> bool:
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("status") in ("complete", "stopped") and (folder / "teacher.pth").is_file()


def _write_yaml(path: Path, data: dict) -> Path:
    from hipt.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return path


def _dino_common(depth: int) -> dict:
    # A short run: no warm-up, a teacher that follows the student closely (DINO's 0.996 would
    # leave the teacher near its random start after a few dozen steps), small heads.
    return {
        "model": {"kwargs": {"depth": depth}, "drop_path": 0.0, "out_dim": 1024,
                  "hidden_dim": 256, "bottleneck_dim": 64},
        "dino": {"momentum_teacher": 0.9},
        "optim": {"lr": 0.002, "warmup_epochs": 0, "freeze_last_layer_epochs": 0},
    }  # fmt: skip


def stage_pretrain1(demo: Demo) -> None:
    if _pretrain_done(demo.stage1):
        print(f"   done already: {demo.stage1 / 'teacher.pth'}")
        return
    s = demo.size
    cfg = _dino_common(s.vit256_depth)
    cfg["model"]["arch"] = "vit256_s16"
    cfg["data"] = {
        "tiles_dir": str((demo.out / "tiles").resolve()),
        "tissue": {"min_fraction": 0.5},
    }
    cfg["crops"] = {"global_px": 96, "local_px": 48, "local_crops": 2}
    # One loader process crops while one thread trains: more threads only fight it for 2 cores.
    cfg["train"] = {"epochs": 1, "batch_size": s.stage1_batch, "device": "cpu", "workers": 1,
                    "threads": 1, "stop_at_step": s.stage1_steps, "checkpoint_every_steps": 20}  # fmt: skip
    path = _write_yaml(demo.out / "configs" / "pretrain_stage1.yaml", cfg)
    demo.hipt("pretrain1", ["pretrain", "stage1", "--config", str(path), "--out", str(demo.stage1)])


def stage_embed(demo: Demo) -> None:
    # The ViT-4K of this pass is random (its region features are not used): stage 2 pretrains
    # the real one on the patch features written here.
    demo.hipt(
        "embed",
        ["embed", "--tiles", str(demo.out / "tiles"), "--out", str(demo.out), "--device", "cpu",
         "--vit256", str(demo.stage1 / "teacher.pth"), "--random-weights"],
    )  # fmt: skip


def stage_pretrain2(demo: Demo) -> None:
    if _pretrain_done(demo.stage2):
        print(f"   done already: {demo.stage2 / 'teacher.pth'}")
        return
    s = demo.size
    cfg = _dino_common(s.vit4k_depth)
    cfg["model"]["arch"] = "vit4k_xs"
    # Forty-odd steps on a few dozen regions collapse ViT-4K's embeddings towards one point
    # (slide models then see near-identical regions and learn nothing): a softer teacher, a
    # smaller head and dinov2's KoLeo term keep them apart.
    cfg["model"]["out_dim"] = 256
    cfg["dino"].update({"teacher_temp": 0.07, "warmup_teacher_temp": 0.07, "koleo_weight": 0.1})
    cfg["data"] = {"features_dir": str((demo.out / "features").resolve())}
    cfg["crops"] = {"local_crops": 4}
    cfg["train"] = {"epochs": s.stage2_epochs, "batch_size": 16, "device": "cpu", "workers": 0,
                    "checkpoint_every_steps": 20}  # fmt: skip
    path = _write_yaml(demo.out / "configs" / "pretrain_stage2.yaml", cfg)
    demo.hipt("pretrain2", ["pretrain", "stage2", "--config", str(path), "--out", str(demo.stage2)])


def _train_config(demo: Demo, task: str) -> Path:
    cohort = demo.out / "cohort"
    cfg = {
        "cohort": f"demo_{task}",
        "task": task,
        "csv": str((cohort / f"{task}.csv").resolve()),
        "features_dir": str((demo.out / "features").resolve()),
        "model": {
            "name": "hipt_lgp",
            "kwargs": {
                "vit4k_weights": str((demo.stage2 / "teacher.pth").resolve()),
                "dropout": 0.1,
            },
        },  # fmt: skip
        "splits": {"folds": demo.size.folds},
        "threads": 1,  # bags are small: one thread is fastest (train.config)
        # The paper's protocol: the last epoch's model (a few validation cases pick noise).
        "train": {"epochs": demo.size.epochs, "lr": 2.0e-4, "patience": 0, "select_on": "last"},
    }
    return _write_yaml(demo.out / "configs" / f"train_{task}.yaml", cfg)


def stage_train(demo: Demo) -> None:
    # The two tasks are independent and each trains on one thread, so they run side by side in
    # two processes (the 2-core budget's largest saving): subtyping shows its progress here,
    # survival's output follows when it is done.
    import subprocess

    survival = ["train", "--config", str(_train_config(demo, "survival")),
                "--out", str(demo.runs), "--no-progress"]  # fmt: skip
    print(f"$ hipt {shlex.join(survival)}  (in a second process)", flush=True)
    side = subprocess.Popen(
        [sys.executable, "-m", "hipt.cli", *survival],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        subtype = [
            "train",
            "--config",
            str(_train_config(demo, "subtype")),
            "--out",
            str(demo.runs),
        ]
        demo.hipt("train subtype", subtype)
    finally:
        output, _ = side.communicate()
    print(output, end="", flush=True)
    if side.returncode != 0:
        raise SystemExit(
            f"hipt demo: stage train survival failed: 'hipt {shlex.join(survival)}' -> "
            f"{side.returncode}"
        )


def _test_slides(demo: Demo, fold: int) -> list[str]:
    import pandas as pd

    run = demo.runs / "demo_subtype"
    splits = pd.read_csv(run / "splits.csv")
    cases = set(splits[(splits["fold"] == fold) & (splits["role"] == "test")]["case_id"])
    table = pd.read_csv(demo.out / "cohort" / "subtype.csv")
    return sorted(table[table["case_id"].isin(cases)]["slide_id"])


def _linked_features(demo: Demo, name: str, slide_ids: list[str]) -> Path:
    """A folder of links to some features files, for one batch ``hipt heatmap`` call."""
    folder = demo.out / "heatmap_inputs" / name
    folder.mkdir(parents=True, exist_ok=True)
    for sid in slide_ids:
        link = folder / f"{sid}.h5"
        if not link.exists():
            link.symlink_to((demo.out / "features" / f"{sid}.h5").resolve())
    return folder


def stage_heatmap(demo: Demo) -> None:
    from hipt.synthetic.demo import read_demo_cohort

    cohort = read_demo_cohort(demo.out / "cohort")
    subtype = {s.slide_id: s.subtype for s in cohort.slides}
    chosen: dict[str, list[tuple[str, int]]] = {
        label: [] for label in sorted(set(subtype.values()))
    }
    for k in range(demo.size.folds):
        run = demo.runs / "demo_subtype" / f"fold_{k}"
        test = _test_slides(demo, k)
        # Region attention of every test slide of the fold: what the hit rate is computed from.
        demo.hipt(
            "heatmap (regions)",
            ["heatmap", "--run", str(run), "--features", str(_linked_features(demo, f"fold_{k}", test)),
             "--tiles", str(demo.out / "tiles"),
             "--out", str(demo.out / "attention" / f"fold_{k}"), "--levels", "slide", "--top-k", "0",
             "--set", "thumbnail_px=512"],
        )  # fmt: skip
        for sid in test:  # overlays for slides with several regions, a few of each class
            several = cohort.truth(sid).n_regions > 1
            if several and len(chosen[subtype[sid]]) < demo.size.heatmap_slides_per_class:
                chosen[subtype[sid]].append((sid, k))
    for picks in chosen.values():
        for sid, k in picks:
            demo.hipt(
                "heatmap",
                ["heatmap", "--run", str(demo.runs / "demo_subtype" / f"fold_{k}"),
                 "--features", str(demo.out / "features" / f"{sid}.h5"),
                 "--tiles", str(demo.out / "tiles"), "--vit256", str(demo.stage1 / "teacher.pth"),
                 "--out", str(demo.out / "heatmaps"), "--top-k", "2",
                 "--set", "region_png_px=512", "--set", "thumbnail_px=1024"],
            )  # fmt: skip


def _earlier_runs(out: Path) -> list[dict]:
    """Stage times of the earlier complete runs in this folder (``timings.yaml``)."""
    try:
        runs = yaml.safe_load((out / "timings.yaml").read_text()).get("runs", [])
    except (OSError, AttributeError, yaml.YAMLError):
        return []
    return [r for r in runs if isinstance(r, dict)]


def stage_report(demo: Demo) -> None:
    from hipt.demo_report import write_report

    _write_yaml(demo.out / "configs" / "demo.yaml", {"size": demo.size_name, **asdict(demo.size)})
    path = write_report(
        demo.out,
        size_name=demo.size_name,
        size=asdict(demo.size),
        times=demo.times,
        cpu_times=demo.cpu_times,
        first_run=next(iter(_earlier_runs(demo.out)), None),
    )
    print(f"   {path}")


STAGES = (
    ("cohort", "generate slides of two subtypes with survival", stage_cohort),
    ("tile", "tissue masks and 4096 px regions", stage_tile),
    ("pretrain1", "DINO stage 1: ViT-256 on patches of the slides", stage_pretrain1),
    ("embed", "patch features with the pretrained ViT-256", stage_embed),
    ("pretrain2", "DINO stage 2: ViT-4K on the patch features", stage_pretrain2),
    ("train", "subtyping and survival, k-fold by case (HIPT_LGP)", stage_train),
    ("heatmap", "attention of every test slide; overlays of a few", stage_heatmap),
    ("report", "report.html", stage_report),
)


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every stage succeeded."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(
        out=out,
        size=SIZES[args.size],
        size_name=args.size,
        seed=args.seed,
        workers=max(1, args.workers),
        progress=not args.no_progress,
        times={},
        cpu_times={},
    )
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for name, what, fn in STAGES:
        _stage(demo, name, what, fn)
    total = time.perf_counter() - t0
    this_run = {
        "size": demo.size_name,
        "wall_s": {k: round(v, 1) for k, v in {**demo.times, "total": total}.items()},
        "cpu_s": {k: round(v, 1) for k, v in {**demo.cpu_times, "total": _cpu_seconds() - c0}.items()},
    }  # fmt: skip
    _write_yaml(out / "timings.yaml", {"runs": [*_earlier_runs(out), this_run]})
    print(f"\nDemo finished in {total:.0f} s. Open the report: {(out / 'report.html').resolve()}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hipt demo")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
