"""From a multi-label classifier's logits to labels and scores: probabilities, the decision
rule (per-label thresholds or the original's p >= 0.5), threshold tuning, F1.

Plain numpy on the host, shared by training (epoch choice, reports) and prediction (predict.py).
"""
from __future__ import annotations

import keras
import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

from .tasks import predict_logits


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def predict_probabilities(classifier: keras.Model, token_ids: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """Label probabilities float [N, labels] for int32 token ids [N, T] ([CLS] first)."""
    return sigmoid(predict_logits(classifier, token_ids, batch_size))


def decision_thresholds(thresholds: np.ndarray | None, num_labels: int) -> np.ndarray:
    """Per-label thresholds, float64 [num_labels]; None means the original's 0.5 for all."""
    if thresholds is None:
        return np.full(num_labels, 0.5)
    return np.asarray(thresholds, np.float64)


def predict_labels(probabilities: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Every label whose probability reaches its threshold, or the single label closest to its
    threshold when none does. thresholds None: 0.5 for every label, the original's rule."""
    cut = decision_thresholds(thresholds, probabilities.shape[1])
    predicted = (probabilities >= cut).astype(np.uint8)
    empty = predicted.sum(axis=1) == 0
    predicted[empty, (probabilities[empty] - cut).argmax(axis=1)] = 1
    return predicted


def f1_scores(gold: np.ndarray, probabilities: np.ndarray,
              thresholds: np.ndarray | None = None) -> dict[str, float]:
    """micro-F1, macro-F1 and their mean (the original's reported F1) over all train labels."""
    predicted = predict_labels(probabilities, thresholds)
    labels = list(range(gold.shape[1]))
    micro = f1_score(gold, predicted, average="micro", labels=labels, zero_division=0)
    macro = f1_score(gold, predicted, average="macro", labels=labels, zero_division=0)
    return {"micro_f1": float(micro), "macro_f1": float(macro), "f1": float((micro + macro) / 2)}


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
# A label gets a threshold of its own only when validation holds this many of its examples;
# below that a tuned value fits one or two documents, and the shared threshold serves better.
MIN_POSITIVES_FOR_OWN_THRESHOLD = 5


def tune_thresholds(gold: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per-label decision thresholds that maximise F1 on held-out (validation) data.

    First one threshold shared by all labels, by the average of micro- and macro-F1; then each
    label with enough validation examples takes the threshold that maximises its own F1 (ties go
    to the value nearest the shared one). Returns float [num_labels].
    """
    shared = max(THRESHOLD_GRID, key=lambda t: f1_scores(
        gold, probabilities, np.full(gold.shape[1], t))["f1"])
    thresholds = np.full(gold.shape[1], shared)
    for label in np.flatnonzero(gold.sum(axis=0) >= MIN_POSITIVES_FOR_OWN_THRESHOLD):
        truth, p = gold[:, label] > 0, probabilities[:, label]
        chosen = p[None, :] >= THRESHOLD_GRID[:, None]
        f1 = 2 * (chosen & truth).sum(axis=1) / (chosen.sum(axis=1) + truth.sum())
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        thresholds[label] = THRESHOLD_GRID[best[np.argmin(np.abs(THRESHOLD_GRID[best] - shared))]]
    return thresholds


def per_label_report(gold: np.ndarray, probabilities: np.ndarray, names: list[str],
                     thresholds: np.ndarray | None = None) -> list[dict]:
    predicted = predict_labels(probabilities, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=list(range(len(names))), zero_division=0)
    cut = decision_thresholds(thresholds, len(names))
    return [{"label": n, "threshold": float(t), "precision": float(p), "recall": float(r),
             "f1": float(f), "support": int(s)}
            for n, t, p, r, f, s in zip(names, cut, precision, recall, f1, support)]


def mean_loss(gold: np.ndarray, logits: np.ndarray) -> float:
    """The training loss (binary cross-entropy on logits, summed over labels, averaged over
    examples) computed from logits already predicted, so evaluating needs no second pass."""
    x, y = logits.astype(np.float64), gold.astype(np.float64)
    per_label = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    return float(per_label.sum(axis=1).mean())


def split_scores(gold: np.ndarray, logits: np.ndarray,
                 thresholds: np.ndarray | None = None) -> dict[str, float]:
    """loss, micro_f1, macro_f1 and f1 of one split's logits."""
    return {"loss": mean_loss(gold, logits), **f1_scores(gold, sigmoid(logits), thresholds)}
