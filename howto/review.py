"""Review of collected records by people: a Label Studio project, or an editable sheet, read back as input.

    python prepare_data.py my_pages/ --out runs/data --review runs/review     # writes the files below
    python prepare_data.py runs/review/export.json --out runs/data            # a Label Studio JSON export

`--review DIR` writes `labeling_config.xml` and `tasks.json` (import both into Label Studio: every record
pre-filled as a prediction, the passage of the page it came from beside the editable question and steps, the steps
one a line so that they can be reordered, accept or reject), and the same records as `review.jsonl` and
`review.csv` for a review without Label Studio: edit the prompt and steps, set `decision` to `reject` to drop a
record. All of them come back through prepare_data.py: accepted and edited records keep their `source`, `category`,
`passage` and `extraction` (with how the review went), rejected and unreviewed ones are counted and dropped.

What comes back is checked against a schema first (SCHEMAS): a file that is not what Label Studio or the sheet
writes stops the run with one line naming the file, the task or line, and the field.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from jsonschema import Draft202012Validator, ValidationError

from howto.chat import parse_steps
from howto.records import json_type, json_value
from howto.runio import RunError, atomic_write_text, write_json, write_jsonl

DECISIONS = ("accept", "reject")
Reviewed = tuple[int, str, dict[str, Any], str, str, list[str]]  # line, where, original, decision, prompt, steps
SHEET_COLUMNS = ("id", "decision", "prompt", "steps", "passage", "category", "source", "extraction")
PROVENANCE = ("category", "source", "extraction", "passage")
# A cell that a spreadsheet would run as a formula starts with one of these (OWASP, CSV injection); written with a
# leading apostrophe, which reading the sheet back takes off again.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
# The source is shown as a label (a Header of `source_label`, a copy of `source`: Label Studio resolves `$source` to the
# whole task), never given to an object tag that may load it as a URL; the passage is text stored in the task
# (valueType="text"), its lines kept.
LABEL_CONFIG = """<View>
  <Style>.htx-text { white-space: pre-wrap; }</Style>
  <Header value="Collected how-to record: check the question and the steps against the passage of the page"/>
  <View style="display: flex; gap: 24px; align-items: flex-start">
    <View style="flex: 1; min-width: 0">
      <Header value="Passage of the page" size="5"/>
      <Header value="$source_label" size="6" style="font-weight: normal; overflow-wrap: anywhere"/>
      <Text name="passage" value="$passage" valueType="text" saveTextResult="no" selectionEnabled="false"/>
    </View>
    <View style="flex: 1; min-width: 0">
      <Header value="Question" size="5"/>
      <TextArea name="prompt" toName="passage" editable="true" maxSubmissions="1" rows="2" required="true"/>
      <Header value="Steps, one a line, in order: edit, add, delete or move lines" size="5"/>
      <TextArea name="steps" toName="passage" editable="true" maxSubmissions="1" rows="12" required="true"/>
      <Choices name="decision" toName="passage" choice="single" showInline="true" required="true">
        <Choice value="accept"/>
        <Choice value="reject"/>
      </Choices>
    </View>
  </View>
