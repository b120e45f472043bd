#!/usr/bin/env python
"""Recall and precision of the rule-based extraction on real documentation pages with a hand-made answer key.

    python -m bench.collect_bench ../shared/data/external/gitlab-docs
    python -m bench.collect_bench PAGES --show-misses

PAGES holds Markdown or HTML pages and `expected.jsonl`: one line per procedure, {"file", "steps": [...]} with each
step's text as written in the page (Markdown; sub-bullets, code and images kept under the step's first line). A
procedure is found when a record from its file has the same number of steps and each step starts with the text of
the expected step's own first paragraph (inline markup and shortcodes removed, case and spacing ignored). Recall is
procedures found over procedures expected; the non-procedure rate is the share of records that match no expected
procedure. Prints one table per run plus the time taken.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from howto.collect import clean, collect_file, markdown_blocks


def step_key(text: str) -> str:
    """A step compared on its words: lowercase, punctuation and spacing ignored."""
    return " ".join(re.findall(r"\w+", text.lower()))


def expected_first_paragraph(step: str) -> str:
    """The expected step's own text: its first paragraph, without what belongs under it, rendered to plain text."""
    own = re.split(r"\n\s*\n|\n\s*(?:[-*+]|\d+[.)]|```|!\[)", step, maxsplit=1)[0]
    blocks, _ = markdown_blocks(own)
    return clean(" ".join(b.text for b in blocks if b.kind == "para"))


def matches(record: dict, expected: dict) -> bool:
    got, want = record["response"], expected["steps"]
    return len(got) == len(want) and all(
        step_key(g).startswith(step_key(expected_first_paragraph(w))) for g, w in zip(got, want))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pages", type=Path, help="folder of pages with expected.jsonl")
    p.add_argument("--show-misses", action="store_true", help="print the procedures missed and the extra records")
    args = p.parse_args()
    expected = [json.loads(line) for line in (args.pages / "expected.jsonl").read_text().splitlines() if line.strip()]
    files = sorted(f for f in args.pages.iterdir() if f.suffix in (".md", ".html", ".htm") and f.name != "README.md")
    start = time.perf_counter()
    records = {f.name: collect_file(f)[0] for f in files}
    seconds = time.perf_counter() - start
    found, used = 0, set()
    misses = []
    for want in expected:
        hit = next((k for k, r in enumerate(records.get(want["file"], []))
                    if (want["file"], k) not in used and matches(r, want)), None)
        if hit is None:
            misses.append(want)
        else:
            used.add((want["file"], hit))
            found += 1
    made = sum(len(r) for r in records.values())
    extra = [(f, r) for f, rs in records.items() for k, r in enumerate(rs) if (f, k) not in used]
    table = Table(title=f"rule-based extraction on {args.pages}")
    for column in ("pages", "expected", "records made", "found", "recall", "non-procedures", "rate", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(str(len(files)), str(len(expected)), str(made), str(found), f"{found / len(expected):.1%}",
                  str(len(extra)), f"{len(extra) / max(made, 1):.1%}", f"{seconds:.2f}")
    Console().print(table)
    if args.show_misses:
        for want in misses:
            print("MISSED", want["file"], want["heading"], [expected_first_paragraph(s)[:50] for s in want["steps"]])
        for f, r in extra:
            print("EXTRA", f, r["prompt"], [s[:50] for s in r["response"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
