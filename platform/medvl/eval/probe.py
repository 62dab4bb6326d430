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
