#!/usr/bin/env python
"""Turn raw how-to records into a clean, deduplicated, tokenized and split dataset.

    python prepare_data.py data/howto_steps.jsonl --out runs/data
    python prepare_data.py my_data/ more.csv --out runs/data --model smollm2 --skip-invalid --seed 1
    python prepare_data.py data/howto_steps.jsonl --out runs/data --config configs/cpu.yaml

Inputs: JSON (one record or a list), JSONL, Alpaca-style JSON/JSONL and CSV files, or folders of them (see
howto/records.py), in any mix with raw sources: HTML, Markdown, PDF and .txt pages and support-chat exports, turned
into records by howto/collect.py (--extract-llm for what its rules cannot read, --review DIR to stop and write a
Label Studio project and a sheet; their exports are inputs too, see howto/review.py).
Settings, as flags or keys of a --config YAML (`--help` lists them with their defaults):
--split and --seed (the stratified split), --near-dup-threshold, --thin-threshold, --model with --max-seq-length and
--overlong (token lengths in the model's own chat format), --skip-invalid, --keep-case, --keep-punctuation, and
--augment with its --augment-* settings (new records for thin categories from an OpenAI-compatible LLM).

Stages, in order: load -> validate -> redact sensitive data -> normalise -> deduplicate -> balance report ->
(augment thin categories) -> token lengths -> split -> write. Redaction runs before anything is written, and
near-duplicates stay in one split so that the test set never holds a paraphrase of a training record. Every record
dropped on the way is counted in stats.json with the reason. OUT (train/val/test.jsonl, stats.json, report.md,
distributions.png, config.yaml, run_info.json) is built beside its final place and swapped in whole, so a failed
rerun never leaves old and new files mixed. The same input and seed give byte-identical outputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from rich.console import Console
from rich.progress import track

from howto.augment import augment
from howto.chat import example_lengths
from howto.collect import DOCUMENT_SUFFIXES, collect_inputs
from howto.dedup import deduplicate
from howto.llm import ChatClient, LLMError
from howto.pii import PLACEHOLDER_RE, name_detection_available, redact_record
from howto.prepare_report import MAX_LISTED, plot_distributions, print_summary, render_report
from howto.records import SUFFIXES, Raw, RecordError, read_records, to_record
from howto import runtime
from howto.review import write_review
from howto.runio import (RunError, atomic_dir, atomic_write_text, check_out_dir, library_versions, parse_args,
                         positive_int, run_script, write_json, write_jsonl, write_run_info)

SPLITS = ("train", "val", "test")
OUTPUTS = ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json", "report.md", "distributions.png", "config.yaml",
           "run_info.json")
INPUT_SUFFIXES = (*SUFFIXES, *DOCUMENT_SUFFIXES)  # records, and raw sources for howto.collect

console = Console(stderr=True)  # progress bars and messages; the summary table goes to stdout


def main(argv: list[str] | None = None) -> int:
    runtime.setup()
    args = parse(argv)
    clock = Stopwatch()
    try:
        out = check_out(args.out)  # before any slow work
        files = find_input_files(args.inputs, out)
        llm = ChatClient.from_settings(args.augment_url, args.augment_model, key_env=args.augment_key_env) \
            if args.extract_llm else None
        collection = collect_inputs(files, llm, args.extract_llm_max_requests, args.product, args.category)
        raws = clock.lap("load", load_inputs(files, collection))
        items, skipped, unknown = clock.lap("validate", validate(raws, args.skip_invalid))
        pii = clock.lap("redact", redact_items(items))
        if args.review:  # people review what was collected, redacted; their export comes back as an input
            write_review(args.review, [item.record for item in items])
            say(f"{len(items)} records written for review to {args.review} (Label Studio and sheet)")
            return 0
        items, normalisation = clock.lap("normalise", normalize_items(items, not args.keep_case,
                                                                      not args.keep_punctuation))
        if not items:
            raise RunError("no valid record left to prepare")
        items, dedup = clock.lap("deduplicate", deduplicate(items, args.near_dup_threshold))
        balance = clock.lap("balance", balance_report(items, args.thin_threshold))
        augmentation = None
        if args.augment:
            items, dedup, balance, augmentation = clock.lap("augment", augment_and_deduplicate(items, balance,
                                                                                               dedup, args))
        items, lengths, tokens = clock.lap("tokenize", measure_tokens(items, args))
        splits = clock.lap("split", split_records(items, args.split, args.seed))
        stats = collect_stats(args, files, raws, skipped, unknown, pii, normalisation, dedup, balance,
                              augmentation, tokens, splits)
        stats["collected"] = collection.report
        clock.lap("write", write_outputs(out, splits, items, lengths, stats, args, files, clock.timings))
    except (RunError, LLMError) as e:
        say(f"error: {e}", "red")
        return 1
    print_summary(stats, clock.timings, out)
    return 0


# ------------------------------------------------------------------------------------------------- settings
def sibling_parsers() -> list[argparse.ArgumentParser]:
    """The other two scripts' parsers: a top-level key of a --config file that one of them has is meant for it."""
    import evaluate
    import finetune

    return [evaluate.build_parser(), finetune.build_parser()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Validate, redact, normalise, deduplicate, report on, tokenize and split how-to records.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="JSON (one record or a list), JSONL, Alpaca-style JSON/JSONL or CSV files, HTML, Markdown, "
                        "PDF or .txt pages, chat exports, review exports, or folders of them")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder for train/val/test.jsonl, stats.json, report.md, distributions.png; "
                        "replaced whole when the run succeeds")
    p.add_argument("--keep-case", action="store_true", help="do not lowercase prompts and steps")
    p.add_argument("--keep-punctuation", action="store_true", help="do not strip punctuation from prompts and steps")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip invalid records (and list them) instead of stopping with an error")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of augmentation (default: %(default)s)")
    p.add_argument("--split", type=split_ratios, default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST",
                   help="fractions of the split, stratified by category (default: %(default)s)")
    p.add_argument("--near-dup-threshold", type=float, default=0.6, metavar="X",
                   help="Jaccard similarity of two prompts' character 5-grams (their content words, question "
                        "framing left out) from which they are near-duplicates, grouped and kept in one split unless "
                        "they name different things (default: %(default)s)")
    p.add_argument("--thin-threshold", type=int, default=20, metavar="N",
                   help="a category with fewer records is flagged as thin, and augmented with --augment "
                        "(default: %(default)s)")
    p.add_argument("--model", default="mistral",
                   help="model whose tokenizer and chat template count tokens: mistral, tiny, smollm2, a folder or "
                        "a hub id (default: %(default)s)")
    p.add_argument("--max-seq-length", type=positive_int, default=1024, metavar="N",
                   help="longest tokenized conversation allowed (default: %(default)s)")
    p.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="records over --max-seq-length are dropped, or cut by whole steps from the end until they "
                        "fit (at least two steps kept, else dropped); either way they are listed (default: "
                        "%(default)s)")
    p.add_argument("--augment", action="store_true",
                   help="ask an OpenAI-compatible LLM for new records and paraphrases in thin categories")
    p.add_argument("--augment-url", metavar="URL",
                   help="base URL of the endpoint, with /v1 (default: $OPENAI_BASE_URL)")
    p.add_argument("--augment-model", metavar="NAME", help="model name at the endpoint (default: $OPENAI_MODEL)")
    p.add_argument("--augment-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable that holds the API key; the key itself is never logged or written "
                        "(default: %(default)s)")
    p.add_argument("--augment-max-records", type=int, default=200, metavar="N",
                   help="most new records augmentation may add (default: %(default)s)")
    p.add_argument("--augment-max-requests", type=int, default=50, metavar="N",
                   help="most chat requests augmentation may make, retries not counted (default: %(default)s)")
    p.add_argument("--extract-llm", action="store_true",
                   help="send prose sections and chats that the rules find no steps in to the --augment-url LLM")
    p.add_argument("--extract-llm-max-requests", type=int, default=50, metavar="N",
                   help="most chat requests LLM extraction may make (default: %(default)s)")
    p.add_argument("--product", default="", metavar="NAME",
                   help="the product the raw pages document, named in their questions (\"How do I ... in NAME?\"); "
                        "default: the name the page gives (its site name, or a title such as \"NAME Help Centre\")")
    p.add_argument("--category", default="", metavar="NAME",
                   help="category of the records collected from raw sources (default: the product's name, else "
                        "the name of the file's folder)")
    p.add_argument("--review", metavar="DIR",
                   help="stop after extraction and redaction and write a Label Studio config and tasks and an "
                        "editable review.jsonl/review.csv sheet to DIR")
    return p


