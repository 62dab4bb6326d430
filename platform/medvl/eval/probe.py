"""Linear probe on frozen features (scikit-learn logistic regression), the standard transfer measure."""
from __future__ import annotations

import numpy as np


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 label_fraction: float = 1.0, seed: int = 0, C: float = 1.0) -> dict[str, float]:
    """Fit on (a stratified `label_fraction` of) the train features, score on the test features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(seed)
    idx = np.arange(len(train_y))
    if label_fraction < 1.0:
        keep = []
        for c in np.unique(train_y):
            ci = idx[train_y == c]
            keep.extend(rng.choice(ci, max(1, int(round(len(ci) * label_fraction))), replace=False))
        idx = np.sort(np.asarray(keep))
    if len(np.unique(train_y[idx])) < 2:
        return {"accuracy": float("nan"), "train_rows": float(len(idx))}
    scaler = StandardScaler().fit(train_x[idx])
    clf = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(train_x[idx]), train_y[idx])
    pred = clf.predict(scaler.transform(test_x))
    return {"accuracy": float((pred == test_y).mean()), "train_rows": float(len(idx))}


def linear_probe_multilabel(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                            label_fraction: float = 1.0, seed: int = 0, C: float = 1.0) -> dict[str, float]:
    """One logistic regression per finding on frozen features; targets are [N, F] with 1 / 0 / NaN (unknown rows
    are left out of that finding). Scored by AUROC on the test rows; `label_fraction` keeps a random share of the
    train rows. Returns {"auroc_mean", "auroc/<j>" per finding index (NaN where a side lacks a class)}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(seed)
    idx = np.arange(len(train_x))
    if label_fraction < 1.0:
        idx = np.sort(rng.choice(idx, max(1, int(round(len(idx) * label_fraction))), replace=False))
    scaler = StandardScaler().fit(train_x[idx])
    tr, te = scaler.transform(train_x[idx]), scaler.transform(test_x)
    out, good = {}, []
    for j in range(train_y.shape[1]):
        ktr, kte = ~np.isnan(train_y[idx, j]), ~np.isnan(test_y[:, j])
        ytr, yte = train_y[idx, j][ktr], test_y[kte, j]
        if len(np.unique(ytr)) < 2 or len(np.unique(yte)) < 2:
            out[f"auroc/{j}"] = float("nan")
            continue
        clf = LogisticRegression(C=C, max_iter=2000).fit(tr[ktr], ytr)
        a = float(roc_auc_score(yte, clf.predict_proba(te[kte])[:, 1]))
        out[f"auroc/{j}"] = a
        good.append(a)
    out["auroc_mean"] = float(np.mean(good)) if good else float("nan")
    out["train_rows"] = float(len(idx))
    return out
