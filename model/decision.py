"""The decision rule: which rescored top-k labels an image gets, and how the tune stage chooses it.

A rule is plain data (saved in the checkpoint): a global threshold, optional per-class
thresholds, optionally a threshold for the classes the tuning labels never show (a class the new
domain's labels never show is mostly a false positive there), the minimum and maximum number
of labels and, where the tune stage chose one, the test resolution it was chosen at. Labels scoring above their
threshold are kept, best first, at most ``max_labels``; if fewer than ``min_labels`` pass,
the top ``min_labels`` are taken.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from common.seeds import rng
from model.metrics import f2_per_image, hits

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)
# for the classes the tuning labels never show: the grid and the strict end the 3rd place used
UNSEEN_THRESHOLDS = np.r_[THRESHOLDS, 0.99]
LABEL_COUNTS = [(lo, hi) for lo in (1, 2, 3) for hi in range(max(lo, 2), 8)]  # (min_labels, max_labels) tried


@dataclass
class DecisionRule:
    threshold: float = 0.55
    min_labels: int = 2
    max_labels: int = 5
    class_thresholds: dict[int, float] = field(default_factory=dict)
    unseen_threshold: float | None = None  # for every class outside ``seen_classes`` (None: the global one)
    seen_classes: tuple[int, ...] = ()  # the classes with a positive in the tuning labels
    # (short side, crop) the test images are resized and cropped to, which the thresholds were chosen at
    # (None: the training one, data.shortest_side and pipeline.crop_size)
    test_resolution: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_thresholds"] = {int(k): float(v) for k, v in self.class_thresholds.items()}
        d["seen_classes"] = [int(c) for c in self.seen_classes]
        d["test_resolution"] = None if self.test_resolution is None else [int(v) for v in self.test_resolution]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecisionRule":
        """A saved rule; one saved before the unseen-class threshold or the test resolution existed has none."""
        unseen, resolution = d.get("unseen_threshold"), d.get("test_resolution")
        return cls(float(d["threshold"]), int(d["min_labels"]), int(d["max_labels"]),
                   {int(k): float(v) for k, v in d.get("class_thresholds", {}).items()},
                   None if unseen is None else float(unseen), tuple(int(c) for c in d.get("seen_classes", ())),
                   None if resolution is None else (int(resolution[0]), int(resolution[1])))

    @classmethod
    def from_config(cls, cfg) -> "DecisionRule":
        """The configured rule (the original's), for a checkpoint that holds none."""
        return cls(cfg.submit.threshold, cfg.submit.min_labels, cfg.predict.max_labels)

    def thresholds_for(self, indices: np.ndarray) -> np.ndarray:
        """Each ranked label's threshold: one gather from a per-class table."""
        size = max(int(indices.max(initial=0)), max(self.class_thresholds, default=0),
                   max(self.seen_classes, default=0)) + 1
        table = np.full(size, self.threshold, dtype=np.float64)
        if self.unseen_threshold is not None:
            table[:] = self.unseen_threshold
            table[list(self.seen_classes)] = self.threshold
        if self.class_thresholds:
            table[list(self.class_thresholds)] = list(self.class_thresholds.values())
        return table[indices]

    def apply(self, indices: np.ndarray, scores: np.ndarray) -> list[list[int]]:
        """Class indices per image (best first): those above threshold, at most ``max_labels``;
        the top ``min_labels`` when fewer pass (an image with no label scores 0)."""
        chosen = chosen_labels(scores > self.thresholds_for(indices), self.min_labels, self.max_labels)
        return [row[keep].tolist() for row, keep in zip(indices, chosen)]


def chosen_labels(passing: np.ndarray, min_labels: int, max_labels: int) -> np.ndarray:
    """``[N, k]``: the labels a rule keeps from ``passing`` (``[N, k]``): the first ``max_labels`` that pass, or
    the top ``min_labels`` positions of an image where fewer pass."""
    kept = passing & (np.cumsum(passing, axis=-1, dtype=np.int16) <= max_labels)
    too_few = kept.sum(axis=-1, keepdims=True) < min_labels
    return np.where(too_few, np.arange(passing.shape[-1]) < min_labels, kept)


class HeldOut:
    """What scoring rules on one set of images needs, computed once: which ranked labels are true, and how many
    true labels each image has. Top-k rows hold each class once, as ``f2_per_image`` counts them."""

    def __init__(self, indices: np.ndarray, scores: np.ndarray, targets: list[list[int]]):
        # ranks at which no image scores above the lowest candidate threshold can never be chosen (beyond the
        # top labels a rule's minimum takes): the search leaves them out, which changes no result
        live = np.flatnonzero((scores > THRESHOLDS.min()).any(axis=0))
        width = max(int(live.max(initial=-1)) + 1, 3)
        self.indices, self.scores = indices[:, :width], scores[:, :width]
        self.hit = hits(self.indices, targets)
        self.truths = np.array([len(set(t)) for t in targets], dtype=np.int64)

    def mean_f2(self, chosen: np.ndarray) -> float:
        """Mean per-image F2 of an ``[N, k]`` chosen mask (``f2_per_image``'s arithmetic, vectorised)."""
        tp = (chosen & self.hit).sum(axis=-1)
        denominator = 5 * tp + 4 * (self.truths - tp) + (chosen.sum(axis=-1) - tp)
        f2 = np.divide(5 * tp, denominator, out=np.zeros(denominator.shape), where=denominator > 0)
        return float(f2.mean())

    def f2_by_threshold(self, thresholds, min_labels: int, max_labels: int) -> np.ndarray:
        """``[T]`` mean F2 of the rules that differ only in their thresholds (each a scalar or ``[N, k]``), one
        rule at a time: memory stays that of one ``[N, k]`` mask for validation's 17,400 images too (stacking a
        tune hold-out's rules measured slower)."""
        return np.array([self.mean_f2(chosen_labels(self.scores > t, min_labels, max_labels)) for t in thresholds])


def _search(held: HeldOut, candidates: list[DecisionRule], best: DecisionRule, best_f2: float):
    """``_first_best`` over whole rules, each scored with its own thresholds and label counts."""
    f2s = [held.mean_f2(chosen_labels(held.scores > c.thresholds_for(held.indices), c.min_labels, c.max_labels))
           for c in candidates]
    return _first_best(candidates, f2s, best, best_f2)


def _first_best(candidates, f2s, best, best_f2):
    """The first candidate that beats the best so far by more than rounding, in order, as a loop would take it."""
    for candidate, f2 in zip(candidates, f2s):
        if f2 > best_f2 + 1e-12:
            best, best_f2 = candidate, float(f2)
    return best, best_f2


def choose_rule(indices: np.ndarray, scores: np.ndarray, targets: list[list[int]], min_class_examples: int,
                seen_classes=None) -> tuple[DecisionRule, float]:
    """Pick, by mean F2 on held-out images: global threshold and label counts; with ``seen_classes`` (those with
    a positive in the tuning labels) a threshold for every other class; then per-class thresholds for classes
    with at least ``min_class_examples`` held-out positives. Returns (rule, mean F2)."""
    held = HeldOut(indices, scores, targets)
    best, best_f2 = DecisionRule(), -1.0
    for lo, hi in LABEL_COUNTS:
        best, best_f2 = _first_best([DecisionRule(float(t), lo, hi) for t in THRESHOLDS],
                                    held.f2_by_threshold(THRESHOLDS, lo, hi), best, best_f2)
    if seen_classes is not None:
        # coordinate ascent: the unseen classes' threshold with each label count, then (where it gained) the
        # global threshold and label counts again around it: each alone can be stuck where both together gain
        seen = tuple(sorted(int(c) for c in seen_classes))
        best, best_f2 = _search(held, [replace(best, seen_classes=seen, min_labels=lo, max_labels=hi,
                                               unseen_threshold=float(u))
                                       for lo, hi in LABEL_COUNTS for u in UNSEEN_THRESHOLDS], best, best_f2)
        if best.unseen_threshold is not None:
            best, best_f2 = _search(held, [replace(best, min_labels=lo, max_labels=hi, threshold=float(t))
                                           for lo, hi in LABEL_COUNTS for t in THRESHOLDS], best, best_f2)
    counts = np.bincount([c for t in targets for c in t], minlength=int(indices.max()) + 1)
    present = np.zeros(len(counts), dtype=bool)
    present[indices.ravel()] = True
    frequent = [int(c) for c in np.flatnonzero((counts >= min_class_examples) & present)]
    for c in sorted(frequent, key=lambda c: -counts[c]):  # coordinate ascent, most common classes first
        others, is_c = best.thresholds_for(held.indices), held.indices == c
        trials = (np.where(is_c, t, others) for t in THRESHOLDS)  # class c at each threshold, the rest as chosen
        best, best_f2 = _first_best([replace(best, class_thresholds={**best.class_thresholds, c: float(t)})
                                     for t in THRESHOLDS],
                                    held.f2_by_threshold(trials, best.min_labels, best.max_labels), best, best_f2)
    return best, best_f2


def cross_fitted_f2(indices: np.ndarray, scores: np.ndarray, targets: list[list[int]], min_class_examples: int,
                    seen_classes=None, folds: int = 5, seed: int = 0) -> float:
    """What a rule chosen by ``choose_rule`` can be expected to score on images that did not choose it: the images
    are dealt into ``folds`` folds (a permutation drawn from ``seed``), each fold is labelled by the rule chosen on
    the other folds, and the mean F2 over every image is returned. Each rule is chosen on a part of the images
    (fewer per-class thresholds pass ``min_class_examples``), so this reads, if anything, a little low for the rule
    chosen on all of them; the F2 ``choose_rule`` returns reads high, since the rule was fitted to those very images."""
    n = len(targets)
    if n < 2:  # no image to choose on while one is scored
        return float("nan")
    fold = np.empty(n, dtype=np.int64)
    fold[rng(seed, "rule_folds").permutation(n)] = np.arange(n) % min(folds, n)
    per_image = np.zeros(n)
    for k in np.unique(fold):
        chooser, scored = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        rule, _ = choose_rule(indices[chooser], scores[chooser], [targets[i] for i in chooser], min_class_examples,
                              seen_classes)
        per_image[scored] = f2_per_image(rule.apply(indices[scored], scores[scored]), [targets[i] for i in scored])
    return float(per_image.mean())


def best_global_threshold(indices: np.ndarray, scores: np.ndarray, targets: list[list[int]],
                          min_labels: int = 1, max_labels: int = 5) -> tuple[float, float]:
    """(threshold, mean F2): the validation metric's threshold search, label counts fixed."""
    f2s = HeldOut(indices, scores, targets).f2_by_threshold(THRESHOLDS, min_labels, max_labels)
    f2, t = max(zip(f2s.tolist(), THRESHOLDS.tolist()))
    return t, f2


@dataclass(frozen=True)
class ChosenRule:
    """A rule chosen on held-out images, with the two figures of it: on the images that chose it (optimistic) and
    cross-fitted over folds of them (``cross_fitted_f2``: what new images can expect)."""
    rule: DecisionRule
    f2_in_sample: float
    f2_cross_fitted: float
    folds: int


def choose_rule_with_estimate(indices: np.ndarray, scores: np.ndarray, targets: list[list[int]],
                              min_class_examples: int, seen_classes=None, folds: int = 5, seed: int = 0
                              ) -> ChosenRule:
    rule, f2 = choose_rule(indices, scores, targets, min_class_examples, seen_classes)
    return ChosenRule(rule, f2, cross_fitted_f2(indices, scores, targets, min_class_examples, seen_classes, folds,
                                                seed), folds)


@dataclass(frozen=True)
class ResolutionTrial:
    resolution: tuple[int, int]  # (short side, crop)
    chosen: ChosenRule  # the rule chosen at it, carrying the resolution

    @property
    def f2(self) -> float:
        """The hold-out F2 of the rule chosen at this resolution, on the images that chose it: what picks the
        resolution."""
        return self.chosen.f2_in_sample

    @property
    def rule(self) -> DecisionRule:
        return self.chosen.rule


def choose_test_resolution(candidates, predict, targets: list[list[int]], min_class_examples: int,
                           seen_classes=None, folds: int = 5, seed: int = 0
                           ) -> tuple[ResolutionTrial, list[ResolutionTrial]]:
    """The test resolution, chosen as the rule is: ``predict(resolution)`` gives the hold-out's (indices,
    scores) at each candidate, a rule is chosen on each, and the best F2 wins (the first listed on a tie).
    Returns (the best, every trial in order); the best's rule carries its resolution."""
    trials = []
    for short, crop in candidates:
        chosen = choose_rule_with_estimate(*predict((short, crop)), targets, min_class_examples, seen_classes, folds,
                                           seed)
        trials.append(ResolutionTrial((short, crop), replace(chosen, rule=replace(chosen.rule,
                                                                                   test_resolution=(short, crop)))))
    best, _ = _first_best(trials, [t.f2 for t in trials], trials[0], trials[0].f2 - 1.0)
    return best, trials
