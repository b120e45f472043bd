#!/usr/bin/env python
"""Training against the machine's limit: tokens/s, MFU and padding waste of each engine and of each change that cuts
waste, before and after, on the same machine in one run.

    python -m bench.train_bench --model smollm2                  # CPU: every group below, 3 repeats
    python -m bench.train_bench --model smollm2 --groups threads --repeats 1
    python -m bench.train_bench --full-size                      # GPU: Mistral-7B architecture, 4-bit, 2 x 2048

Groups, each row a process of its own through finetune.py's loading and trainer code:
- engines: unsloth and hf side by side in the same precision, 4-bit on and off for each (bf16 rows only where the
  CPU computes bf16 natively); the 4-bit column says what was loaded, not what was asked for;
- checkpointing: gradient checkpointing on (the recomputation costs a forward pass of every layer) and off;
- batching: padded batches in random order (before) and batches of similar lengths (TRL's group_by_length);
- attention: transformers' `sdpa` attention (before: torch's fused CPU kernel) and its eager attention (after);
- compile: the decoder layers run op by op (before) and compiled by torch.compile (after; howto.device.compile_layers);
- threads: alone with OMP_WAIT_POLICY=PASSIVE (the loop's) and with OpenMP's default wait policy (spinning), then
  beside one busy process (a pure-Python loop on one core) with the default policy, with PASSIVE, and with PASSIVE
  and one thread fewer.
Rows differ from the CPU loop's own settings (howto.device.cpu_plan, the "loop" row) in one thing only.

The data are the bundled records (data/howto_steps.jsonl) in the model's chat format, so lengths and padding are the
loop's own. Tokens per second count useful (non-padding) tokens over the optimizer steps after the warm-up. MFU is
howto.flops' model FLOPs of those tokens over the peak: on a CPU a dense matmul of the run's dtype measured in the
same process, on the same threads, just before and just after training (the higher is used, both are shown), so a
machine busy throughout slows both sides of the ratio while a moment of contention during one measurement does not
inflate MFU; on a GPU the rated peak. HFU adds the recomputation of checkpointing. Padding
waste is the share of computed token positions that were padding. The warm-up column is the time from the start of
training to the end of the warm-up steps (the untrained model's evaluation included), where torch.compile builds its
kernels (Inductor caches them on disk, so only the first compiling row of a machine pays the full build;
finetune.py's first run pays it too). Peak memory is the GPU's peak allocation, or the process's peak resident
memory on a CPU.

`--full-size` builds a Mistral-7B-architecture model (MistralConfig of Mistral-7B-v0.3: hidden 4096, 32 layers,
32 heads, 8 KV heads, MLP 14336, vocabulary 32768) with random weights once, in bf16, into the model cache; both
engines then load it in 4-bit as they would the real model, at batch 2 x 2048 on synthetic full-length sequences.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

import finetune
from howto import device, flops, models, runtime
from howto.preflight import Architecture
from howto.runio import atomic_dir, library_versions, write_json

ROOT = Path(__file__).resolve().parents[1]

ENGINES = ("unsloth", "hf")
GROUPS = ("engines", "checkpointing", "batching", "attention", "compile", "threads")
DATA = ROOT / "data" / "howto_steps.jsonl"
TARGET_SPEEDUP = 1.8
TARGET_MEMORY_SHARE = 0.60
TARGET_CPU_MFU = 0.40
T4_GIB = 16e9 / 2**30  # a "16 GB" T4 holds 14.9 GiB
FULL_SIZE = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                 sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
BUSY_LOOP = "while True: pass"

console = Console()
if not console.is_terminal:
    console = Console(width=200)  # a log file: the whole table on one line a row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model for every row: smollm2, tiny, a folder or a hub id")
    p.add_argument("--full-size", action="store_true",
                   help="GPU: a random-weight Mistral-7B-architecture model in 4-bit (built once into the cache)")
    p.add_argument("--groups", default=",".join(GROUPS), help="comma-separated groups of rows to measure")
    p.add_argument("--repeats", type=int, default=3, help="times each row is measured; tables give the range")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (default 2 full-size, "
                                                                "else 4)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per row, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the timing")
    p.add_argument("--seq-len", type=int, default=2048, help="--full-size: tokens per synthetic sequence")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one row's case as JSON, measured in this process
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    options = build_parser().parse_args(argv)
    runtime.setup()
    if options.worker:
        result = measure(json.loads(options.worker), options)
        print("\nRESULT=" + json.dumps(result), flush=True)  # on a line of its own, after the trainer's display
        return
    check_options(options)
    options.batch_size = options.batch_size or (2 if options.full_size else 4)
    model_path, label = bench_model(options)
    cases = plan_cases(options)

    def save(runs: dict[str, list[dict]], summary: dict[str, Any]) -> None:
        if options.json:
            write_json(options.json, {"model": model_path, "label": label, "cases": cases, "runs": runs, **summary,
                                      "machine": machine(), "versions": library_versions()})

    runs = run_all(cases, model_path, options, save)
    save(runs, report(cases, runs, label, options))


def check_options(options: argparse.Namespace) -> None:
    if options.steps <= options.warmup_steps:
        raise SystemExit("error: --steps must be larger than --warmup-steps")
    unknown = set(options.groups.split(",")) - set(GROUPS)
    if unknown:
        raise SystemExit(f"error: --groups: unknown {', '.join(sorted(unknown))} (choose from {', '.join(GROUPS)})")
    if options.full_size and not models.has_cuda():
        raise SystemExit("error: --full-size needs a CUDA GPU; on a CPU, benchmark the tiny or smollm2 model")


def machine() -> dict[str, Any]:
    """The CPU model and cores, and the GPU if any: a time means little without them."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "gpu": torch_gpu_name()}


