"""``report.html`` of ``hipt demo``: one self-contained page (images inlined) of every stage's output.

Read from what the stages wrote: ``qc/*.png`` and ``tiling.csv`` (tiling), ``pretrain/*/log.jsonl``
(DINO losses), ``runs/demo_*/fold_*/`` (fold metrics and test predictions), ``attention/`` and
``heatmaps/`` (``hipt heatmap``), and the cohort's ``truth.json`` (where the lesions are). The
numbers the page shows are also written to ``demo_summary.json``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["attention_hits", "pooled_predictions", "write_report"]

HIT_LESION_FRACTION = 0.2  # a region "is on the lesion" when at least this share of it is


# ----------------------------------------------------------------------------- numbers
def pooled_predictions(run_dir: Path) -> pd.DataFrame:
    """Every finished fold's test predictions, with a ``fold`` column."""
    frames = []
    for d in sorted(run_dir.glob("fold_*")):
        p = d / "predictions.csv"
        if p.is_file() and (d / "metrics.json").is_file():
            frames.append(pd.read_csv(p).assign(fold=int(d.name.split("_")[1])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def fold_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.json`` of every finished fold."""
    out = []
    for d in sorted(run_dir.glob("fold_*")):
        try:
            out.append(json.loads((d / "metrics.json").read_text()))
        except (OSError, ValueError):
            continue
    return out


def attention_hits(out: Path) -> pd.DataFrame:
    """Per test slide with several regions: is its top-attended region on a lesion?

    ``chance`` is the share of that slide's regions that are on a lesion (what a random pick
    would hit).
    """
    import h5py

    from hipt.synthetic.demo import read_demo_cohort, region_lesion_fraction

    cohort = read_demo_cohort(out / "cohort")
    rows = []
    for scores in sorted((out / "attention").glob("fold_*/*/scores.h5")):
        truth = cohort.truth(scores.parent.name)
        with h5py.File(scores, "r") as f:
            coords = f["coords"][:]
            att = f["slide_attention"][:]
        if len(coords) < 2:
            continue
        with h5py.File(out / "tiles" / f"{truth.slide_id}.h5", "r") as t:
            side = float(t.attrs["region_size_level0"])
        on = np.array([region_lesion_fraction(truth, x, y, side) for x, y in coords])
        top = int(np.argmax(att))
        rows.append({
            "slide_id": truth.slide_id, "subtype": truth.subtype, "fold": scores.parents[1].name,
            "regions": len(coords), "top_region_lesion_fraction": round(float(on[top]), 3),
            "hit": bool(on[top] >= HIT_LESION_FRACTION),
            "chance": float(np.mean(on >= HIT_LESION_FRACTION)),
        })  # fmt: skip
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- pictures
def _img(data: bytes, mime: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    b64 = base64.b64encode(data).decode()
    return f'<img src="data:{mime};base64,{b64}" alt="{html.escape(alt)}"{w}>'


def _png_file(path: Path, alt: str, max_px: int = 900) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_px, max_px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return _img(buf.getvalue(), "image/jpeg", alt)


def _figure(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return _img(buf.getvalue(), "image/png", "plot")


def _loss_plot(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, stage, what in zip(axes, ("stage1", "stage2"), ("ViT-256 on patches", "ViT-4K on patch features"), strict=True):  # fmt: skip
        log = out / "pretrain" / stage / "log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []  # fmt: skip
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set(title=f"DINO {stage}: {what}", xlabel="step", ylabel="loss")
    return _figure(fig)


def _roc_plot(pred: pd.DataFrame) -> tuple[str, float]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    prob_cols = [c for c in pred.columns if c.startswith("prob_")]
    y = pred["label_index"].to_numpy()
    score = pred[prob_cols[1]].to_numpy()
    auc = float(roc_auc_score(y, score)) if len(set(y)) == 2 else float("nan")
    fpr, tpr, _ = roc_curve(y, score) if len(set(y)) == 2 else ([0, 1], [0, 1], None)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot(fpr, tpr, label=f"pooled test AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"{prob_cols[1][5:]} vs {prob_cols[0][5:]}")  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    return _figure(fig), auc


def _km_plot(pred: pd.DataFrame) -> tuple[str, float]:
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.utils import concordance_index

    t, e, risk = pred["survival_months"], pred["event"], pred["risk"]
    c_index = float(concordance_index(t, -risk, e))
    high = risk > np.median(risk)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    for mask, name in ((~high, "low predicted risk"), (high, "high predicted risk")):
        if mask.any():
            KaplanMeierFitter().fit(t[mask], e[mask], label=f"{name} (n={int(mask.sum())})").plot_survival_function(ax=ax, ci_show=False)  # fmt: skip
    ax.set(xlabel="months", ylabel="survival", title=f"pooled test cases, c-index {c_index:.3f}")
    return _figure(fig), c_index


# ----------------------------------------------------------------------------- page
def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda x: f"{x:.3f}", border=0, classes="t")


def _section(title: str, sentence: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2><p class='what'>{sentence}</p>{body}</section>"


def _tiling_section(out: Path) -> str:
    from hipt.synthetic.demo import read_demo_cohort

    cohort = read_demo_cohort(out / "cohort")
    tiling = pd.read_csv(out / "tiling.csv")
    special = {s.slide_id: s.special for s in cohort.slides if s.special}
    cells = []
    for s in cohort.slides:
        qc = out / "qc" / f"{s.slide_id}.png"
        if qc.is_file():
            note = f" · {special[s.slide_id]}" if s.slide_id in special else ""
            cells.append(f"<figure>{_png_file(qc, s.slide_id, 260)}<figcaption>{s.slide_id} "
                         f"({s.subtype}{note})</figcaption></figure>")  # fmt: skip
    keep = [
        c for c in ("slide_id", "status", "n_regions", "mpp_level0", "mpp_source") if c in tiling
    ]
    return _section(
        "Tiling",
        f"Each slide's thumbnail with the tissue outline and the 4096 px regions kept by "
        f"<code>hipt tile</code> ({len(cohort.slides)} slides, {int(tiling.get('n_regions', pd.Series([0])).sum())} "
        f"regions). Lesions are gland-like rings (glandular) or solid sheets of nuclei (solid); "
        f"one SVS is scanned at 0.25 µm/px, one slide is smaller than a region, one has pen marks.",
        "<div class='grid'>" + "".join(cells) + "</div>" + _table(tiling[keep]),
    )  # fmt: skip


def _heatmap_section(out: Path) -> str:
    blocks = []
    for folder in sorted((out / "heatmaps").glob("*/")):
        if not (folder / "slide.png").is_file():
            continue
        imgs = [_png_file(folder / "slide.png", folder.name, 700)]
        imgs += [
            _png_file(p, p.stem, 700)
            for p in sorted((folder / "top_regions").glob("rank?.png"))[:2]
        ]
        blocks.append(f"<h3>{html.escape(folder.name)}</h3>" + "".join(imgs))
    return _section(
        "Heatmaps",
        "Attention of the subtyping model (fold of each slide's test set): over the slide's "
        "regions (thumbnail), then inside the two most attended regions over patches (ViT-4K) "
        "and tokens (ViT-256). Hot colours mark what the model used; the lesion is the tissue "
        "that defines the subtype.",
        "".join(blocks) or "<p>No heatmaps were rendered.</p>",
    )


CSS = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}
h2{border-bottom:1px solid #ccc}.what{color:#444;font-style:italic}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;font-size:11px}
table.t{border-collapse:collapse;font-size:12px;margin:8px 0}table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #eee}
img{max-width:100%}"""


def write_report(
    out: str | Path,
    *,
    size_name: str,
    size: dict[str, Any],
    times: dict[str, float],
    cpu_times: dict[str, float] | None = None,
    first_run: dict[str, Any] | None = None,
) -> Path:
    """Write ``OUT/report.html`` and ``OUT/demo_summary.json``; returns the report's path."""
    from hipt.atomic import write_text_atomic

    out = Path(out)
    sub = pooled_predictions(out / "runs" / "demo_subtype")
    surv = pooled_predictions(out / "runs" / "demo_survival")
    roc_img, auc = _roc_plot(sub)
    km_img, c_index = _km_plot(surv)
    hits = attention_hits(out)
    hit_rate = float(hits["hit"].mean()) if len(hits) else float("nan")
    chance = float(hits["chance"].mean()) if len(hits) else float("nan")
    fold_sub = pd.DataFrame(
        [{"fold": m["fold"], "test cases": m["test"]["n"], "AUC": m["test"]["auc"],
          "balanced accuracy": m["test"]["balanced_accuracy"]} for m in fold_metrics(out / "runs" / "demo_subtype")]
    )  # fmt: skip
    fold_surv = pd.DataFrame(
        [{"fold": m["fold"], "test cases": m["test"]["n"], "c-index": m["test"]["c_index"]}
         for m in fold_metrics(out / "runs" / "demo_survival")]
    )  # fmt: skip
    summary = {
        "size": size_name, "pooled_test_auc": auc, "pooled_test_c_index": c_index,
        "attention_hit_rate": hit_rate, "attention_chance_rate": chance,
        "attention_slides": int(len(hits)), "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "stage_cpu_seconds": {k: round(v, 1) for k, v in (cpu_times or {}).items()},
    }  # fmt: skip
    write_text_atomic(out / "demo_summary.json", json.dumps(summary, indent=2))

    sizes = pd.DataFrame([
        {"part": "ViT-256 (stage-1 DINO, embedding)", "demo": f"{size['vit256_depth']} block(s), width 384", "HIPT": "12 blocks"},
        {"part": "ViT-4K (stage-2 DINO, in HIPT_LGP)", "demo": f"{size['vit4k_depth']} block(s), width 192", "HIPT": "6 blocks"},
        {"part": "stage-1 pretraining", "demo": f"{size['stage1_steps']} steps of {size['stage1_batch']} patches, 96/48 px crops", "HIPT": "hundreds of thousands of steps, 224/96 px crops"},
        {"part": "stage-2 pretraining", "demo": f"{size['stage2_epochs']} epochs", "HIPT": "100 epochs"},
        {"part": "cohort", "demo": f"{size['cases']} generated cases", "HIPT": "hundreds of real cases"},
    ])  # fmt: skip
    cpu_times = cpu_times or {}
    rows = []
    for k, v in times.items():
        row = {"stage": k, "wall seconds": round(v, 1), "CPU seconds": round(cpu_times.get(k, float("nan")), 1)}  # fmt: skip
        if first_run:  # this run skipped finished work: show what doing it took
            row["first run: wall s"] = first_run.get("wall_s", {}).get(k)
            row["first run: CPU s"] = first_run.get("cpu_s", {}).get(k)
        rows.append(row)
    stage_times = pd.DataFrame(rows)
    parts = [
        f"<h1>hipt demo ({html.escape(size_name)})</h1>",
        "<p>Every result below comes from the demo's own generated slides, through every HIPT "
        "stage on the real code path: tiling, DINO pretraining of both encoders, embedding, "
        "slide-level training and attention heatmaps.</p>",
        _section(
            "Model sizes",
            "<b>Model sizes and training lengths are reduced for the demo</b> "
            "so it runs on a laptop CPU; this table compares them with HIPT's.",
            _table(sizes) + _table(stage_times),
        ),  # fmt: skip
        _tiling_section(out),
        _section(
            "Pretraining",
            "The DINO loss of each stage per step (<code>log.jsonl</code>): "
            "stage 1 trains the ViT-256 on 96 px views of patches, stage 2 the ViT-4K on "
            "crops of the regions' patch-feature grids.",
            _loss_plot(out),
        ),  # fmt: skip
        _section(
            "Subtyping",
            f"Glandular vs solid per case, k-fold by case: the ROC curve of all "
            f"test folds' predictions pooled (AUC {auc:.3f}), and each fold's own metrics.",
            roc_img + _table(fold_sub),
        ),  # fmt: skip
        _section(
            "Survival",
            f"Kaplan–Meier curves of the test cases split at the median predicted "
            f"risk (pooled over folds, c-index {c_index:.3f}); risk grows with lesion area "
            f"and is higher for solid lesions.",
            km_img + _table(fold_surv),
        ),  # fmt: skip
        _section(
            "Where the model looks",
            f"For each test slide with several regions, whether "
            f"its most attended region lies on the lesion (≥{HIT_LESION_FRACTION:.0%} of it): "
            f"hit rate {hit_rate:.0%} over {len(hits)} slides, against {chance:.0%} for a "
            f"region picked at random.",
            _table(hits) if len(hits) else "",
        ),  # fmt: skip
        _heatmap_section(out),
    ]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>hipt demo</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"  # fmt: skip
    path = out / "report.html"
    write_text_atomic(path, page)
    return path
