#!/usr/bin/env python
"""Turn raw how-to records into a clean, deduplicated, tokenized and split dataset.

    python prepare_data.py data/howto_steps.jsonl --out prepared

Stages, in order: load -> validate -> redact sensitive data -> normalise -> deduplicate -> balance report ->
(augment thin categories) -> token lengths -> split -> write. Redaction runs before anything is written, and
near-duplicates stay in one split so that the test set never holds a paraphrase of a training record. The same
input and seed give byte-identical train/val/test files, stats.json, report.md and distributions.png.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import io
import json
import random
import re
import statistics
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from datasketch import MinHash, MinHashLSH
from rich.console import Console
from rich.progress import track
from rich.table import Table

from howto.augment import augment
from howto.chat import encode_example, parse_steps, strip_numbering
from howto.llm import ChatClient, LLMError
from howto.pii import PLACEHOLDER_RE, name_detection_available, redact_record
from howto.runio import atomic_write_bytes, atomic_write_text, parse_args, write_json, write_jsonl, write_run_info

SPLITS = ("train", "val", "test")
DATA_SUFFIXES = (".json", ".jsonl", ".csv")
UNCATEGORIZED = "uncategorized"
MAX_LISTED = 200  # entries per list in stats.json and report.md; counts are always complete

console = Console(stderr=True)  # progress bars and messages; the summary table goes to stdout


def say(message: str, style: str | None = None) -> None:
    """A message as written: no markup (placeholders look like tags) and no wrapping, so logs can be grepped."""
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def progress(items: Iterable, description: str, total: int | None = None) -> Iterable:
    """A progress bar on a terminal; nothing in logs, where a bar would only leave blank lines."""
    return track(items, description=description, total=total, console=console, transient=True,
                 disable=not console.is_terminal)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Validate, redact, normalise, deduplicate, report on, tokenize and split how-to records.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="JSON (one record or a list), JSONL, Alpaca-style JSON/JSONL or CSV files, or folders of them")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder for train/val/test.jsonl, stats.json, report.md, distributions.png")
    p.add_argument("--keep-case", action="store_true", help="do not lowercase prompts and steps")
    p.add_argument("--keep-punctuation", action="store_true", help="do not strip punctuation from prompts and steps")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip invalid records (and list them) instead of stopping with an error")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of augmentation (default: %(default)s)")
    p.add_argument("--split", type=split_ratios, default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST",
                   help="fractions of the split, stratified by category (default: %(default)s)")
    p.add_argument("--near-dup-threshold", type=float, default=0.6, metavar="X",
                   help="MinHash Jaccard similarity of two records' word sets (prompt and steps, function words "
                        "left out) from which they are near-duplicates, kept in one split (default: %(default)s)")
    p.add_argument("--thin-threshold", type=int, default=20, metavar="N",
                   help="a category with fewer records is flagged as thin, and augmented with --augment "
                        "(default: %(default)s)")
    p.add_argument("--model", default="mistral",
                   help="model whose tokenizer and chat template count tokens: mistral, tiny, smollm2, a folder or "
                        "a hub id (default: %(default)s)")
    p.add_argument("--max-seq-length", type=int, default=1024, metavar="N",
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
    return p


def split_ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three fractions that sum to 1 with train > 0, got {text!r}")
    return parts  # type: ignore[return-value]


class DataError(Exception):
    """Input that cannot be read at all (a missing file, malformed JSON): the run stops, even with --skip-invalid."""


@dataclass(slots=True)
class Raw:
    """A record as read, before validation, with where it came from."""
    data: Any
    file: str
    line: int
    index: int
    kind: str  # "json" (also JSONL and Alpaca) or "csv"

    def where(self) -> str:
        return f"{self.file}{f':{self.line}' if self.line else ''}: record index {self.index}"


@dataclass(slots=True)
class Item:
    """A valid record on its way through the pipeline; `group` ties near-duplicates to one split."""
    record: dict[str, Any]
    origin: str
    group: int = -1


# --------------------------------------------------------------------------------------------------- loading
def find_input_files(inputs: Iterable[str], out: str | Path | None = None) -> list[Path]:
    """Files as given, and the .json/.jsonl/.csv files under folders, sorted so that runs are reproducible.

    A folder scan leaves out the output folder, so that a rerun never reads its own earlier outputs as data.
    """
    skip = Path(out).resolve() if out else None
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                           and not (skip and p.resolve().is_relative_to(skip)))
            if not found:
                raise DataError(f"{path}: folder holds no .json, .jsonl or .csv file")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in DATA_SUFFIXES:
                raise DataError(f"{path}: unsupported file type (expected .json, .jsonl or .csv)")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def json_error(path: Path, text: str, e: json.JSONDecodeError, first_line: int = 1) -> str:
    """A JSON syntax error as file:line:column, the line itself with a caret, and a hint for the usual causes.

    `first_line` is the file line where `text` starts (a JSONL line is parsed on its own).
    """
    line = e.lineno + first_line - 1
    message = f"{path}:{line}:{e.colno}: malformed JSON at line {line}, column {e.colno}: {e.msg}"
    if e.msg == "Expecting ',' delimiter":
        previous = text[: e.pos].rstrip().count("\n") + first_line
        place = "before this value" if previous == line else f"at the end of line {previous}"
        message += f"; a comma is probably missing {place} (two values are never merged into one)"
    elif e.msg == "Extra data" and path.suffix.lower() == ".json":
        message += "; a .json file holds one record or one list of records (one record a line is .jsonl)"
    lines = text.splitlines()
    if 0 < e.lineno <= len(lines):
        message += f"\n    {line} | {lines[e.lineno - 1]}\n    {' ' * len(str(line))} | {' ' * (e.colno - 1)}^"
    return message


def load_json(path: Path) -> list[Raw]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(json_error(path, text, e)) from None
    if isinstance(value, dict):
        start = len(text) - len(text.lstrip())
        return [Raw(value, str(path), text.count("\n", 0, start) + 1, 0, "json")]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a record or a list of records, got {json_type(value)}")
    lines = element_lines(text)
    return [Raw(v, str(path), line, i, "json") for i, (v, line) in enumerate(zip(value, lines))]


def element_lines(text: str) -> list[int]:
    """The line where each element of a top-level JSON array starts (the text is known to be valid JSON)."""
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    newlines = [m.start() for m in re.finditer("\n", text)]
    starts = []
    pos = text.index("[") + 1
    while True:
        pos = separators.match(text, pos).end()
        if text[pos] == "]":
            break
        starts.append(bisect.bisect_left(newlines, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return starts


def load_jsonl(path: Path) -> tuple[list[Raw], list[str]]:
    """Records of a JSONL file; a broken line is an invalid record (skippable), named with line and column."""
    raws, errors = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raws.append(Raw(json.loads(line), str(path), lineno, len(raws) + len(errors), "json"))
            except json.JSONDecodeError as e:
                errors.append(json_error(path, line, e, first_line=lineno))
    return raws, errors


def load_csv(path: Path) -> list[Raw]:
    """Rows of a CSV file with a header: `prompt` and `steps` (or `response`) columns, optional category/source."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "prompt" not in columns or not {"steps", "response"} & set(columns):
            raise DataError(f"{path}:1: a CSV needs a header with 'prompt' and 'steps' (or 'response') columns, "
                            f"found {columns}")
        raws, line = [], 2
        for index, row in enumerate(reader):
            raws.append(Raw(row, str(path), line, index, "csv"))
            line = reader.line_num + 1
    return raws


