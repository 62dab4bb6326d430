"""Pictures of a run (matplotlib, Agg; no pyplot state, so drawing is safe off the main thread):

* `loss_curves.png`: every named loss term over steps (one panel each: `train/loss` and each `train/<term>` of
  `Method.loss_terms()`), plus the held-out metrics (`val/...`) over steps, from the run's metric journal
  (`metrics.jsonl`, `medvl.track.buffer`);
* `retrieval.png` (contrastive methods): a few held-out images with their top-3 captions (green: the image's own);
* `zero_shot_confusion.png` (labelled held-out sets): the zero-shot confusion matrix (scikit-learn's
  ConfusionMatrixDisplay).

Evaluators that can be pictured keep `picture_data(...)` of their last call; `medvl.track.pictures` draws and
uploads them at each epoch end in a background thread.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

PANEL_IMAGES = 4
TOP_K = 3


def picture_data(images: torch.Tensor, unique_captions: Sequence[str], caption_ids: torch.Tensor,
                 img_emb: torch.Tensor, txt_emb: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 preds: Optional[torch.Tensor] = None, classnames: Optional[Sequence[str]] = None,
                 n: int = PANEL_IMAGES, k: int = TOP_K) -> dict[str, Any]:
    """What the pictures need from one held-out evaluation (small, CPU, detached): the first `n` images (uint8),
    their top-`k` captions by similarity and their own caption; the zero-shot labels and predictions."""
    n = min(n, len(images))
    sim = img_emb[:n].float() @ txt_emb.float().T
    kk = min(k, sim.shape[1])
    score, idx = sim.topk(kk, dim=1)
    d: dict[str, Any] = {
        "images": images[:n].detach().cpu().numpy().copy(),
        "topk": [[unique_captions[j] for j in row] for row in idx.tolist()],
        "topk_scores": score.tolist(),
        "truth": [unique_captions[int(c)] for c in caption_ids[:n]],
    }
    if labels is not None and preds is not None and classnames:
        d.update(labels=labels.detach().cpu().numpy().copy(), preds=preds.detach().cpu().numpy().copy(),
                 classnames=list(classnames))
    return d


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def loss_curves(records: list[dict], loss_terms: Sequence[str], out: str | Path) -> Optional[Path]:
    """One panel per loss term (`train/loss`, `train/<term>`), one for the held-out metrics; None if no loss yet."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, v in r["m"].items():
            series.setdefault(key, []).append((int(r["s"]), float(v)))
    names = [n for n in ["train/loss"] + [f"train/{t}" for t in loss_terms] if n in series]
    if not names:
        return None
    # held-out scores in [0, 1] (accuracies, recalls, AUROCs) on one shared axis; ranks and counts stay in MLflow
    val = sorted(n for n in series if n.startswith("val/") and n != "val/rows" and not n.endswith("_rank")
                 and all(0.0 <= v <= 1.0 for _, v in series[n]))[:12]
    panels = names + (["val"] if val else [])
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = _figure(4.2 * cols, 3.0 * rows)
    for i, name in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        if name == "val":
            for n in val:
                pts = sorted(series[n])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=n[4:])
            ax.set_title("held-out metrics")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=6, ncol=2, loc="lower right")
        else:
            pts = sorted(series[name])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
            ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    return Path(out)


def retrieval_panel(data: dict[str, Any], out: str | Path) -> Path:
    """Each held-out image with its top-k captions (score, green when it is the image's own caption)."""
    import textwrap
    n = len(data["images"])
    fig = _figure(3.0 * n, 3.6)
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(np.transpose(data["images"][i], (1, 2, 0)))
        ax.set_xticks([]), ax.set_yticks([])
        lines = []
        for cap, s in zip(data["topk"][i], data["topk_scores"][i]):
            lines.append((f"{s:+.2f} " + textwrap.shorten(cap, 60), cap == data["truth"][i]))
        for j, (txt, ok) in enumerate(lines):
            ax.text(0.0, -0.06 - 0.15 * j, "\n".join(textwrap.wrap(txt, 34)[:2]), transform=ax.transAxes,
                    fontsize=7, va="top", color="green" if ok else "firebrick")
        ax.set_title(textwrap.shorten("own: " + data["truth"][i], 40), fontsize=8)
    fig.suptitle(f"held-out retrieval: top-{len(data['topk'][0])} captions per image (green: its own)", fontsize=9, y=0.99)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.84, bottom=0.3, wspace=0.15)
    fig.savefig(out)
    return Path(out)


def confusion(data: dict[str, Any], out: str | Path) -> Optional[Path]:
    """The zero-shot confusion matrix (rows: true class, columns: predicted), None without labels."""
    if "labels" not in data:
        return None
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix
    names = data["classnames"]
    cm = confusion_matrix(data["labels"], data["preds"], labels=list(range(len(names))))
    size = max(4.0, 0.45 * len(names) + 2.5)
    fig = _figure(size, size)
    ax = fig.add_subplot(1, 1, 1)
    ConfusionMatrixDisplay(cm, display_labels=names).plot(ax=ax, colorbar=False, xticks_rotation=45,
                                                          values_format="d")
    acc = float(np.trace(cm)) / max(1, cm.sum())
    ax.set_title(f"zero-shot confusion (accuracy {acc:.3f}, n={int(cm.sum())})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    return Path(out)


def draw_all(out_dir: str | Path, records: list[dict], loss_terms: Sequence[str],
             data: Optional[dict[str, Any]]) -> list[Path]:
    """Every picture there is data for, into `out_dir`."""
    out = Path(out_dir)
    made = [loss_curves(records, loss_terms, out / "loss_curves.png")]
    if data:
        made.append(retrieval_panel(data, out / "retrieval.png"))
        made.append(confusion(data, out / "zero_shot_confusion.png"))
    return [p for p in made if p is not None]