def split_ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three fractions that sum to 1 with train > 0, got {text!r}")
    return parts  # type: ignore[return-value]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Flags and --config, through the same checks."""
    parser = build_parser()
    args = parse_args(parser, argv, section="prepare_data", siblings=sibling_parsers)
    if not args.inputs:
        parser.error("give at least one INPUT file or folder")
    if not 0 < args.near_dup_threshold <= 1:
        parser.error("--near-dup-threshold must be in (0, 1]")
    return args


@dataclass(slots=True)
class Item:
    """A valid record on its way through the pipeline; `group` ties near-duplicates to one split."""
    record: dict[str, Any]
    origin: str
    group: int = -1


class Stopwatch:
    """Seconds per stage, for the summary and run_info.json."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def lap(self, stage: str, result: Any = None) -> Any:
        now = time.perf_counter()
        self.timings[stage] = round(now - self.start, 3)
        self.start = now
        return result


def say(message: str, style: str | None = None) -> None:
    """A message as written: no markup (placeholders look like tags) and no wrapping, so logs can be grepped."""
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def progress(items: Iterable, description: str, total: int | None = None) -> Iterable:
    """A progress bar on a terminal; nothing in logs, where a bar would only leave blank lines."""
    return track(items, description=description, total=total, console=console, transient=True,
                 disable=not console.is_terminal)


# ---------------------------------------------------------------------------------------------------- loading
def check_out(out: str) -> Path:
    """The output folder can be written, and replacing it loses nothing that this script did not write."""
    path = check_out_dir(out)
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OUTPUTS) if path.is_dir() else []
    if foreign:
        raise RunError(f"--out {path}: holds {', '.join(foreign[:5])}{' ...' * (len(foreign) > 5)}, which "
                       "prepare_data.py did not write; the folder is replaced as a whole, so give a new or empty one")
    return path


def find_input_files(inputs: Iterable[str], out: Path | None = None) -> list[Path]:
    """Files as given, and the .json/.jsonl/.csv files under folders, sorted so that runs are reproducible.

    A folder scan leaves out the output folder, so that a rerun never reads its own earlier outputs as data.
    """
    skip = out.resolve() if out else None
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
                           and not (skip and p.resolve().is_relative_to(skip)))
            if not found:
                raise RunError(f"{path}: folder holds no {', '.join(INPUT_SUFFIXES)} file")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in INPUT_SUFFIXES:
                raise RunError(f"{path}: unsupported file type (expected {', '.join(INPUT_SUFFIXES)})")
            files.append(path)
        else:
            raise RunError(f"{path}: no such file or folder")
    return files


def load_inputs(files: list[Path], collection: Any) -> list[Raw]:
    """All records of all files, in file order (collected from raw sources and reviews by howto.collect); those
    that could not be read carry their problem."""
    raws: list[Raw] = []
    for path in progress(files, "load"):
        raws += [Raw(r, str(path), line, k, "json") for k, (line, r) in enumerate(collection.of(path))] \
            if str(path) in collection.files else read_records(path)
    return raws


def validate(raws: list[Raw], skip_invalid: bool) -> tuple[list[Item], list[str], Counter]:
    """Valid records; invalid ones stop the run (all listed, in file and line order) unless they may be skipped."""
    items, errors, unknown = validate_records(raws)
    if errors and not skip_invalid:
        for e in errors[:50]:
            say(f"error: {e}", "red")
        more = f" ({len(errors) - 50} more not shown)" if len(errors) > 50 else ""
        raise RunError(f"{len(errors)} invalid record{'s' * (len(errors) > 1)}{more}: fix them or run with "
                       "--skip-invalid")
    for e in errors[:50]:
        say(f"skipped: {e}", "yellow")
    if unknown:
        say("warning: ignoring unknown fields " + ", ".join(f"'{k}' ({n} records)" for k, n in sorted(unknown.items())),
            "yellow")
    return items, errors, unknown


def validate_records(raws: list[Raw]) -> tuple[list[Item], list[str], Counter]:
    """Valid records as Items, an error line (file, line, record index, field) per invalid one, unknown fields."""
    items, errors, unknown = [], [], Counter()
    for raw in progress(raws, "validate"):
        if raw.problem:  # a line that is not JSON, a key written twice, a CSV row with extra cells
            errors.append(raw.problem)
            continue
        try:
            record, extra = to_record(raw)
        except RecordError as e:
            errors.append(f"{raw.where()}, {e}")
            continue
        unknown.update(extra)
        items.append(Item(record, raw.where()))
    return items, errors, unknown


# ------------------------------------------------------------------------------------ redaction, normalisation
def redact_items(items: list[Item]) -> dict[str, Any]:
    """Replace sensitive spans by typed placeholders in place; counts by type and how many records had any."""
    total: Counter = Counter()
    touched = 0
    for item in progress(items, "redact"):
        item.record, found = redact_record(item.record)
        total.update(found)
        touched += bool(found)
    return {"replaced": dict(sorted(total.items())), "total": sum(total.values()), "records_with_pii": touched,
            "name_detection": name_detection_available()}


_APOSTROPHE = re.compile(r"(?<=\w)['\u2019](?=\w)")  # don't -> dont: one word, as a user types it
_PUNCTUATION = re.compile(r"[^\w\s]|_")
# Never text, whatever --keep-punctuation says: terminal escape sequences (ESC [ 31 m) and C0 and C1 controls (NUL,
# ESC; tab and line breaks are whitespace, collapsed anyway) become spaces, and the invisible characters that
# reorder or hide text (bidi embeddings, overrides, isolates and marks, zero-width space, BOM: "Trojan Source") go.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x1f\x7f-\x9f]")
_INVISIBLE = re.compile("[\u061c\u200b\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def normalize_text(text: str, lowercase: bool = True, strip_punctuation: bool = True) -> str:
    """Drop control and bidi characters, lowercase, strip punctuation (apostrophes inside words are dropped, other
    marks become spaces) and collapse whitespace; placeholders such as [EMAIL] are kept as they are, since the model
    must learn them verbatim."""
    text = _INVISIBLE.sub("", _CONTROL.sub(" ", text))
    pieces, last = [], 0
    for match in PLACEHOLDER_RE.finditer(text) if "[" in text else ():
        pieces += [_normalize_piece(text[last:match.start()], lowercase, strip_punctuation), match.group()]
        last = match.end()
    pieces.append(_normalize_piece(text[last:], lowercase, strip_punctuation))
    return " ".join("".join(pieces).split())  # str.split's whitespace is re's \s


def _normalize_piece(text: str, lowercase: bool, strip_punctuation: bool) -> str:
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = _PUNCTUATION.sub(" ", _APOSTROPHE.sub("", text))
    return text


def has_words(text: str) -> bool:
    """Whether text says anything: a letter outside placeholders ("[EMAIL]", "1", "--" say nothing)."""
    return any(c.isalpha() for c in (PLACEHOLDER_RE.sub(" ", text) if "[" in text else text))


def normalize_items(items: list[Item], lowercase: bool, strip_punctuation: bool) -> tuple[list[Item], dict]:
    """Normalised records, and what normalisation took away: a step without words (a bare "1.", punctuation) is
    removed and listed; a record whose prompt has no words, or with fewer than two steps left, is dropped and listed.
    """
    kept, dropped, removed = [], [], []
    for item in progress(items, "normalise"):
        record = item.record
        prompt = normalize_text(record["prompt"], lowercase, strip_punctuation)
        steps = [normalize_text(step, lowercase, strip_punctuation) for step in record["response"]]
        empty = [k for k, step in enumerate(steps) if not has_words(step)]
        if not has_words(prompt) or len(steps) - len(empty) < 2:
            what = f"prompt {record['prompt']!r} has no words" if not has_words(prompt) else \
                f"{len(steps) - len(empty)} of {len(steps)} steps have words"
            dropped.append(f"{item.origin}: {what}, dropped")
            continue
        removed += [f"{item.origin}: step {k + 1} {record['response'][k]!r} has no words, removed" for k in empty]
        item.record = {**record, "prompt": prompt, "response": [s for k, s in enumerate(steps) if k not in empty]}
        kept.append(item)
    if dropped or removed:
        say(f"warning: normalisation dropped {len(dropped)} records and removed {len(removed)} steps without words "
            "(listed in stats.json)", "yellow")
    return kept, {"lowercase": lowercase, "strip_punctuation": strip_punctuation, "dropped_count": len(dropped),
                  "dropped": dropped[:MAX_LISTED], "steps_removed_count": len(removed),
                  "steps_removed": removed[:MAX_LISTED]}


# ------------------------------------------------------------------------------------------ balance/diversity
def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts: 1.0 when no word sequence repeats, low for templated data."""
    grams: Counter = Counter()
    for text in texts:
        words = text.split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return round(len(grams) / total, 4) if total else 0.0


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (numpy's inverted CDF): a value that occurs in the data, so it reads as a real length."""
    return int(np.percentile(values, q, method="inverted_cdf")) if values else 0


def describe(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 2),
            "p95": percentile(values, 95), "max": max(values)}


