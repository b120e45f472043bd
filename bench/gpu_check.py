#!/usr/bin/env python
"""The GPU check: every CUDA-only path of the toolkit run once on the GPU found, in under 10 minutes, with no hub.

    python -m bench.gpu_check                      # prints one markdown table to paste into the docs
    python -m bench.gpu_check --out gpu_check.md   # also writes it to a file

Parts, each a process of its own with its own timeout (and all within --budget), so one that fails or hangs does
not hide the others:
- prepare_data.py, finetune.py (Unsloth engine, then hf engine) and evaluate.py on the tiny model on CUDA, as
  tests/test_e2e.py runs them on a CPU: 4-bit loading, the precision the card has, 8-bit AdamW, generation in NF4;
- python -m bench.train_bench --full-size: Unsloth against hf on a Mistral-7B-architecture model with random
  weights, 4-bit, 2 x 2048 tokens (built once, about 14.5 GB, into the model cache);
- the preflight's memory estimate for the bench's settings against the peak the bench measured.
The first lines say what the toolkit decided for the card (compute capability, bf16, precision, the MFU peak).
A tiny run's numbers say nothing about quality; they say the path works on this card.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

from howto import flops, models, preflight, runtime
from howto.runio import RunError, atomic_write_text, library_versions, run_script

ROOT = Path(__file__).resolve().parents[1]

TINY_TRAIN = ["--model", "tiny", "--epochs", "1", "--batch-size", "8", "--grad-accum", "1", "--max-seq-length", "256"]
BENCH = ["--full-size", "--repeats", "1", "--steps", "4", "--warmup-steps", "1"]
BENCH_BATCH, BENCH_SEQ = 2, 2048  # train_bench.py's --full-size defaults, which the estimate is made for
LOG_TAIL = 4000


@dataclass
class Part:
    """One row of the table: what ran, how it ended, the figures it gave, its time."""
    name: str
    status: str
    figures: str = ""
    seconds: float | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", type=float, default=570, help="seconds for all the parts together")
    p.add_argument("--script-timeout", type=float, default=150, help="seconds for each script on the tiny model")
    p.add_argument("--bench-timeout", type=float, default=360, help="seconds for the full-size bench")
    p.add_argument("--work", default=None, help="folder for the runs and logs (default: a new temporary folder)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag, value in (("--budget", args.budget), ("--script-timeout", args.script_timeout),
                        ("--bench-timeout", args.bench_timeout)):
        if value <= 0:
            raise RunError(f"{flag} must be > 0 (seconds), got {value:g}")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    runtime.setup()
    if not models.has_cuda():
        raise RunError("python -m bench.gpu_check needs a CUDA GPU and torch finds none here; on a CPU, "
                       "tests/test_gpu_decisions.py checks the same decisions on simulated cards")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: runs and logs in {work}", flush=True)
    deadline = time.monotonic() + args.budget
    parts = run_scripts(work, args.script_timeout, deadline)
    bench_json = work / "bench.json"
    parts.append(run_part("bench.train_bench --full-size (Unsloth and hf, 4-bit, 7B architecture)",
                          ["-m", "bench.train_bench", *BENCH, "--json", str(bench_json)], work / "logs" / "bench.log",
                          args.bench_timeout, deadline, lambda: bench_figures(bench_json)))
    parts += estimate_rows(bench_json)
    table = render(header(), parts)
    print("\n" + table, flush=True)
    if args.out:
        atomic_write_text(args.out, table)
    return table


def header() -> list[str]:
    """What the toolkit decided for this card, and the versions: a row means little without them."""
    import torch

    props = torch.cuda.get_device_properties(0)
    precision, why = models.choose_precision("hf")
    peak, source = flops.peak_flops(precision)
    installed = library_versions()
    versions = ", ".join(f"{name} {installed.get(name, 'not installed')}"
                         for name in ("torch", "unsloth", "transformers", "trl", "bitsandbytes"))
    return [f"GPU check of {date.today().isoformat()}: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / preflight.GB:.1f} GB; {versions}",
            f"bf16 in hardware: {'yes' if models.gpu_has_bf16() else 'no'}; precision {precision} ({why}); "
            f"MFU peak: {f'{peak / 1e12:g} TFLOP/s' if peak else 'none'} ({source})"]


# ------------------------------------------------------------------------------------------------------- The parts

def run_part(name: str, script: list[str], log: Path, timeout: float, deadline: float,
             figures: Callable[[], str] | None = None) -> Part:
    """A script of the repository run with this Python, offline, within its timeout and what is left of the
    budget, its output in `log`; `figures` reads what it wrote. A timeout ends its whole process group (the bench's
    workers too)."""
    seconds = min(timeout, deadline - time.monotonic())
    if seconds <= 1:
        return Part(name, "skipped: no time left in --budget")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"gpu_check: {name} (up to {seconds:.0f} s) ...", flush=True)
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, *script], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Part(name, f"timed out after {seconds:.0f} s (log: {log})", last_line(log), seconds)
    elapsed = time.monotonic() - start
    if code != 0:
        return Part(name, f"failed, exit {code} (log: {log})", last_line(log), elapsed)
    try:
        return Part(name, "ok", figures() if figures else "", elapsed)
    except (OSError, KeyError, ValueError) as e:
        return Part(name, f"ran, but its results could not be read ({type(e).__name__}: {e})", "", elapsed)


def last_line(log: Path) -> str:
    """The last non-empty line of a log: usually the error."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:].splitlines()]
    return next((line for line in reversed(lines) if line), "")


