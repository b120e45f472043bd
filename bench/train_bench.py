#!/usr/bin/env python
"""Training throughput and peak memory: the Unsloth path against plain transformers + peft, same model and data.

    python bench/train_bench.py                          # CPU: the tiny model (numbers show the plumbing only)
    python bench/train_bench.py --model smollm2          # CPU: a real 135M model
    python bench/train_bench.py --full-size              # GPU: Mistral-7B architecture, 4-bit, batch 2 x 2048

Each engine runs in a process of its own (Unsloth patches the libraries it is imported before, and peak memory is
per process) through finetune.py's own loading and trainer code, on the same fixed-length random token sequences.
Tokens per second are timed over optimizer steps after a few warm-up steps (kernel autotuning, allocator growth);
peak memory is the GPU's peak allocation, or the process's peak resident memory on a CPU.

`--full-size` builds a Mistral-7B-architecture model (MistralConfig of Mistral-7B-v0.3: hidden 4096, 32 layers,
32 heads, 8 KV heads, MLP 14336, vocabulary 32768) with random weights once, in bf16, into the model cache; both
engines then load it in 4-bit as they would the real model. Speed and memory do not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402
from howto import models  # noqa: E402
from howto.runio import atomic_dir, library_versions, write_json  # noqa: E402

ENGINES = ("unsloth", "hf")
TARGET_SPEEDUP = 1.8
TARGET_MEMORY_SHARE = 0.60
T4_GIB = 16e9 / 2**30  # a "16 GB" T4 holds 14.9 GiB
FULL_SIZE = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                 sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

console = Console()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="model for both paths: tiny, smollm2, a folder or a hub id")
    p.add_argument("--full-size", action="store_true",
                   help="GPU: a random-weight Mistral-7B-architecture model in 4-bit (built once into the cache)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048 full-size, else 256)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step (the T4 recipe's 2)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per engine, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--engines", default="unsloth,hf", help="comma-separated engines to measure")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)  # one engine's measurement, in its process
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    return p


def build_full_size_model() -> str:
    """The 7B-architecture model with random weights, saved once (about 14.5 GB of bf16 safetensors)."""

    def build(folder: Path) -> None:
        import torch
        from transformers import MistralConfig, MistralForCausalLM

        console.print("building a random-weight Mistral-7B-architecture model once (about 14.5 GB) ...")
        torch.manual_seed(0)
        roomy_gpu = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 24 * 2**30
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 14.5 GB rather than 29 GB in fp32
        try:
            with torch.device("cuda" if roomy_gpu else "cpu"):
                model = MistralForCausalLM(MistralConfig(**FULL_SIZE))
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(folder, max_shard_size="5GB")
        del model
        torch.cuda.empty_cache()  # the measuring processes need the GPU to themselves
        models.save_mistral_tokenizer(folder)
        (folder / "README.md").write_text("Mistral-7B-v0.3 architecture with RANDOM weights, for benchmarks only.\n")

    return str(atomic_dir(models.cache_dir() / "mistral-7b-arch-random", build))


def synthetic_dataset(vocab: int, n: int, seq_len: int) -> Any:
    """Fixed-length random sequences, the first quarter prompt (no loss), the rest assistant tokens."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq_len), generator=generator).tolist()
    prompt = seq_len // 4
    return Dataset.from_list([{"input_ids": row, "completion_mask": [0] * prompt + [1] * (seq_len - prompt)}
                              for row in ids])


def step_timer() -> Any:
    """Time and tokens seen at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepTimer()


def measure(engine: str, model_path: str, seq_len: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """One engine, in this process: finetune.py's loader and trainer, timed over steps after the warm-up."""
    finetune.import_engine(engine)  # Unsloth before transformers, trl and peft
    import torch

    with tempfile.TemporaryDirectory(prefix=f"bench-{engine}-") as tmp:
        args = finetune.parse(["--data", tmp, "--out", tmp, "--engine", engine, "--model", model_path,
                               "--batch-size", str(batch), "--grad-accum", "1", "--max-seq-length", str(seq_len),
                               "--epochs", "1", "--patience", "0", "--warmup-ratio", "0"])
        tokenizer = models.load_tokenizer(model_path)
        train = synthetic_dataset(tokenizer.vocab_size, steps * batch, seq_len)
        precision, why = finetune.choose_precision(engine)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        model = finetune.load_model(args, model_path, precision)
        trainer = finetune.build_trainer(model, tokenizer, train, train.select(range(1)), args, Path(tmp), precision)
        timer = step_timer()
        trainer.add_callback(timer)
        trainer.train()
        (t0, n0), (t1, n1) = timer.marks[warmup - 1], timer.marks[-1]
        return {
            "engine": engine, "precision": precision, "precision_reason": why,
            "four_bit": bool(args.load_in_4bit and (engine == "unsloth" or torch.cuda.is_available())),
            "tokens_per_s": (n1 - n0) / (t1 - t0), "s_per_step": (t1 - t0) / (len(timer.marks) - warmup),
            "peak_memory_gib": finetune.peak_memory_gib(), "measured_steps": len(timer.marks) - warmup,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        }


