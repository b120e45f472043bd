"""1-5 ratings of how-to answers on correctness, completeness and clarity, by an LLM judge or by people.

Both paths share one written rubric and the same blinding: the systems' outputs are shown side by side as A, B, ...
in an order shuffled per prompt with a seed, so neither the judge nor a person can favour a system by its position
or its name. Scores are unblinded only after they are collected. A score that is missing or malformed stays missing:
it is counted and reported, never guessed, clamped or filled in.

Statistics: a system's mean per criterion has a percentile bootstrap 95% confidence interval over prompts (seeded);
with two systems, the paired difference is the SECOND system minus the FIRST (the order of the `outputs` dict of the
first example for the judge, the `systems` argument or name order for human sheets), with a bootstrap CI and a
Wilcoxon signed-rank p-value. Agreement between raters is Krippendorff's alpha at the ordinal level (the
`krippendorff` package) and, for exactly two raters, Cohen's kappa with quadratic weights.
"""
from __future__ import annotations

import csv
import html
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable

import krippendorff
import numpy as np
from rich.progress import track

from howto.chat import render_steps
from howto.llm import ChatClient
from howto.metrics import bootstrap_ci, wilcoxon_p
from howto.runio import atomic_write_text, write_json

CRITERIA = ("correctness", "completeness", "clarity")
SCORES = (1, 2, 3, 4, 5)
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
N_BOOTSTRAP = 2000

RUBRIC_ANCHORS: dict[str, dict[Any, str]] = {
    "correctness": {
        "question": "Are the steps right for this task, with nothing wrong, misleading or harmful?",
        5: "Every step is right for the task and would work as written; nothing is wrong, misleading or unsafe.",
        4: "All steps are right, but one is slightly imprecise (a menu or button named a little differently, a "
           "detail that is off) in a way the user would easily get past.",
        3: "One step is wrong or would fail as written, but the rest is right and the user could probably still "
           "reach the goal.",
        2: "Several steps are wrong, or one wrong step would keep the user from reaching the goal.",
        1: "The steps are mostly wrong, answer a different task, or include a harmful or unsafe action (deleting "
           "data, turning off security, paying or sharing personal data without need).",
    },
    "completeness": {
        "question": "Are all the steps needed to finish the task there, compared with the reference?",
        5: "Every necessary step is there: a user could finish the task without guessing anything.",
        4: "One minor step is missing that almost every user would infer (such as pressing Save at the end).",
        3: "One necessary step is missing, or the answer stops before the task is done, so the user has to work "
           "something out alone.",
        2: "Several necessary steps are missing; the answer covers only part of the task.",
        1: "Almost nothing that is needed is there (one vague step, or no steps at all).",
    },
    "clarity": {
        "question": "Is each step one clear, actionable instruction, and are the steps in an order a user can follow?",
        5: "Every step is one short, unambiguous action (what to do and where), the steps are in the right order, "
           "and there is no filler.",
        4: "Clear and in order, with one step that is wordy, a little vague, or combines two actions.",
        3: "Understandable, but several steps are vague or combine actions, or one pair of steps is out of order.",
        2: "Hard to follow: most steps are vague or merged into long sentences, or the order is largely wrong.",
        1: "Not usable as instructions: no discernible steps, unreadable, contradictory, or not in the form of steps.",
    },
}


RUBRIC_NOTE = ("The reference shows what the task needs; an answer may phrase steps differently or take another valid "
               "route and still score 5. Longer is not better. An answer with no steps scores 1 on every criterion.")


def _render_rubric() -> str:
    lines = ["Score each answer from 1 (worst) to 5 (best) on three criteria, each on its own.", RUBRIC_NOTE]
    for criterion, anchors in RUBRIC_ANCHORS.items():
        lines += ["", f"{criterion.capitalize()}: {anchors['question']}"]
        lines += [f"  {score}: {anchors[score]}" for score in sorted(SCORES, reverse=True)]
    return "\n".join(lines)


RUBRIC = _render_rubric()

