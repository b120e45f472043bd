"""bench/gpu_check.py's parts that need no GPU: its flags, its refusal on a CPU, how a part that fails, hangs or
finds no time left is reported without hiding the others, the preflight-against-bench rows and the table."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import gpu_check
from howto.runio import RunError


def test_flags_and_their_errors():
    args = gpu_check.parse([])
    assert (args.budget, args.script_timeout, args.bench_timeout, args.out) == (570, 150, 360, None)
    assert args.budget < 600  # the whole check fits in 10 minutes
    with pytest.raises(RunError, match=r"--bench-timeout must be > 0 \(seconds\), got -1"):
        gpu_check.parse(["--bench-timeout", "-1"])


def test_refuses_without_cuda_and_says_what_covers_the_cpu(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RunError, match=r"needs a CUDA GPU .*tests/test_gpu_decisions.py") as e:
        gpu_check.main(["--work", str(tmp_path), "--out", str(tmp_path / "table.md")])
    assert str(e.value).count("\n") == 0
    assert not list(tmp_path.iterdir())  # nothing started


def test_a_failing_a_hanging_and_a_late_part_are_each_reported(tmp_path):
    log = tmp_path / "part.log"
    deadline = time.monotonic() + 60
    ok = gpu_check.run_part("ok", ["-c", "print('done')"], log, 30, deadline, lambda: "figures read")
    assert (ok.status, ok.figures) == ("ok", "figures read") and "done" in log.read_text()
    failed = gpu_check.run_part("fails", ["-c", "import sys; print('first'); sys.exit('error: the real reason')"],
                                log, 30, deadline, lambda: "never read")
    assert failed.status.startswith("failed, exit 1") and failed.figures == "error: the real reason"
    start = time.monotonic()
    child = tmp_path / "child.pid"
    hangs = gpu_check.run_part("hangs", ["-c", "import subprocess, sys, time; p = subprocess.Popen([sys.executable, "
                                               "'-c', 'import time; time.sleep(60)']); open(sys.argv[1], 'w')"
                                               ".write(str(p.pid)); print('waiting', flush=True); time.sleep(60)",
                                         str(child)], log, 5, deadline)
    assert hangs.status.startswith("timed out after 5 s") and hangs.figures == "waiting"
    assert time.monotonic() - start < 30
    time.sleep(0.5)
    assert not Path(f"/proc/{child.read_text()}").exists() or "zombie" in Path(
        f"/proc/{child.read_text()}/status").read_text().lower()  # the part's own children end with it
    late = gpu_check.run_part("late", ["-c", "pass"], log, 30, time.monotonic())
    assert late.status == "skipped: no time left in --budget" and late.seconds is None
    unreadable = gpu_check.run_part("unreadable", ["-c", "pass"], log, 30, deadline,
                                    lambda: json.loads((tmp_path / "missing.json").read_text()))
    assert unreadable.status.startswith("ran, but its results could not be read (FileNotFoundError")


def bench_json(tmp_path: Path) -> Path:
    """The shape bench/train_bench.py --json writes: runs keyed by case, one measurement each here."""
    runs = {"a": [{"engine": "unsloth", "tokens_per_s": 3000.0, "mfu": 0.42, "peak_memory_gib": 5.0}],
            "b": [{"engine": "hf", "tokens_per_s": 1500.0, "mfu": 0.21, "peak_memory_gib": 8.0}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": runs, "cases": []}))
    return path


def test_bench_figures_and_the_estimate_against_the_measured_peak(tmp_path):
    path = bench_json(tmp_path)
    figures = gpu_check.bench_figures(path)
    assert "unsloth: 3000 tokens/s, MFU 42.0%, peak 5.00 GiB" in figures
    assert "Unsloth 2.00x the tokens/s of hf, 62% of its memory" in figures
    rows = {p.name.rsplit(", ", 1)[1]: p for p in gpu_check.estimate_rows(path)}
    assert set(rows) == {"unsloth", "hf"} and all(p.status == "ok" for p in rows.values())
    assert "measured 5.37 GB" in rows["unsloth"].figures and "measured 8.59 GB" in rows["hf"].figures
    estimates = [float(p.figures.split("estimate ")[1].split(" GB")[0]) for p in rows.values()]
    assert estimates[0] < estimates[1]  # the hf engine keeps more on the GPU than Unsloth
    missing = gpu_check.estimate_rows(tmp_path / "no-bench.json")
    assert [p.status for p in missing] == ["no measurement (the bench did not finish)"] * 2


def test_the_table_is_one_markdown_table_under_its_header():
    parts = [gpu_check.Part("finetune.py | tiny", "ok", "bf16, best val loss 9.1", 42.4),
             gpu_check.Part("bench", "skipped: no time left in --budget")]
    text = gpu_check.render(["GPU check of today: a card"], parts)
    lines = text.splitlines()
    assert lines[0] == "GPU check of today: a card" and lines[1] == ""
    assert lines[2:] == ["| part | result | figures | seconds |", "| --- | --- | --- | ---: |",
                         "| finetune.py \\| tiny | ok | bf16, best val loss 9.1 | 42 |",
                         "| bench | skipped: no time left in --budget |  | - |"]