def balance_report(items: list[Item], thin_threshold: int) -> dict[str, Any]:
    categories = Counter(item.record["category"] for item in items)
    prompts = [item.record["prompt"] for item in items]
    steps = [len(item.record["response"]) for item in items]
    return {
        "records": len(items),
        "categories": dict(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))),
        "thin_threshold": thin_threshold,
        "thin": {c: n for c, n in sorted(categories.items()) if n < thin_threshold},
        "steps_per_record": {**describe(steps), "histogram": {str(k): v for k, v in sorted(Counter(steps).items())}},
        "prompt_words": describe([len(p.split()) for p in prompts]),
        "step_words": describe([len(s.split()) for item in items for s in item.record["response"]]),
        "distinct_1": distinct_n(prompts, 1),
        "distinct_2": distinct_n(prompts, 2),
    }


# ---------------------------------------------------------------------------------------------- augmentation
def augment_and_deduplicate(items: list[Item], balance: dict, dedup: dict,
                            args: argparse.Namespace) -> tuple[list[Item], dict, dict, dict | None]:
    """Records, dedup report, balance report and augmentation report after new records join the data.

    New records for thin categories go through the same validation, redaction and normalisation as input data;
    what fails is listed, never kept.
    """
    if not balance["thin"]:
        say(f"--augment: no category below {args.thin_threshold} records, nothing to augment")
        return items, dedup, balance, None
    wanted = {category: args.thin_threshold - n for category, n in balance["thin"].items()}
    client = ChatClient.from_settings(args.augment_url, args.augment_model, key_env=args.augment_key_env)
    new, report = augment([item.record for item in items], wanted, client, max_records=args.augment_max_records,
                          max_requests=args.augment_max_requests, seed=args.seed)
    valid, rejected, _ = validate_records([Raw(record, "<augmented>", 0, i, "json") for i, record in enumerate(new)])
    for item in valid:
        item.record["source"] = "augmented"
    pii = redact_items(valid)
    valid, normalisation = normalize_items(valid, not args.keep_case, not args.keep_punctuation)
    before = len(items)
    items, final = deduplicate(items + valid, args.near_dup_threshold)
    augmentation = {**report, "returned": len(new), "valid": len(valid),
                    "rejected": rejected + normalisation["dropped"], "steps_removed": normalisation["steps_removed"],
                    "pii_replaced": pii["replaced"], "added": len(items) - before,
                    "balance_before": {"categories": balance["categories"], "thin": balance["thin"]}}
    dedup = {**final, "exact_duplicates": (dedup["exact_duplicates"] + final["exact_duplicates"])[:MAX_LISTED],
             "exact_duplicates_removed": dedup["exact_duplicates_removed"] + final["exact_duplicates_removed"]}
    return items, dedup, balance_report(items, args.thin_threshold), augmentation


