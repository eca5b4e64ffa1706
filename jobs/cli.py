"""The `gradcon` command: one subcommand per job."""
from __future__ import annotations

import argparse
import logging
import sys

from cluster.storage import StorageError
from jobs import demo, prepare, report, score, submit, train, tune
from jobs import eval as eval_job

COMMANDS = {"prepare": prepare, "train": train, "tune": tune, "score": score, "eval": eval_job, "demo": demo,
            "submit": submit, "report": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradcon", description="GradCon anomaly detection at cluster scale")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command].main(args)
    except (ValueError, FileNotFoundError, StorageError) as e:
        print(f"gradcon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what the job started has been stopped on the way out (its finally blocks)
        print(f"gradcon {args.command}: interrupted", file=sys.stderr)
        return 130

