"""``switchformer`` command line: one module per subcommand, each registering its own parser."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from switchformer.cli import compare, convert, distill, finetune, generate, info, plan, train, upcycle
from switchformer.cli import eval as eval_command

SUBCOMMANDS = [train, eval_command, compare, distill, finetune, generate, convert, upcycle, info, plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchformer",
        description="Switch Transformers (Fedus, Zoph, Shazeer 2021): train, compare, inspect and convert.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from switchformer.training.denormals import flushed_denormals

    # First, before any parallel op starts torch's thread pool, so that its threads inherit the flag.
    with flushed_denormals():
        return _run(argv)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from switchformer.experiments.side_by_side import RunProcessError
    from switchformer.parallel.collectives import CollectiveError
    from switchformer.training.trainer import NonFiniteLossError

    try:
        return int(args.run(args) or 0)
    except ValueError as error:  # configuration and input errors: say what is wrong, no traceback
        print(f"switchformer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CollectiveError, RunProcessError) as error:  # the run failed; the message says why
        print(f"switchformer {args.command}: failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = "rerun the same command" if args.command == "compare" else "continue with --resume --output RUN_DIR"
        print(
            f"switchformer {args.command}: interrupted; the last complete checkpoint is kept ({how})", file=sys.stderr
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