</View>
"""

_TEXT = {"type": ["string", "null"]}
_STEPS = {"type": "array", "items": {"type": "string"}}
SCHEMAS = {
    "task": {"type": "object", "required": ["data"], "properties": {
        "id": {"type": ["integer", "string"]},
        "data": {"type": "object", "required": ["prompt", "steps"], "properties": {
            "prompt": {"type": "string"}, "steps": _STEPS, **{k: _TEXT for k in PROVENANCE}}},
        "annotations": {"type": ["array", "null"], "items": {"type": "object", "properties": {
            "id": {"type": ["integer", "string", "null"]},
            "was_cancelled": {"type": ["boolean", "null"]},
            "updated_at": _TEXT,
            "result": {"type": ["array", "null"], "items": {"type": "object", "required": ["from_name", "value"],
                                                            "properties": {
                "from_name": {"type": "string"},
                "value": {"type": "object", "properties": {
                    "text": {"type": ["array", "string"], "items": {"type": "string"}},
                    "choices": {"type": "array", "items": {"type": "string"}}}}}}}}}}}},
    "row": {"type": "object", "required": ["prompt", "response"], "properties": {
        "id": {"type": ["integer", "string", "null"]}, "decision": _TEXT, "prompt": {"type": "string"},
        "response": _STEPS, **{k: _TEXT for k in PROVENANCE}}},
}
VALIDATORS = {name: Draft202012Validator(schema) for name, schema in SCHEMAS.items()}


def _result(name: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"from_name": name, "to_name": "passage", "type": kind, "value": value}


def write_review(folder: str | Path, records: list[dict[str, Any]]) -> None:
    """The Label Studio config and tasks, and the same records as an editable JSONL and CSV sheet."""
    folder = Path(folder)
    atomic_write_text(folder / "labeling_config.xml", LABEL_CONFIG)
    tasks = [{"data": {"prompt": r["prompt"], "steps": r["response"], **{k: r.get(k, "") for k in PROVENANCE},
                       "source_label": f"Source: {r.get('source') or 'not given'}"},
              "predictions": [{"model_version": r.get("extraction", "") or "input", "result": [
                  _result("prompt", "textarea", {"text": [r["prompt"]]}),
                  _result("steps", "textarea", {"text": ["\n".join(r["response"])]}),
                  _result("decision", "choices", {"choices": ["accept"]})]}]} for r in records]
    write_json(folder / "tasks.json", tasks)
    write_jsonl(folder / "review.jsonl", ({"id": k, "decision": "accept", "prompt": r["prompt"],
                                          "response": r["response"], **{c: r.get(c, "") for c in PROVENANCE}}
                                         for k, r in enumerate(records, 1)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for k, r in enumerate(records, 1):
        row = {"id": k, "decision": "accept", "prompt": r["prompt"], "steps": "\n".join(r["response"]),
               **{c: r.get(c, "") for c in PROVENANCE}}
        writer.writerow({c: inert_cell(v) if isinstance(v, str) else v for c, v in row.items()})
    atomic_write_text(folder / "review.csv", buffer.getvalue())


def inert_cell(text: str) -> str:
    """A cell a spreadsheet shows as text, never runs as a formula ("=HYPERLINK(...)" -> "'=HYPERLINK(...)")."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def cell_text(cell: str) -> str:
    """The text of a cell written by inert_cell."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


# ------------------------------------------------------------------------------------------------- reading back
def review_kind(path: Path) -> str | None:
    """"labelstudio" for a Label Studio JSON export, "sheet" for a review.jsonl/review.csv sheet, else None."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return "sheet" if "decision" in {c.strip().lower() for c in next(csv.reader(f), [])} else None
    if suffix not in (".json", ".jsonl"):
        return None
    first = first_object(path)
    if "data" in first and "annotations" in first:
        return "labelstudio"
    return "sheet" if "decision" in first else None


