"""How-to records read from JSON, JSONL and CSV files, and the one check that makes a record clean.

Every problem names the file and line (and the column of a JSON syntax error), so it can be fixed where it is.
prepare_data.py reads raw inputs in all three formats; finetune.py and evaluate.py read the JSONL splits it wrote
through `read_clean`. The reference steps are called `response` everywhere, as in the specification.

A clean record: {"prompt": str, "response": [str, str, ...], "category": str[, "source": str][, "extraction": str]
[, "passage": str]}; a collected record's passage is the text of the page it came from, shown to reviewers.
"""
from __future__ import annotations

import bisect
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from howto.chat import parse_steps, strip_numbering
from howto.runio import RunError

SUFFIXES = (".json", ".jsonl", ".csv")
UNCATEGORIZED = "uncategorized"
FIELDS = {
    "json": {"prompt", "response", "category", "source", "extraction", "passage"},
    "alpaca": {"instruction", "input", "output", "category", "source", "extraction", "passage"},
    "csv": {"prompt", "steps", "response", "category", "source", "extraction", "passage"},
}


class RecordError(ValueError):
    """One record that is not a valid how-to record: skippable with --skip-invalid, listed with its place."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"field '{field}': {message}" if field else message)


@dataclass(slots=True)
class Raw:
    """A record as read, before validation, with where it came from; `problem` when it could not be read."""
    data: Any
    file: str
    line: int
    index: int
    kind: str  # "json" (also JSONL and Alpaca) or "csv"
    problem: str | None = None

    def where(self) -> str:
        return f"{self.file}{f':{self.line}' if self.line else ''}: record index {self.index}"


# ------------------------------------------------------------------------------------------------------- reading
def read_records(path: str | Path) -> list[Raw]:
    """The records of a .json (one record or a list), .jsonl or .csv file, in file order.

    A file that cannot be read as a whole (not UTF-8, malformed JSON, a CSV without the needed columns) raises
    RunError. A JSONL line that is not JSON, or a record with a key written twice, comes back as a Raw with a
    `problem`, so that it is reported in line order with the other invalid records.
    """
    path = Path(path)
    try:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".csv":
            return _read_csv(path)
        return _read_json(path)
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except csv.Error as e:
        raise RunError(f"{path}: malformed CSV: {e}") from None


class _Keys:
    """A JSON decoder that notes keys written twice in one object (json keeps the last one without a word)."""

    def __init__(self) -> None:
        self.repeated: list[str] = []
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        self.repeated += [k for k, _ in pairs if k in seen or seen.add(k)]
        return dict(pairs)

    def decode(self, text: str, pos: int = 0) -> tuple[Any, int, list[str]]:
        """The value at `pos`, where it ends, and the keys it repeats."""
        self.repeated = []
        value, end = self.decoder.raw_decode(text, pos)
        return value, end, self.repeated


def _repeated(keys: list[str]) -> str:
    return f"key {', '.join(repr(k) for k in dict.fromkeys(keys))} written twice in one object (which one is meant?)"


def _read_jsonl(path: Path) -> list[Raw]:
    raws: list[Raw] = []
    keys = _Keys()
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")  # an error at the end of a cut-off line is on this line, not the next
            if not line.strip():
                continue
            raw = Raw(None, str(path), lineno, len(raws), "json")
            try:
                raw.data, end, repeated = keys.decode(line, len(line) - len(line.lstrip()))
                if line[end:].strip():
                    raise json.JSONDecodeError("Extra data", line, end)
                if repeated:
                    raw.problem = f"{raw.where()}, {_repeated(repeated)}"
            except json.JSONDecodeError as e:
                raw.problem = json_error(path, line, e, first_line=lineno)
            except RecursionError:
                raw.problem = f"{raw.where()}, JSON nested too deeply to be a record"
            raws.append(raw)
    return raws


def _read_json(path: Path) -> list[Raw]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(json_error(path, text, e)) from None
    except RecursionError:
        raise RunError(f"{path}: JSON nested too deeply to hold records") from None
    if not isinstance(value, (dict, list)):
        raise RunError(f"{path}: expected a record or a list of records, got {json_type(value)}")
    keys = _Keys()
    newlines = [m.start() for m in re.finditer("\n", text)]
    starts = [len(text) - len(text.lstrip())] if isinstance(value, dict) else _element_starts(text, keys)
    raws = []
    for index, start in enumerate(starts):
        data, _, repeated = keys.decode(text, start)
        raw = Raw(data, str(path), bisect.bisect_left(newlines, start) + 1, index, "json")
        if repeated:
            raw.problem = f"{raw.where()}, {_repeated(repeated)}"
        raws.append(raw)
    return raws


def _element_starts(text: str, keys: _Keys) -> list[int]:
    """Where each element of a top-level JSON array starts (the text is known to be valid JSON)."""
    separators = re.compile(r"[\s,]*")
    starts = []
    pos = text.index("[") + 1
    while True:
        pos = separators.match(text, pos).end()
        if text[pos] == "]":
            return starts
        starts.append(pos)
        _, pos, _ = keys.decode(text, pos)


def _read_csv(path: Path) -> list[Raw]:
    """Rows of a CSV file with a header: `prompt` and `steps` (or `response`) columns, optional category/source."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        columns = next(reader, [])
        if "prompt" not in columns or not {"steps", "response"} & set(columns):
            raise RunError(f"{path}:1: a CSV needs a header with 'prompt' and 'steps' (or 'response') columns, "
                           f"found {columns}")
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise RunError(f"{path}:1: column {', '.join(map(repr, twice))} named twice in the header")
        raws, line = [], 2
        for cells in reader:
            if cells:  # a blank line holds no record
                raw = Raw(dict(zip(columns, cells)), str(path), line, len(raws), "csv")
                if len(cells) > len(columns):
                    raw.problem = (f"{raw.where()}, {len(cells)} cells in a row under a header of {len(columns)} "
                                   "columns (an unquoted comma?)")
                raws.append(raw)
            line = reader.line_num + 1
    return raws