JUDGE_INSTRUCTIONS = (
    "You are a strict and fair judge of step-by-step instructions. You get a how-to question, a reference answer "
    "written by a person, and candidate answers labelled A, B, ... . Score every candidate against the rubric below. "
    "The labels and the order of the candidates are random: ignore them, and judge each candidate on its own merits."
)


class MalformedJudgement(ValueError):
    """The judge's answer cannot be read as the scores asked for."""


class RatingsError(ValueError):
    """A filled rating sheet or its key is not what the reader expects."""


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces: blinding, statistics
# ---------------------------------------------------------------------------------------------------------------------

def _systems_of(examples: list[dict[str, Any]]) -> list[str]:
    """The systems in the order of the first example's outputs; every example must have the same ones."""
    if not examples:
        raise ValueError("no examples to rate")
    systems = list(examples[0].get("outputs") or {})
    if not systems:
        raise ValueError("examples[0]: 'outputs' must map system names to lists of steps")
    for index, example in enumerate(examples):
        outputs = example.get("outputs")
        if not isinstance(outputs, dict) or sorted(outputs) != sorted(systems):
            raise ValueError(f"examples[{index}]: outputs has systems {sorted(outputs or {})}, "
                             f"the first example has {sorted(systems)}")
        if not isinstance(example.get("prompt"), str) or not isinstance(example.get("reference"), list):
            raise ValueError(f"examples[{index}]: needs 'prompt' (a string) and 'reference' (a list of steps)")
        for system, steps in outputs.items():
            if not isinstance(steps, list):
                raise ValueError(f"examples[{index}]: outputs[{system!r}] must be a list of steps, "
                                 f"got {type(steps).__name__}")
    return systems


def _blind(systems: list[str], rng: random.Random) -> dict[str, str]:
    """A random label -> system assignment for one prompt."""
    order = list(systems)
    rng.shuffle(order)
    return dict(zip(LABELS, order))


def _steps_text(steps: list[str]) -> str:
    return render_steps(steps) if steps else "(no steps)"


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _summarise(per_item: list[dict[str, dict[str, float | None]]], systems: list[str],
               seed: int) -> dict[str, Any]:
    """Means, CIs, counts and (for two systems) paired differences from one score per item, system and criterion."""
    means: dict[str, dict[str, float | None]] = {}
    ci: dict[str, dict[str, list[float | None]]] = {}
    n: dict[str, dict[str, int]] = {}
    for system in systems:
        means[system], ci[system], n[system] = {}, {}, {}
        for criterion in CRITERIA:
            values = [item[system][criterion] for item in per_item if item[system][criterion] is not None]
            means[system][criterion] = _mean(values)
            ci[system][criterion] = list(bootstrap_ci(values, N_BOOTSTRAP, seed))
            n[system][criterion] = len(values)
    paired: dict[str, dict[str, Any]] = {}
    if len(systems) == 2:
        first, second = systems
        for criterion in CRITERIA:
            deltas = [item[second][criterion] - item[first][criterion] for item in per_item
                      if item[first][criterion] is not None and item[second][criterion] is not None]
            paired[criterion] = {"delta_mean": _mean(deltas), "ci": list(bootstrap_ci(deltas, N_BOOTSTRAP, seed)),
                                 "p_wilcoxon": wilcoxon_p(deltas), "n": len(deltas)}
    return {"means": means, "ci": ci, "n": n, "paired": paired}


# ---------------------------------------------------------------------------------------------------------------------
# LLM judge
# ---------------------------------------------------------------------------------------------------------------------

def _judge_messages(example: dict[str, Any], labels: dict[str, str]) -> list[dict[str, str]]:
    answer_format = {label: {"rationale": "one or two sentences", **{c: "integer 1-5" for c in CRITERIA}}
                     for label in labels}
    parts = [f"<question>\n{example['prompt'].strip()}\n</question>",
             f"<reference>\n{_steps_text(example['reference'])}\n</reference>"]
    parts += [f'<output id="{label}">\n{_steps_text(example["outputs"][system])}\n</output>'
              for label, system in labels.items()]
    parts.append("Reply with one JSON object only, with a key for every candidate, in this shape:\n"
                 + json.dumps(answer_format))
    return [{"role": "system", "content": f"{JUDGE_INSTRUCTIONS}\n\n{RUBRIC}"},
            {"role": "user", "content": "\n\n".join(parts)}]


