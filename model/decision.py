"""The decision rule: which rescored top-k labels an image gets, and how the tune stage chooses it.

A rule is plain data (saved in the checkpoint): a global threshold, optional per-class
thresholds, and the minimum and maximum number of labels. Labels scoring above their
threshold are kept, best first, at most ``max_labels``; if fewer than ``min_labels`` pass,
the top ``min_labels`` are taken.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from model.metrics import f2_per_image

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


@dataclass
class DecisionRule:
    threshold: float = 0.55
    min_labels: int = 2
    max_labels: int = 5
    class_thresholds: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_thresholds"] = {int(k): float(v) for k, v in self.class_thresholds.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecisionRule":
        return cls(float(d["threshold"]), int(d["min_labels"]), int(d["max_labels"]),
                   {int(k): float(v) for k, v in d.get("class_thresholds", {}).items()})

    @classmethod
    def from_config(cls, cfg) -> "DecisionRule":
        """The configured rule (the original's), for a checkpoint that holds none."""
        return cls(cfg.submit.threshold, cfg.submit.min_labels, cfg.predict.max_labels)

    def thresholds_for(self, indices: np.ndarray) -> np.ndarray:
        t = np.full(indices.shape, self.threshold, dtype=np.float64)
        for c, v in self.class_thresholds.items():
            t[indices == c] = v
        return t

    def apply(self, indices: np.ndarray, scores: np.ndarray) -> list[list[int]]:
        """Class indices per image (best first): those above threshold, at most ``max_labels``;
        the top ``min_labels`` when fewer pass (an image with no label scores 0)."""
        passing = scores > self.thresholds_for(indices)
        out = []
        for i in range(len(indices)):
            chosen = indices[i, passing[i]][: self.max_labels]
            out.append((chosen if len(chosen) >= self.min_labels else indices[i, : self.min_labels]).tolist())
        return out


def _score(rule: DecisionRule, indices, scores, targets) -> float:
    return float(f2_per_image(rule.apply(indices, scores), targets).mean())


def choose_rule(indices: np.ndarray, scores: np.ndarray, targets: list[list[int]],
                min_class_examples: int) -> tuple[DecisionRule, float]:
    """Pick, by mean F2 on held-out images: global threshold and label counts, then per-class thresholds
    for classes with at least ``min_class_examples`` held-out positives. Returns (rule, mean F2)."""
    best, best_f2 = DecisionRule(), -1.0
    for lo in (1, 2, 3):
        for hi in range(max(lo, 2), 8):
            for t in THRESHOLDS:
                rule = DecisionRule(float(t), lo, hi)
                f2 = _score(rule, indices, scores, targets)
                if f2 > best_f2 + 1e-12:
                    best, best_f2 = rule, f2
    counts = np.bincount([c for t in targets for c in t], minlength=int(indices.max()) + 1)
    frequent = [int(c) for c in np.flatnonzero(counts >= min_class_examples) if np.any(indices == c)]
    for c in sorted(frequent, key=lambda c: -counts[c]):  # coordinate ascent, most common classes first
        for t in THRESHOLDS:
            trial = DecisionRule(best.threshold, best.min_labels, best.max_labels,
                                 {**best.class_thresholds, c: float(t)})
            f2 = _score(trial, indices, scores, targets)
            if f2 > best_f2 + 1e-12:
                best, best_f2 = trial, f2
    return best, best_f2


def best_global_threshold(indices: np.ndarray, scores: np.ndarray, targets: list[list[int]],
                          min_labels: int = 1, max_labels: int = 5) -> tuple[float, float]:
    """(threshold, mean F2): the validation metric's threshold search, label counts fixed."""
    results = [(_score(DecisionRule(float(t), min_labels, max_labels), indices, scores, targets), float(t))
               for t in THRESHOLDS]
    f2, t = max(results)
    return t, f2