def json_error(path: Path, text: str, e: json.JSONDecodeError, first_line: int = 1) -> str:
    """A JSON syntax error as file:line:column, the line itself with a caret, and a hint for the usual causes.

    `first_line` is the file line where `text` starts (a JSONL line is parsed on its own).
    """
    line = e.lineno + first_line - 1
    message = f"{path}:{line}:{e.colno}: malformed JSON at line {line}, column {e.colno}: {e.msg}"
    if e.pos >= len(text.rstrip()):
        message += "; the text ends before the record does (a cut-off line?)"
    elif e.msg == "Expecting ',' delimiter":
        previous = text[: e.pos].rstrip().count("\n") + first_line
        place = "before this value" if previous == line else f"at the end of line {previous}"
        message += f"; a comma is probably missing {place} (two values are never merged into one)"
    elif e.msg == "Extra data" and path.suffix.lower() == ".json":
        message += "; a .json file holds one record or one list of records (one record a line is .jsonl)"
    lines = text.splitlines()
    if 0 < e.lineno <= len(lines):
        message += f"\n    {line} | {lines[e.lineno - 1]}\n    {' ' * len(str(line))} | {' ' * (e.colno - 1)}^"
    return message


# ---------------------------------------------------------------------------------------------------- validation

def json_value(path: Path, text: str, line: int, holds: str) -> Any:
    """The JSON value of a file or of one JSONL line (starting at file line `line`); a syntax error names the file's
    own line and column, and a value nested too deeply for Python's parser is said to be no `holds`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(json_error(path, text, e, first_line=line).splitlines()[0]) from None
    except RecursionError:
        raise RunError(f"{path}:{line}: JSON nested too deeply to be {holds}") from None

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
    """A how-to answer is a list of at least two non-empty strings; numbering written into them is dropped."""
    if not present:
        raise RecordError(field, "missing")
    if not isinstance(steps, list):
        hint = " (one string holds no steps: split it, one string a step)" if isinstance(steps, str) else ""
        raise RecordError(field, f"must be a list of steps, a JSON array of strings like [\"Open the app.\", "
                                 f"\"Tap Settings.\"], got {json_type(steps)}{hint}")
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


def steps_from_text(text: Any, field: str) -> Any:
    """A CSV cell or an Alpaca output: a JSON array of strings, or numbered/bulleted lines (as the model writes)."""
    if not isinstance(text, str):
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
    """The clean record and the unknown fields that were ignored; RecordError names the field at fault."""
    data = raw.data
    if not isinstance(data, dict):
        raise RecordError("(record)", f"expected an object with prompt and response, got {json_type(data)}")
    if raw.kind == "csv":
        kind, field = "csv", "steps" if "steps" in data else "response"
        prompt = check_text(data.get("prompt"), "prompt", True)
        steps = check_steps(steps_from_text(data.get(field), field), field, True)
    elif "prompt" not in data and "instruction" in data:
        kind = "alpaca"
        prompt = check_text(data["instruction"], "instruction", True)
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError("input", f"must be a string, got {json_type(extra)}")
        if extra and extra.strip():
            prompt = f"{prompt}\n{extra.strip()}"
        steps = check_steps(steps_from_text(data.get("output"), "output"), "output", "output" in data)
    else:
        kind = "json"
        prompt = check_text(data.get("prompt"), "prompt", "prompt" in data)
        steps = check_steps(data.get("response"), "response", "response" in data)
    record: dict[str, Any] = {"prompt": prompt, "response": steps,
                              "category": optional_label(data, "category") or UNCATEGORIZED}
    # provenance: where the record came from, how it was extracted, the text it was extracted from
    for label in ("source", "extraction", "passage"):
        value = optional_label(data, label)
        if value:
            record[label] = value
    return record, set(data) - FIELDS[kind]


def read_clean(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, clean record) of each record of a prepared JSONL split; the first problem stops the run, named
    `file:line: field 'x': ...`."""
    rows = []
    for raw in read_records(path):
        if raw.problem:
            raise RunError(raw.problem)
        try:
            rows.append((raw.line, to_record(raw)[0]))
        except RecordError as e:
            raise RunError(f"{path}:{raw.line}: {e}") from None
    return rows


