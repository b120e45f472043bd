"""Write docs/reference.md, every flag of the three scripts, from their own parsers, so that the flags are written in
one place (each flag's help in its script) and the reference cannot drift from them.

    python -m tools.flag_reference           write docs/reference.md
    python -m tools.flag_reference --check   exit 1 when docs/reference.md is not what the parsers say

Run it from the repository's root; tests/test_docs.py runs the check.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path

from howto.runio import SCRIPTS, add_config_argument, markdown_fence

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
COMMAND = "python -m tools.flag_reference"
WIDTH = 116  # help lines wrap here whatever the terminal, so the page is the same on every machine

HEADER = f"""# Flag reference

Every flag of the three scripts, as `python SCRIPT.py --help` prints it, with its default. This page is generated
from the scripts' own parsers by `{COMMAND}`: edit a flag's help in its script, then rerun
it (a test fails while this page is stale).

Every flag can also be set in a YAML file passed with `--config`: keys are flag names (`max_seq_length` or
`max-seq-length`), top-level keys apply to every script that has such a flag, a mapping named `prepare_data:`,
`finetune:` or `evaluate:` applies to that script alone, and flags on the command line win
([training.md](training.md#config-files)).
"""


def script_parser(script: str) -> argparse.ArgumentParser:
    """The script's parser as it runs it (with --config), named after the script and wrapped at WIDTH.

    A default that is a file of this clone is written relative to its root before the help is wrapped, so that the
    page does not depend on where the clone lies (a longer folder would wrap the line elsewhere)."""
    parser = importlib.import_module(script).build_parser()
    add_config_argument(parser)
    parser.prog = f"{script}.py"
    parser.formatter_class = functools.partial(parser.formatter_class, width=WIDTH)
    for action in parser._actions:  # argparse has no public way to list a parser's flags
        if isinstance(action.default, str) and action.default.startswith(f"{ROOT}/"):
            action.default = action.default.removeprefix(f"{ROOT}/")
    return parser


def help_text(script: str) -> str:
    """`--help` of the script as the reference prints it."""
    return script_parser(script).format_help()


def reference() -> str:
    sections = [f"## {script}.py\n\n{markdown_fence(help_text(script).rstrip())}\n" for script in SCRIPTS]
    return "\n".join([HEADER, *sections])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/reference.md is stale, write nothing")
    args = parser.parse_args(argv)
    text = reference()
    if args.check:
        current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
        if current != text:
            print(f"{REFERENCE.relative_to(ROOT)} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
