#!/usr/bin/env python
"""Time the whole prepare_data.py command on generated records, and check a real dataset's split for near-copies.

    python -m bench.prepare_bench --n 100000
    python -m bench.prepare_bench --template --n 100000 --repeat 3
    python -m bench.prepare_bench --leak-check ../shared/data/bitext_records.jsonl

The first runs `prepare_data.py` on N records with a wide vocabulary (made-up words and app names), a share of
exact duplicates, near-duplicate paraphrases and planted PII, then on 2N others, and prints the seconds of each stage
(prepare_data's own stopwatch, from run_info.json) and of the whole command, to show throughput and how it scales.

--template runs it on N template-style records, the kind augmentation and synthetic sets produce: one question
pattern over 60 app names, 12 verbs and 13 settings, each question asked in several wordings, some with a typo.
It reports the time of each run (each on its own seed, so that none finds its token lengths cached), the split
against the fractions asked, and how many near-duplicate groups mix two different questions (none may: a group must
not chain across apps, verbs or settings).

--leak-check runs it on FILE and counts the test and validation prompts whose character 5-gram Jaccard similarity
to some training prompt is at least 0.8, computed here on exact 5-gram sets.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import sparse

from rich.console import Console
from rich.table import Table

import prepare_data

ROOT = Path(__file__).resolve().parents[1]

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


# Template-style data: one question pattern over 60 apps (pairs of them share a word, as product families do),
# 12 verbs and 13 settings, asked in several wordings and with typos, answered by one step pattern.
APP_WORDS = ("Shop", "Ride", "Food", "Pay", "Photo", "Music", "Chat", "Bank", "Fit", "Trip", "Home", "Mail", "News",
             "Learn", "Game", "Health", "Cloud", "Note", "Map", "Ticket", "Style", "Pet", "Garden", "Book", "Film",
             "Radio", "Job", "Car", "Sleep", "Kid")
APP_TAILS = ("Go", "Hub", "Now", "Plus", "Box", "Pal")
TEMPLATE_VERBS = ("turn on", "turn off", "change", "reset", "find", "update", "hide", "lock", "share", "back up",
                  "restore", "clear")
SETTINGS = ("dark mode", "notifications", "my password", "location sharing", "autoplay", "two-factor login",
            "the language", "payment methods", "saved addresses", "my profile photo", "data saver",
            "my order history", "sound effects")
QUESTION_OPENERS = ("How do I", "How can I", "how do i", "What are the steps to", "Help me", "I want to",
                    "Can you tell me how to", "I'm trying to", "im trying to", "Please tell me how to")
TEMPLATE_CATEGORIES = ("shopping", "travel", "food_delivery", "banking", "streaming", "social_media")


def template_apps() -> list[str]:
    """60 app names: each of 30 words with two of the tails, so that "Shop Go" and "Shop Hub" both exist."""
    return [f"{word} {APP_TAILS[(i + k) % len(APP_TAILS)]}" for i, word in enumerate(APP_WORDS) for k in (0, 3)]


def typo(rng: random.Random, text: str) -> str:
    """One slip in one longer word: two letters swapped, one doubled or one dropped."""
    words = text.split(" ")
    long_words = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not long_words:
        return text
    i = rng.choice(long_words)
    w, k = words[i], rng.randrange(1, len(words[i]) - 2)
    words[i] = rng.choice([w[:k] + w[k + 1] + w[k] + w[k + 2:], w[:k] + w[k] + w[k:], w[:k] + w[k + 1:]])
    return " ".join(words)


def template_records(n: int, seed: int = 0) -> list[dict]:
    """n records; `source` names the question (app, verb, setting) so that groups can be checked for purity."""
    rng = random.Random(seed)
    apps = template_apps()
    records = []
    for _ in range(n):
        a, v, s = rng.randrange(len(apps)), rng.randrange(len(TEMPLATE_VERBS)), rng.randrange(len(SETTINGS))
        app, verb, setting = apps[a], TEMPLATE_VERBS[v], SETTINGS[s]
        prompt = (f"{rng.choice(QUESTION_OPENERS)} {verb} {setting} in the {app} app"
                  f"{rng.choice(('?', '?', ' please?', ''))}")
        if rng.random() < 0.15:
            prompt = typo(rng, prompt)
        steps = [rng.choice((f"Open the {app} app.", f"Launch {app}.")),
                 rng.choice(("Tap your profile picture, then 'Settings'.", "Go to 'Settings' from the menu.")),
                 rng.choice((f"Find '{setting.capitalize()}'.", f"Scroll to the '{setting.capitalize()}' section.")),
                 rng.choice((f"Tap '{verb.capitalize()}'.", f"Choose '{verb.capitalize()}'.")),
                 rng.choice((f"Confirm to {verb} {setting}.", f"Tap 'Save' to {verb} {setting}."))]
        records.append({"prompt": prompt, "response": steps, "category": TEMPLATE_CATEGORIES[a % 6],
                        "source": f"q{a}-{v}-{s}"})
    return records


STAGES = ("load", "validate", "redact", "normalise", "deduplicate", "balance", "augment", "tokenize", "split",
          "write")  # prepare_data's stopwatch, in the order the stages run


def run_prepare(records: list[dict], workdir: Path, args: argparse.Namespace, name: str) -> dict:
    """The whole `prepare_data.py` command on the records, timed from the outside; its stats and stage timings."""
    data, out = workdir / f"{name}.jsonl", workdir / f"{name}-out"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    command = [sys.executable, str(ROOT / "prepare_data.py"), str(data), "--out", str(out), "--seed", str(args.seed),
               "--near-dup-threshold", str(args.near_dup_threshold), "--model", args.model]
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    if done.returncode:
        sys.exit(f"prepare_data.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    timings = json.loads((out / "run_info.json").read_text(encoding="utf-8"))["timings_s"]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "stats": stats, "timings": timings, "out": out}


def stage_table(title: str, runs: dict[str, dict], n: dict[str, int]) -> Table:
    """Seconds per stage (prepare_data's own stopwatch) and the whole command's wall and CPU time, one column per
    run. On a shared machine the wall time grows with the others' load; the CPU time (user + system) much less."""
    table = Table(title=title)
    table.add_column("stage")
    for name in runs:
        table.add_column(f"{name}: s", justify="right")
        table.add_column(f"{name}: records/s", justify="right")
    found = {stage for run in runs.values() for stage in run["timings"]}
    stages = [s for s in STAGES if s in found] + sorted(found - set(STAGES))
    for stage in [*stages, "whole command (wall)", "whole command (CPU)"]:
        row = [stage]
        for name, run in runs.items():
            t = {"whole command (wall)": run["seconds"], "whole command (CPU)": run["cpu_seconds"]}.get(
                stage, run["timings"].get(stage, 0.0))
            row += [f"{t:.2f}", f"{n[name] / t:,.0f}" if t else ""]
        table.add_row(*row)
    return table


def split_check(stats: dict, asked: tuple[float, ...]) -> tuple[str, float]:
    """Records per split with their fractions, and the largest distance from the fractions asked, in points."""
    counts = [stats["splits"][name]["records"] for name in prepare_data.SPLITS]
    total = sum(counts)
    text = " / ".join(f"{name} {c:,} ({c / total:.1%})" for name, c in zip(prepare_data.SPLITS, counts))
    return text, max(abs(c / total - f) * 100 for c, f in zip(counts, asked))


def mixed_groups(records: list[dict], threshold: float) -> tuple[int, int]:
    """Near-duplicate groups of the records, and how many of them mix two questions (by `source`)."""
    raws = [prepare_data.Raw(r, "bench", 0, i, "json") for i, r in enumerate(records)]
    items, _, _ = prepare_data.validate_records(raws)
    prepare_data.redact_items(items)
    items, _ = prepare_data.normalize_items(items, lowercase=True, strip_punctuation=True)
    items, report = prepare_data.deduplicate(items, threshold, max_listed=len(items))
    source = {item.origin: item.record["source"] for item in items}
    return len(report["groups"]), sum(len({source[m["origin"]] for m in g}) > 1 for g in report["groups"])


def bench_scaling(args: argparse.Namespace, console: Console) -> None:
    """Wide synthetic data at N and 2N: throughput per stage and how the time grows. The 2N records come from the
    next seed: with the same one, half of them would find their token lengths in prepare_data's cache."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {f"{n:,}": run_prepare(synthetic_records(n, args.seed + k), Path(tmp), args, f"wide-{n}")
                for k, n in enumerate((args.n, 2 * args.n))}
    n = {f"{k:,}": k for k in (args.n, 2 * args.n)}
    console.print(stage_table(f"prepare_data.py on N={args.n:,} and 2N={2 * args.n:,} synthetic records", runs, n))
    small, large = (run["seconds"] for run in runs.values())
    console.print(f"{args.n:,} records in {small:.1f} s ({'within' if small < 60 else 'OVER'} the 60 s target); "
                  f"2N/N time ratio {large / small:.2f} (2.00 is linear)")


def bench_template(args: argparse.Namespace, console: Console) -> None:
    """Template-style data, the whole command --repeat times, each on data of its own seed, so that no run finds its
    token lengths in prepare_data's cache: time, split fractions, group purity."""
    asked = (0.8, 0.1, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {f"seed {args.seed + k}": run_prepare(template_records(args.n, args.seed + k), Path(tmp), args,
                                                     f"template-{k}") for k in range(args.repeat)}
    records = template_records(args.n, args.seed)
    console.print(stage_table(f"prepare_data.py on {args.n:,} template-style records", runs,
                              {name: args.n for name in runs}))
    seconds = [run["seconds"] for run in runs.values()]
    cpu = [run["cpu_seconds"] for run in runs.values()]
    stats = next(iter(runs.values()))["stats"]
    dedup = stats["dedup"]
    split, off = split_check(stats, asked)
    groups, mixed = mixed_groups(records, args.near_dup_threshold)
    summary = Table(title="template-style data: results")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    for measure, value in [
        ("whole command, wall seconds (min-max)", f"{min(seconds):.1f}-{max(seconds):.1f}"),
        ("whole command, CPU seconds (min-max)", f"{min(cpu):.1f}-{max(cpu):.1f}"),
        ("60 s target", "met" if max(seconds) < 60 else "NOT met"),
        ("records after exact duplicates", f"{sum(stats['splits'][s]['records'] for s in prepare_data.SPLITS):,}"),
        ("near-duplicate groups", f"{dedup['near_duplicate_groups']:,} ({dedup['records_in_near_duplicate_groups']:,}"
                                  " records)"),
        ("groups mixing two questions", f"{mixed} of {groups:,}"),
        ("groups joined by near-copies; largest split unit",
         f"{dedup['groups_joined_by_near_copies']:,}; {dedup['largest_split_unit']:,} records"),
        ("split (asked 80/10/10)", split),
        ("largest distance from a fraction asked", f"{off:.2f} points ({'within' if off <= 1 else 'OVER'} 1)"),
    ]:
        summary.add_row(measure, value)
    console.print(summary)


def prompt_shingles(prompt: str, k: int = 5) -> set[str]:
    """Character 5-grams of a prompt, written here apart from howto.dedup so the check does not trust the code it
    checks."""
    text = " ".join(prompt.lower().split())
    return {text[i:i + k] for i in range(max(1, len(text) - k + 1))}


def near_copies(prompts: list[str], train: list[str], level: float) -> tuple[int, float]:
    """How many prompts have a training prompt at character 5-gram Jaccard >= level, and the highest Jaccard."""
    sets = [prompt_shingles(p) for p in prompts + train]
    vocabulary: dict[str, int] = {}
    rows = [i for i, s in enumerate(sets) for _ in s]
    cols = [vocabulary.setdefault(g, len(vocabulary)) for s in sets for g in s]
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sets), len(vocabulary)))
    shared = (matrix[:len(prompts)] @ matrix[len(prompts):].T).toarray()
    sizes = np.array([len(s) for s in sets])
    similarity = shared / (sizes[:len(prompts), None] + sizes[None, len(prompts):] - shared)
    best = similarity.max(axis=1) if len(train) else np.zeros(len(prompts))
    return int((best >= level).sum()), float(best.max(initial=0.0))


