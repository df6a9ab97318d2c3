"""Figures for the run folder and report: training curves, ROC, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from medlens.tasks import Task, get_task  # noqa: E402
from medlens.utils import atomic_path  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def history_panels(columns) -> list[tuple[str, list[str]]]:
    """The panels of the training curves: loss (train and validation), then each metric logged for both
    training and validation (``train_acc`` beside ``val_acc``), then validation-only metrics (AUC, QWK, Dice)."""
    cols = [c for c in columns if c != "epoch"]
    panels = [("loss", [c for c in ("train_loss", "val_loss") if c in cols] +
               [c for c in cols if c.endswith("loss") and c not in ("train_loss", "val_loss")])]
    paired = []
    for c in cols:
        if c.startswith("train_") and not c.endswith("loss") and f"val_{c[6:]}" in cols:
            paired.append(c[6:])
            panels.append((f"{c[6:]}: train vs validation", [c, f"val_{c[6:]}"]))
    rest = [c for c in cols if c.startswith("val_") and not c.endswith("loss") and c[4:] not in paired]
    if rest:
        panels.append(("validation metrics", rest))
    return [p for p in panels if p[1]]


def plot_history(history_csv: Path, out: Path) -> Path | None:
    """Training curves: training and validation side by side in each panel (loss; accuracy), so a gap
    (over-fitting) or a validation curve that never moves is visible, then validation-only metrics."""
    if not Path(history_csv).exists():
        return None
    h = pd.read_csv(history_csv)
    panels = history_panels(h.columns)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    # an ensemble's history holds each member's rows (train.ensemble): one curve per member
    groups = list(h.groupby("member")) if "member" in h.columns else [(None, h)]
    for ax, (title, cols) in zip(axes[0], panels):
        for member, g in groups:
            for col in cols:
                ok = g[col].notna()
                ax.plot(g.loc[ok, "epoch"], g.loc[ok, col], marker=".",
                        label=col if member is None else f"{col} (member {member})",
                        linestyle="--" if col.startswith("train_") else "-")
        ax.set_xlabel("epoch"); ax.set_title(title); ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_roc(task: str | Task, y: np.ndarray, prob: np.ndarray, class_names: list[str], out: Path,
             threshold: float | None = None, title: str = "ROC (test)") -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    if get_task(task).one_score(len(class_names)):  # one curve, the threshold a point on it
        fpr, tpr, thr = roc_curve(y, prob)
        ax.plot(fpr, tpr, lw=2, label="model")
        if threshold is not None:
            pred = prob >= threshold
            sens = (pred & (y == 1)).sum() / max((y == 1).sum(), 1)
            fpr_t = (pred & (y == 0)).sum() / max((y == 0).sum(), 1)
            ax.plot([fpr_t], [sens], "o", color="crimson", label=f"threshold {threshold:.3f} (from val)")
    else:
        y = np.asarray(y)
        for c, name in enumerate(class_names):
            yc = (y[:, c] if y.ndim == 2 else (y == c)).astype(int)
            if 0 < yc.sum() < len(yc):
                fpr, tpr, _ = roc_curve(yc, prob[:, c])
                ax.plot(fpr, tpr, lw=1.2, label=str(name)[:20])
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity"); ax.set_ylabel("sensitivity"); ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, out)


def plot_predicted_vs_true(y: np.ndarray, pred: np.ndarray, out: Path, half_width: float | None = None,
                           name: str = "value", title: str = "Predicted vs true (test)") -> Path:
    """A regression's predictions against the true values, the identity line and (when given) the band of the
    prediction interval ``pred +- half_width`` around it."""
    y, pred = np.asarray(y, float).reshape(-1), np.asarray(pred, float).reshape(-1)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    line = np.array([lo, hi])
    if half_width:
        ax.fill_between(line, line - half_width, line + half_width, color="tab:blue", alpha=0.12,
                        label=f"prediction interval (+-{half_width:.3g})")
    ax.plot(line, line, "--", color="grey", lw=1, label="identity")
    ax.scatter(y, pred, s=10, alpha=0.6, label="cases")
    ax.set_xlabel(f"true {name}"[:40]); ax.set_ylabel(f"predicted {name}"[:40]); ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, out)


def plot_confusion(confusion: list[list[int]], class_names: list[str], out: Path,
                   title: str = "Confusion matrix (test)") -> Path:
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cm), 1.0 + 0.7 * len(cm)))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    names = [str(n)[:12] for n in class_names]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right"); ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title(title)
    return save_figure(fig, out)


def _unit(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def grid_png(arrays: np.ndarray, path: str | Path, title: str, cols: int = 8, cmap: str = "gray") -> Path:
    """A grid of 2D arrays (N, H, W), each min-max scaled, white gaps between them, under ``title``.

    Drawn as one mosaic in one image axes: a subplot per tile made a report's four 16-image galleries cost
    2.5 s of matplotlib axes set-up, more than the tiny model's whole training."""
    tiles = [_unit(np.asarray(a, np.float32)) for a in arrays]
    n = len(tiles)
    cols = min(cols, n)
    rows = int(np.ceil(n / cols))
    h, w = tiles[0].shape
    gap = max(1, round(0.08 * max(h, w)))
    mosaic = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan, np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        mosaic[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = t
    fig, ax = plt.subplots(figsize=(1.4 * cols, 1.4 * rows + 0.4))
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=plt.get_cmap(cmap).with_extremes(bad="white"), vmin=0, vmax=1,
              interpolation="nearest")
    ax.axis("off")
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def plot_reliability(curves: dict[str, dict[str, list[float]]], out: Path, title: str) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin, one line per
    curve (e.g. before and after scaling), marker area by bin count."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    for label, b in curves.items():
        c = np.asarray(b["count"], float)
        ax.plot(b["confidence"], b["observed"], "-", lw=1.4, label=label)
        ax.scatter(b["confidence"], b["observed"], s=12 + 200 * c / max(c.max(), 1), alpha=.6)
    ax.set_xlim(0, 1); ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability"); ax.set_ylabel("observed frequency"); ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, out)


def plot_decision_curve(dca: dict, out: Path, title: str = "Decision curve (test)") -> Path:
    t = np.asarray(dca["thresholds"])
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    ax.plot(t, dca["model"], lw=2, label="model")
    ax.plot(t, dca["treat_all"], lw=1.2, label="treat all")
    ax.axhline(0, color="black", lw=1, label="treat none")
    top = max(max(dca["model"]), dca["prevalence"], 0.01)
    ax.set_ylim(-0.05 * top, top * 1.1)
    ax.set_xlabel("threshold probability"); ax.set_ylabel("net benefit"); ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, out)


def plot_roc_overlay(y: np.ndarray, probs: dict[str, np.ndarray], out: Path, title: str = "ROC (test)") -> Path:
    """Binary ROC curves of several runs on the same cases."""
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    for name, p in probs.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.6, label=str(name)[:40])
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity"); ax.set_ylabel("sensitivity"); ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, out)
