"""torchrun, for scripts/train.sh: the same options and processes, but a user's error is one line, once.

    python -m training.launch [torchrun options] -m training.train [training options]

Under plain torchrun a mistyped config key prints its one-line error once per rank, then ~40 lines of
torchrun's ChildFailedError. Here every rank hands its one-line error to this process (a file per rank in a
folder named by ``IIC_ERROR_DIR``; ``common.cli.command`` writes it instead of printing), and when the run
fails this process prints each distinct message once and exits with the ranks' exit code. A rank that
crashed without such a message (a bug) keeps torchrun's full report. torchrun's own warnings (rendezvous trouble, a
node that stopped answering) and each restart of the worker group (``--max-restarts``) are printed with their time;
only its per-child failure lines, which the ranks' one-line errors say better, are left out.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

ERROR_DIR = "IIC_ERROR_DIR"
# the per-child "failed (exitcode: 2) local_rank: 0 ..." and "Sending process ... closing signal" lines
CHILD_LINES = "torch.distributed.elastic.multiprocessing"
RESTART_LOGGER = "torch.distributed.elastic.agent.server.api"  # "Worker group FAILED. 1/1 attempts left; ..."


class LauncherLines(logging.Filter):
    """torchrun's lines a user needs: its warnings and errors, and the (informational) restarts."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(CHILD_LINES):
            return False
        return record.levelno >= logging.WARNING or "restart worker group" in str(record.msg)


def show_launcher_lines() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LauncherLines())
    handler.setFormatter(logging.Formatter("%(asctime)s torchrun: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("torch.distributed")
    root.handlers[:] = [handler]
    root.propagate = False
    logging.getLogger(RESTART_LOGGER).setLevel(logging.INFO)


def collected_errors(folder: Path) -> list[tuple[int, str]]:
    """(exit code, message) per rank that reported one, in rank order, each message once."""
    seen, out = set(), []
    for path in sorted(folder.glob("rank*.txt"), key=lambda p: int(p.stem[4:])):
        code, _, message = path.read_text().partition("\n")
        if message not in seen:
            seen.add(message)
            out.append((int(code), message))
    return out


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(argv)
    # the thread budget (common.threads) sets each rank's threads; without this torchrun warns that it sets 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    show_launcher_lines()  # (a crash's report is in the ChildFailedError re-raised below)
    with tempfile.TemporaryDirectory(prefix="iic_launch_") as folder:
        os.environ[ERROR_DIR] = folder
        # torchrun's agent makes a torchelastic_* folder for its logs and leaves it: make it in ours, gone at the end
        tempfile.tempdir = folder
        try:
            run(args)
        except ChildFailedError:
            errors = collected_errors(Path(folder))
            if not errors:
                raise  # no rank said why: a crash, whose report torchrun's error holds
            for _, message in errors:
                print(f"error: {message}", file=sys.stderr)
            return errors[0][0]
        except (KeyboardInterrupt, SignalException):  # Ctrl-C, or a SIGTERM to the launcher: torchrun stops the ranks
            print("error: interrupted", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