def bench_leak_check(args: argparse.Namespace, console: Console) -> None:
    """A real dataset through `prepare_data.py`: test and validation prompts that are near-copies of training ones."""
    records = [json.loads(line) for line in args.leak_check.read_text(encoding="utf-8").splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        run = run_prepare(records, Path(tmp), args, "leak")
        prompts = {name: [json.loads(line)["prompt"] for line in
                          (run["out"] / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
                   for name in prepare_data.SPLITS}
    dedup = run["stats"]["dedup"]
    table = Table(title=f"{args.leak_check.name}: near-copies of training prompts (5-gram Jaccard >= 0.8)")
    for column in ("split", "prompts", "with a training near-copy", "highest Jaccard to a training prompt"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name in ("val", "test"):
        count, highest = near_copies(prompts[name], prompts["train"], 0.8)
        table.add_row(name, f"{len(prompts[name]):,}", str(count), f"{highest:.3f}")
    console.print(table)
    console.print(f"{len(records):,} records in {run['seconds']:.1f} s; {dedup['near_duplicate_groups']} "
                  f"near-duplicate groups ({dedup['records_in_near_duplicate_groups']} records), "
                  f"{dedup['groups_joined_by_near_copies']} groups joined by near-copies or answers, "
                  f"largest split unit {dedup['largest_split_unit']} records")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="records generated (the scaling run also times 2N)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and of the split")
    p.add_argument("--near-dup-threshold", type=float, default=0.6, help="as prepare_data.py's flag")
    p.add_argument("--model", default="mistral", help="tokenizer that counts tokens (as prepare_data.py's --model)")
    p.add_argument("--template", action="store_true",
                   help="template-style records (60 apps, 12 verbs, 13 settings) instead of the wide vocabulary")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of the whole command with --template, on seeds SEED, SEED+1, ...")
    p.add_argument("--leak-check", type=Path, metavar="FILE",
                   help="prepare FILE (JSONL) and count held-out prompts that are near-copies of training prompts")
    args = p.parse_args()
    console = Console()
    if args.leak_check:
        bench_leak_check(args, console)
    elif args.template:
        bench_template(args, console)
    else:
        bench_scaling(args, console)


if __name__ == "__main__":
    main()
