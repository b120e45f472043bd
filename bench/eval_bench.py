"""How fast evaluation runs: scored examples per second for the metrics alone, generation throughput batched
versus one prompt at a time, and how much of a batch's work is useful when answers end at different lengths.

    python -m bench.eval_bench                       # 1,000 pairs, 16 prompts on the tiny model, 32 on SmolLM2
    python -m bench.eval_bench --pairs 200 --prompts 8 --straggler-prompts 0
    python -m bench.eval_bench --straggler-adapter runs/smollm2   # stragglers of a fine-tuned SmolLM2

Metrics: BERTScore and the step encoder are all-MiniLM-L6-v2 (the offline settings); the 1,000 pairs are made from
the bundled dataset's references, with steps dropped, shuffled or reversed, so outputs and references differ as they
do in a real run. Model loading is timed apart. Generation: the tiny random-weight model by default, greedy; its
answers are all `--max-new-tokens` long (random weights never emit the end-of-sequence token), so both modes do the
same work. A real model (`--model smollm2`) stops answers early, and a batch runs until its longest answer ends.

Stragglers: SmolLM2, or a SmolLM2 run fine-tuned by finetune.py (`--straggler-adapter`; its answers end when the
steps do, the base model's mostly run to the cap), answers bundled prompts in batches of each of
`--straggler-batch-sizes` (on a CPU a decoding step costs mostly one read of the weights, whatever the batch), at most
160 new tokens (the CPU profile's cap), once with the prompts in the order evaluate.py used before (by prompt
length) and once in its order now (by the reference answer's length). A batch computes a token for every row at
every step until its longest answer ends, so the useful share is the tokens answered over rows x steps. The share
is a property of the greedy answers, the same on any machine; the times are not.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from howto import runtime
from howto.chat import render_steps
from howto.generate import generate_batch
from howto.metrics import METRICS, BertScore, StepEncoder, paired_comparison, score_examples
from howto.models import load_for_generation

# Plain greedy decoding, without the repeat penalty evaluate.py applies by default: the figures in docs/benchmarks.md
# were measured so, and the straggler shares are properties of those greedy answers.
GREEDY = 1.0

ROOT = Path(__file__).resolve().parents[1]


def synthetic_pairs(n: int, seed: int) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Prompts, outputs and references: each output is its reference kept, reversed, shuffled or cut short."""
    records = [json.loads(line) for line in (ROOT / "data" / "howto_steps.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    prompts, outputs, references = [], [], []
    for i in range(n):
        record = records[i % len(records)]
        steps = list(record["response"])
        kind = rng.choice(["same", "reversed", "shuffled", "dropped"])
        if kind == "reversed":
            steps.reverse()
        elif kind == "shuffled":
            rng.shuffle(steps)
        elif kind == "dropped":
            steps = [s for s in steps if rng.random() > 0.4]
        prompts.append(record["prompt"])
        outputs.append(steps)
        references.append(record["response"])
    return prompts, outputs, references


def bench_metrics(n: int, seed: int) -> list[tuple[str, str, str]]:
    _, outputs, references = synthetic_pairs(n, seed)
    began = time.perf_counter()
    bertscore, encoder = BertScore("minilm", 6), StepEncoder("minilm")
    load = time.perf_counter() - began
    began = time.perf_counter()
    rows = score_examples(outputs, references, bertscore, encoder)
    scoring = time.perf_counter() - began
    began = time.perf_counter()
    for metric in METRICS:
        values = [r[metric] for r in rows]
        paired_comparison(values, values[::-1], n_resamples=2000, seed=seed)
    stats = time.perf_counter() - began
    return [
        ("metrics: load BERTScore + step encoder (minilm)", f"{load:.1f} s", ""),
        (f"metrics: score {n} pairs (BERTScore + alignment + order)", f"{scoring:.1f} s",
         f"{n / scoring:.0f} examples/s"),
        (f"paired bootstrap (2000) + Wilcoxon, {len(METRICS)} metrics x {n} prompts", f"{stats:.2f} s", ""),
    ]


def bench_generation(model: str, n_prompts: int, max_new_tokens: int, batch_size: int,
                     repeats: int) -> list[tuple[str, str, str]]:
    """Each mode `repeats` times, interleaved, keeping the fastest: on a shared machine the slower runs measure the
    neighbours, not the code."""

    lm, tokenizer = load_for_generation(model)
    prompts = synthetic_pairs(n_prompts, 0)[0]
    generate_batch(lm, tokenizer, prompts[:2], max_new_tokens, repeat_penalty=GREEDY)  # warm-up
    results: dict[str, tuple[int, float]] = {}
    for _ in range(repeats):
        for label, size in (("one prompt at a time", 1), (f"batched ({batch_size}, left-padded)", batch_size)):
            began = time.perf_counter()
            tokens = 0
            for start in range(0, len(prompts), size):
                tokens += sum(n for _, n in generate_batch(lm, tokenizer, prompts[start : start + size],
                                                                     max_new_tokens, repeat_penalty=GREEDY))
            seconds = time.perf_counter() - began
            if label not in results or seconds < results[label][1]:
                results[label] = (tokens, seconds)
    rows = [(f"generation, {model}: {label}", f"{seconds:.1f} s for {tokens} tokens",
             f"{tokens / seconds:.0f} tok/s") for label, (tokens, seconds) in results.items()]
    (one_t, one_s), (many_t, many_s) = results.values()
    rows.append(("generation: batched / one at a time", "", f"{(many_t / many_s) / (one_t / one_s):.2f}x"))
    return rows


def bench_stragglers(n_prompts: int, batch_sizes: list[int], adapter: str | None,
                     max_new_tokens: int = 160) -> list[tuple[str, str, str]]:
    """Useful tokens over computed tokens (rows x steps of each batch), prompts ordered the old way and the new, for
    each batch size (one batch of every prompt has no order to choose)."""

    records = [json.loads(line) for line in (ROOT / "data" / "howto_steps.jsonl").read_text().splitlines()]
    records = records[:: max(1, len(records) // n_prompts)][:n_prompts]
    lm, tokenizer = load_for_generation("smollm2", adapter=adapter)
    model = "smollm2 + adapter" if adapter else "smollm2"
    orders = {"by prompt length (before)": lambda r: len(r["prompt"]),
              "by reference length (now)": lambda r: len(render_steps(r["response"]))}
    rows = []
    for batch_size, (label, key) in itertools.product(batch_sizes, orders.items()):
        if batch_size >= len(records) and label == "by prompt length (before)":
            continue
        todo = sorted(records, key=key)
        useful = computed = 0
        began = time.perf_counter()
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            lengths = [n for _, n in generate_batch(lm, tokenizer, [r["prompt"] for r in batch], max_new_tokens,
                                                    repeat_penalty=GREEDY)]
            steps = [min(n + 1, max_new_tokens) for n in lengths]  # an answer that ends spends a step on its end
            useful += sum(steps)
            computed += len(batch) * max(steps)  # every row runs until the batch's longest answer ends
        seconds = time.perf_counter() - began
        rows.append((f"stragglers, {model}, {len(todo)} prompts in batches of {batch_size}: {label}",
                     f"{seconds:.1f} s, {useful} of {computed} tokens useful",
                     f"{useful / computed:.0%} useful, {useful / seconds:.1f} useful tok/s"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000, help="synthetic output/reference pairs to score")
    parser.add_argument("--model", default="tiny", help="model for the generation bench: tiny, smollm2, or a path")
    parser.add_argument("--prompts", type=int, default=16, help="prompts generated in each generation mode")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch in the batched mode")
    parser.add_argument("--repeats", type=int, default=3, help="generation runs per mode; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic pairs")
    parser.add_argument("--straggler-prompts", type=int, default=32,
                        help="bundled prompts SmolLM2 answers in the straggler bench; 0 skips it")
    parser.add_argument("--straggler-batch-sizes", default="8,32",
                        help="comma-separated batch sizes of the straggler bench (the CPU profile answers all 34 test "
                             "prompts in one batch)")
    parser.add_argument("--straggler-adapter", help="a finetune.py run folder of SmolLM2 whose adapter answers in the "
                                                    "straggler bench (its answers end; the base model's ramble)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bench's models are local: never wait on the hub
    runtime.setup()
    import torch

    rows = bench_metrics(args.pairs, args.seed) + bench_generation(args.model, args.prompts, args.max_new_tokens,
                                                                     args.batch_size, args.repeats)
    if args.straggler_prompts:
        sizes = [int(size) for size in args.straggler_batch_sizes.split(",")]
        rows += bench_stragglers(args.straggler_prompts, sizes, args.straggler_adapter)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    table = Table(title=f"evaluate.py speed ({'GPU' if torch.cuda.is_available() else 'CPU'}, "
                        f"{torch.get_num_threads()} threads{load})")
    for column, justify in (("what", "left"), ("time", "right"), ("rate", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