def run_worker(engine: str, model_path: str, options: argparse.Namespace, seq_len: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--model-path", model_path,
               "--seq-len", str(seq_len), "--batch-size", str(options.batch_size), "--steps", str(options.steps),
               "--warmup-steps", str(options.warmup_steps)]
    console.print(f"measuring the {engine} path ...")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT=")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"error: the {engine} run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT="))


def verdict(met: bool, applies: bool) -> str:
    if not applies:
        return "[dim]GPU target[/]"
    return "[green]met[/]" if met else "[red]missed[/]"


def report(results: dict[str, dict[str, Any]], full_size: bool, label: str) -> dict[str, Any]:
    on_gpu = all(r["gpu"] for r in results.values())
    table = Table(title=f"Training throughput: {label}", title_justify="left")
    for column in ("path", "precision", "4-bit", "tokens/s", "s/step", "peak memory GiB"):
        table.add_column(column, justify="right" if column not in ("path", "precision") else "left")
    for engine, r in results.items():
        table.add_row(engine, r["precision"], "yes" if r["four_bit"] else "no", f"{r['tokens_per_s']:.1f}",
                      f"{r['s_per_step']:.3f}", f"{r['peak_memory_gib']:.2f}")
    summary: dict[str, Any] = {}
    if set(ENGINES) <= set(results):
        u, h = results["unsloth"], results["hf"]
        summary = {"speedup": u["tokens_per_s"] / h["tokens_per_s"],
                   "memory_share": u["peak_memory_gib"] / h["peak_memory_gib"]}
        table.add_section()
        table.add_row("unsloth / hf", "", "", f"{summary['speedup']:.2f}x", "", f"{summary['memory_share']:.0%}")
    console.print(table)

    targets = Table(title="Targets", title_justify="left")
    for column in ("target", "measured", "status"):
        targets.add_column(column)
    if summary:
        targets.add_row(f"Unsloth >= {TARGET_SPEEDUP}x the tokens/s of hf", f"{summary['speedup']:.2f}x",
                        verdict(summary["speedup"] >= TARGET_SPEEDUP, on_gpu))
        targets.add_row(f"Unsloth peak memory < {TARGET_MEMORY_SHARE:.0%} of hf", f"{summary['memory_share']:.0%}",
                        verdict(summary["memory_share"] < TARGET_MEMORY_SHARE, on_gpu))
    if "unsloth" in results:
        peak = results["unsloth"]["peak_memory_gib"]
        fits = "Mistral-7B QLoRA step, batch 2 x 2048, in 16 GB (14.9 GiB)"
        if full_size:
            targets.add_row(fits, f"{peak:.2f} GiB", verdict(peak < T4_GIB, on_gpu))
        else:
            targets.add_row(fits, "-", "[dim]needs --full-size on a GPU[/]")
    console.print(targets)
    if not on_gpu:
        console.print("[dim]On a CPU both paths fall back to CPU kernels (Unsloth's CPU fallback in bf16 and 4-bit, "
                      "hf in fp32): the GPU targets do not apply, and peak memory is the whole process's.[/]")
    return summary


def main(argv: list[str] | None = None) -> None:
    options = build_parser().parse_args(argv)
    if options.worker:
        result = measure(options.worker, options.model_path, options.seq_len, options.batch_size, options.steps,
                         options.warmup_steps)
        print("RESULT=" + json.dumps(result), flush=True)
        return
    if options.steps <= options.warmup_steps:
        raise SystemExit("error: --steps must be larger than --warmup-steps")
    if options.full_size:
        if not models.has_cuda():
            raise SystemExit("error: --full-size needs a CUDA GPU; on a CPU, benchmark the tiny or smollm2 model")
        model_path, label = build_full_size_model(), "Mistral-7B architecture (random weights), 4-bit"
    else:
        model_path, label = models.resolve_model(options.model), options.model
        if options.model == "tiny":
            console.print("[yellow]--model tiny: random weights, a 64-wide model; the numbers show the plumbing, "
                          "not what Unsloth does for a 7B model on a GPU.[/]")
    seq_len = options.seq_len or (2048 if options.full_size else 256)
    engines = [e.strip() for e in options.engines.split(",") if e.strip()]
    results = {engine: run_worker(engine, model_path, options, seq_len) for engine in engines}
    label += f", batch {options.batch_size} x {seq_len} tokens, {options.steps - options.warmup_steps} timed steps"
    summary = report(results, options.full_size, label)
    if options.json:
        write_json(options.json, {"model": model_path, "label": label, "results": results, **summary,
                                  "versions": library_versions()})


if __name__ == "__main__":
    main()