def string_list(value: Any, where: str, field: str, hint: str = "") -> list[str]:
    """A field that must be a non-empty list of non-empty strings, stripped; the error names where and the field."""
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s.strip() for s in value):
        raise RunError(f"{where}: field {field!r} must be a non-empty list of non-empty strings{hint}")
    return [s.strip() for s in value]


def read_text_records(path: str | Path, flag: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
                      shape: str = "a JSON object") -> list[tuple[str, dict[str, Any]]]:
    """(file:line, record) of a small JSONL file of text fields (the forgetting probe, general conversations): each
    required field a non-empty string, each optional one absent or a non-empty string, stripped; the record's other
    fields kept as they are. Every error names the file and line (or the flag, for a missing file) and the field."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{flag} {path}: no such file")
    rows = []
    for raw in read_records(path):
        where = f"{path}:{raw.line}"
        if raw.problem:
            raise RunError(raw.problem)
        if not isinstance(raw.data, dict):
            raise RunError(f"{where}: expected {shape}")
        record = dict(raw.data)
        for field in (*required, *optional):
            value = record.get(field)
            if (field in required or value is not None) and (not isinstance(value, str) or not value.strip()):
                raise RunError(f"{where}: field {field!r} must be a non-empty string")
            if value is not None:
                record[field] = value.strip()
        rows.append((where, record))
    return rows