# ---------------------------------------------------------------------------------------------- token lengths
def measure_tokens(items: list[Item], args: argparse.Namespace) -> tuple[list[Item], list[int], dict[str, Any]]:
    """Token lengths in the canonical chat format that finetune.py trains on (howto.chat.encode_example), with
    overlong records dropped or cut: the length policy is decided here, and finetune.py only checks it."""
    counter = TokenCounter(args.model)
    lengths = counter.lengths([(item.record["prompt"], item.record["response"]) for item in items])
    over_limit = sum(length > args.max_seq_length for length in lengths)
    tokens = {"model": args.model, "max": max(lengths), "p95": percentile(lengths, 95),
              "mean": round(statistics.fmean(lengths), 1), "max_seq_length": args.max_seq_length,
              "over_limit": over_limit, "overlong_action": args.overlong}
    items, lengths, tokens["overlong"] = enforce_max_length(items, lengths, counter, args.max_seq_length,
                                                            args.overlong)
    counter.save()
    tokens["dropped"] = sum(o["action"] == "dropped" for o in tokens["overlong"])
    if over_limit:
        say(f"warning: {over_limit} records over {args.max_seq_length} tokens, "
            f"{'truncated or dropped' if args.overlong == 'truncate' else 'dropped'}", "yellow")
    if not items:
        raise RunError(f"no record fits in --max-seq-length {args.max_seq_length}")
    return items, lengths, tokens


