"""The frame every command shares: --config/--set parsing, logging, and one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import functools
import logging
import sys

from common.config import Config, load_config
from common.errors import UserError
from common.log import setup_logging

log = logging.getLogger(__name__)


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


def command(main):
    """Run ``main`` with logging set up; a UserError becomes ``error: <message>`` on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(argv=None):
        setup_logging()
        try:
            return main(argv)
        except UserError as exc:
            log.error("%s", exc)
            sys.exit(2)
        except KeyboardInterrupt:
            log.error("interrupted")
            sys.exit(130)
    return wrapper
