"""Classification transfer of a trained image tower on a MedMNIST-format `.npz` (see `medvl.eval.medmnist`):
a linear probe on frozen features and end-to-end fine-tuning, both scored with accuracy and AUC on the test split,
as the PMC-CLIP paper reports them (PneumoniaMNIST, BreastMNIST, DermaMNIST: AUC / ACC).

* AUC: binary -> ROC AUC of the positive class; multi-class -> macro one-vs-rest; multi-label -> mean over labels.
* Accuracy: argmax (multi-class); multi-label -> per-label accuracy at a 0.5 threshold, averaged.
* Probe: scikit-learn logistic regression on L2-normalised frozen embeddings (standardised), fit on `train`.
* Fine-tuning: a copy of the image tower + a linear head, AdamW (`lr` for the tower, 10x for the head), cosine
  schedule, `epochs` over `train`; the epoch with the best `val` AUC is scored on `test`.

Run through `medvl transfer RECIPE --npz pneumoniamnist.npz` (metrics go to the run's MLflow run).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.data.decode import normalize_images
from medvl.eval.medmnist import MedMnist, to_model_images


def classification_scores(y: np.ndarray, prob: np.ndarray, multilabel: bool) -> dict[str, float]:
    """{'accuracy', 'auc'} from class probabilities [N, C] (or per-label probabilities [N, K])."""
    from sklearn.metrics import roc_auc_score
    if multilabel:
        acc = float(((prob >= 0.5) == (y > 0)).mean())
        aucs = [roc_auc_score(y[:, k], prob[:, k]) for k in range(y.shape[1]) if len(np.unique(y[:, k])) == 2]
        return {"accuracy": acc, "auc": float(np.mean(aucs)) if aucs else float("nan")}
    acc = float((prob.argmax(1) == y).mean())
    present = np.unique(y)
    if len(present) < 2:
        return {"accuracy": acc, "auc": float("nan")}
    if prob.shape[1] == 2:
        return {"accuracy": acc, "auc": float(roc_auc_score(y, prob[:, 1]))}
    p = prob[:, present] / np.clip(prob[:, present].sum(1, keepdims=True), 1e-12, None)
    return {"accuracy": acc, "auc": float(roc_auc_score(y, p, multi_class="ovr", average="macro",
                                                        labels=present))}


@torch.no_grad()
def embed(encode: Callable[[torch.Tensor], torch.Tensor], images_u8: np.ndarray, norm, device,
          batch_size: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = normalize_images(torch.from_numpy(images_u8[i:i + batch_size]).to(device), *norm)
        out.append(F.normalize(encode(x).float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def linear_probe_transfer(encode, data: MedMnist, size: int, norm, device="cpu", C: float = 1.0,
                          label_fraction: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Logistic regression on frozen embeddings; test accuracy and AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler
    xs = {s: embed(encode, to_model_images(data.images[s], size), norm, device) for s in ("train", "test")}
    y_tr, y_te = data.targets("train"), data.targets("test")
    idx = np.arange(len(y_tr))
    if label_fraction < 1.0:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max(2, int(round(len(idx) * label_fraction))),
                                                         replace=False))
    scaler = StandardScaler().fit(xs["train"][idx])
    clf = LogisticRegression(C=C, max_iter=3000)
    if data.multilabel:
        clf = OneVsRestClassifier(clf)
    clf.fit(scaler.transform(xs["train"][idx]), y_tr[idx])
    prob = clf.predict_proba(scaler.transform(xs["test"]))
    if not data.multilabel and prob.shape[1] != data.num_classes:  # a class absent from the probe's train rows
        full = np.zeros((len(prob), data.num_classes))
        full[:, clf.classes_] = prob
        prob = full
    return classification_scores(y_te, prob, data.multilabel)


class _Classifier(nn.Module):
    def __init__(self, tower: nn.Module, dim: int, classes: int):
        super().__init__()
        self.tower, self.head = tower, nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.tower(x))


def finetune_transfer(tower: nn.Module, data: MedMnist, size: int, norm, device="cpu", epochs: int = 5,
                      lr: float = 1e-4, batch_size: int = 64, weight_decay: float = 0.05, seed: int = 0,
                      log: Optional[Callable[[int, dict], None]] = None) -> dict[str, float]:
    """End-to-end fine-tuning of a copy of `tower` (images -> embedding) with a linear head; returns test accuracy
    and AUC of the epoch with the best val AUC, plus `best_epoch`."""
    torch.manual_seed(seed)
    tower = copy.deepcopy(tower).to(device)
    for p in tower.parameters():
        p.requires_grad_(True)
    x = {s: to_model_images(data.images[s], size) for s in ("train", "val", "test")}
    with torch.no_grad():
        dim = int(tower(normalize_images(torch.from_numpy(x["train"][:2]).to(device), *norm)).shape[-1])
    k = data.num_classes
    model = _Classifier(tower, dim, k).to(device)
    opt = torch.optim.AdamW([{"params": model.tower.parameters(), "lr": lr},
                             {"params": model.head.parameters(), "lr": 10 * lr}], weight_decay=weight_decay)
    y_tr = data.targets("train")
    steps = max(1, epochs * math.ceil(len(y_tr) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    best: dict[str, float] = {}
    best_val = -1.0
    for ep in range(epochs):
        model.train()
        order = rng.permutation(len(y_tr))
        for i in range(0, len(order), batch_size):
            b = order[i:i + batch_size]
            if len(b) < 2:
                continue
            xb = normalize_images(torch.from_numpy(x["train"][b]).to(device), *norm)
            yb = torch.from_numpy(y_tr[b]).to(device)
            logits = model(xb)
            loss = (F.binary_cross_entropy_with_logits(logits, yb.float()) if data.multilabel
                    else F.cross_entropy(logits, yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = _scores(model, x["val"], data.targets("val"), data.multilabel, norm, device, batch_size)
        if log is not None:
            log(ep, val)
        score = val["auc"] if not math.isnan(val["auc"]) else val["accuracy"]
        if score > best_val:
            best_val = score
            best = {**_scores(model, x["test"], data.targets("test"), data.multilabel, norm, device, batch_size),
                    "best_epoch": float(ep + 1), "val_auc": val["auc"]}
    return best


@torch.no_grad()
def _scores(model, x_u8, y, multilabel, norm, device, batch_size) -> dict[str, float]:
    model.eval()
    probs = []
    for i in range(0, len(x_u8), batch_size):
        logits = model(normalize_images(torch.from_numpy(x_u8[i:i + batch_size]).to(device), *norm)).float()
        probs.append((logits.sigmoid() if multilabel else logits.softmax(-1)).cpu())
    return classification_scores(y, torch.cat(probs).numpy(), multilabel)


def image_tower(model: nn.Module) -> nn.Module:
    """The open_clip image tower (images -> embedding) inside a medvl method's model (`.clip.visual`)."""
    clip = getattr(model, "clip", model)
    tower = getattr(clip, "visual", None)
    if not isinstance(tower, nn.Module):
        raise TypeError(f"{type(model).__name__}: no open_clip image tower (`.clip.visual`) to transfer")
    return tower


def medmnist_transfer(model: nn.Module, data: MedMnist, size: int, norm, device="cpu",
                      modes: tuple[str, ...] = ("probe", "finetune"), epochs: int = 5, lr: float = 1e-4,
                      batch_size: int = 64, label_fraction: float = 1.0, seed: int = 0,
                      prefix: Optional[str] = None) -> dict[str, float]:
    """Probe and/or fine-tune `model`'s image tower on `data`; metrics `transfer/<name>/<mode>_{accuracy,auc}`."""
    tower = image_tower(model)
    pre = prefix if prefix is not None else f"transfer/{data.name}/"
    out: dict[str, float] = {}
    was = tower.training
    tower.eval()
    try:
        if "probe" in modes:
            for k, v in linear_probe_transfer(tower, data, size, norm, device, label_fraction=label_fraction,
                                              seed=seed).items():
                out[f"{pre}probe_{k}"] = v
    finally:
        tower.train(was)
    if "finetune" in modes:
        for k, v in finetune_transfer(tower, data, size, norm, device, epochs=epochs, lr=lr,
                                      batch_size=batch_size, seed=seed).items():
            out[f"{pre}finetune_{k}"] = v
    return out
