"""The `gradcon` command: `gradcon VERB [WORD ...] [--config FILE] [key=value ...]`, one style for every job.

Each job is a module with a typed config (`Config`, a gradcon_core.config.Config dataclass) and `run(cfg)`;
a job that takes words before its settings names the fields they fill (`WORDS`: prepare's KIND, submit's
JOB). `key=value` sets one setting, `params.nu=0.1` one entry of a mapping setting; `--config FILE` reads
settings from YAML first, and key=value wins over it. `gradcon VERB --help` lists every setting with its
default. run's return value is the exit code where it is an int (submit's: the job's status), else 0.

The flags of the release before (`--model M`, `--input I`, `--quick`, `--no-s3`, `--search A=D ...`) still
work for this release: each is read as its key=value, with a notice that names it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from types import ModuleType

from cluster.storage import StorageError
from gradcon_core.config import load_config
from jobs import demo, prepare, report, score, submit, train, tune
from jobs import eval as eval_job

COMMANDS: dict[str, ModuleType] = {"prepare": prepare, "train": train, "tune": tune, "score": score,
                                   "eval": eval_job, "report": report, "demo": demo, "submit": submit}
# Flags of the release before whose values are lists: they take every word up to the next flag.
LIST_FLAGS = ("search", "env", "pip")


@dataclass
class Arguments:
    """A command line taken apart: the words, the key=value settings, the YAML file, what follows `--`."""

    words: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    config: str | None = None
    after_dashes: list[str] | None = None


def split_arguments(argv: list[str], renamed: dict[str, str] | None = None) -> Arguments:
    """argv taken apart; a flag of the release before becomes its key=value (renamed: old flag -> key), with a
    notice on stderr."""
    args, old = Arguments(), []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            args.after_dashes = argv[i + 1:]
            break
        if arg == "--config" or arg.startswith("--config="):
            args.config, i = _value(argv, i, "--config")
        elif arg.startswith("--"):
            settings, i = _old_flag(argv, i, renamed or {})
            old += settings
        else:
            (args.settings if "=" in arg else args.words).append(arg)
            i += 1
    args.settings += old  # the flags won over key=value in the release before: they still do
    return args


def _value(argv: list[str], i: int, flag: str) -> tuple[str, int]:
    if argv[i].startswith(f"{flag}="):
        return argv[i].split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise ValueError(f"{flag} needs a value")
    return argv[i + 1], i + 2


def _old_flag(argv: list[str], i: int, renamed: dict[str, str]) -> tuple[list[str], int]:
    """The settings a flag of the release before stands for, and where the next argument starts."""
    name, has_value, value = argv[i][2:].partition("=")
    key = renamed.get(name, name).replace("-", "_")
    i += 1
    if key in LIST_FLAGS and not has_value:
        values = []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        settings = [f"search.{v}" for v in values] if key == "search" else [f"{key}={','.join(values)}"]
    elif key.startswith("no_") and not has_value:
        settings = [f"{key[3:]}=false"]
    else:
        if not has_value:  # a bare flag is a boolean; otherwise its value follows
            takes_value = i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]
            value, i = (argv[i], i + 1) if takes_value else ("true", i)
        settings = [f"{key}={value}"]
    print(f"note: --{name} is the flag style of the release before, which goes away in the next: write "
          f"{' '.join(settings)}", file=sys.stderr)
    return settings, i


def parse(module: ModuleType, argv: list[str]):
    """The job's config from its command line (after the verb)."""
    args = split_arguments(argv, getattr(module, "RENAMED", {}))
    names = getattr(module, "WORDS", ())
    if len(args.words) > len(names):
        takes = " ".join(n.upper() for n in names) or "no words"
        raise ValueError(f"unexpected {' '.join(args.words[len(names):])!r}: this command takes {takes} before "
                         "its key=value settings")
    extra = dict(zip(names, args.words))
    if args.after_dashes is not None:
        extra["job_args"] = args.after_dashes
    return load_config(module.Config, args.config, args.settings, extra=extra)


def describe(verb: str, module: ModuleType) -> str:
    """`gradcon VERB --help`: what the job does and every setting, with its default and what it means."""
    words = " ".join(n.upper() for n in getattr(module, "WORDS", ()))
    lines = [f"usage: gradcon {verb} {words + ' ' if words else ''}[--config FILE] [key=value ...]", "",
             textwrap.dedent(module.__doc__).strip(), "", "settings (key=value; a YAML file takes the same keys):"]
    comments = _comments(module.Config)
    hints = typing.get_type_hints(module.Config)
    for f in dataclasses.fields(module.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"  {f.name}={default!r}  ({kind}){'  ' + comments[f.name] if f.name in comments else ''}")
    return "\n".join(lines)


def _comments(cls: type) -> dict[str, str]:
    """The comment on each field's line in the config class and its bases (the settings' documentation)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source_lines, _ = inspect.getsourcelines(klass)
        for node in ast.parse(textwrap.dedent("".join(source_lines))).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = source_lines[node.lineno - 1]
                if "#" in line:
                    comments[node.target.id] = line.split("#", 1)[1].strip()
    return comments


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: gradcon {{{','.join(COMMANDS)}}} [WORD ...] [--config FILE] [key=value ...]\n"
              "  gradcon VERB --help lists the settings of VERB", file=sys.stdout if argv else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    verb, module = argv[0], COMMANDS[argv[0]]
    if {"-h", "--help"} & set(argv[1:argv.index("--") if "--" in argv else None]):
        print(describe(verb, module))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = module.run(parse(module, argv[1:]))
    except (ValueError, FileNotFoundError, StorageError) as e:
        print(f"gradcon {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what the job started has been stopped on the way out (its finally blocks)
        print(f"gradcon {verb}: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0
