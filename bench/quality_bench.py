"""Answer quality on data nobody on the team wrote: fine-tune on the Bitext customer-support records, then compare
the base and the fine-tuned model on the held-out prompts, looping answers included.

    python -m bench.quality_bench                          # ../shared/data/bitext_records.jsonl, the CPU loop
    python -m bench.quality_bench --max-train 0            # every training record (about 2,600: a long CPU run)
    python -m bench.quality_bench --data my.jsonl --config configs/t4.yaml --out runs/quality-t4

The three scripts run as a user runs them, each through its command line with `--config` (prepare_data.py,
finetune.py, evaluate.py with the forgetting probe, no export). The test split stays whole (about 320 prompts of
Bitext); the training split is cut to `--max-train` records drawn with the seed, since on two CPU cores an epoch of
all of it takes most of an hour. The table: base and fine-tuned means, the difference with its 95% paired bootstrap
CI for BERTScore F1, step-order accuracy, looping answers and step-count error, and the share of general questions
answered with a numbered list (the forgetting probe). Writes OUT/data, OUT/run, OUT/run/eval and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BITEXT = ROOT.parent / "shared" / "data" / "bitext_records.jsonl"
ROWS = {"bertscore_f1": "BERTScore F1", "order_accuracy": "step-order accuracy", "looping": "looping answers",
        "step_count_error": "step-count error"}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = Path(args.out)
    run_step("prepare_data.py", args.data, "--out", out / "data", "--config", args.config)
    cut_training_split(out / "data" / "train.jsonl", args.max_train, args.seed)
    run_step("finetune.py", "--data", out / "data", "--out", out / "run", "--config", args.config)
    run_step("evaluate.py", "--data", out / "data", "--finetuned", out / "run", "--out", out / "run" / "eval",
               "--config", args.config, "--no-parity")
    table = quality_table(json.loads((out / "run" / "eval" / "metrics.json").read_text(encoding="utf-8")))
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(BITEXT), help="records to prepare, train on and test on")
    p.add_argument("--out", default=str(ROOT / "runs" / "quality-bench"), help="output folder")
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"), help="run settings for all three scripts")
    p.add_argument("--max-train", type=int, default=800, help="training records kept (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training records kept")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (the Bitext records live in ../shared/data beside a clone)")
    return args


def run_step(script: str, *args: object) -> None:
    """One of the toolkit's scripts through its command line, its output shown as it runs."""
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"{script} failed: see its output above")


def cut_training_split(path: Path, keep: int, seed: int) -> None:
    """Keep `keep` training records drawn with the seed, in their file order (validation and test stay whole)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if 0 < keep < len(lines):
        chosen = sorted(random.Random(seed).sample(range(len(lines)), keep))
        path.write_text("".join(lines[i] for i in chosen), encoding="utf-8")
        print(f"training split cut to {keep} of {len(lines)} records")


def quality_table(metrics: dict) -> str:
    """The benchmark's Markdown table from evaluate.py's metrics.json."""
    comparison = metrics["comparisons"]["finetuned"]
    lines = [f"{metrics['n_paired']['finetuned']} paired test prompts; Δ = fine-tuned − base, 95% paired bootstrap CI.",
             "", "| metric | base | fine-tuned | Δ [95% CI] |", "|---|---|---|---|"]
    for key, label in ROWS.items():
        c = comparison[key]
        lines.append(f"| {label} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | {c['delta']:+.3f} "
                     f"[{c['ci_low']:.3f}, {c['ci_high']:.3f}] (n {c['n']}) |")
    probe = metrics.get("forgetting") or {}
    for key, label in (("over_formatting", "numbered list for a general question"),
                       ("correct", "correct short answer to a general question")):
        if probe.get(key):
            o = probe[key]
            lines.append(f"| {label} | {o['base']:.3f} | {o['finetuned']:.3f} | "
                         f"{o['delta']:+.3f} [{o['ci_low']:.3f}, {o['ci_high']:.3f}] (n {o['n']}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