def load_inputs(files: list[Path]) -> tuple[list[Raw], list[str]]:
    """All records of all files, in file order, and the JSONL lines that could not be parsed."""
    raws: list[Raw] = []
    errors: list[str] = []
    for path in progress(files, "load"):
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                found, broken = load_jsonl(path)
                raws += found
                errors += broken
            elif suffix == ".csv":
                raws += load_csv(path)
            else:
                raws += load_json(path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV: {e}") from None
    return raws, errors


# ------------------------------------------------------------------------------------------------ validation
FIELDS = {
    "json": {"prompt", "response", "category", "source"},
    "alpaca": {"instruction", "input", "output", "category", "source"},
    "csv": {"prompt", "steps", "response", "category", "source"},
}


class RecordError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")


def json_type(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def check_text(value: Any, field: str, present: bool) -> str:
    if not present:
        raise RecordError(field, "missing")
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {json_type(value)}")
    if not value.strip():
        raise RecordError(field, "is empty")
    return value.strip()


def check_steps(steps: Any, field: str, present: bool) -> list[str]:
    """A how-to answer is a list of at least two non-empty strings."""
    if not present:
        raise RecordError(field, "missing")
    if not isinstance(steps, list):
        raise RecordError(field, f"must be an array of step strings, got {json_type(steps)}")
    if not steps:
        raise RecordError(field, "empty step list")
    for k, step in enumerate(steps):
        if not isinstance(step, str):
            raise RecordError(f"{field}[{k}]", f"step must be a string, got {json_type(step)}")
        if not step.strip():
            raise RecordError(f"{field}[{k}]", "empty step")
    if len(steps) == 1:
        raise RecordError(field, "only one step: a how-to answer needs at least two")
    return strip_numbering([s.strip() for s in steps])


def steps_from_text(text: Any, field: str, present: bool) -> Any:
    """A CSV cell or an Alpaca output: a JSON array of strings, or numbered/bulleted lines (as the model writes)."""
    if not present or not isinstance(text, str):
        return text
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(field, f"not a valid JSON array: {e.msg} at column {e.colno}") from None
    return parse_steps(text)


def optional_label(data: dict, field: str) -> str | None:
    value = data.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {json_type(value)}")
    return value.strip()


def to_record(raw: Raw) -> tuple[dict[str, Any], set[str]]:
    """The canonical record {prompt, response, category[, source]} and the unknown fields that were ignored."""
    data = raw.data
    if not isinstance(data, dict):
        raise RecordError("(record)", f"expected an object with prompt and response, got {json_type(data)}")
    if raw.kind == "csv":
        kind, field = "csv", "steps" if "steps" in data else "response"
        prompt = check_text(data.get("prompt"), "prompt", True)
        steps = check_steps(steps_from_text(data.get(field), field, True), field, True)
    elif "prompt" not in data and "instruction" in data:
        kind = "alpaca"
        prompt = check_text(data["instruction"], "instruction", True)
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError("input", f"must be a string, got {json_type(extra)}")
        if extra and extra.strip():
            prompt = f"{prompt}\n{extra.strip()}"
        steps = check_steps(steps_from_text(data.get("output"), "output", "output" in data), "output",
                            "output" in data)
    else:
        kind = "json"
        prompt = check_text(data.get("prompt"), "prompt", "prompt" in data)
        steps = check_steps(data.get("response"), "response", "response" in data)
    record: dict[str, Any] = {"prompt": prompt, "response": steps,
                              "category": optional_label(data, "category") or UNCATEGORIZED}
    source = optional_label(data, "source")
    if source:
        record["source"] = source
    return record, set(data) - FIELDS[kind]


def validate_records(raws: list[Raw]) -> tuple[list[Item], list[str], Counter]:
    """Valid records as Items, an error line (file, line, record index, field) per invalid one, unknown fields."""
    items, errors, unknown = [], [], Counter()
    for raw in progress(raws, "validate"):
        try:
            record, extra = to_record(raw)
        except RecordError as e:
            errors.append(f"{raw.where()}, {e}")
            continue
        unknown.update(extra)
        items.append(Item(record, raw.where()))
    return items, errors, unknown


# ------------------------------------------------------------------------------------ redaction, normalisation
def redact_items(items: list[Item]) -> tuple[Counter, int]:
    """Replace sensitive spans by typed placeholders in place; counts by type and how many records had any."""
    total: Counter = Counter()
    touched = 0
    for item in progress(items, "redact"):
        item.record, found = redact_record(item.record)
        total.update(found)
        touched += bool(found)
    return total, touched


_APOSTROPHE = re.compile(r"(?<=\w)['\u2019](?=\w)")  # don't -> dont: one word, as a user types it
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str, lowercase: bool = True, strip_punctuation: bool = True) -> str:
    """Lowercase, strip punctuation (apostrophes inside words are dropped, other marks become spaces) and collapse
    whitespace; placeholders such as [EMAIL] are kept as they are, since the model must learn them verbatim."""
    pieces, last = [], 0
    for match in PLACEHOLDER_RE.finditer(text) if "[" in text else ():
        pieces += [_normalize_piece(text[last:match.start()], lowercase, strip_punctuation), match.group()]
        last = match.end()
    pieces.append(_normalize_piece(text[last:], lowercase, strip_punctuation))
    return _SPACES.sub(" ", "".join(pieces)).strip()


def _normalize_piece(text: str, lowercase: bool, strip_punctuation: bool) -> str:
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = _PUNCTUATION.sub(" ", _APOSTROPHE.sub("", text))
    return text


def normalize_items(items: list[Item], lowercase: bool, strip_punctuation: bool) -> tuple[list[Item], list[str]]:
    """Normalised records; a record whose prompt or steps are only punctuation is dropped and listed."""
    kept, dropped = [], []
    for item in progress(items, "normalise"):
        record = item.record
        prompt = normalize_text(record["prompt"], lowercase, strip_punctuation)
        steps = [s for s in (normalize_text(x, lowercase, strip_punctuation) for x in record["response"]) if s]
        if not prompt or len(steps) < 2:
            dropped.append(f"{item.origin}: nothing left of the {'prompt' if not prompt else 'steps'} "
                           "after normalisation")
            continue
        item.record = {**record, "prompt": prompt, "response": steps}
        kept.append(item)
    return kept, dropped


# ----------------------------------------------------------------------------------------------- duplicates
# Function words say nothing about what a record is about; without them, unrelated how-tos share few words, so
# LSH proposes few false candidates and the search stays near linear.
STOPWORDS = frozenset(
    "a an the and or but to of in on at for from with by as into onto about up down out over under then than so if "
    "is are was be been it its this that these those there here i me my you your we our they their he she his her "
    "do does did how what when where which who why can could would should will shall may might must please".split()
)


def shingles(record: dict[str, Any]) -> list[bytes]:
    """Words of prompt and steps, lowercased whatever the normalisation flags say, function words left out."""
    words = set(" ".join([record["prompt"], *record["response"]]).lower().split())
    return [w.encode() for w in (words - STOPWORDS or words)]


def deduplicate(items: list[Item], threshold: float, num_perm: int = 128) -> tuple[list[Item], dict[str, Any]]:
    """Drop exact duplicates (the first one stays) and group near-duplicates, setting each Item's `group`.

    Near-duplicates are records whose word sets have a MinHash Jaccard estimate >= threshold, found through
    locality-sensitive hashing so the search stays near linear; records with the same prompt and different steps
    are grouped too. They are kept, since a paraphrase is useful training data, but always land in one split.
    """
    kept: list[Item] = []
    first: dict[tuple, Item] = {}
    removed = []
    for item in items:
        key = (item.record["prompt"], tuple(item.record["response"]))
        if key in first:
            removed.append({"removed": item.origin, "kept": first[key].origin, "prompt": item.record["prompt"]})
        else:
            first[key] = item
            kept.append(item)

    parent = list(range(len(kept)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    by_prompt: dict[str, int] = {}
    for i, item in enumerate(kept):
        union(i, by_prompt.setdefault(item.record["prompt"], i))

    # Recall first: every LSH candidate is checked against the threshold, so a false candidate costs one
    # comparison, while a missed pair would let a paraphrase of a training record into the test split.
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8))
    hashes = MinHash.generator((shingles(item.record) for item in kept), num_perm=num_perm, hashfunc=zlib.crc32)
    signatures = None
    for i, minhash in enumerate(progress(hashes, "near-duplicates", total=len(kept))):
        if signatures is None:
            signatures = np.empty((len(kept), num_perm), dtype=minhash.hashvalues.dtype)
        signatures[i] = minhash.hashvalues
        candidates = np.fromiter(lsh.query(minhash), dtype=np.int64)
        if candidates.size:
            similarity = (signatures[candidates] == minhash.hashvalues).mean(axis=1)
            for j in candidates[similarity >= threshold]:
                union(i, int(j))
        lsh.insert(i, minhash)

    members: dict[int, list[int]] = {}
    for i, item in enumerate(kept):
        item.group = root(i)
        members.setdefault(item.group, []).append(i)
    groups = [m for m in members.values() if len(m) > 1]
    report = {
        "exact_duplicates_removed": len(removed),
        "exact_duplicates": removed[:MAX_LISTED],
        "near_duplicate_threshold": threshold,
        "near_duplicate_groups": len(groups),
        "records_in_near_duplicate_groups": sum(len(g) for g in groups),
        "groups": [[{"origin": kept[i].origin, "prompt": kept[i].record["prompt"]} for i in g]
                   for g in groups[:MAX_LISTED]],
    }
    return kept, report


# ------------------------------------------------------------------------------------------ balance/diversity
def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts: 1.0 when no word sequence repeats, low for templated data."""
    grams: Counter = Counter()
    for text in texts:
        words = text.split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return round(len(grams) / total, 4) if total else 0.0


def describe(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "mean": round(statistics.fmean(ordered), 2),
            "p95": percentile(ordered, 95), "max": ordered[-1]}


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile: a value that occurs in the data, so it reads as a real length."""
    return ordered[max(0, -(-len(ordered) * q // 100) - 1)] if ordered else 0


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
def augment_thin(items: list[Item], wanted: dict[str, int], args: argparse.Namespace) -> tuple[list[Item], dict]:
    """New records for thin categories (category -> records wanted), put through the same validation, redaction
    and normalisation as input data; what fails is listed, never kept."""
    client = ChatClient.from_settings(args.augment_url, args.augment_model, key_env=args.augment_key_env)
    new, report = augment([item.record for item in items], wanted, client, max_records=args.augment_max_records,
                          max_requests=args.augment_max_requests, seed=args.seed)
    raws = [Raw(record, "<augmented>", 0, i, "json") for i, record in enumerate(new)]
    valid, rejected, _ = validate_records(raws)
    for item in valid:
        item.record["source"] = "augmented"
    pii, _ = redact_items(valid)
    valid, dropped = normalize_items(valid, not args.keep_case, not args.keep_punctuation)
    report = {**report, "returned": len(new), "valid": len(valid), "rejected": rejected + dropped,
              "pii_replaced": dict(sorted(pii.items()))}
    return valid, report


# ---------------------------------------------------------------------------------------------- token lengths
def token_lengths(items: list[Item], tokenizer: Any) -> list[int]:
    return [len(encode_example(tokenizer, item.record["prompt"], item.record["response"])["input_ids"])
            for item in progress(items, "tokenize")]


def enforce_max_length(items: list[Item], lengths: list[int], tokenizer: Any, max_length: int,
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
                length = len(encode_example(tokenizer, item.record["prompt"], steps)["input_ids"])
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

    Within a category, groups are shuffled, largest first, and each goes to the split furthest below its target.
    A group takes the category of its first record. Each split keeps the input order.
    """
    units: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        units.setdefault(item.group if item.group >= 0 else -1 - i, []).append(i)
    by_category: dict[str, list[list[int]]] = {}
    for unit in units.values():
        by_category.setdefault(items[unit[0]].record["category"], []).append(unit)
    assigned: dict[int, str] = {}
    for category in sorted(by_category):
        category_units = by_category[category]
        random.Random(f"{seed}:{category}").shuffle(category_units)
        category_units.sort(key=len, reverse=True)
        total = sum(len(u) for u in category_units)
        targets = [r * total for r in ratios]
        counts = [0, 0, 0]
        for unit in category_units:
            k = max(range(3), key=lambda s: (targets[s] - counts[s], -s))
            counts[k] += len(unit)
            for i in unit:
                assigned[i] = SPLITS[k]
    return {name: [item for i, item in enumerate(items) if assigned[i] == name] for name in SPLITS}


# ------------------------------------------------------------------------------------------------------ output
def output_record(record: dict[str, Any]) -> dict[str, Any]:
    """Fixed key order, so that the same data always gives the same bytes."""
    out = {"prompt": record["prompt"], "response": record["response"], "category": record["category"]}
    if record.get("source"):
        out["source"] = record["source"]
    return out


def plot_distributions(items: list[Item], lengths: list[int], stats: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    balance = stats["balance"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    names = list(balance["categories"])[::-1]
    counts = [balance["categories"][n] for n in names]
    axes[0, 0].barh(names, counts, color=["tab:red" if n in balance["thin"] else "tab:blue" for n in names])
    axes[0, 0].axvline(balance["thin_threshold"], color="tab:red", linestyle="--", label="thin threshold")
    axes[0, 0].set(title="Records per category (red: thin)", xlabel="records")
    axes[0, 0].legend()
    for ax, values, title, unit, color in (
        (axes[0, 1], [len(item.record["response"]) for item in items], "Steps per record", "steps", "tab:green"),
        (axes[1, 0], [len(item.record["prompt"].split()) for item in items], "Prompt length", "words", "tab:purple"),
    ):
        ax.hist(values, bins=range(min(values, default=0), max(values, default=0) + 2), align="left", rwidth=0.8,
                color=color)
        ax.set(title=title, xlabel=unit, ylabel="records")
    limit = stats["tokens"]["max_seq_length"]
    axes[1, 1].hist(lengths, bins=40, color="tab:orange")
    if max(lengths, default=0) * 2 >= limit:  # the limit line only where it would not squash the histogram
        axes[1, 1].axvline(limit, color="tab:red", linestyle="--", label="max seq length")
        axes[1, 1].legend()
    axes[1, 1].set(title=f"Tokenized conversation length ({stats['tokens']['model']}, limit {limit})",
                   xlabel="tokens", ylabel="records")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def render_report(stats: dict[str, Any]) -> str:
    """report.md: the same facts as stats.json, for a person."""
    v, pii, dedup, bal, tok = stats["validation"], stats["pii"], stats["dedup"], stats["balance"], stats["tokens"]
    lines = ["# Data preparation report", "", "## Inputs", ""]
    lines += [f"- `{f['file']}`: {f['records']} records" for f in stats["inputs"]]
    lines += ["", "## Validation", "", f"- records read: {v['records_read']}, valid: {v['valid']}, "
              f"skipped: {v['skipped_count']}"]
    if v["unknown_fields"]:
        lines.append("- unknown fields, ignored: " + ", ".join(f"`{k}` ({n})" for k, n in v["unknown_fields"].items()))
    lines += [f"- skipped: {e}".replace("\n", " ") for e in v["skipped"]]
    lines += ["", "## Sensitive information", "",
              f"- placeholders inserted: {pii['total']} in {pii['records_with_pii']} records"]
    lines += [f"- `[{kind}]`: {n}" for kind, n in pii["replaced"].items()]
    lines.append(f"- person names: {'Presidio' if pii['name_detection'] else 'not detected (Presidio not installed)'}")
    n = stats["normalisation"]
    lines += ["", "## Normalisation", "", f"- lowercase: {n['lowercase']}, punctuation stripped: "
              f"{n['strip_punctuation']}, whitespace collapsed, placeholders kept"]
    lines += [f"- dropped: {d}" for d in n["dropped"]]
    lines += ["", "## Duplicates", "", f"- exact duplicates removed: {dedup['exact_duplicates_removed']}"]
    lines += [f"  - {d['removed']} (same as {d['kept']})" for d in dedup["exact_duplicates"]]
    lines.append(f"- near-duplicate groups (Jaccard >= {dedup['near_duplicate_threshold']}): "
                 f"{dedup['near_duplicate_groups']} groups, {dedup['records_in_near_duplicate_groups']} records, "
                 "each group kept whole in one split")
    for group in dedup["groups"]:
        lines.append("  - " + " | ".join(f"\"{m['prompt']}\" ({m['origin']})" for m in group))
    lines += ["", "## Balance and diversity", "", "| category | records | thin |", "|---|---|---|"]
    lines += [f"| {c} | {k} | {'yes' if c in bal['thin'] else ''} |" for c, k in bal["categories"].items()]
    lines += ["", f"- thin threshold: {bal['thin_threshold']} records; thin: "
              f"{', '.join(bal['thin']) or 'none'}",
              f"- distinct-1 of prompts: {bal['distinct_1']}, distinct-2: {bal['distinct_2']}",
              f"- steps per record: {fmt_dist(bal['steps_per_record'])}",
              f"- prompt words: {fmt_dist(bal['prompt_words'])}",
              f"- words per step: {fmt_dist(bal['step_words'])}"]
    if stats["augmentation"]:
        a = stats["augmentation"]
        lines += ["", "## Augmentation", "", f"- requests: {a['requests']} ({a['http_attempts']} HTTP attempts), "
                  f"malformed answers: {a['malformed_answers']}",
                  f"- records returned: {a['returned']}, valid: {a['valid']}, added after deduplication: "
                  f"{a['added']}, placeholders inserted: {sum(a['pii_replaced'].values())}"]
        lines += [f"- `{c}`: wanted {k['wanted']}, new {k['new']}, paraphrases {k['paraphrases']}"
                  for c, k in a["per_category"].items()]
        lines += [f"- rejected: {e}" for e in a["rejected"][:MAX_LISTED]]
    lines += ["", "## Tokens", "", f"- tokenizer: `{tok['model']}`, canonical chat format",
              f"- length: max {tok['max']}, p95 {tok['p95']}, mean {tok['mean']}",
              f"- over {tok['max_seq_length']} tokens: {tok['over_limit']} ({tok['overlong_action']})"]
    lines += [f"  - {o['origin']}: {o['tokens']} tokens, {o['action']}" for o in tok["overlong"]]
    lines += ["", "## Split", "", f"seed {stats['settings']['seed']}, fractions {stats['settings']['split']}, "
              "stratified by category", "", "| split | records | categories |", "|---|---|---|"]
    for name, s in stats["splits"].items():
        lines.append(f"| {name} | {s['records']} | {', '.join(f'{c} {k}' for c, k in s['categories'].items())} |")
    lines += ["", "![distributions](distributions.png)", ""]
    return "\n".join(lines)


def fmt_dist(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if k != "histogram")


def print_summary(stats: dict[str, Any], timings: dict[str, float], out: Path) -> None:
    table = Table(title=f"prepare_data -> {out}")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    v, dedup, tok = stats["validation"], stats["dedup"], stats["tokens"]
    rows = [
        ("load", f"{v['records_read']} records from {len(stats['inputs'])} files"),
        ("validate", f"{v['valid']} valid, {v['skipped_count']} skipped"),
        ("redact", f"{stats['pii']['total']} placeholders "
                   + " ".join(f"{k}={n}" for k, n in stats["pii"]["replaced"].items())),
        ("normalise", f"{len(stats['normalisation']['dropped'])} dropped"),
        ("deduplicate", f"{dedup['exact_duplicates_removed']} exact removed, {dedup['near_duplicate_groups']} "
                        f"near-dup groups ({dedup['records_in_near_duplicate_groups']} records)"),
        ("balance", f"{len(stats['balance']['categories'])} categories, thin: "
                    f"{', '.join(stats['balance']['thin']) or 'none'}"),
    ]
    if stats["augmentation"]:
        rows.append(("augment", f"{stats['augmentation']['added']} records added"))
    rows += [
        ("tokenize", f"max {tok['max']}, p95 {tok['p95']}, {tok['over_limit']} over {tok['max_seq_length']} "
                     f"({tok['overlong_action']})"),
        ("split", " / ".join(f"{name} {s['records']}" for name, s in stats["splits"].items())),
    ]
    for stage, result in rows:
        table.add_row(stage, result, f"{timings.get(stage, 0):.2f}")
    Console().print(table)


# -------------------------------------------------------------------------------------------------------- main
def augment_and_deduplicate(items: list[Item], balance: dict, dedup: dict,
                            args: argparse.Namespace) -> tuple[list[Item], dict, dict, dict]:
    """Records, dedup report, balance report and augmentation report after new records join the data."""
    wanted = {category: args.thin_threshold - n for category, n in balance["thin"].items()}
    new, augmentation = augment_thin(items, wanted, args)
    before = len(items)
    items, final = deduplicate(items + new, args.near_dup_threshold)
    augmentation["added"] = len(items) - before
    augmentation["balance_before"] = {"categories": balance["categories"], "thin": balance["thin"]}
    dedup = {**final, "exact_duplicates": (dedup["exact_duplicates"] + final["exact_duplicates"])[:MAX_LISTED],
             "exact_duplicates_removed": dedup["exact_duplicates_removed"] + final["exact_duplicates_removed"]}
    return items, dedup, balance_report(items, args.thin_threshold), augmentation


def measure_tokens(items: list[Item], args: argparse.Namespace) -> tuple[list[Item], list[int], dict[str, Any]]:
    """Token lengths in the canonical chat format of the chosen model, with overlong records dropped or cut."""
    from howto.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model))
    lengths = token_lengths(items, tokenizer)
    ordered = sorted(lengths)
    over_limit = sum(length > args.max_seq_length for length in lengths)
    tokens = {"model": args.model, "max": ordered[-1], "p95": percentile(ordered, 95),
              "mean": round(statistics.fmean(ordered), 1), "max_seq_length": args.max_seq_length,
              "over_limit": over_limit, "overlong_action": args.overlong}
    items, lengths, tokens["overlong"] = enforce_max_length(items, lengths, tokenizer, args.max_seq_length,
                                                            args.overlong)
    if over_limit:
        say(f"warning: {over_limit} records over {args.max_seq_length} tokens, "
            f"{'truncated or dropped' if args.overlong == 'truncate' else 'dropped'} (see report.md)", "yellow")
    if not items:
        raise DataError(f"no record fits in --max-seq-length {args.max_seq_length}")
    return items, lengths, tokens


def write_outputs(out: Path, splits: dict[str, list[Item]], items: list[Item], lengths: list[int],
                  stats: dict[str, Any], args: argparse.Namespace, files: list[Path],
                  timings: dict[str, float]) -> None:
    for name, split in splits.items():
        write_jsonl(out / f"{name}.jsonl", (output_record(item.record) for item in split))
    write_json(out / "stats.json", stats)
    atomic_write_text(out / "report.md", render_report(stats))
    atomic_write_bytes(out / "distributions.png", plot_distributions(items, lengths, stats))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    write_run_info(out, config, files, extra={"timings_s": timings})


def run(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now

    files = find_input_files(args.inputs, args.out)
    raws, broken = load_inputs(files)
    lap("load")

    items, invalid, unknown = validate_records(raws)
    errors = broken + invalid
    if errors and not args.skip_invalid:
        for e in errors[:50]:
            say(f"error: {e}", "red")
        more = f" ({len(errors) - 50} more not shown)" if len(errors) > 50 else ""
        say(f"{len(errors)} invalid record{'s' * (len(errors) > 1)}{more}: fix them or run with --skip-invalid",
            "red")
        return 1
    for e in errors[:50]:
        say(f"skipped: {e}", "yellow")
    if unknown:
        say("warning: ignoring unknown fields " + ", ".join(f"'{k}' ({n} records)" for k, n in sorted(unknown.items())),
            "yellow")
    lap("validate")

    pii, touched = redact_items(items)
    lap("redact")
    items, dropped = normalize_items(items, not args.keep_case, not args.keep_punctuation)
    lap("normalise")
    if not items:
        raise DataError("no valid record left to prepare")
    items, dedup = deduplicate(items, args.near_dup_threshold)
    lap("deduplicate")
    balance = balance_report(items, args.thin_threshold)
    lap("balance")

    augmentation = None
    if args.augment and not balance["thin"]:
        say(f"--augment: no category below {args.thin_threshold} records, nothing to augment")
    elif args.augment:
        items, dedup, balance, augmentation = augment_and_deduplicate(items, balance, dedup, args)
        lap("augment")

    items, lengths, tokens = measure_tokens(items, args)
    lap("tokenize")
    splits = split_records(items, args.split, args.seed)
    lap("split")

    per_file = Counter(raw.file for raw in raws)
    stats = {
        "inputs": [{"file": str(f), "records": per_file[str(f)]} for f in files],
        "settings": {"seed": args.seed, "split": list(args.split), "model": args.model,
                     "max_seq_length": args.max_seq_length, "overlong": args.overlong,
                     "near_dup_threshold": args.near_dup_threshold, "thin_threshold": args.thin_threshold},
        "validation": {"records_read": len(raws) + len(broken), "valid": len(raws) - len(invalid),
                       "skipped_count": len(errors), "skipped": errors,
                       "unknown_fields": dict(sorted(unknown.items()))},
        "pii": {"replaced": dict(sorted(pii.items())), "total": sum(pii.values()), "records_with_pii": touched,
                "name_detection": name_detection_available()},
        "normalisation": {"lowercase": not args.keep_case, "strip_punctuation": not args.keep_punctuation,
                          "dropped": dropped},
        "dedup": dedup,
        "balance": balance,
        "augmentation": augmentation,
        "tokens": tokens,
        "splits": {name: {"records": len(split), "categories": dict(sorted(Counter(
            item.record["category"] for item in split).items()))} for name, split in splits.items()},
    }
    out = Path(args.out)
    write_outputs(out, splits, items, lengths, stats, args, files, timings)
    lap("write")
    print_summary(stats, timings, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv, section="prepare_data")
    if not args.inputs:
        parser.error("give at least one INPUT file or folder")
    if not 0 < args.near_dup_threshold <= 1:
        parser.error("--near-dup-threshold must be in (0, 1]")
    try:
        return run(args)
    except (DataError, LLMError) as e:
        say(f"error: {e}", "red")
        return 1


if __name__ == "__main__":
    sys.exit(main())
