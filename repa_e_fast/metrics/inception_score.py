"""Inception Score with the ADM evaluator's definition (from improved-GAN).

Class probabilities ``p(y|x)`` are split into consecutive chunks of ``split_size`` samples
(5000: ten splits for 50k samples; a shorter last chunk is its own split); each split scores
``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the split's mean prediction, and the IS is
the mean over splits.
"""

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected class probabilities [N, classes], got shape {probs.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part) - np.log(marginal))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))
