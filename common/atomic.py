"""Write files so that a final name never holds a partial file: temp name, flush, fsync, rename."""
from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

from common.errors import writing


def tmp_name(path: Path) -> Path:
    """Hidden, and this process's own: a worker orphaned by a killed run can never write into the file
    that the next run is writing under the same final name."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kwargs):
    path = Path(path)
    tmp = tmp_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with writing(path), open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def atomic_write_csv(path: str | Path, header: list[str] | None, rows) -> None:
    """A CSV with ``\n`` line ends (as Kaggle's files), ``header`` first unless None."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)