def torch_gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------------- The rows

def bench_model(options: argparse.Namespace) -> tuple[str, str]:
    if options.full_size:
        return build_full_size_model(), "Mistral-7B architecture (random weights), 4-bit"
    if options.model == "tiny":
        console.print("[yellow]--model tiny: random weights, a 64-wide model; the numbers show the plumbing, "
                      "not what Unsloth does for a 7B model on a GPU.[/]")
    return models.resolve_model(options.model), options.model


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


def plan_cases(options: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row: the loop's own settings with one thing changed. Identical rows of two groups run once."""
    if options.full_size:
        gpu = {"threads": None, "wait_policy": None, "busy": False, "checkpointing": None, "batching": "full",
               "four_bit": True}
        return [{**gpu, "group": "engines", "label": engine, "engine": engine,
                 "precision": models.choose_precision(engine)[0]} for engine in ENGINES]
    plan = device.cpu_plan()
    loop = {"group": "loop", "label": "after: the CPU loop's settings (device.cpu_plan)", "engine": plan["engine"],
            "precision": plan["precision"], "four_bit": plan["four_bit"], "checkpointing": False,
            "batching": "grouped", "attention": plan["attention"], "compile": plan["compile"],
            "threads": plan["threads"], "wait_policy": "PASSIVE", "busy": False}
    # Unsloth picks bf16 by the same CPU flags as cpu_plan (unsloth_zoo.cpu.runtime.cpu_bf16_supported)
    before = {**loop, "label": "before: Unsloth's CPU fallback, checkpointing, random order, sdpa, not compiled, "
                               "default threads",
              "engine": "unsloth", "precision": plan["precision"], "checkpointing": True,
              "batching": "random", "attention": "sdpa", "compile": False, "wait_policy": None}
    cases = [loop, before]
    groups = options.groups.split(",")
    if "engines" in groups:
        precisions = ["fp32", "bf16"] if device.cpu_has_native_bf16() else ["fp32"]
        # finetune.py's hf engine loads full-precision weights on a CPU (its 4-bit is bitsandbytes' CUDA path), so
        # 4-bit on a CPU is Unsloth's row alone
        cases += [{**loop, "group": "engines", "label": f"{engine}, {precision}, {'4-bit' if four_bit else 'no 4-bit'}",
                   "engine": engine, "precision": precision, "four_bit": four_bit,
                   "compile": loop["compile"] and engine == "hf"}  # finetune.py compiles the hf engine's layers
                  for precision in precisions for four_bit in (False, True) for engine in ENGINES
                  if not (four_bit and engine == "hf")]
    if "checkpointing" in groups:
        cases.append({**loop, "group": "checkpointing", "label": "gradient checkpointing on (before)",
                      "checkpointing": True})
    if "batching" in groups:
        cases.append({**loop, "group": "batching", "label": "random order, padded (before)", "batching": "random"})
    if "attention" in groups:
        cases.append({**loop, "group": "attention", "label": "sdpa attention (before)", "attention": "sdpa"})
    if "compile" in groups:
        cases.append({**loop, "group": "compile", "label": "layers not compiled (before)", "compile": False})
    if "threads" in groups:
        busy = {**loop, "group": "threads", "busy": True}
        cases += [{**loop, "group": "threads", "label": "alone: OMP_WAIT_POLICY=PASSIVE (the loop's)"},
                  {**loop, "group": "threads", "label": "alone: default wait policy (spinning)", "wait_policy": None},
                  {**busy, "label": "busy core: default wait policy (spinning)", "wait_policy": None},
                  {**busy, "label": "busy core: OMP_WAIT_POLICY=PASSIVE"},
                  {**busy, "label": f"busy core: PASSIVE, {max(1, plan['threads'] - 1)} thread(s)",
                   "threads": max(1, plan["threads"] - 1)}]
    return cases


def case_key(case: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in case.items() if k not in ("group", "label")}, sort_keys=True)


