#!/usr/bin/env python
"""Time prepare_data.py's stages on N synthetic records, then on 2N, to show throughput and how it scales.

    python bench/prepare_bench.py --n 100000

The records have a wide vocabulary (made-up words and app names), a share of exact duplicates, near-duplicate
paraphrases and planted PII, so every stage does real work. The stages are prepare_data's own functions, called
in the script's order on a JSONL file in a temporary folder. Tokenization is timed apart, on a subset, because
its cost is the tokenizer's, not the pipeline's.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare_data as pd  # noqa: E402

CATEGORIES = {"shopping": 20, "banking": 15, "email": 12, "phone_settings": 10, "smart_home": 8, "travel": 8,
              "food_delivery": 8, "streaming": 7, "work_tools": 6, "social_media": 4, "government_services": 1,
              "health_fitness": 1}
OPENERS = ("How do I", "How can I", "What are the steps to", "how to", "Can you tell me how to", "I want to")
VERBS = ("reset", "change", "update", "delete", "add", "remove", "turn on", "turn off", "share", "export", "find",
         "cancel", "renew", "book", "set up", "block", "report", "download", "upload", "track", "pay", "link")
STEP_VERBS = ("Open", "Tap", "Select", "Go to", "Enter", "Choose", "Confirm", "Check", "Scroll to", "Press", "Type",
              "Toggle", "Review", "Save", "Wait for", "Sign in to")
SYLLABLES = ("ka", "lo", "mi", "ter", "shu", "ven", "dra", "po", "lix", "zen", "qua", "rin", "bel", "tor", "ny",
             "fa", "gor", "wel", "sta", "mup", "cri", "do", "hex", "jul", "ob", "pre", "sil", "tum", "vor", "yes")
CARDS = ("4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "6011 1111 1111 1117")
IBANS = ("GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "NL91ABNA0417164300", "FR1420041010050500013M02606")


def make_words(rng: random.Random, count: int, syllables: tuple[int, int]) -> list[str]:
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*syllables))))
    return sorted(words)


def plant_pii(rng: random.Random, text: str) -> str:
    kind = rng.randrange(7)
    value = [
        lambda: f"{rng.choice(('ana', 'budi', 'chen', 'dewi', 'eko'))}.{rng.randint(1, 999)}@example.com",
        lambda: f"+44 20 7946 0{rng.randint(100, 999)}",
        lambda: rng.choice(CARDS),
        lambda: rng.choice(IBANS),
        lambda: f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        lambda: f"https://user:pw{rng.randint(100, 999)}@files.example.com/share",
        lambda: f"{rng.randint(1, 999)} {rng.choice(('Maple', 'Oak', 'Harbor', 'Sunset'))} Street",
    ][kind]()
    return f"{text} using {value}"


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """n records: about 4% exact duplicates (some in another case), 5% paraphrases, 3% with PII."""
    rng = random.Random(seed)
    vocab = make_words(rng, 20000, (2, 4))
    apps = [w.capitalize() for w in make_words(rng, 800, (2, 3))]
    categories, weights = zip(*CATEGORIES.items())
    records: list[dict] = []
    for _ in range(n):
        roll = rng.random()
        if records and roll < 0.04:
            twin = dict(rng.choice(records))
            if rng.random() < 0.5:
                twin["prompt"] = twin["prompt"].upper()
            records.append(twin)
            continue
        if records and roll < 0.09:
            original = rng.choice(records)
            words = original["prompt"].split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            records.append({**original, "prompt": " ".join(words)})
            continue
        app = rng.choice(apps)
        prompt = f"{rng.choice(OPENERS)} {rng.choice(VERBS)} my {' '.join(rng.sample(vocab, 2))} in {app}?"
        steps = [f"{rng.choice(STEP_VERBS)} the {' '.join(rng.sample(vocab, rng.randint(1, 3)))} "
                 f"{rng.choice(('menu', 'button', 'tab', 'screen', 'option', 'page'))}."
                 for _ in range(rng.randint(3, 10))]
        steps[0] = f"Open {app} and sign in."
        if rng.random() < 0.03:
            if rng.random() < 0.5:
                prompt = plant_pii(rng, prompt)
            else:
                k = rng.randrange(len(steps))
                steps[k] = plant_pii(rng, steps[k])
        records.append({"prompt": prompt, "response": steps,
                        "category": rng.choices(categories, weights)[0], "source": "synthetic"})
    return records


def time_pipeline(n: int, seed: int, threshold: float) -> dict[str, float]:
    """Seconds per stage for n records, from a JSONL file to the split."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(n, seed)), encoding="utf-8")
        times: dict[str, float] = {}
        start = time.perf_counter()
        raws, _ = pd.load_inputs([path])
        times["load"] = time.perf_counter() - start
        start = time.perf_counter()
        items, errors, _ = pd.validate_records(raws)
        times["validate"] = time.perf_counter() - start
        start = time.perf_counter()
        pd.redact_items(items)
        times["redact"] = time.perf_counter() - start
        start = time.perf_counter()
        items, _ = pd.normalize_items(items, lowercase=True, strip_punctuation=True)
        times["normalise"] = time.perf_counter() - start
        start = time.perf_counter()
        items, dedup = pd.deduplicate(items, threshold)
        times["deduplicate"] = time.perf_counter() - start
        start = time.perf_counter()
        pd.balance_report(items, 20)
        times["balance"] = time.perf_counter() - start
        start = time.perf_counter()
        pd.split_records(items, (0.8, 0.1, 0.1), seed)
        times["split"] = time.perf_counter() - start
    assert not errors, errors[:3]
    print(f"n={n}: {len(items)} records after dedup, {dedup['exact_duplicates_removed']} exact duplicates removed, "
          f"{dedup['near_duplicate_groups']} near-duplicate groups", file=sys.stderr)
    return times