class TokenCounter:
    """Token lengths of conversations, remembered between runs (in the model cache, per tokenizer, library versions
    and chat format): importing transformers and loading a tokenizer take seconds, so a rerun that knows every
    length loads no tokenizer at all, and new records are encoded together in one batch (howto.chat.example_lengths,
    the lengths of encode_example). The cache keeps the lengths of the latest runs, at most MAX_CACHED of them."""

    MAX_CACHED = 300_000

    def __init__(self, model: str):
        from howto import chat, models

        self.model = models.resolve_model(model)  # tiny and smollm2 are built into the cache once
        folder = Path(self.model)
        identity = hashlib.sha256(json.dumps([self.model, library_versions(), chat.SYSTEM_PROMPT]).encode())
        identity.update(Path(chat.__file__).read_bytes())
        for file in sorted(folder.glob("*token*")) if folder.is_dir() else []:
            identity.update(file.read_bytes())
        self.path = models.cache_dir() / "token-lengths" / f"{identity.hexdigest()[:32]}.json"
        self.known: dict[str, int] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.used: dict[str, int] = {}
        self.added = 0
        self.tokenizer: Any = None

    def lengths(self, examples: list[tuple[str, list[str]]]) -> list[int]:
        keys = [hashlib.blake2b(json.dumps(example, ensure_ascii=False).encode(), digest_size=16).hexdigest()
                for example in examples]
        new = {key: example for key, example in zip(keys, examples) if key not in self.known}
        if new:
            if self.tokenizer is None:
                from howto.models import load_tokenizer

                self.tokenizer = load_tokenizer(self.model)
            self.known.update(zip(new, example_lengths(self.tokenizer, list(new.values()))))
            self.added += len(new)
        for key in keys:
            self.used[key] = self.known[key]
        return [self.known[key] for key in keys]

    def save(self) -> None:
        """This run's lengths first, then older ones up to MAX_CACHED; compact JSON, which loads and writes fast."""
        if self.added:
            kept = dict(list({**self.used, **self.known}.items())[:self.MAX_CACHED])
            atomic_write_text(self.path, json.dumps(kept, separators=(",", ":")))


