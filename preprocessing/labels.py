"""Read the Kaggle label files into compact per-image class lists.

``train_human_labels.csv`` has about 8 million rows over 1.74 million images, so it
is parsed by pandas' C reader into categoricals and grouped with numpy (no Python
loop over rows), in seconds and well under 4 GB on a 2-core machine (docs/BENCHMARKS.md, "The label files");
``train_machine_labels.csv`` (the same columns, about twice the rows) the same way.
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
    notes: dict[str, int] = field(default_factory=dict)  # a file's own counts (the machine labels': overruled ...)

    def summary(self) -> dict:
        return {**self.notes,
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
    # verified negatives (human Confidence 0) as keys ``position * (classes + 1) + class``, sorted
    negative_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

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


_PLAIN_CHARACTER = np.zeros(129, dtype=bool)  # PLAIN_ID's characters, by code point (128: any other)
_PLAIN_CHARACTER[[ord(c) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-"]] = True


def plain_ids(ids: np.ndarray) -> np.ndarray:
    """``PLAIN_ID.match`` of each of a fixed-width str array, on its code points at once (a Python loop over
    1.7 M ids took seconds)."""
    if not len(ids) or ids.dtype.itemsize == 0:
        return np.zeros(len(ids), dtype=bool)
    points = ids.view(np.uint32).reshape(len(ids), -1)
    padding = points == 0  # numpy pads a shorter string with NULs at its end
    ok = (_PLAIN_CHARACTER[np.minimum(points, 128)] | padding).all(axis=1)
    # NULs only at the end (padding, not an id's own), and at least one character
    return ok & (padding[:, 1:] >= padding[:, :-1]).all(axis=1) & ~padding[:, 0]


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


@dataclass
class LabelRows:
    """A label file's rows, parsed: per row its image (an index into ``image_ids``), class (-1: a code outside
    the vocabulary) and confidence, and whether the row is usable (well-formed, with a plain id)."""
    image_ids: np.ndarray  # str, sorted, unique
    image: np.ndarray  # int64 per row
    cls: np.ndarray  # int64 per row
    conf: np.ndarray  # float64 per row (NaN where missing)
    ok: np.ndarray  # bool per row
    label_codes: np.ndarray  # per row, the code's index among the file's codes (to count unknown codes)


def read_label_rows(path: Path, vocab: Vocabulary, problems: LabelProblems) -> LabelRows:
    """Parse a file in ``train_human_labels.csv``'s columns; malformed rows and bad ids go to ``problems``."""
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
    id_ok_per_id = plain_ids(sorted_ids)
    good = ~malformed
    bad_id = np.zeros(n_ids, dtype=bool)
    bad_id[id_codes[good]] = True
    bad_id &= ~id_ok_per_id
    problems.bad_ids = [str(i) for i in sorted_ids[bad_id]]

    code_to_class = np.array([vocab.index.get(c, -1) for c in labels.categories], dtype=np.int64)
    cls = np.where(labels.codes >= 0, code_to_class[np.maximum(labels.codes, 0)], -1)
    return LabelRows(sorted_ids, id_codes.astype(np.int64), cls, conf, good & id_ok_per_id[np.maximum(id_codes, 0)],
                     np.asarray(labels.codes))


def _count_unknown(rows: LabelRows, counted: np.ndarray, problems: LabelProblems) -> None:
    unknown = counted & (rows.cls < 0)
    problems.unknown_code_rows = int(unknown.sum())
    problems.unknown_codes = int(np.count_nonzero(np.bincount(rows.label_codes[unknown], minlength=1)))


def _unique_pairs(image: np.ndarray, cls: np.ndarray, width: int) -> np.ndarray:
    """(image, class) pairs as sorted, unique int64 keys ``image * width + class``."""
    pairs = np.sort(image.astype(np.int64) * width + cls)
    return pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs


def read_human_labels(path: Path, vocab: Vocabulary) -> tuple[LabelTable, LabelProblems]:
    """Positives are the ``Confidence == 1`` rows whose code is in the vocabulary; the table also keeps the
    verified negatives (``Confidence == 0``), which a machine label never overrules."""
    problems = LabelProblems()
    rows = read_label_rows(path, vocab, problems)
    n_ids = len(rows.image_ids)
    positive = rows.ok & (rows.conf == 1)
    negative = rows.ok & (rows.conf == 0)
    problems.positive_rows = int(positive.sum())
    problems.negative_rows = int(negative.sum())
    _count_unknown(rows, positive, problems)

    keep = positive & (rows.cls >= 0)
    width = len(vocab) + 1
    pairs = _unique_pairs(rows.image[keep], rows.cls[keep], width)
    pair_img, pair_cls = pairs // width, pairs % width
    counts = np.bincount(pair_img, minlength=n_ids)
    has_label = counts > 0
    position = np.cumsum(has_label) - 1  # an image's place in the table (where it has a label)
    table = LabelTable(rows.image_ids[has_label].astype(object),
                       np.concatenate([[0], np.cumsum(counts[has_label])]).astype(np.int64),
                       pair_cls.astype(np.int32))
    known_negative = negative & (rows.cls >= 0) & has_label[rows.image]
    table.negative_keys = _unique_pairs(position[rows.image[known_negative]], rows.cls[known_negative], width)

    labeled = np.zeros(n_ids, dtype=bool)
    labeled[rows.image[rows.ok]] = True
    problems.no_label_ids = [str(x) for x in rows.image_ids[labeled & ~has_label]]
    return table, problems


@dataclass
class MachineLabels:
    """Machine labels aligned with a human ``LabelTable``: image i of the table has the classes
    ``classes[offsets[i]:offsets[i + 1]]`` (sorted) with their confidences, none a class a human labeled."""
    offsets: np.ndarray  # int64, len(table) + 1
    classes: np.ndarray  # int32
    confidences: np.ndarray  # float32, in (0, 1]

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        window = slice(self.offsets[i], self.offsets[i + 1])
        return self.classes[window], self.confidences[window]


def read_machine_labels(path: Path, vocab: Vocabulary, human: LabelTable) -> tuple[MachineLabels, LabelProblems]:
    """``train_machine_labels.csv`` (the human file's columns; confidences in [0, 1]) for the images of ``human``.

    A human label, positive or verified negative, wins over a machine one for the same class; a class listed
    twice for an image keeps its highest confidence; a confidence of 0 says nothing and is dropped; images that
    have no human positive (so are in no shard) are counted and dropped."""
    problems = LabelProblems()
    rows = read_label_rows(path, vocab, problems)
    usable = rows.ok & (rows.conf > 0)
    problems.positive_rows = int(usable.sum())
    problems.negative_rows = int((rows.ok & (rows.conf == 0)).sum())
    _count_unknown(rows, usable, problems)

    # the machine file's sorted ids -> places in the human table's sorted ids (-1: not there)
    human_ids = np.asarray(human.image_ids).astype(str)
    place = np.searchsorted(human_ids, rows.image_ids) if len(human_ids) else np.zeros(len(rows.image_ids), int)
    place = np.minimum(place, max(len(human_ids) - 1, 0))
    found = (human_ids[place] == rows.image_ids) if len(human_ids) else np.zeros(len(rows.image_ids), bool)
    place = np.where(found, place, -1)
    row_place = place[rows.image]
    known = usable & (rows.cls >= 0)
    problems.notes["rows_of_images_in_no_shard"] = int((known & (row_place < 0)).sum())
    keep = known & (row_place >= 0)

    width = len(vocab) + 1
    keys = row_place[keep] * width + rows.cls[keep]
    order = np.argsort(keys, kind="stable")
    keys, conf = keys[order], rows.conf[keep][order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, int)
    repeats = np.diff(np.append(starts, len(keys))) - 1  # each pair's rows beyond its first
    conf = np.maximum.reduceat(conf, starts) if len(keys) else conf  # a pair listed twice: its highest confidence
    keys = keys[starts]
    # (image, class) pairs a human labeled, positive or verified negative, as sorted keys: those win
    human_keys = np.sort(np.concatenate([np.repeat(np.arange(len(human), dtype=np.int64), np.diff(human.offsets))
                                         * width + human.classes, human.negative_keys]))
    at = np.minimum(np.searchsorted(human_keys, keys), max(len(human_keys) - 1, 0))
    overruled = human_keys[at] == keys if len(human_keys) else np.zeros(len(keys), bool)
    problems.notes["rows_overruled_by_a_human_label"] = int((overruled * (repeats + 1)).sum())
    problems.notes["repeated_rows"] = int(repeats[~overruled].sum())
    keys, conf = keys[~overruled], conf[~overruled]
    counts = np.bincount(keys // width, minlength=len(human))
    problems.notes["labels_kept"], problems.notes["images_with_labels"] = len(keys), int((counts > 0).sum())
    return MachineLabels(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), (keys % width).astype(np.int32),
                         conf.astype(np.float32)), problems


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