def time_tokenization(n: int, model: str, seed: int) -> float:
    """Records per second through the canonical chat format and the model's tokenizer."""
    from howto.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    items, _, _ = pd.validate_records([pd.Raw(r, "bench", 0, i, "json") for i, r in
                                       enumerate(synthetic_records(n, seed))])
    start = time.perf_counter()
    pd.token_lengths(items, tokenizer)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="records in the first run; the second run has 2N")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of the split")
    p.add_argument("--near-dup-threshold", type=float, default=0.6, help="as prepare_data.py's flag")
    p.add_argument("--tokenize-n", type=int, default=5000, help="records tokenized to time tokenization apart")
    p.add_argument("--model", default="mistral", help="tokenizer to time (as prepare_data.py's --model)")
    args = p.parse_args()

    runs = {n: time_pipeline(n, args.seed, args.near_dup_threshold) for n in (args.n, 2 * args.n)}
    small, large = runs[args.n], runs[2 * args.n]
    table = Table(title=f"prepare_data stages, N={args.n:,} and 2N={2 * args.n:,} synthetic records")
    for column in ("stage", "N: seconds", "N: records/s", "2N: seconds", "2N: records/s", "2N/N time"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in [*small, "total"]:
        t1 = sum(small.values()) if stage == "total" else small[stage]
        t2 = sum(large.values()) if stage == "total" else large[stage]
        table.add_row(stage, f"{t1:.2f}", f"{args.n / t1:,.0f}", f"{t2:.2f}", f"{2 * args.n / t2:,.0f}",
                      f"{t2 / t1:.2f}")
    rate = time_tokenization(args.tokenize_n, args.model, args.seed)
    table.add_row("tokenize*", "", f"{rate:,.0f}", "", "", "")
    console = Console()
    console.print(table)
    console.print(f"* tokenization timed apart, on {args.tokenize_n:,} records with the {args.model} tokenizer")
    total = sum(small.values())
    console.print(f"{args.n:,} records through load, validation, redaction, normalisation, dedup and split in "
                  f"{total:.1f} s ({'within' if total < 60 else 'OVER'} the 60 s target); 2N/N time ratio "
                  f"{sum(large.values()) / total:.2f} (2.00 is linear)")


if __name__ == "__main__":
    main()
