"""The whole loop as a user runs it, through the three command lines, on the tiny model and the bundled data."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from howto.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_prepare_finetune_evaluate_on_tiny_model(tmp_path, tiny_model):
    data, run_dir, eval_dir = tmp_path / "data", tmp_path / "run", tmp_path / "eval"

    run("prepare_data.py", "data/howto_steps.jsonl", "--out", str(data), "--model", "tiny", "--seed", "7")
    for split in ("train", "val", "test"):
        assert (data / f"{split}.jsonl").stat().st_size > 0
    everything = (data / "train.jsonl").read_text() + (data / "test.jsonl").read_text()
    assert "example.com" not in everything and "4111" not in everything  # the bundled fake PII is gone

    proc = run("finetune.py", "--data", str(data), "--out", str(run_dir), "--model", "tiny", "--epochs", "2",
               "--batch-size", "8", "--grad-accum", "1", "--lr", "2e-3", "--max-seq-length", "256")
    assert "mean nothing" in proc.stdout + proc.stderr  # the tiny model says its numbers are not about quality
    assert (run_dir / "adapter_model.safetensors").exists()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["data_sha256"] and info["versions"]["unsloth"] and info["engine"] == "unsloth"
    assert info["best_val_loss"] < json.loads((run_dir / "metrics.json").read_text())["val"][0]["loss"]

    run("finetune.py", "--out", str(run_dir), "--export-only", "--export", "gguf", "--quant", "q8_0")
    assert (run_dir / "merged" / "model.safetensors").exists()
    assert [p.name for p in (run_dir / "gguf").glob("*.gguf")] == ["model-q8_0.gguf"]
    assert "FROM ./model-q8_0.gguf" in (run_dir / "gguf" / "Modelfile").read_text()

    run("evaluate.py", "--data", str(data), "--base", "tiny", "--finetuned", str(run_dir), "--out", str(eval_dir),
        "--bertscore-model", "minilm", "--limit", "8", "--max-new-tokens", "24")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    report = (eval_dir / "report.md").read_text()
    for system in ("base", "finetuned"):
        scores = [json.loads(line) for line in (eval_dir / system / "scores.jsonl").read_text().splitlines()]
        assert len(scores) == 8
        for row in scores:
            for key in ("bertscore_p", "bertscore_r", "bertscore_f1"):
                assert isinstance(row[key], float) and math.isfinite(row[key])
    assert "BERTScore" in report and "order" in report.lower()
    assert (eval_dir / "report.html").stat().st_size > 1000
    assert metrics["baseline"] == "base" and metrics["n_examples"] == 8
    comparison = metrics["comparisons"]["finetuned"]
    for metric in METRICS:
        for system in ("base", "finetuned"):
            assert metric in metrics["systems"][system]["means"]
        assert metric in comparison
    f1 = comparison["bertscore_f1"]
    assert f1["n"] == 8 and f1["ci_low"] <= f1["delta"] <= f1["ci_high"] and 0 <= f1["p_value"] <= 1
