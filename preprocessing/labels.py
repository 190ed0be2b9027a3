"""Read the Kaggle label files into compact per-image class lists.

``train_human_labels.csv`` has about 8 million rows over 1.74 million images, so it
is parsed by pandas' C reader into categoricals and grouped with numpy (no Python
loop over rows): about 10 s and well under 4 GB on a 2-core machine
(``scripts/benchmark_labels.py``).
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


def read_human_labels(path: Path, vocab: Vocabulary) -> tuple[LabelTable, LabelProblems]:
    """Positives are the ``Confidence == 1`` rows whose code is in the vocabulary."""
    problems = LabelProblems()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            df = pd.read_csv(path, dtype="category", keep_default_na=False, engine="c",
                             on_bad_lines="warn", skip_blank_lines=False)
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

    ids = df["ImageID"].cat
    labels = df["LabelName"].cat
    conf_text = df["Confidence"].cat
    problems.rows = len(df) + len(skipped)

    conf_values = pd.to_numeric(pd.Series(conf_text.categories), errors="coerce").to_numpy()
    conf = np.where(conf_text.codes >= 0, conf_values[np.maximum(conf_text.codes, 0)], np.nan)
    id_ok_per_cat = pd.Series(ids.categories, dtype=str).str.fullmatch(PLAIN_ID.pattern).to_numpy()

    def empty(cat) -> np.ndarray:  # a missing trailing field reads as NaN or as ''
        blank = np.asarray(pd.Series(cat.categories, dtype=str).str.strip() == "")
        return (cat.codes < 0) | blank[np.maximum(cat.codes, 0)]

    incomplete = empty(ids) | empty(labels) | empty(conf_text)
    blank_line = empty(ids) & empty(labels) & empty(conf_text) & empty(df["Source"].cat)
    bad_conf = ~incomplete & ~((conf >= 0) & (conf <= 1))
    malformed = incomplete | bad_conf
    for line, row in zip(_line_numbers(np.flatnonzero(malformed), skipped), np.flatnonzero(malformed)):
        reason = "empty line" if blank_line[row] else "missing fields" if incomplete[row] else f"Confidence {conf_text.categories[conf_text.codes[row]]!r} is not a number in [0, 1]"
        problems.malformed_rows.append((line, reason))
    problems.malformed_rows.sort()

    good = ~malformed
    id_ok = np.zeros(len(df), dtype=bool)
    id_ok[good] = id_ok_per_cat[ids.codes[good]]
    bad_id_codes = np.unique(ids.codes[good & ~id_ok])
    problems.bad_ids = sorted(str(ids.categories[c]) for c in bad_id_codes)

    rows_ok = good & id_ok
    positive = rows_ok & (conf == 1)
    problems.positive_rows = int(positive.sum())
    problems.negative_rows = int((rows_ok & (conf == 0)).sum())

    code_to_class = np.array([vocab.index.get(c, -1) for c in labels.categories], dtype=np.int32)
    cls = np.full(len(df), -1, dtype=np.int32)
    cls[positive] = code_to_class[labels.codes[positive]]
    unknown = positive & (cls < 0)
    problems.unknown_code_rows = int(unknown.sum())
    problems.unknown_codes = int(len(np.unique(labels.codes[unknown])))

    # group (image, class) pairs; categories are renumbered in sorted id order
    order_of_cat = np.argsort(np.asarray(ids.categories, dtype=object))
    rank_of_cat = np.empty_like(order_of_cat)
    rank_of_cat[order_of_cat] = np.arange(len(order_of_cat))
    keep = positive & (cls >= 0)
    pair_img = rank_of_cat[ids.codes[keep]].astype(np.int64)
    pair_cls = cls[keep].astype(np.int64)
    pairs = np.unique(pair_img * (len(vocab) + 1) + pair_cls)  # sorted and de-duplicated
    pair_img, pair_cls = pairs // (len(vocab) + 1), pairs % (len(vocab) + 1)
    img_ranks, counts = np.unique(pair_img, return_counts=True)
    sorted_ids = np.asarray(ids.categories, dtype=object)[order_of_cat]
    table = LabelTable(sorted_ids[img_ranks], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                       pair_cls.astype(np.int32))

    labeled = np.zeros(len(sorted_ids), dtype=bool)
    labeled[np.unique(rank_of_cat[ids.codes[rows_ok]])] = True
    has_label = np.zeros(len(sorted_ids), dtype=bool)
    has_label[img_ranks] = True
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
