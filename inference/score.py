"""Mean per-image F2 of a submission against a solution file.

    python -m inference.score SUBMISSION SOLUTION

Either file may be ``image_id,labels`` with a header or headerless like
``tuning_labels.csv``. Images of the solution missing from the submission score 0;
ids in the submission that the solution does not list are reported and ignored. Files that
share no image (another stage's solution) are refused, and so are files that look swapped: a
"submission" whose images are all among the "solution"'s and only part of them. A full
stage's solution and its submission list the same images, so their order cannot be checked.
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from common.cli import command
from common.errors import UserError, reading
from common.paths import readable_file
from model.metrics import f2_per_image

log = logging.getLogger(__name__)


def read_labels(path: Path, what: str = "file") -> dict[str, list[str]]:
    """image id -> label codes, from either layout."""
    readable_file(Path(path), what)
    out: dict[str, list[str]] = {}
    with reading(path, "a submission or solution CSV"), open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or (n == 1 and [c.strip() for c in row[:2]] == ["image_id", "labels"]):
                continue
            if len(row) > 2:
                raise UserError(f"{path} line {n}: expected 'image_id,labels', got {len(row)} fields")
            out[row[0].strip()] = row[1].split() if len(row) == 2 else []
    return out


def score(submission: dict[str, list[str]], solution: dict[str, list[str]]) -> tuple[float, int, list[str]]:
    """(mean F2 over the solution's images, how many the submission lacks, unknown submission ids)."""
    ids = list(solution)
    f2 = f2_per_image([submission.get(i, []) for i in ids], [solution[i] for i in ids])
    return float(f2.mean()) if ids else 0.0, sum(i not in submission for i in ids), [i for i in submission if i not in solution]


def has_header(path: Path) -> bool:
    with reading(path, "a submission or solution CSV"), open(path, newline="") as f:
        first = next(csv.reader(f), [])
    return [c.strip() for c in first[:2]] == ["image_id", "labels"]


def looks_swapped(submission: dict, solution: dict, submission_has_header: bool, solution_has_header: bool) -> bool:
    """A submission lists every test image and a solution (tuning labels, a hold-out) some of them. "Submission"
    images that are all among the "solution"'s, and either a small part of them or in a headerless file while
    the "solution" has the header inference.submit writes, are the solution's."""
    inside = 0 < len(submission) < len(solution) and set(submission) <= set(solution)
    return inside and (len(submission) <= len(solution) // 2 or (solution_has_header and not submission_has_header))


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m inference.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submission", type=Path, help="the submission CSV (inference.submit's output)")
    parser.add_argument("solution", type=Path, help="the labels to score against: a solution file, "
                        "tuning_labels.csv, or the tune stage's hold-out (artifacts/tune/data/holdout_labels.csv)")
    args = parser.parse_args(argv)
    submission, solution = read_labels(args.submission, "SUBMISSION"), read_labels(args.solution, "SOLUTION")
    if looks_swapped(submission, solution, has_header(args.submission), has_header(args.solution)):
        raise UserError(f"{args.submission} (SUBMISSION) has {len(submission)} images, all of them among the "
                        f"{len(solution)} of {args.solution} (SOLUTION): the two files look swapped; the "
                        "submission comes first: python -m inference.score SUBMISSION SOLUTION")
    value, missing, unknown = score(submission, solution)
    if solution and missing == len(solution):
        raise UserError(f"none of the {len(solution)} images of {args.solution} (SOLUTION) is in {args.submission} "
                        "(SUBMISSION): are they of the same stage?")
    if missing:
        log.warning("%d images of the solution are not in the submission (scored 0)", missing)
    if unknown:
        log.warning("%d submission ids are not in the solution, e.g. %s", len(unknown), unknown[:3])
    print(f"mean F2: {value:.5f}")  # the command's result, which scripts read: no log line's time before it


if __name__ == "__main__":
    main()
