"""Read the Kaggle label files into compact per-image class lists.

``train_human_labels.csv`` has about 8 million rows over 1.74 million images, so it
is parsed by pandas' C reader into categoricals and grouped with numpy (no Python
loop over rows), in seconds and well under 4 GB on a 2-core machine (docs/BENCHMARKS.md, "The label file").
"""
from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from common.ids import PLAIN_ID
from common.vocab import Vocabulary

HUMAN_LABEL_COLUMNS = ("ImageID", "Source", "LabelName", "Confidence")
_SKIPPED_LINE = re.compile(r"Skipping line (\d+): (.*)")


@dataclass
class LabelProblems:
    """What reading a label file found wrong; nothing here is silent."""
    malformed_rows: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    unknown_code_rows: int = 0
    unknown_codes: int = 0
    no_label_ids: list[str] = field(default_factory=list)  # labeled, but no trainable positive
    bad_ids: list[str] = field(default_factory=list)  # not a plain name: never used as a path
    rows: int = 0
    positive_rows: int = 0
    negative_rows: int = 0  # Confidence == 0: human-verified absent

    def summary(self) -> dict:
        return {
            "rows": self.rows,
            "positive_rows": self.positive_rows,
            "verified_negative_rows": self.negative_rows,
            "unknown_code_rows": self.unknown_code_rows,
            "unknown_codes": self.unknown_codes,
            "malformed_rows": [{"line": n, "reason": r} for n, r in self.malformed_rows],
        }


