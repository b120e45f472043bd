"""Review of collected records by people: a Label Studio project, or an editable sheet, read back as input.

    python prepare_data.py my_pages/ --out runs/data --review runs/review     # writes the files below
    python prepare_data.py runs/review/export.json --out runs/data            # a Label Studio JSON export

`--review DIR` writes `labeling_config.xml` and `tasks.json` (import both into Label Studio: every record
pre-filled as a prediction, the question and the steps editable, the steps one a line so that they can be reordered,
accept or reject), and the same records as `review.jsonl` and `review.csv` for a review without Label Studio:
edit the prompt and steps, set `decision` to `reject` to drop a record. All of them come back through prepare_data.py:
accepted and edited records keep their `source` and `extraction` (with how the review went), rejected and unreviewed
ones are counted and dropped.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from howto.chat import parse_steps
from howto.runio import atomic_write_text, write_json, write_jsonl

DECISIONS = ("accept", "reject")
Reviewed = tuple[int, str, dict[str, Any], str, str, list[str]]  # line, where, original, decision, prompt, steps
SHEET_COLUMNS = ("id", "decision", "prompt", "steps", "source", "extraction")
LABEL_CONFIG = """<View>
  <Header value="Collected how-to record: check the question and the steps against the source"/>
  <Text name="source" value="$source"/>
  <Header value="Question"/>
  <TextArea name="prompt" toName="source" editable="true" maxSubmissions="1" rows="2" required="true"/>
  <Header value="Steps, one a line, in order: edit, add, delete or move lines"/>
  <TextArea name="steps" toName="source" editable="true" maxSubmissions="1" rows="12" required="true"/>
  <Choices name="decision" toName="source" choice="single" showInline="true" required="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
  </Choices>
</View>
"""


def _result(name: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"from_name": name, "to_name": "source", "type": kind, "value": value}


def write_review(folder: str | Path, records: list[dict[str, Any]]) -> None:
    """The Label Studio config and tasks, and the same records as an editable JSONL and CSV sheet."""
    folder = Path(folder)
    atomic_write_text(folder / "labeling_config.xml", LABEL_CONFIG)
    tasks = [{"data": {"prompt": r["prompt"], "steps": r["response"], "source": r.get("source", ""),
                       "extraction": r.get("extraction", "")},
              "predictions": [{"model_version": r.get("extraction", "") or "input", "result": [
                  _result("prompt", "textarea", {"text": [r["prompt"]]}),
                  _result("steps", "textarea", {"text": ["\n".join(r["response"])]}),
                  _result("decision", "choices", {"choices": ["accept"]})]}]} for r in records]
    write_json(folder / "tasks.json", tasks)
    write_jsonl(folder / "review.jsonl", ({"id": k, "decision": "accept", "prompt": r["prompt"],
                                          "response": r["response"], "source": r.get("source", ""),
                                          "extraction": r.get("extraction", "")}
                                         for k, r in enumerate(records, 1)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for k, r in enumerate(records, 1):
        writer.writerow({"id": k, "decision": "accept", "prompt": r["prompt"], "steps": "\n".join(r["response"]),
                         "source": r.get("source", ""), "extraction": r.get("extraction", "")})
    atomic_write_text(folder / "review.csv", buffer.getvalue())


# ------------------------------------------------------------------------------------------------- reading back
def review_kind(path: Path) -> str | None:
    """"labelstudio" for a Label Studio JSON export, "sheet" for a review.jsonl/review.csv sheet, else None."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return "sheet" if "decision" in next(csv.reader(f), []) else None
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
        kept.append((line, {"prompt": prompt, "response": steps, "source": original["source"] or None,
                            "extraction": extraction}))
    return kept, counts, dropped


def _label_studio(path: Path) -> Iterator[Reviewed]:
    """(0, "task N", original, decision, prompt, steps) of each task of an export, from its latest submitted
    annotation."""
    tasks = json.loads(path.read_text(encoding="utf-8-sig"))
    for k, task in enumerate(tasks, 1):
        data = task.get("data", {})
        original = {"prompt": str(data.get("prompt", "")), "steps": list(data.get("steps") or []),
                    "source": str(data.get("source") or ""), "extraction": str(data.get("extraction") or "")}
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        where = f"task {task.get('id', k)}"
        if not annotations:
            yield 0, where, original, "", original["prompt"], original["steps"]
            continue
        latest = max(annotations, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
        values = {r.get("from_name"): r.get("value", {}) for r in latest.get("result", [])}
        prompt = "\n".join(values.get("prompt", {}).get("text", [])) or original["prompt"]
        steps_text = "\n".join(values.get("steps", {}).get("text", []))
        steps = parse_steps(steps_text) if steps_text.strip() else original["steps"]
        decision = (values.get("decision", {}).get("choices") or [""])[0]
        yield 0, where, original, decision, prompt, steps


def _sheet(path: Path) -> Iterator[Reviewed]:
    """(line, "line N", original, decision, prompt, steps) of each row of a review.jsonl or review.csv sheet. A sheet
    keeps no copy of what was extracted, so its kept rows count as accepted, edited or not."""
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, {**row, "response": parse_steps(row.get("steps") or "")}) for row in reader]
    else:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        rows = [(n, json.loads(line)) for n, line in enumerate(lines, 1) if line.strip()]
    for line, row in rows:
        steps = row.get("response") if isinstance(row.get("response"), list) else []
        original = {"prompt": str(row.get("prompt") or ""), "steps": steps, "source": str(row.get("source") or ""),
                    "extraction": str(row.get("extraction") or "")}
        yield line, f"line {line}", original, str(row.get("decision") or "").strip().lower(), original["prompt"], steps
