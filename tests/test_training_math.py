import numpy as np
import pytest
import torch
from sklearn.metrics import fbeta_score

from model.decision import DecisionRule, choose_rule
from training.losses import bce_loss, per_positive_softmax_loss
from model.metrics import f2_per_image, global_average_precision, topk_rescore
from tests.fixtures import mean_f2


def literal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The definition, one image and one positive at a time (as the original's Python loop)."""
    total, count = logits.new_zeros(()), 0
    for z, y in zip(logits, targets):
        negatives = z[y == 0]
        for p in torch.nonzero(y).flatten():
            total = total - z[p] + torch.logsumexp(torch.cat([z[p:p + 1], negatives]), 0)
            count += 1
    return total / count


def random_case(seed, n=6, c=30):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(n, c, generator=g) < 0.15).double()
    targets[targets.sum(1) == 0, 0] = 1
    return logits, targets


@pytest.mark.parametrize("seed", range(5))
def test_per_positive_softmax_loss_equals_the_literal_definition(seed):
    logits, targets = random_case(seed)
    a = logits.clone().float().requires_grad_()
    b = logits.clone().requires_grad_()
    fast, slow = per_positive_softmax_loss(a, targets), literal_loss(b, targets)
    assert abs(fast.item() - slow.item()) < 1e-5
    fast.backward()
    slow.backward()
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-6)


