"""Linear probes: logistic regression on the student's pooled image features, each vision teacher's summary
and the raw pixels, fitted on the train split and scored on the test split (eval/probe/<features>)."""

import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from data.devices import model_on
from distill.eval.batches import eval_batches

log = logging.getLogger(__name__)


@torch.no_grad()
def _features(model, dataset, stds, pad_id, batch_size, device=None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Student pooled features, each teacher's summary and raw pixels (16×16 grey) of every row."""
    device = model_on(model, device)
    out: dict[str, list] = {}
    labels = []
    for items, batch in eval_batches(dataset, batch_size, pad_id, stds, device):
        px = batch["pixel_values"]
        out.setdefault("student", []).append(model.image_features(px).float().cpu().numpy())
        grey = F.adaptive_avg_pool2d(px.mean(1, keepdim=True), 16).flatten(1)
        out.setdefault("pixels", []).append(grey.float().cpu().numpy())
        for name, v in batch["vision"].items():
            out.setdefault(name, []).append(v["summary"].cpu().numpy())
        labels += [f"{it['id'].rsplit('-', 1)[0]}:{it['label']}" for it in items]
    return {k: np.concatenate(v) for k, v in out.items()}, labels


def probes(model, train_ds, test_ds, test_student, test_labels, stds, pad_id, batch_size,
           device=None) -> dict[str, float]:
    """Linear-probe accuracy of each feature set (logistic regression, standardised inputs)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    train, y_train = _features(model, train_ds, stds, pad_id, batch_size, device)
    test, y_test = _features(model, test_ds, stds, pad_id, batch_size, device)
    result = {}
    for name in train:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(train[name], y_train)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.info("probe %s: lbfgs stopped at its 300-iteration cap (accuracy is a lower bound)", name)
        result[f"eval/probe/{name}"] = float(clf.score(test[name], y_test))
    return result