def enforce_max_length(items: list[Item], lengths: list[int], counter: TokenCounter, max_length: int,
                       mode: str) -> tuple[list[Item], list[int], list[dict[str, Any]]]:
    """Records within the limit, their lengths, and what was done to each overlong one.

    Truncation cuts whole steps from the end, never a step in the middle, so the answer stays a clean numbered
    list; a record that needs to lose all but one step to fit is dropped instead.
    """
    kept, kept_lengths, overlong = [], [], []
    for item, length in zip(items, lengths):
        if length <= max_length:
            kept.append(item)
            kept_lengths.append(length)
            continue
        entry = {"origin": item.origin, "tokens": length, "action": "dropped"}
        if mode == "truncate":
            steps = list(item.record["response"])
            while len(steps) > 2 and length > max_length:
                steps.pop()
                length = counter.lengths([(item.record["prompt"], steps)])[0]
            if length <= max_length:
                entry.update(action=f"truncated to {len(steps)} steps, {length} tokens")
                item.record = {**item.record, "response": steps}
                kept.append(item)
                kept_lengths.append(length)
        overlong.append(entry)
    return kept, kept_lengths, overlong


# ------------------------------------------------------------------------------------------------------ split
def split_records(items: list[Item], ratios: tuple[float, float, float], seed: int) -> dict[str, list[Item]]:
    """Seeded split, stratified by category, with every near-duplicate group whole in one split.

    Within a category, groups are shuffled, largest first, and each goes to the split furthest below its target:
    the category's own share plus the whole data's share so far, so that many small categories still give val
    and test their fraction. Every split asked for (fraction > 0) gets at least one group, and the run stops when
    there are too few groups for that. A group takes the category of its first record. Each split keeps the input
    order.
    """
    units: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        units.setdefault(item.group if item.group >= 0 else -1 - i, []).append(i)
    wanted = [k for k in range(3) if ratios[k] > 0]
    if len(units) < len(wanted):
        raise RunError(f"{len(items)} records ({len(units)} once near-duplicates are grouped) cannot give "
                       f"{', '.join(SPLITS[k] for k in wanted)} a record each: add records, or give a split "
                       "fraction 0 with --split")
    by_category: dict[str, list[list[int]]] = {}
    for unit in units.values():
        by_category.setdefault(items[unit[0]].record["category"], []).append(unit)
    placed: list[tuple[list[int], int]] = []
    totals, seen = [0, 0, 0], 0
    for category in sorted(by_category):
        category_units = by_category[category]
        random.Random(f"{seed}:{category}").shuffle(category_units)
        category_units.sort(key=len, reverse=True)
        size = sum(len(u) for u in category_units)
        counts = [0, 0, 0]
        for unit in category_units:
            seen += len(unit)
            k = max(wanted, key=lambda s: (ratios[s] * (size + seen) - counts[s] - totals[s], -s))
            counts[k] += len(unit)
            totals[k] += len(unit)
            placed.append((unit, k))
    for k in wanted:  # small data: an empty split takes the smallest group of the split with the most to spare
        if totals[k] == 0:
            donors = [s for s in wanted if sum(s == d for _, d in placed) > 1]
            donor = max(donors, key=lambda s: (totals[s] - ratios[s] * len(items), -s))
            j = min((j for j, (_, s) in enumerate(placed) if s == donor), key=lambda j: len(placed[j][0]))
            totals[donor] -= len(placed[j][0])
            totals[k] += len(placed[j][0])
            placed[j] = (placed[j][0], k)
    assigned = {i: SPLITS[k] for unit, k in placed for i in unit}
    splits = {name: [item for i, item in enumerate(items) if assigned[i] == name] for name in SPLITS}
    if any(abs(totals[k] - ratios[k] * len(items)) > max(1.0, 0.01 * len(items)) for k in wanted):
        largest = max(len(u) for u in units.values())
        say(f"warning: the split {' / '.join(f'{n} {len(s)}' for n, s in splits.items())} is off the fractions "
            f"asked ({','.join(map(str, ratios))}): {len(items)} records in {len(units)} groups that stay whole"
            + (f", the largest of {largest} records" if largest > 1 else ""), "yellow")
    return splits


