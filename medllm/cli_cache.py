"""Answer ``--help`` and refuse bad flags without importing torch, transformers or trl.

Building the training stages' parser needs ``transformers.TrainingArguments`` (or trl's
``DPOConfig``), whose import takes 3-5 s on a small machine. The first full parse of a script
saves the parser's options (names, types, choices, defaults, help) as JSON under
``$MEDLLM_CACHE_DIR`` (default ``~/.cache/medllm``), keyed by the script, the toolkit's source and
the installed library versions. Later runs rebuild an equivalent plain ``argparse`` parser from
it before any heavy import: ``--help`` prints from it, and an unknown flag, a missing value or a
value of the wrong type or outside the choices exits with code 2 at once, with the message the
full parser would give. Arguments that pass still go through the full parser. A missing,
stale or unreadable cache only means the slow path; the cache never changes what is accepted.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
FORMAT = 1

# Where the running stage script's parser is saved, set by check(); None: no caching (e.g. in-process tests).
_target: Optional[Path] = None


def cache_dir() -> Path:
    """Where the saved parsers live."""
    return Path(os.environ.get("MEDLLM_CACHE_DIR") or Path.home() / ".cache" / "medllm") / "cli"


def _cache_file(script: Path) -> Path:
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    for source in [script, *sorted(PACKAGE_DIR.glob("*.py"))]:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}=={importlib.metadata.version(name)}\n".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name} absent\n".encode())
    return cache_dir() / f"{script.stem}-{digest.hexdigest()[:16]}.json"


def _jsonable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # only ever shown in help as %(default)s, which is str() of it


def _describe(action: argparse.Action) -> dict:
    type_name = getattr(action.type, "__name__", None)
    return {
        "kind": type(action).__name__,
        "option_strings": action.option_strings,
        "dest": action.dest,
        "nargs": action.nargs,
        "const": _jsonable(action.const),
        "default": "==SUPPRESS==" if action.default == argparse.SUPPRESS else _jsonable(action.default),
        "type": type_name if type_name in ("int", "float", "string_to_bool") else None,
        "choices": None if action.choices is None else [_jsonable(c) for c in action.choices],
        "required": action.required,
        "help": action.help,
        "metavar": action.metavar,
    }


def save(parser: argparse.ArgumentParser) -> None:
    """Save ``parser``'s options for the running stage script (no-op outside ``run_cli``)."""
    target = _target
    if target is None:
        return
    try:
        if target.exists():
            return
        spec = {
            "formatter_class": parser.formatter_class.__name__,
            "description": parser.description,
            "groups": [
                {"title": group.title, "description": group.description,
                 "actions": [_describe(a) for a in group._group_actions if a.option_strings]}
                for group in parser._action_groups
            ],
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        os.replace(partial, target)  # whole or absent, also with several ranks writing at once
    except OSError:
        pass  # a read-only home only costs speed


def string_to_bool(value):
    """transformers' ``string_to_bool``, under the same name so that errors read the same."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


TYPES = {"int": int, "float": float, "string_to_bool": string_to_bool, None: None}


def _rebuild(spec: dict) -> argparse.ArgumentParser:
    formatter = getattr(argparse, spec["formatter_class"], argparse.HelpFormatter)
    parser = argparse.ArgumentParser(description=spec["description"], formatter_class=formatter,
                                     allow_abbrev=False, add_help=False)
    for group_spec in spec["groups"]:
        group = next((g for g in parser._action_groups if g.title == group_spec["title"]), None)
        if group is None:
            group = parser.add_argument_group(group_spec["title"], group_spec["description"])
        for a in group_spec["actions"]:
            default = argparse.SUPPRESS if a["default"] == "==SUPPRESS==" else a["default"]
            if a["kind"] == "_HelpAction":
                group.add_argument(*a["option_strings"], action="help", default=default, help=a["help"])
            elif a["kind"] in ("_StoreFalseAction", "_StoreTrueAction"):
                group.add_argument(*a["option_strings"], dest=a["dest"], default=default, required=a["required"],
                                   help=a["help"], action="store_false" if a["kind"] == "_StoreFalseAction" else "store_true")
            else:
                group.add_argument(*a["option_strings"], dest=a["dest"], nargs=a["nargs"], const=a["const"],
                                   default=default, type=TYPES[a["type"]], choices=a["choices"],
                                   required=a["required"], help=a["help"], metavar=a["metavar"])
    return parser


def check(argv: list[str]) -> None:
    """Before any heavy import: print help or exit 2 on a bad flag, from the saved parser if there is one.

    Also marks the running script so that :func:`save` writes its parser on the first full parse.
    """
    global _target
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file or Path(main_file).resolve().parent != PACKAGE_DIR.parent:
        return  # only the toolkit's own stage scripts
    try:
        _target = _cache_file(Path(main_file).resolve())  # the source hash is read once per process
        spec = json.loads(_target.read_text(encoding="utf-8"))
        parser = _rebuild(spec)
    except (OSError, ValueError, KeyError, TypeError, argparse.ArgumentError):
        return  # no usable cache: the full parser answers
    from medllm.arguments import _apply_aliases

    parser.prog = os.path.basename(sys.argv[0])
    _, unknown = parser.parse_known_args(_apply_aliases(argv))  # --help and bad values exit here
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
