"""The label vocabulary: class index <-> Open Images label code (one home for both directions)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.atomic import atomic_write_csv
from common.errors import UserError

CLASSES_FILE = "classes.csv"


@dataclass
class Vocabulary:
    codes: list[str]
    descriptions: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {code: i for i, code in enumerate(self.codes)}

    def __len__(self) -> int:
        return len(self.codes)

    @classmethod
    def from_kaggle(cls, trainable_csv: Path, descriptions_csv: Path) -> "Vocabulary":
        """``classes-trainable.csv`` in file order gives the index; descriptions are looked up."""
        try:
            codes = pd.read_csv(trainable_csv, dtype=str, keep_default_na=False)
            desc = pd.read_csv(descriptions_csv, dtype=str, keep_default_na=False,
                               on_bad_lines="skip")
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the class files: {exc}") from None
        if "label_code" not in codes.columns:
            raise UserError(f"{trainable_csv} has no 'label_code' column")
        seen: set[str] = set()
        ordered = []
        for code in codes["label_code"].str.strip():
            if code and code not in seen:  # a repeated code would shift every later index
                seen.add(code)
                ordered.append(code)
        lookup = {}
        if {"label_code", "description"} <= set(desc.columns):
            lookup = dict(zip(desc["label_code"], desc["description"]))
        return cls(ordered, [lookup.get(c, "") for c in ordered])

    @classmethod
    def load(cls, shards_dir: Path) -> "Vocabulary":
        """Read the ``classes.csv`` that the shard builder wrote."""
        path = Path(shards_dir) / CLASSES_FILE
        if not path.is_file():
            raise UserError(f"class list not found: {path} (run preprocessing.build_shards first)")
        table = pd.read_csv(path, dtype={"index": int, "label_code": str, "description": str},
                            keep_default_na=False)
        if list(table["index"]) != list(range(len(table))):
            raise UserError(f"{path}: the index column must run 0, 1, 2, ...")
        return cls(list(table["label_code"]), list(table["description"]))

    def save(self, shards_dir: Path) -> Path:
        path = Path(shards_dir) / CLASSES_FILE
        atomic_write_csv(path, ["index", "label_code", "description"],
                         ((i, c, d) for i, (c, d) in enumerate(zip(self.codes, self.descriptions))))
        return path

    def encode(self, codes) -> list[int]:
        """Sorted class indices of the known codes (unknown codes are dropped)."""
        return sorted({self.index[c] for c in codes if c in self.index})

    def decode(self, indices) -> list[str]:
        return [self.codes[int(i)] for i in indices]