# ------------------------------------------------------------------------------------------------------ output
def collect_stats(args: argparse.Namespace, files: list[Path], raws: list[Raw], skipped: list[str], unknown: Counter,
                  pii: dict, normalisation: dict, dedup: dict, balance: dict, augmentation: dict | None,
                  tokens: dict, splits: dict[str, list[Item]]) -> dict[str, Any]:
    """stats.json: every count of the run, and every record dropped with the reason."""
    per_file = Counter(raw.file for raw in raws)
    return {
        "inputs": [{"file": str(f), "records": per_file[str(f)]} for f in files],
        "settings": {"seed": args.seed, "split": list(args.split), "model": args.model,
                     "max_seq_length": args.max_seq_length, "overlong": args.overlong,
                     "near_dup_threshold": args.near_dup_threshold, "thin_threshold": args.thin_threshold},
        "validation": {"records_read": len(raws), "valid": len(raws) - len(skipped), "skipped_count": len(skipped),
                       "skipped": skipped, "unknown_fields": dict(sorted(unknown.items()))},
        "pii": pii,
        "normalisation": normalisation,
        "dedup": dedup,
        "balance": balance,
        "augmentation": augmentation,
        "tokens": tokens,
        "dropped": {"invalid record (skipped)": len(skipped),
                    "no words after normalisation": normalisation["dropped_count"],
                    "exact duplicate": dedup["exact_duplicates_removed"],
                    f"over {args.max_seq_length} tokens": tokens["dropped"]},
        "splits": {name: {"records": len(split), "categories": dict(sorted(Counter(
            item.record["category"] for item in split).items()))} for name, split in splits.items()},
    }


def write_outputs(out: Path, splits: dict[str, list[Item]], items: list[Item], lengths: list[int],
                  stats: dict[str, Any], args: argparse.Namespace, files: list[Path],
                  timings: dict[str, float]) -> None:
    """All outputs into a new folder that then replaces OUT whole: a failed run leaves the old OUT as it was."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}

    def build(folder: Path) -> None:
        for name, split in splits.items():
            write_jsonl(folder / f"{name}.jsonl", (output_record(item.record) for item in split))
        write_json(folder / "stats.json", stats)
        (folder / "report.md").write_text(render_report(stats), encoding="utf-8")
        (folder / "distributions.png").write_bytes(plot_distributions([item.record for item in items], lengths, stats))
        write_run_info(folder, config, files, extra={"timings_s": timings}, gpu=False)

    atomic_dir(out, build, replace=True)


def output_record(record: dict[str, Any]) -> dict[str, Any]:
    """Fixed key order, so that the same data always gives the same bytes."""
    out = {"prompt": record["prompt"], "response": record["response"], "category": record["category"]}
    if record.get("source"):
        out["source"] = record["source"]
    if record.get("extraction"):
        out["extraction"] = record["extraction"]
    return out


if __name__ == "__main__":
    run_script(main)