@dataclass
class LabelTable:
    """Images with at least one trainable label, sorted by id, labels in CSR form."""
    image_ids: np.ndarray  # str, sorted
    offsets: np.ndarray  # int64, len(image_ids) + 1
    classes: np.ndarray  # int32, sorted within each image

    def __len__(self) -> int:
        return len(self.image_ids)

    def labels(self, i: int) -> np.ndarray:
        return self.classes[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def from_lists(cls, items: list[tuple[str, list[int]]]) -> "LabelTable":
        items = sorted(items)
        lengths = [len(labels) for _, labels in items]
        return cls(np.array([i for i, _ in items], dtype=object),
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
                   np.array([c for _, labels in items for c in labels], dtype=np.int32))


def _line_numbers(row_indices: np.ndarray, skipped_lines: list[int]) -> list[int]:
    """File line numbers of data rows, given the lines the parser skipped (header is line 1)."""
    skipped = np.sort(np.asarray(skipped_lines, dtype=np.int64))
    out = []
    for r in row_indices:
        line = int(r) + 2
        # each skipped line at or before this one pushes the row one line further down
        while np.searchsorted(skipped, line, side="right") + int(r) + 2 != line:
            line = int(r) + 2 + int(np.searchsorted(skipped, line, side="right"))
        out.append(line)
    return out


def _sorted_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes, sorted unique values): like a sorted categorical, 4x faster on 8 M ids."""
    codes, uniques = pd.factorize(values, sort=False)
    uniques = np.asarray(uniques).astype(str)  # fixed-width: a C comparison sort, not Python's
    order = np.argsort(uniques, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return np.where(codes >= 0, rank[np.maximum(codes, 0)], -1), uniques[order]


def read_human_labels(path: Path, vocab: Vocabulary) -> tuple[LabelTable, LabelProblems]:
    """Positives are the ``Confidence == 1`` rows whose code is in the vocabulary."""
    problems = LabelProblems()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            df = pd.read_csv(path, dtype={"ImageID": object, "Source": "category", "LabelName": "category",
                                          "Confidence": "category"},
                             keep_default_na=False, engine="c", on_bad_lines="warn", skip_blank_lines=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot parse {path}: {exc}") from None
    missing = [c for c in HUMAN_LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}")
    skipped = []
    for w in caught:
        for m in _SKIPPED_LINE.finditer(str(w.message)):
            skipped.append(int(m.group(1)))
            problems.malformed_rows.append((int(m.group(1)), m.group(2).strip()))
    problems.rows = len(df) + len(skipped)

    id_codes, sorted_ids = _sorted_codes(df.pop("ImageID"))
    labels = df["LabelName"].cat
    conf_text = df["Confidence"].cat
    conf_values = pd.to_numeric(pd.Series(conf_text.categories), errors="coerce").to_numpy()
    conf = np.where(conf_text.codes >= 0, conf_values[np.maximum(conf_text.codes, 0)], np.nan)

    def empty(codes: np.ndarray, categories) -> np.ndarray:  # a missing field reads as NaN or ''
        blank = np.asarray(categories, dtype=str) == ""
        return (codes < 0) | blank[np.maximum(codes, 0)]

    no_id = empty(id_codes, sorted_ids)
    incomplete = no_id | empty(labels.codes, labels.categories) | empty(conf_text.codes, conf_text.categories)
    blank_line = incomplete & no_id & empty(labels.codes, labels.categories) & empty(
        conf_text.codes, conf_text.categories) & empty(df["Source"].cat.codes, df["Source"].cat.categories)
    bad_conf = ~incomplete & ~((conf >= 0) & (conf <= 1))
    malformed = incomplete | bad_conf
    rows = np.flatnonzero(malformed)
    for line, row in zip(_line_numbers(rows, skipped), rows):
        reason = ("empty line" if blank_line[row] else "missing fields" if incomplete[row] else
                  f"Confidence {conf_text.categories[conf_text.codes[row]]!r} is not a number in [0, 1]")
        problems.malformed_rows.append((line, reason))
    problems.malformed_rows.sort()

    n_ids = len(sorted_ids)
    id_ok_per_id = np.fromiter((PLAIN_ID.match(i) is not None for i in sorted_ids), bool, n_ids)
    good = ~malformed
    bad_id = np.zeros(n_ids, dtype=bool)
    bad_id[id_codes[good]] = True
    bad_id &= ~id_ok_per_id
    problems.bad_ids = [str(i) for i in sorted_ids[bad_id]]

    rows_ok = good & id_ok_per_id[np.maximum(id_codes, 0)]
    positive = rows_ok & (conf == 1)
    problems.positive_rows = int(positive.sum())
    problems.negative_rows = int((rows_ok & (conf == 0)).sum())

    code_to_class = np.array([vocab.index.get(c, -1) for c in labels.categories], dtype=np.int64)
    cls = np.full(len(df), -1, dtype=np.int64)
    cls[positive] = code_to_class[labels.codes[positive]]
    unknown = positive & (cls < 0)
    problems.unknown_code_rows = int(unknown.sum())
    problems.unknown_codes = int(np.count_nonzero(np.bincount(labels.codes[unknown], minlength=1)))

    # (image, class) pairs as one int64 key: sort, drop repeats, count per image
    keep = positive & (cls >= 0)
    width = len(vocab) + 1
    pairs = np.sort(id_codes[keep].astype(np.int64) * width + cls[keep])
    if len(pairs):
        pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])]
    pair_img, pair_cls = pairs // width, pairs % width
    counts = np.bincount(pair_img, minlength=n_ids)
    has_label = counts > 0
    table = LabelTable(sorted_ids[has_label].astype(object),
                       np.concatenate([[0], np.cumsum(counts[has_label])]).astype(np.int64),
                       pair_cls.astype(np.int32))

    labeled = np.zeros(n_ids, dtype=bool)
    labeled[id_codes[rows_ok]] = True
    problems.no_label_ids = [str(x) for x in sorted_ids[labeled & ~has_label]]
    return table, problems


def read_tuning_labels(path: Path, vocab: Vocabulary) -> tuple[LabelTable, LabelProblems]:
    """``tuning_labels.csv``: no header, ``image_id,<codes separated by spaces>`` per line."""
    problems = LabelProblems()
    items: dict[str, list[int]] = {}
    labeled: set[str] = set()
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            problems.rows += 1
            if len(row) != 2 or not row[0].strip():
                problems.malformed_rows.append((line_no, f"expected 'image_id,labels', got {len(row)} field(s)"))
                continue
            image_id, codes = row[0].strip(), row[1].split()
            if not PLAIN_ID.match(image_id):
                problems.bad_ids.append(image_id)
                continue
            if image_id in labeled:
                problems.malformed_rows.append((line_no, f"image {image_id} listed again"))
                continue
            labeled.add(image_id)
            problems.positive_rows += len(codes)
            unknown = [c for c in codes if c not in vocab.index]
            problems.unknown_code_rows += len(unknown)
            classes = vocab.encode(codes)
            if classes:
                items[image_id] = classes
            else:
                problems.no_label_ids.append(image_id)
    problems.bad_ids = sorted(set(problems.bad_ids))
    return LabelTable.from_lists(list(items.items())), problems
