"""Scores of a task's predictions: accuracy and macro F1, or Pearson and Spearman correlations."""

import numpy as np


def classification_scores(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """accuracy, and F1 averaged over the classes (macro): a majority-class guess scores low on it."""
    f1s = []
    for c in range(num_classes):
        true_positive = np.sum((predicted == c) & (labels == c))
        guessed, actual = np.sum(predicted == c), np.sum(labels == c)
        f1s.append(2 * true_positive / (guessed + actual) if guessed + actual else 0.0)
    return {"accuracy": float(np.mean(predicted == labels)), "f1": float(np.mean(f1s))}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's coefficient needs)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """NaN where either side is constant (as scipy has it): a regressor that predicts one value for every
    example has no correlation to report, and 0.0 would pass for a weak one."""
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator > 0 else float("nan")


def regression_scores(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlations; NaN when the predictions (or the labels) are all equal."""
    return {
        "pearson": _pearson(predicted, labels),
        "spearman": _pearson(_ranks(predicted), _ranks(labels)),
    }
