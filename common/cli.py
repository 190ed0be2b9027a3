"""The frame every command shares: --config/--set parsing, logging, and one-line errors.

Every fault a user or the machine causes becomes one line on stderr and exit code 2: a
UserError (damaged data with the repair command, in the command's own --config and --set), a full
disk or read-only folder (``common.errors.describe_os_error``), running out of GPU memory, and a
model given input of the wrong type or device. A fault of the GPU, its driver or NCCL is one line
in its own words and exit code 1 (``common.errors.failure_kind``). Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from common.config import Config, load_config
from common.errors import DamagedData, UserError, describe_os_error, failure_kind
from common.log import setup_logging

log = logging.getLogger(__name__)

# What PyTorch says when a batch does not suit the model (dtype or device), e.g. float16 on a CPU model
INPUT_MISMATCH = re.compile(r"Input type \(.*\) and weight type \(.*\) should be the same|"
                            r"Expected all tensors to be on the same device|"
                            r"expected scalar type \w+ but found \w+|"
                            r"expected (mat1 and mat2|input and weight) to have the same dtype|"
                            r"mat1 and mat2 must have the same dtype")


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", metavar="PATH",
                        help="YAML config (default: config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set data.shortest_side=128 (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def config_args(argv: list[str]) -> str:
    """The ``--config``/``--set`` arguments of a command line, to repeat them in a command a message suggests."""
    import shlex
    out, it = [], iter(argv)
    for arg in it:
        flag, _, value = arg.partition("=")
        if flag in ("--config", "--set"):
            out += [flag, shlex.quote(value or next(it, ""))]
    return " ".join(out)


def describe(exc: BaseException, batch_keys: str, argv: list[str] = ()) -> str | None:
    """The one-line message for a fault that is not a bug, or None."""
    if isinstance(exc, DamagedData):
        repeat = " ".join(["python -m preprocessing.verify", config_args(list(argv)), "--repair"]).replace("  ", " ")
        return f"{exc}; run {repeat}, then the same command again"
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    kind = failure_kind(exc)
    if kind == "device":
        return (f"the GPU, its driver or the link between GPUs failed ({first_line(exc)}): a fault of the machine or "
                "the run, not of the data; the last checkpoint resumes the run")
    if kind == "out_of_memory":
        what = "GPU memory" if re.search(r"cuda|device|gpu", str(exc), re.IGNORECASE) else "memory"
        return f"out of {what} ({first_line(exc)}): lower {batch_keys}"
    if isinstance(exc, RuntimeError) and INPUT_MISMATCH.search(str(exc)):
        return (f"the batches do not suit the model ({first_line(exc)}): check pipeline.dtype (auto follows the "
                f"device), pipeline.device and model.amp")
    return None


def report_error(message: str, code: int = 2) -> None:
    """``error: <message>`` on stderr; under ``training.launch`` handed to the launcher instead, which prints
    each rank's distinct message once."""
    folder = os.environ.get("IIC_ERROR_DIR")
    if folder and os.path.isdir(folder):
        with contextlib.suppress(OSError):
            Path(folder, f"rank{os.environ.get('RANK', 0)}.txt").write_text(f"{code}\n{message}")
            return
    log.error("%s", message)


def stop_on_interrupt(signum, frame) -> None:
    """SIGINT (Ctrl-C, or torchrun passing on its own) as KeyboardInterrupt, once, so the command stops cleanly;
    a second one during that stop, or one landing inside a finalizer (DALI's pipeline ``__del__`` waits for its
    threads), ends the process at once: raised there it would be printed as a traceback and lost."""
    inside_finalizer = False
    while frame is not None and not inside_finalizer:
        inside_finalizer = frame.f_code.co_name == "__del__"
        frame = frame.f_back
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    if inside_finalizer:
        report_error("interrupted", 130)
        logging.shutdown()
        os._exit(130)
    raise KeyboardInterrupt


def command(main=None, *, batch_keys: str = "the batch size"):
    """Run ``main(argv)`` with logging set up; a fault that is not a bug becomes ``error: <one line>`` on
    stderr and exit code 2. ``batch_keys`` names the config keys that lower memory use, for the hint."""
    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            setup_logging()
            restore = threading.current_thread() is threading.main_thread()  # signals are set there only
            before = signal.signal(signal.SIGINT, stop_on_interrupt) if restore else None
            try:
                return main(argv)
            except KeyboardInterrupt:
                restore = False  # stopping: a second Ctrl-C ends the process at once (stop_on_interrupt)
                report_error("interrupted", 130)
                sys.exit(130)
            except Exception as exc:
                message = describe(exc, batch_keys, sys.argv[1:] if argv is None else argv)
                if message is None:
                    raise
                code = 1 if failure_kind(exc) == "device" else 2  # 2: what the user can put right
                report_error(message, code)
                sys.exit(code)
            finally:
                if restore:
                    signal.signal(signal.SIGINT, before)
        return wrapper
    return decorate(main) if main is not None else decorate