def first_object(path: Path) -> dict[str, Any]:
    """The first record of a JSON or JSONL file when it is an object, else {}: enough to tell what the file is.
    Files that do not parse count as {}; the record loader reports their errors with line and column."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text) if path.suffix.lower() == ".json" else \
            json.loads(next((line for line in text.splitlines() if line.strip()), "null"))
    except (json.JSONDecodeError, RecursionError):
        return {}
    first = value[0] if isinstance(value, list) and value else value
    return first if isinstance(first, dict) else {}


def read_review(path: Path, kind: str) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, int], list[str]]:
    """(line, raw record) of each kept record (line 0 for a Label Studio task), the counts of accepted, edited,
    rejected and unreviewed records, and a line per dropped record saying why."""
    counts = {"accepted": 0, "edited": 0, "rejected": 0, "not_reviewed": 0}
    kept, dropped = [], []
    for line, where, original, decision, prompt, steps in (_label_studio(path) if kind == "labelstudio" else
                                                            _sheet(path)):
        if decision not in DECISIONS:
            key, reason = "not_reviewed", "not reviewed" if not decision else f"unknown decision {decision!r}"
        elif decision == "reject":
            key, reason = "rejected", "rejected in review"
        else:
            edited = prompt.strip() != original["prompt"].strip() or steps != original["steps"]
            key, reason = ("edited" if edited else "accepted"), ""
        counts[key] += 1
        if reason:
            dropped.append(f"{path}: {where}: {reason} ({original['source'] or original['prompt'][:60]})")
            continue
        extraction = ", ".join(filter(None, [original["extraction"], f"{key} in review"]))
        record = {"prompt": prompt, "response": steps, "source": original["source"] or None, "extraction": extraction}
        kept.append((line, {**record, **{k: original[k] for k in ("category", "passage") if original[k]}}))
    return kept, counts, dropped


def check(value: Any, schema: str, path: Path, where: str) -> None:
    """Stop with one line naming the file, the task or line, and the field, when `value` does not fit the schema."""
    error = next(iter(sorted(VALIDATORS[schema].iter_errors(value), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        raise RunError(f"{path}: {where}: {schema_message(error)}")


def schema_message(error: ValidationError) -> str:
    """"field 'annotations[0].result[1]': must be an object, got a string" and the like."""
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"field '{f'{field}.' if field else ''}{missing}': missing"
    if error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        names = {"array": "a list", "object": "an object", "string": "a string", "integer": "a number",
                 "null": "null", "boolean": "true or false"}
        hint = " (a list of steps, one string each)" if field.endswith(("steps", "response")) else ""
        return (f"field '{field or '(record)'}': must be {' or '.join(names.get(w, w) for w in wanted)}{hint}, "
                f"got {json_type(error.instance)}")
    return f"field '{field or '(record)'}': {error.message}"


def _original(data: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": data["prompt"], "steps": list(data["steps"]), **{k: str(data.get(k) or "") for k in PROVENANCE}}


def _label_studio(path: Path) -> Iterator[Reviewed]:
    """(0, "task N", original, decision, prompt, steps) of each task of an export (a list of tasks, or one task),
    from its latest submitted annotation: the latest `updated_at`, and the later one in the export on a tie."""
    tasks = json_value(path, path.read_text(encoding="utf-8-sig"), 1, "a Label Studio export")
    tasks = [tasks] if isinstance(tasks, dict) else tasks
    if not isinstance(tasks, list):
        raise RunError(f"{path}: a Label Studio export is a list of tasks, got {json_type(tasks)}")
    for k, task in enumerate(tasks, 1):
        where = f"task {task.get('id', k) if isinstance(task, dict) else k}"
        check(task, "task", path, where)
        original = _original(task["data"])
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            yield 0, where, original, "", original["prompt"], original["steps"]
            continue
        latest = max(enumerate(annotations), key=lambda ka: (ka[1].get("updated_at") or "", ka[0]))[1]
        values = {r["from_name"]: r["value"] for r in latest.get("result") or []}
        prompt = "\n".join(_texts(values.get("prompt", {}))) or original["prompt"]
        steps_text = "\n".join(_texts(values.get("steps", {})))
        steps = parse_steps(steps_text) if steps_text.strip() else original["steps"]
        decision = (values.get("decision", {}).get("choices") or [""])[0]
        yield 0, where, original, decision, prompt, steps


def _texts(value: dict[str, Any]) -> list[str]:
    """A textarea's texts: a list, as Label Studio writes it, or one string, as a hand-edited export may hold."""
    text = value.get("text") or []
    return [text] if isinstance(text, str) else text


def _sheet(path: Path) -> Iterator[Reviewed]:
    """(line, "line N", original, decision, prompt, steps) of each row of a review.jsonl or review.csv sheet. A sheet
    keeps no copy of what was extracted, so its kept rows count as accepted, edited or not."""
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows, start = [], 2
            for row in reader:
                cells = {str(k).strip().lower(): cell_text(v) for k, v in row.items() if k is not None and
                         isinstance(v, str)}
                rows.append((start, {**cells, "response": parse_steps(cells.get("steps") or "")}))
                start = reader.line_num + 1
    else:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        rows = [(n, json_value(path, line, n, "a review row")) for n, line in enumerate(lines, 1) if line.strip()]
    for line, row in rows:
        check(row, "row", path, f"line {line}")
        original = _original({**row, "steps": row["response"]})
        yield line, f"line {line}", original, str(row.get("decision") or "").strip().lower(), original["prompt"], \
            original["steps"]

