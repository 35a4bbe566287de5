"""``hipt demo``: the whole flow on a small generated cohort, in a few minutes on a laptop CPU.

1. Writes a few synthetic slides (Aperio SVS at 0.25 µm/px, generic TIFFs at 0.5 µm/px).
2. ``hipt tile``: tissue masks, 4096 px regions at 0.5 µm/px, QC images.
3. ``hipt embed``: ViT-256 → ViT-4K embeddings of every region (random weights unless the released
   HIPT weights are given with ``--vit256``/``--vit4k``; nothing is downloaded).
4. ``hipt inspect`` on one features file.
5. ``hipt train``: subtyping and survival cross-validation on a generated cohort of region features
   with a known signal (a handful of demo slides cannot train a slide model).

Every step runs through the ``hipt`` command, exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt demo``."""
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--vit256", default=None, help="released ViT-256 weights (optional)")
    parser.add_argument("--vit4k", default=None, help="released ViT-4K weights (optional)")
    parser.add_argument(
        "--epochs", type=int, default=8, help="epochs per fold in the training step"
    )
    parser.add_argument("--folds", type=int, default=3, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")


def _step(title: str, argv: list[str]) -> None:
    from hipt.cli import main as hipt_main

    print(f"\n== {title}\n$ hipt {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = hipt_main(argv)
    if code != 0:
        raise SystemExit(
            f"demo step failed ({title}): 'hipt {shlex.join(argv)}' exited with {code}"
        )
    print(f"-- {title}: {time.perf_counter() - t0:.1f} s", flush=True)


def _train_config(
    path: Path,
    *,
    cohort: str,
    task: str,
    csv: Path,
    features: Path,
    folds: int,
    epochs: int,
    model: dict,
    lr: float,
) -> Path:
    import yaml

    cfg = {
        "cohort": cohort,
        "task": task,
        "csv": str(csv.resolve()),
        "features_dir": str(features.resolve()),
        "model": model,
        "splits": {"folds": folds},
        "train": {"epochs": epochs, "lr": lr, "patience": 0},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every step succeeded."""
    from hipt.synthetic import write_demo_slides
    from hipt.synthetic.cohorts import make_subtyping_cohort, make_survival_cohort

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    print("== writing demo slides", flush=True)
    slides = write_demo_slides(out / "slides", seed=args.seed)
    for p in slides:
        print(f"   {p}")

    _step("tile", ["tile", str(out / "slides"), "--out", str(out)])

    embed = ["embed", "--tiles", str(out / "tiles"), "--out", str(out), "--device", "cpu"]
    if args.vit256 and args.vit4k:
        embed += ["--vit256", args.vit256, "--vit4k", args.vit4k]
    else:
        print(
            "\nNo released weights given (--vit256/--vit4k): embedding with random weights, so the "
            "features show the pipeline, not tissue biology.",
            flush=True,
        )
        embed += ["--random-weights"]
    _step("embed", embed)

    features = sorted((out / "features").glob("*.h5"))
    if features:
        _step("inspect", ["inspect", str(features[0])])

    print("\n== generating cohorts of region features with a known signal", flush=True)
    cohorts = out / "cohorts"
    sub = make_subtyping_cohort(cohorts / "subtype", n_cases=60, seed=args.seed)
    surv = make_survival_cohort(cohorts / "survival", n_cases=120, seed=args.seed)
    # A gated-attention MIL head learns these small cohorts in seconds; the global transformer
    # (hipt_gp, hipt_lgp) needs the hundreds of cases of a real cohort (see train/configs/).
    print("   slide model: abmil (gated attention over the region features)", flush=True)
    sub_cfg = _train_config(
        cohorts / "subtype.yaml", cohort="demo_subtype", task="subtype", csv=sub.csv_path,
        features=sub.features_dir, folds=args.folds, epochs=args.epochs,
        model={"name": "abmil", "kwargs": {"hidden_dim": 64}}, lr=5.0e-4,
    )  # fmt: skip
    surv_cfg = _train_config(
        cohorts / "survival.yaml", cohort="demo_survival", task="survival", csv=surv.csv_path,
        features=surv.features_dir, folds=args.folds, epochs=args.epochs,
        model={"name": "abmil", "kwargs": {"hidden_dim": 32}}, lr=3.0e-4,
    )  # fmt: skip
    _step("train subtyping", ["train", "--config", str(sub_cfg), "--out", str(out / "runs")])
    _step("train survival", ["train", "--config", str(surv_cfg), "--out", str(out / "runs")])

    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s. Outputs in {out}/:")
    for name, what in [
        ("tiling.csv", "one row per slide"),
        ("qc/", "thumbnails with tissue outline and kept regions"),
        ("tiles/", "region grids (hipt.tiles/1)"),
        ("features/", "patch and region embeddings (hipt.features/1)"),
        ("runs/demo_subtype/report.md", "subtyping folds, AUC, ROC curves"),
        ("runs/demo_survival/report.md", "survival folds, c-index, Kaplan-Meier curves"),
    ]:
        print(f"  {name:<30} {what}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hipt demo")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