def run_scripts(work: Path, timeout: float, deadline: float) -> list[Part]:
    """The three scripts on the tiny model, both engines training; a later script is skipped when what it reads
    was not made."""
    data, evaluation, logs = work / "data", work / "eval", work / "logs"
    parts = [run_part("prepare_data.py, tiny model", ["prepare_data.py", "data/howto_steps.jsonl", "--out", str(data),
                                                      "--model", "tiny", "--seed", "7"], logs / "prepare_data.log",
                      timeout, deadline, lambda: prepare_figures(data))]
    if parts[-1].status != "ok":
        return parts + [Part("finetune.py and evaluate.py, tiny model", "skipped: no prepared data")]
    runs = {engine: work / engine for engine in ("unsloth", "hf")}
    for engine, run_dir in runs.items():
        parts.append(run_part(f"finetune.py, tiny model, {engine} engine",
                              ["finetune.py", "--data", str(data), "--out", str(run_dir), "--engine", engine,
                               *TINY_TRAIN], logs / f"finetune-{engine}.log", timeout, deadline,
                              lambda d=run_dir: finetune_figures(d)))
    trained = next((d for d, part in zip(runs.values(), parts[1:]) if part.status == "ok"), None)
    if trained is None:
        return parts + [Part("evaluate.py, tiny model", "skipped: no finished training run")]
    parts.append(run_part(f"evaluate.py, tiny model, base against the {trained.name} run",
                          ["evaluate.py", "--data", str(data), "--base", "tiny", "--finetuned", str(trained),
                           "--out", str(evaluation), "--bertscore-model", "minilm", "--limit", "8",
                           "--max-new-tokens", "24"], logs / "evaluate.log", timeout, deadline,
                          lambda: evaluate_figures(evaluation)))
    return parts


# ------------------------------------------------------------------------------------------------------- Figures

def prepare_figures(data: Path) -> str:
    counts = {split: len((data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines())
              for split in ("train", "val", "test")}
    return ", ".join(f"{n} {split}" for split, n in counts.items()) + " records"


def finetune_figures(run_dir: Path) -> str:
    info = json.loads((run_dir / "run_info.json").read_text(encoding="utf-8"))
    return (f"{info['precision']}, best val loss {info['best_val_loss']:.3f}, {info['train_tokens_per_s']:.0f} "
            f"tokens/s, peak {info['peak_memory_gib']:.2f} GiB")


def evaluate_figures(evaluation: Path) -> str:
    metrics = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
    means = {name: system["means"].get("bertscore_f1") for name, system in metrics["systems"].items()}
    scores = ", ".join(f"{name} {value:.3f}" for name, value in means.items() if value is not None)
    return f"{metrics['n_examples']} test prompts; BERTScore F1 (MiniLM) {scores}"


def bench_rows(bench_json: Path) -> dict[str, dict[str, Any]]:
    """The bench's one measurement of each engine."""
    bench = json.loads(bench_json.read_text(encoding="utf-8"))
    return {runs[0]["engine"]: runs[0] for runs in bench["runs"].values() if runs}


def bench_figures(bench_json: Path) -> str:
    rows = bench_rows(bench_json)
    figures = [f"{engine}: {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%}, peak {r['peak_memory_gib']:.2f} GiB"
               if r.get("mfu") else f"{engine}: {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_memory_gib']:.2f} GiB"
               for engine, r in rows.items()]
    if {"unsloth", "hf"} <= rows.keys():
        u, h = rows["unsloth"], rows["hf"]
        figures.append(f"Unsloth {u['tokens_per_s'] / h['tokens_per_s']:.2f}x the tokens/s of hf, "
                       f"{u['peak_memory_gib'] / h['peak_memory_gib']:.0%} of its memory")
    return "; ".join(figures)


def estimate_rows(bench_json: Path) -> list[Part]:
    """The preflight's estimate for the bench's settings against the peak it measured, per engine. The estimate's
    CUDA context is left out: the bench measures the allocator's peak (torch.cuda.max_memory_allocated)."""
    import finetune

    arch, source = preflight.architecture(models.DEFAULT_MODEL)
    measured = bench_rows(bench_json) if bench_json.is_file() else {}
    parts = []
    for engine in ("unsloth", "hf"):
        name = f"preflight estimate against the bench's peak, {engine}"
        args = finetune.parse(["--data", "-", "--out", "-", "--engine", engine, "--batch-size", str(BENCH_BATCH),
                               "--max-seq-length", str(BENCH_SEQ), "--load-in-4bit"])
        parts_gb = preflight.estimate_for(arch, args)
        tensors = (sum(parts_gb.values()) - parts_gb["CUDA context and workspace"]) / preflight.GB
        if engine not in measured:
            parts.append(Part(name, "no measurement (the bench did not finish)",
                              f"estimate {tensors:.2f} GB of tensors"))
            continue
        peak = measured[engine]["peak_memory_gib"] * 2**30 / preflight.GB
        parts.append(Part(name, "ok", f"estimate {tensors:.2f} GB of tensors, measured {peak:.2f} GB "
                                      f"({tensors / peak - 1:+.0%}); {source}"))
    return parts


def render(lines: list[str], parts: list[Part]) -> str:
    """The header lines and one markdown table, ready to paste."""
    rows = ["| part | result | figures | seconds |", "| --- | --- | --- | ---: |"]
    for p in parts:
        cells = [p.name, p.status, p.figures, f"{p.seconds:.0f}" if p.seconds is not None else "-"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    run_script(main)
