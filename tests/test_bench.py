"""Smoke tests of the five benches and the GPU check, run as the docs run them (`python -m bench.NAME` from the root):
each starts and answers --help, and the extraction bench scores a one-page answer key."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*_bench.py"))


def run_bench(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_five_benches_are_there():
    assert BENCHES == ["collect_bench", "eval_bench", "prepare_bench", "quality_bench", "train_bench"]


@pytest.mark.parametrize("name", [*BENCHES, "gpu_check"])
def test_bench_answers_help(name):
    result = run_bench(name, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:")


def test_collect_bench_finds_the_procedure_of_its_answer_key(tmp_path):
    (tmp_path / "help.md").write_text("# Orders\n\n## Cancel an order\n\n1. Open **Orders**.\n2. Tap the order.\n"
                                      "3. Tap *Cancel order*.\n", encoding="utf-8")
    expected = {"file": "help.md", "heading": "Cancel an order",
                "steps": ["Open **Orders**.", "Tap the order.", "Tap *Cancel order*."]}
    (tmp_path / "expected.jsonl").write_text(json.dumps(expected) + "\n", encoding="utf-8")
    result = run_bench("collect_bench", str(tmp_path), "--show-misses")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "100.0%" in result.stdout and "MISSED" not in result.stdout, result.stdout


def test_quality_table_reads_evaluates_metrics():
    from bench.quality_bench import ROWS, quality_table
    from howto.metrics import paired_comparison

    def row(base: list[float], tuned: list[float]) -> dict:
        return {**paired_comparison(base, tuned, 100, 0), "base": sum(base) / len(base),
                "finetuned": sum(tuned) / len(tuned)}

    metrics = {"n_paired": {"finetuned": 3}, "comparisons": {"finetuned": {k: row([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
                                                                          for k in ROWS}},
               "forgetting": {"over_formatting": row([0, 0, 0, 0], [0, 1, 0, 0]),
                              "correct": row([1, 1, 0, 0], [1, 0, 0, 0])}}
    lines = quality_table(metrics).splitlines()
    assert lines[0].startswith("3 paired test prompts") and len(lines) == 4 + len(ROWS) + 2
    assert lines[4] == f"| {ROWS['bertscore_f1']} | 0.200 | 0.600 | +0.400 [0.400, 0.400] (n 3) |"
    assert lines[-2].startswith("| numbered list for a general question | 0.000 | 0.250 | +0.250 [")
    assert lines[-1].startswith("| correct short answer to a general question | 0.500 | 0.250 | -0.250 [")