def _parse_judgement(text: str, labels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The judge's JSON, checked strictly: every label, every criterion, each an integer 1..5."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)  # some servers fence JSON even in JSON mode
    if fenced:
        body = fenced.group(1)
    try:
        answer = json.loads(body)
    except json.JSONDecodeError as e:
        raise MalformedJudgement(f"not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(answer, dict):
        raise MalformedJudgement(f"expected a JSON object, got {type(answer).__name__}")
    result = {}
    for label in labels:
        scores = answer.get(label)
        if not isinstance(scores, dict):
            raise MalformedJudgement(f"no object for candidate {label!r}")
        checked: dict[str, Any] = {}
        for criterion in CRITERIA:
            value = scores.get(criterion)
            if type(value) is not int or value not in SCORES:
                raise MalformedJudgement(f"candidate {label!r}: {criterion} must be an integer 1-5, got {value!r}")
            checked[criterion] = value
        rationale = scores.get("rationale", "")
        checked["rationale"] = rationale if isinstance(rationale, str) else json.dumps(rationale)
        result[label] = checked
    return result


def judge_outputs(examples: list[dict[str, Any]], client: ChatClient, seed: int = 0,
                  max_retries: int = 2) -> dict[str, Any]:
    """Score every system's output 1-5 per criterion with an LLM judge that sees the reference.

    All systems of one prompt go into one request, in a seeded random order per prompt, so the judge compares them
    under the same conditions. A malformed answer is sent back with what was wrong, up to `max_retries` times; after
    that the prompt's scores stay missing. `paired` is the second system minus the first, in the order of the first
    example's `outputs`. Errors of the endpoint itself (unreachable, HTTP 4xx) raise howto.llm.LLMError.
    """
    systems = _systems_of(examples)
    rng = random.Random(seed)
    requests_before = client.requests_made
    per_example = []
    for example in track(examples, description="judging", transient=True):
        labels = _blind(systems, rng)
        messages = _judge_messages(example, labels)
        judgement, error = None, None
        for _ in range(max_retries + 1):
            text = client.chat(messages, temperature=0, json_mode=True)
            try:
                judgement = _parse_judgement(text, labels)
                break
            except MalformedJudgement as e:
                error = str(e)
                messages = messages + [
                    {"role": "assistant", "content": text[:4000]},
                    {"role": "user", "content": f"That answer cannot be used: {error}. "
                                                "Reply again with only the JSON object in the shape asked for."},
                ]
        by_system = {system: (judgement or {}).get(label) for label, system in labels.items()}
        per_example.append({
            "prompt": example["prompt"],
            "category": example.get("category"),
            "positions": {label: system for label, system in labels.items()},
            "scores": {s: {c: (by_system[s] or {}).get(c) for c in CRITERIA} for s in systems},
            "rationales": {s: (by_system[s] or {}).get("rationale") for s in systems},
            "error": None if judgement else error,
        })
    summary = _summarise([row["scores"] for row in per_example], systems, seed)
    missing = sum(score is None for row in per_example for s in systems for score in row["scores"][s].values())
    return {"systems": systems, "per_example": per_example, **summary, "missing": missing,
            "requests": client.requests_made - requests_before, "rubric": RUBRIC, "judge_model": client.model}


# ---------------------------------------------------------------------------------------------------------------------
# Rating sheets for people
# ---------------------------------------------------------------------------------------------------------------------

SCORE_COLUMNS = [f"{label}_{criterion}" for label in "AB" for criterion in CRITERIA]
SHEET_COLUMNS = ["item_id", "prompt", "reference", "output_A", "output_B", *SCORE_COLUMNS, "rater"]

_SHEET_SCRIPT = r"""
function csvField(value) {
  const text = value === undefined || value === null ? "" : String(value);
  return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}
function buildCsv(data, values, rater) {
  const lines = [data.columns.map(csvField).join(",")];
  for (const row of data.rows) {
    const cells = data.columns.map(column =>
      column === "rater" ? rater : (column in row ? row[column] : (values[row.item_id + "|" + column] || "")));
    lines.push(cells.map(csvField).join(","));
  }
  return lines.join("\n") + "\n";
}
function checkedValues() {
  const values = {};
  for (const input of document.querySelectorAll("input[type=radio]:checked")) values[input.name] = input.value;
  return values;
}
function download() {
  const rater = document.getElementById("rater").value.trim();
  if (!rater) { alert("Please enter your name first."); return; }
  const values = checkedValues();
  const expected = DATA.rows.length * DATA.score_columns.length;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([buildCsv(DATA, values, rater)], {type: "text/csv;charset=utf-8"}));
  link.download = "ratings_" + rater.replace(/[^A-Za-z0-9_-]+/g, "_") + ".csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
  document.getElementById("status").textContent =
    Object.keys(values).length + " of " + expected + " scores given; unrated ones are left empty.";
}
const DATA = JSON.parse(document.getElementById("sheet-data").textContent);
document.getElementById("download").addEventListener("click", download);
"""

_SHEET_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
.card { border: 1px solid #ccc; border-radius: 8px; padding: 1rem 1.5rem; margin: 1.5rem 0; }
.outputs { display: grid; grid-template-columns: 1fr 1fr; gap: 1.5rem; }
.reference { background: #f6f6f6; padding: .5rem 1rem; border-radius: 6px; }
fieldset { border: 0; padding: .2rem 0; } legend { font-weight: 600; }
label { margin-right: .8rem; } .rubric td { vertical-align: top; padding: .2rem .5rem; }
#bar { position: sticky; bottom: 0; background: #fff; padding: 1rem 0; border-top: 1px solid #ccc; }
"""


def _steps_html(steps: list[str]) -> str:
    if not steps:
        return "<p><em>(no steps)</em></p>"
    return "<ol>" + "".join(f"<li>{html.escape(step)}</li>" for step in steps) + "</ol>"


def _rubric_html() -> str:
    rows = []
    for criterion, anchors in RUBRIC_ANCHORS.items():
        rows.append(f"<h3>{criterion.capitalize()}: {html.escape(anchors['question'])}</h3><table class='rubric'>")
        rows += [f"<tr><td><b>{s}</b></td><td>{html.escape(anchors[s])}</td></tr>" for s in sorted(SCORES)[::-1]]
        rows.append("</table>")
    return "\n".join(rows)


def _card_html(item_id: str, example: dict[str, Any], labels: dict[str, str]) -> str:
    columns = []
    for label, system in labels.items():
        radios = "".join(
            f"<fieldset><legend>{criterion}</legend>"
            + "".join(f'<label><input type="radio" name="{item_id}|{label}_{criterion}" value="{s}"> {s}</label>'
                      for s in SCORES)
            + "</fieldset>"
            for criterion in CRITERIA)
        columns.append(f"<div><h3>Answer {label}</h3>{_steps_html(example['outputs'][system])}{radios}</div>")
    return (f'<section class="card" id="{item_id}"><h2>{item_id}: {html.escape(example["prompt"])}</h2>'
            f'<div class="reference"><h3>Reference</h3>{_steps_html(example["reference"])}</div>'
            f'<div class="outputs">{"".join(columns)}</div></section>')


def write_rating_sheet(examples: list[dict[str, Any]], out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a blinded rating sheet for people: rating_sheet.csv, rating_sheet.html and the key rating_key.json.

    The two systems appear as A and B in a seeded random order per prompt; which is which is only in the key file,
    which must not be handed to raters. The HTML form downloads a CSV with the same columns as the CSV sheet, so
    either can be filled and read back with read_ratings.
    """
    systems = _systems_of(examples)
    if len(systems) != 2:
        raise ValueError(f"a rating sheet compares exactly two systems, got {len(systems)}: {systems}")
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    width = max(3, len(str(len(examples))))
    rows, key, cards = [], {}, []
    for index, example in enumerate(examples, 1):
        item_id = f"item-{index:0{width}d}"  # letters keep spreadsheets from turning the id into a number
        labels = _blind(systems, rng)
        key[item_id] = labels
        rows.append({"item_id": item_id, "prompt": example["prompt"], "reference": render_steps(example["reference"]),
                     **{f"output_{label}": render_steps(example["outputs"][system])
                        for label, system in labels.items()}})
        cards.append(_card_html(item_id, example, labels))

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SHEET_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, html_path = out_dir / "rating_sheet.csv", out_dir / "rating_sheet.html"
    atomic_write_text(csv_path, buffer.getvalue())
    write_json(out_dir / "rating_key.json", key)

    data = json.dumps({"columns": SHEET_COLUMNS, "score_columns": SCORE_COLUMNS, "rows": rows}, ensure_ascii=False)
    data = data.replace("<", "\\u003c")  # no "</script>" can end the data block early
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rating sheet</title><style>{_SHEET_STYLE}</style></head>
<body>
<h1>Rate the answers</h1>
<p>Each card has a how-to question, a reference answer and two answers, A and B, in random order. Rate each answer
from 1 to 5 on correctness, completeness and clarity using the rubric below. Leave a score empty if you cannot
judge it. When done, enter your name and download your ratings as a CSV file.</p>
<details><summary>Rubric</summary>
<p>{html.escape(RUBRIC_NOTE)}</p>
{_rubric_html()}
</details>
{"".join(cards)}
<div id="bar"><label>Your name <input id="rater" autocomplete="name"></label>
<button id="download" type="button">Download ratings (CSV)</button> <span id="status"></span></div>
<script type="application/json" id="sheet-data">{data}</script>
<script>{_SHEET_SCRIPT}</script>
</body></html>
"""
    atomic_write_text(html_path, page)
    return csv_path, html_path


def _read_key(key_file: str | Path) -> dict[str, dict[str, str]]:
    try:
        key = json.loads(Path(key_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RatingsError(f"{key_file}: cannot read the rating key: {e}") from None
    if not isinstance(key, dict) or not all(
            isinstance(v, dict) and sorted(v) == ["A", "B"] and all(isinstance(s, str) for s in v.values())
            for v in key.values()):
        raise RatingsError(f"{key_file}: expected item_id -> {{'A': system, 'B': system}}")
    return key


_SCORE = re.compile(r"([1-5])(?:\.0*)?")


def _read_sheet(path: Path, key: dict[str, dict[str, str]]) -> tuple[list[tuple[str, str, str, str, int | None]], int]:
    """One filled sheet as (rater, item_id, system, criterion, score) rows, and how many score cells were empty."""
    ratings, empty = [], 0
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheet programs add a BOM
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise RatingsError(f"{path}: the file is empty")
        header = [h.strip() for h in header]
        absent = [c for c in ["item_id", *SCORE_COLUMNS] if c not in header]
        if absent:
            raise RatingsError(f"{path}:1: missing column(s) {', '.join(absent)}")
        column = {name: header.index(name) for name in header}
        seen: set[tuple[str, str]] = set()
        while True:
            line = reader.line_num + 1  # a record may span lines (quoted newlines): report where it starts
            row = next(reader, None)
            if row is None:
                break
            if not any(cell.strip() for cell in row):
                continue
            row += [""] * (len(header) - len(row))
            item_id = row[column["item_id"]].strip()
            if item_id not in key:
                raise RatingsError(f"{path}: line {line}: column 'item_id': {item_id!r} is not in the rating key")
            rater = row[column["rater"]].strip() if "rater" in column else ""
            rater = rater or path.stem
            if (rater, item_id) in seen:
                raise RatingsError(f"{path}: line {line}: rater {rater!r} rated {item_id} twice")
            seen.add((rater, item_id))
            for name in SCORE_COLUMNS:
                label, criterion = name.split("_", 1)
                cell = row[column[name]].strip()
                if not cell:
                    empty += 1
                    ratings.append((rater, item_id, key[item_id][label], criterion, None))
                    continue
                match = _SCORE.fullmatch(cell)
                if not match:
                    raise RatingsError(f"{path}: line {line}: column {name!r}: {cell!r} is not an integer score "
                                       f"1-5 (item {item_id})")
                ratings.append((rater, item_id, key[item_id][label], criterion, int(match.group(1))))
    return ratings, empty


def krippendorff_alpha_ordinal(matrix: list[list[float]]) -> float | None:
    """Ordinal Krippendorff's alpha of a raters x units matrix (NaN = no score); None where it is undefined
    (no unit scored twice, or every score the same value, so there is no disagreement to expect)."""
    data = np.asarray(matrix, dtype=float)
    pairable = data[:, (~np.isnan(data)).sum(axis=0) >= 2]
    values = pairable[~np.isnan(pairable)]
    if values.size == 0 or np.unique(values).size < 2:
        return None
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal", value_domain=list(SCORES)))


def quadratic_weighted_kappa(first: list[int], second: list[int]) -> float | None:
    """Cohen's kappa with quadratic weights over the score scale 1..5 (weights by score value, not by which scores
    happen to occur); None where both raters use one single score and chance agreement explains everything."""
    observed = np.zeros((len(SCORES), len(SCORES)))
    for a, b in zip(first, second, strict=True):
        observed[a - SCORES[0], b - SCORES[0]] += 1
    if observed.sum() == 0:
        return None
    grid = np.asarray(SCORES, dtype=float)
    weights = (grid[:, None] - grid[None, :]) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    chance = float((weights * expected).sum())
    return None if chance == 0 else 1.0 - float((weights * observed).sum()) / chance


def read_ratings(files: list[str | Path], key_file: str | Path, systems: list[str] | None = None) -> dict[str, Any]:
    """Read filled rating sheets (one per rater), unblind them with the key, and summarise.

    A rater is named by the sheet's `rater` column, or by the file name where that is empty. A score cell must hold
    an integer 1-5 or nothing: anything else is an error naming the file, line and column; an empty cell is a missing
    score and is counted. Each item's score is the mean over the raters who gave one; means and bootstrap CIs are
    over items. `systems` fixes the order for the paired difference (second minus first); by default names are
    sorted.
    """
    key = _read_key(key_file)
    names = sorted({s for labels in key.values() for s in labels.values()})
    systems = list(systems) if systems else names
    if sorted(systems) != names:
        raise RatingsError(f"{key_file}: the key has systems {names}, not {sorted(systems)}")
    ratings, missing = [], 0
    for path in files:
        rows, empty = _read_sheet(Path(path), key)
        ratings += rows
        missing += empty
    raters = list(dict.fromkeys(r[0] for r in ratings))
    if not raters:
        raise RatingsError(f"no ratings in {', '.join(str(f) for f in files) or 'no files'}")

    given = {(rater, item, system, criterion): score for rater, item, system, criterion, score in ratings
             if score is not None}
    items = list(key)
    per_item = []
    for item in items:
        per_item.append({system: {criterion: _mean([given[(r, item, system, criterion)] for r in raters
                                                    if (r, item, system, criterion) in given])
                                  for criterion in CRITERIA}
                         for system in systems})

    agreement: dict[str, dict[str, float | None]] = {}
    units = [(item, system) for item in items for system in systems]
    for criterion in CRITERIA:
        matrix = [[given.get((r, item, system, criterion), np.nan) for item, system in units] for r in raters]
        alpha = krippendorff_alpha_ordinal(matrix) if len(raters) >= 2 else None
        kappa = None
        if len(raters) == 2:
            both = [(a, b) for a, b in zip(*matrix) if not (np.isnan(a) or np.isnan(b))]
            kappa = quadratic_weighted_kappa([int(a) for a, _ in both], [int(b) for _, b in both])
        agreement[criterion] = {"krippendorff_alpha": alpha, "weighted_kappa": kappa}

    summary = _summarise(per_item, systems, seed=0)
    return {"raters": raters, "systems": systems, **summary, "agreement": agreement, "missing": missing,
            "items": len(items)}