def run_all(cases: list[dict[str, Any]], model_path: str, options: argparse.Namespace,
            save: Callable[[dict[str, list[dict]], dict[str, Any]], None]) -> dict[str, list[dict]]:
    """Each distinct row `--repeats` times, the repeats interleaved so that a change in the machine's load touches
    every row alike; the measurements so far are saved after each row."""
    distinct = {case_key(c): c for c in cases}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in distinct}
    for repeat in range(1, options.repeats + 1):
        for key, case in distinct.items():
            console.print(f"[{repeat}/{options.repeats}] {case['group']}: {case['label']} ...")
            runs[key].append(run_worker(case, model_path, options))
            save(runs, {})
    return runs


def run_worker(case: dict[str, Any], model_path: str, options: argparse.Namespace) -> dict[str, Any]:
    """One row in a fresh process (Unsloth patches what it is imported before; OpenMP reads its settings once)."""
    command = [sys.executable, "-m", "bench.train_bench", "--worker", json.dumps(case), "--model-path",
               model_path, "--batch-size", str(options.batch_size), "--steps", str(options.steps),
               "--warmup-steps", str(options.warmup_steps), "--seq-len", str(options.seq_len),
               *(["--full-size"] if options.full_size else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    # An empty value is OpenMP's own default (it notes the value as invalid on stderr), and one that
    # howto.runtime.setup, which sets PASSIVE where the variable is unset, leaves alone.
    env["OMP_WAIT_POLICY"] = case["wait_policy"] or ""
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if case["busy"] else None
    if busy is not None:
        time.sleep(1.0)  # running before the worker starts, as a competing program would be
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT=")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"error: {case['label']}: the run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT="))


# --------------------------------------------------------------------------------------------- One row, measured

def bench_records(tokenizer: Any, options: argparse.Namespace, vocab: int) -> list[dict[str, list[int]]]:
    """Every usable bundled record in the model's chat format, so that batches grouped by length are grouped among
    as many records as in the loop; --full-size: random full-length sequences, one batch a step."""
    from howto import chat
    from howto.records import RecordError, read_records, to_record

    if options.full_size:
        import torch

        n = options.steps * options.batch_size
        ids = torch.randint(3, vocab, (n, options.seq_len), generator=torch.Generator().manual_seed(0)).tolist()
        prompt = options.seq_len // 4
        return [{"input_ids": row, "completion_mask": [0] * prompt + [1] * (options.seq_len - prompt)} for row in ids]
    encoded = []
    for raw in read_records(DATA):
        try:
            record = to_record(raw)[0]
        except RecordError:
            continue  # prepare_data.py drops these too
        encoded.append(chat.encode_example(tokenizer, record["prompt"], record["response"]))
    return encoded


def measure(case: dict[str, Any], options: argparse.Namespace) -> dict[str, Any]:
    """One row, in this process: finetune.py's loader and trainer, timed over the steps after the warm-up, between
    two measurements of the peak."""
    finetune.import_engine(case["engine"])  # Unsloth before transformers, trl and peft
    import torch
    from datasets import Dataset

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        args = finetune.parse(["--data", tmp, "--out", tmp, "--engine", case["engine"], "--model", options.model_path,
                               "--batch-size", str(options.batch_size), "--grad-accum", "1", "--epochs", "1",
                               "--patience", "0", "--warmup-ratio", "0", "--max-seq-length",
                               str(options.seq_len if options.full_size else 384),
                               "--load-in-4bit" if case["four_bit"] else "--no-load-in-4bit",
                               *({True: ["--compile"], False: ["--no-compile"]}.get(case.get("compile"), []))])
        tokenizer = models.load_tokenizer(options.model_path)
        finetune.set_pad_token(tokenizer)
        records = bench_records(tokenizer, options, tokenizer.vocab_size)
        train = Dataset.from_list(records)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        model = finetune.load_model(args, options.model_path, case["precision"])
        if case["checkpointing"] is not None:  # None: as the loader chose (Unsloth's own on a GPU)
            set_checkpointing(model, case["checkpointing"])
        if case.get("attention"):  # None on a GPU: as the loader chose
            model.set_attn_implementation(case["attention"])
        trainer = finetune.build_trainer(model, tokenizer, train, train.select(range(1)), args, Path(tmp),
                                         case["precision"])
        trainer.args.train_sampling_strategy = "group_by_length" if case["batching"] == "grouped" else "random"
        batches = flops.watch_batches(trainer)
        timer = step_timer(options.steps)
        trainer.add_callback(timer)
        peak_before, peak_source = peak_rates(case["precision"])
        trainer.train()
        peak_after, _ = peak_rates(case["precision"])
        arch = Architecture.from_config(model.config.to_dict())
        result = row_result(case, args, arch, batches, timer.marks, options.warmup_steps, peak_before, peak_after,
                            peak_source, loaded_in_4bit(model))
        return {**result, "warmup_s": timer.marks[options.warmup_steps - 1][0] - timer.begin}


def peak_rates(precision: str) -> tuple[dict[str, float | None], str]:
    """The peak in FLOP/s (rated on a GPU, measured on a CPU) and, on a CPU, in FLOPs per CPU-second."""
    import torch

    if torch.cuda.is_available():
        peak, source = flops.peak_flops(precision)
        return {"wall": peak, "cpu": None}, source
    wall, cpu = flops.measured_peak_flops(precision)
    return {"wall": wall, "cpu": cpu}, f"{precision} matmul measured on {torch.get_num_threads()} thread(s)"


def set_checkpointing(model: Any, on: bool) -> None:
    """Gradient checkpointing as the row asks, whatever the loader chose (transformers' own, non-reentrant)."""
    if on and not model.is_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    elif not on and model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()


def loaded_in_4bit(model: Any) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def step_timer(steps: int) -> Any:
    """Wall and process CPU time when training begins and at the end of every optimizer step; training stops after
    `steps`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = 0.0
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))
            control.should_training_stop = state.global_step >= steps

    return StepTimer()


def row_result(case: dict[str, Any], args: argparse.Namespace, arch: Architecture, batches: list[dict[str, Any]],
               marks: list[tuple[float, float]], warmup: int, peak_before: dict[str, float | None],
               peak_after: dict[str, float | None], peak_source: str, four_bit: bool) -> dict[str, Any]:
    """The timed steps' figures. cpu_share: the CPU time the process got over what its threads could have had;
    mfu_cpu_time: MFU per second of CPU time the process got, against the matmul's, which other processes on the
    machine do not change (spinning threads do count: their CPU time is spent, not computed)."""
    import torch

    timed = batches[warmup:len(marks)]
    (wall0, cpu0), (wall1, cpu1) = marks[warmup - 1], marks[-1]
    seconds, cpu_seconds = wall1 - wall0, cpu1 - cpu0
    peak = flops.higher_peak(peak_before["wall"], peak_after["wall"])
    use = flops.usage(arch, timed, seconds, args.lora_r, args.target_modules, case["checkpointing"] is not False, peak)
    peak_cpu = flops.higher_peak(peak_before["cpu"], peak_after["cpu"])
    model_flops = use["flops_per_s"] * seconds
    return {
        **case, **use, "four_bit_loaded": four_bit, "threads_used": torch.get_num_threads(),
        "tokens_per_s": sum(sum(b["lengths"]) for b in timed) / seconds, "s_per_step": seconds / len(timed),
        "cpu_share": cpu_seconds / (seconds * torch.get_num_threads()),
        "mfu_cpu_time": model_flops / cpu_seconds / peak_cpu if peak_cpu else None,
        "peak_flops_per_s": peak, "peak_before": peak_before, "peak_after": peak_after, "peak_source": peak_source,
        "peak_memory_gib": finetune.peak_memory_gib(), "measured_steps": len(timed),
        "load_average_1min": os.getloadavg()[0], "gpu": torch_gpu_name(),
    }


# ------------------------------------------------------------------------------------------------------- Report

def spread(values: list[float], fmt: str) -> str:
    """One value, or the median with the range over the repeats."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(cases: list[dict[str, Any]], runs: dict[str, list[dict]], label: str,
           options: argparse.Namespace) -> dict[str, Any]:
    first = next(iter(runs.values()))[0]
    on_gpu = bool(first["gpu"])
    where = first["gpu"] or f"{machine()['cpu']}, {os.cpu_count()} cores"
    loads = [r["load_average_1min"] for rs in runs.values() for r in rs]
    title = (f"Training: {label}, batch {options.batch_size}, {options.steps - options.warmup_steps} timed steps, "
             f"{where}; median (range) over {options.repeats} repeat(s)")
    table = Table(title=title, title_justify="left")
    for column in ("group", "row", "engine", "precision", "4-bit", "ckpt", "tokens/s", "MFU", "HFU", "padding",
                   "peak GFLOP/s", "CPU share", "MFU of CPU time", "peak mem GiB", "warm-up s"):
        table.add_column(column, justify="left" if column in ("group", "row", "engine", "precision") else "right")
    summary: dict[str, Any] = {"rows": []}
    for case in cases:
        rs = runs[case_key(case)]
        row = {"group": case["group"], "label": case["label"],
               "tokens_per_s": [r["tokens_per_s"] for r in rs], "mfu": [r["mfu"] for r in rs if r["mfu"]],
               "padding_waste": [r["padding_waste"] for r in rs]}
        summary["rows"].append(row)
        peaks = [r["peak_flops_per_s"] / 1e9 for r in rs if r["peak_flops_per_s"]]
        table.add_row(case["group"], case["label"], case["engine"], case["precision"],
                      "yes" if rs[0]["four_bit_loaded"] else "no",
                      {True: "on", False: "off", None: "engine's"}[case["checkpointing"]],
                      spread(row["tokens_per_s"], ".1f"), spread(row["mfu"], ".1%") if row["mfu"] else "-",
                      spread([r["hfu"] for r in rs if r["hfu"]], ".1%") if row["mfu"] else "-",
                      spread(row["padding_waste"], ".1%"), spread(peaks, ".0f") if peaks else "-",
                      spread([r["cpu_share"] for r in rs], ".0%"),
                      spread([r["mfu_cpu_time"] for r in rs], ".1%") if rs[0]["mfu_cpu_time"] else "-",
                      spread([r["peak_memory_gib"] for r in rs], ".2f"),
                      spread([r["warmup_s"] for r in rs], ".1f"))
    console.print(table)
    console.print(f"Load average (1 min) during the rows: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores"
                  + (" [yellow](a busy machine: absolute figures are low, ratios such as MFU less so)[/]"
                     if max(loads) > (os.cpu_count() or 1) else ""))
    if on_gpu:
        summary.update(gpu_targets(runs, cases))
    else:
        loop = runs[case_key(cases[0])]
        mfu, per_cpu = (statistics.median(r[k] for r in loop) for k in ("mfu", "mfu_cpu_time"))
        verdict = "[green]met[/]" if mfu >= TARGET_CPU_MFU else "[red]missed[/]"
        console.print(f"Target: the CPU loop's settings at >= {TARGET_CPU_MFU:.0%} MFU: median {mfu:.1%}, {verdict} "
                      f"({per_cpu:.1%} of the CPU time the process got)")
    return summary


def gpu_targets(runs: dict[str, list[dict]], cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The GPU targets: Unsloth's speed-up and memory share against hf, and the 7B step within a T4's 16 GB."""
    by_engine = {c["engine"]: runs[case_key(c)] for c in cases if c["group"] == "engines"}
    u, h = by_engine["unsloth"], by_engine["hf"]
    speedup = statistics.median(r["tokens_per_s"] for r in u) / statistics.median(r["tokens_per_s"] for r in h)
    share = statistics.median(r["peak_memory_gib"] for r in u) / statistics.median(r["peak_memory_gib"] for r in h)
    peak = max(r["peak_memory_gib"] for r in u)
    targets = Table(title="GPU targets", title_justify="left")
    for column in ("target", "measured", "status"):
        targets.add_column(column)
    for text, value, met in (
            (f"Unsloth >= {TARGET_SPEEDUP}x the tokens/s of hf", f"{speedup:.2f}x", speedup >= TARGET_SPEEDUP),
            (f"Unsloth peak memory < {TARGET_MEMORY_SHARE:.0%} of hf", f"{share:.0%}", share < TARGET_MEMORY_SHARE),
            ("Mistral-7B QLoRA step, batch 2 x 2048, in 16 GB (14.9 GiB)", f"{peak:.2f} GiB", peak < T4_GIB)):
        targets.add_row(text, value, "[green]met[/]" if met else "[red]missed[/]")
    console.print(targets)
    return {"speedup": speedup, "memory_share": share}


if __name__ == "__main__":
    main()