def test_loss_stays_finite_when_every_class_is_positive():
    logits = torch.randn(2, 4, requires_grad=True)
    loss = per_positive_softmax_loss(logits, torch.ones(2, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bce_matches_torch():
    logits, targets = random_case(1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float())
    assert torch.allclose(bce_loss(logits, targets), expected)


@pytest.mark.parametrize("seed", range(3))
def test_rescoring_equals_the_literal_softmax(seed):
    logits, _ = random_case(seed, c=40)
    k = 7
    indices, scores = topk_rescore(logits, k)
    for z, idx, sc in zip(logits, indices, scores):
        ranked = z.sort(descending=True).values
        assert torch.equal(z[idx], ranked[:k])
        for i in range(k):
            group = torch.cat([ranked[i:i + 1], ranked[k:]])
            assert abs(torch.softmax(group, 0)[0].item() - sc[i].item()) < 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_mean_f2_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    truth = (rng.random((50, 12)) < 0.2).astype(int)
    pred = (rng.random((50, 12)) < 0.25).astype(int)
    to_lists = lambda m: [list(np.flatnonzero(r)) for r in m]  # noqa: E731
    expected = fbeta_score(truth, pred, beta=2, average="samples", zero_division=0)
    assert abs(mean_f2(to_lists(pred), to_lists(truth)) - expected) < 1e-12
    assert f2_per_image([[]], [[1]])[0] == 0.0  # no prediction scores 0


def test_gap_against_a_literal_implementation():
    rng = np.random.default_rng(0)
    n, c, k = 20, 15, 5
    scores_full = rng.random((n, c))
    truth = [list(rng.choice(c, rng.integers(1, 4), replace=False)) for _ in range(n)]
    idx = np.argsort(-scores_full, 1)[:, :k]
    sc = np.take_along_axis(scores_full, idx, 1)
    pooled = sorted(((sc[i, j], idx[i, j] in truth[i]) for i in range(n) for j in range(k)), key=lambda x: -x[0])
    hits_so_far, ap = 0, 0.0
    for rank, (_, rel) in enumerate(pooled, 1):
        if rel:
            hits_so_far += 1
            ap += hits_so_far / rank
    expected = ap / sum(len(t) for t in truth)
    assert abs(global_average_precision(idx, sc, truth) - expected) < 1e-12


def test_decision_rule_threshold_max_min_and_per_class():
    indices = np.array([[3, 1, 4, 0, 2, 5], [2, 0, 1, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.56, 0.1], [0.3, 0.2, 0.1, 0.05, 0.01, 0.0], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    rule = DecisionRule(threshold=0.55, min_labels=2, max_labels=4)
    assert rule.apply(indices, scores) == [[3, 1, 4, 0], [2, 0], [5, 4]]  # max 4; min 2 by taking the top ones
    rule.class_thresholds = {4: 0.45, 3: 0.95}
    assert rule.apply(indices, scores) == [[1, 4, 0, 2], [2, 0], [5, 4]]
    assert DecisionRule.from_dict(rule.to_dict()) == rule


def test_choose_rule_finds_a_rule_at_least_as_good_as_the_original():
    rng = np.random.default_rng(3)
    n, c, k = 120, 10, 6
    truth = [list(rng.choice(c, rng.integers(1, 3), replace=False)) for _ in range(n)]
    logits = rng.normal(size=(n, c))
    for i, t in enumerate(truth):
        logits[i, t] += 2.0
    idx, sc = (x.numpy() for x in topk_rescore(torch.tensor(logits), k))
    rule, f2 = choose_rule(idx, sc, truth, min_class_examples=5)
    original = mean_f2(DecisionRule().apply(idx, sc), truth)
    assert f2 >= original and abs(f2 - mean_f2(rule.apply(idx, sc), truth)) < 1e-12


def test_choose_rule_sets_per_class_thresholds_where_they_win():
    """Class 0 is in every image but always scores 0.3, below two negatives at 0.4: no single threshold
    separates them, while a low threshold for class 0 and a high one elsewhere is perfect."""
    rng = np.random.default_rng(0)
    n, c = 200, 10
    truth, rows = [], []
    for i in range(n):
        other = int(rng.integers(1, c))
        decoys = [(other % 9) + 1, ((other + 1) % 9) + 1]
        scores = {other: 0.8, 0: 0.3, **{d: 0.4 for d in decoys}}
        scores.update({j: 0.05 for j in range(c) if j not in scores})
        ranked = sorted(scores, key=lambda j: -scores[j])
        truth.append([0, other])
        rows.append((ranked, [scores[j] for j in ranked]))
    idx = np.array([r[0] for r in rows])
    sc = np.array([r[1] for r in rows])
    global_rule, global_f2 = choose_rule(idx, sc, truth, min_class_examples=10 ** 9)
    assert not global_rule.class_thresholds and global_f2 < 0.9
    rule, f2 = choose_rule(idx, sc, truth, min_class_examples=5)
    assert rule.class_thresholds and f2 > global_f2 + 0.1
    assert abs(f2 - mean_f2(rule.apply(idx, sc), truth)) < 1e-12


def reference_apply(rule, indices, scores):
    """The rule applied image by image, threshold by threshold: the plain form of DecisionRule.apply."""
    out = []
    for row, row_scores in zip(indices, scores):
        passing = [int(c) for c, s in zip(row, row_scores) if s > rule.class_thresholds.get(int(c), rule.threshold)]
        chosen = passing[: rule.max_labels]
        out.append(chosen if len(chosen) >= rule.min_labels else [int(c) for c in row[: rule.min_labels]])
    return out


def reference_choose_rule(indices, scores, targets, min_class_examples):
    """choose_rule written as loops over every candidate rule, scored image by image."""
    from model.decision import THRESHOLDS

    def score(rule):
        return float(f2_per_image(reference_apply(rule, indices, scores), targets).mean())
    best, best_f2 = DecisionRule(), -1.0
    for lo in (1, 2, 3):
        for hi in range(max(lo, 2), 8):
            for t in THRESHOLDS:
                if (f2 := score(DecisionRule(float(t), lo, hi))) > best_f2 + 1e-12:
                    best, best_f2 = DecisionRule(float(t), lo, hi), f2
    counts = np.bincount([c for t in targets for c in t], minlength=int(indices.max()) + 1)
    frequent = [int(c) for c in np.flatnonzero(counts >= min_class_examples) if np.any(indices == c)]
    for c in sorted(frequent, key=lambda c: -counts[c]):
        for t in THRESHOLDS:
            trial = DecisionRule(best.threshold, best.min_labels, best.max_labels, {**best.class_thresholds, c: float(t)})
            if (f2 := score(trial)) > best_f2 + 1e-12:
                best, best_f2 = trial, f2
    return best, best_f2


@pytest.mark.parametrize("seed", range(6))
def test_the_vectorised_rule_and_its_search_equal_the_plain_loops(seed):
    """Tuning-label-like held-out sets (about 2.4 labels an image, a few frequent classes): the same rule, the
    same F2 to the last bit, and every image labelled as the plain loop labels it."""
    from model.decision import best_global_threshold
    rng = np.random.default_rng(seed)
    n, c, k = 150, 40, 12
    truth = [sorted(set(rng.choice(c, int(rng.integers(1, 5)), replace=False, p=np.r_[[8.0] * 6, [1.0] * 34] / 82)))
             for _ in range(n)]
    logits = rng.normal(size=(n, c))
    for i, t in enumerate(truth):
        logits[i, t] += rng.uniform(0.5, 3.0)
    idx, sc = (x.numpy() for x in topk_rescore(torch.tensor(logits), k))
    rule, f2 = choose_rule(idx, sc, truth, min_class_examples=5)
    assert (rule, f2) == reference_choose_rule(idx, sc, truth, 5)
    assert rule.class_thresholds  # the per-class search was exercised
    assert rule.apply(idx, sc) == reference_apply(rule, idx, sc)
    t, global_f2 = best_global_threshold(idx, sc, truth, 1, 5)
    from model.decision import THRESHOLDS
    plain = max((float(f2_per_image(reference_apply(DecisionRule(float(x), 1, 5), idx, sc), truth).mean()), float(x))
                for x in THRESHOLDS)
    assert (global_f2, t) == plain


def test_classes_the_tuning_labels_never_show_get_their_own_threshold():
    """Class 9 never occurs in the tuning labels but is each image's top score (0.7, above the true labels'
    0.6): no global threshold keeps the true labels and drops it; a threshold for unseen classes does."""
    rng = np.random.default_rng(0)
    n = 120
    truth = [sorted(rng.choice(8, 2, replace=False).tolist()) for _ in range(n)]
    idx, sc = [], []
    for t in truth:
        others = [c for c in range(8) if c not in t]
        idx.append([9, *t, *others[:3]])
        sc.append([0.7, 0.6, 0.6, 0.1, 0.08, 0.06])
    idx, sc = np.array(idx), np.array(sc)
    plain, plain_f2 = choose_rule(idx, sc, truth, min_class_examples=10 ** 9)
    rule, f2 = choose_rule(idx, sc, truth, min_class_examples=10 ** 9, seen_classes=range(8))
    assert plain.unseen_threshold is None and rule.unseen_threshold >= 0.7 and f2 == 1.0 > plain_f2 + 0.05
    assert all(9 not in labels for labels in rule.apply(idx, sc))
    assert DecisionRule.from_dict(rule.to_dict()) == rule
    # a rule saved before the unseen-class threshold existed loads without one
    old = {"threshold": 0.4, "min_labels": 1, "max_labels": 3, "class_thresholds": {"2": 0.9}}
    assert DecisionRule.from_dict(old) == DecisionRule(0.4, 1, 3, {2: 0.9})
    # per-class thresholds still win over the unseen one, and seen classes keep the global one
    mixed = DecisionRule(0.5, 1, 5, {9: 0.65}, unseen_threshold=0.99, seen_classes=(0, 1))
    assert mixed.thresholds_for(np.array([[0, 1, 2, 9]])).tolist() == [[0.5, 0.5, 0.99, 0.65]]
