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
import hashlib
import io
import json
import random
import re
import secrets
from dataclasses import dataclass
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
SHEET_COLUMNS = ["item_id", "prompt", "reference", "output_A", "output_B", *SCORE_COLUMNS, "rater", "sheet_id",
                 "key_hash"]
KEY_FILE = "rating_key.json"
SHEET_FILE = "rating_sheet.csv"


@dataclass(frozen=True)
class RatingKey:
    """Which system is A and which is B on each item of one sheet, and the sheet's id and hash.

    The id and hash are written into every row of the sheet as well, so a filled sheet is read only with the key it
    was written with: a key rewritten since (another seed, other answers) would unblind it backwards. The hash covers
    the id, the assignment and a secret salt that only the key holds, so a rater cannot work the assignment out from
    it.
    """
    file: Path
    sheet_id: str
    key_hash: str
    items: dict[str, dict[str, str]]
    rows_sha256: str

    @property
    def systems(self) -> list[str]:
        return sorted({s for labels in self.items.values() for s in labels.values()})


def _key_hash(sheet_id: str, salt: str, items: dict[str, dict[str, str]]) -> str:
    text = json.dumps({"sheet_id": sheet_id, "salt": salt, "items": items}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rows_sha256(rows: list[dict[str, str]], items: dict[str, dict[str, str]]) -> str:
    """What a sheet shows and how it is blinded: equal for a rerun that would write the same sheet."""
    return hashlib.sha256(json.dumps([rows, items], sort_keys=True).encode()).hexdigest()


def read_key(key_file: str | Path) -> RatingKey:
    """The key of a rating sheet, checked: its items, and that its hash still matches what it holds."""
    key_file = Path(key_file)
    try:
        data = json.loads(key_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise RatingsError(f"{key_file}: cannot read the rating key: {e}") from None
    if isinstance(data, dict) and "sheet_id" not in data and "items" not in data:
        raise RatingsError(f"{key_file}: a rating key without a sheet id (written before sheets were tied to their "
                           "keys): nothing shows which sheet it unblinds; write a new sheet with --rating-sheet "
                           "--force-new-sheet and rate that")
    items = data.get("items") if isinstance(data, dict) else None
    fields = [data.get(k) for k in ("sheet_id", "salt", "key_hash", "rows_sha256")] if isinstance(data, dict) else []
    if not isinstance(items, dict) or not items or not all(isinstance(f, str) for f in fields) or not all(
            isinstance(v, dict) and sorted(v) == ["A", "B"] and all(isinstance(s, str) for s in v.values())
            for v in items.values()):
        raise RatingsError(f"{key_file}: expected sheet_id, salt, key_hash, rows_sha256 and items: "
                           "item_id -> {'A': system, 'B': system}")
    sheet_id, salt, key_hash, rows_sha256 = fields
    if _key_hash(sheet_id, salt, items) != key_hash:
        raise RatingsError(f"{key_file}: the key's hash does not match what it holds (edited by hand?): it cannot "
                           f"be trusted to unblind sheet {sheet_id}")
    return RatingKey(key_file, sheet_id, key_hash, items, rows_sha256)


def _blinded_rows(examples: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, str]], dict[str, dict[str, str]]]:
    """The sheet's rows (question, reference, answers as A and B) and the label -> system assignment per item."""
    systems = _systems_of(examples)
    if len(systems) != 2:
        raise ValueError(f"a rating sheet compares exactly two systems, got {len(systems)}: {systems}")
    rng = random.Random(seed)
    width = max(3, len(str(len(examples))))
    rows, items = [], {}
    for index, example in enumerate(examples, 1):
        item_id = f"item-{index:0{width}d}"  # letters keep spreadsheets from turning the id into a number
        labels = _blind(systems, rng)
        items[item_id] = labels
        rows.append({"item_id": item_id, "prompt": example["prompt"], "reference": render_steps(example["reference"]),
                     **{f"output_{label}": render_steps(example["outputs"][system])
                        for label, system in labels.items()}})
    return rows, items


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SHEET_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_rating_sheet(examples: list[dict[str, Any]], out_dir: str | Path, seed: int = 0,
                       force: bool = False) -> Path:
    """Write a blinded rating sheet for people, rating_sheet.csv, and the key that unblinds it, rating_key.json.

    The two systems appear as A and B in a seeded random order per prompt; which is which is only in the key file,
    which must not be handed to raters. Sheet and key carry the same sheet id and key hash, which read_ratings checks.
    A key that is already there is kept when it is for the very same sheet (a rerun with the same answers and
    seed), even with `force`; any other key may have sheets out with raters, so it is replaced only with `force`,
    and those sheets can then no longer be read.
    """
    out_dir = Path(out_dir)
    rows, items = _blinded_rows(examples, seed)
    key_path, csv_path = out_dir / KEY_FILE, out_dir / SHEET_FILE
    rows_sha256 = _rows_sha256(rows, items)
    old = None
    if key_path.exists():
        try:
            old = read_key(key_path)
        except RatingsError:
            if not force:
                raise
    if old is not None and old.rows_sha256 == rows_sha256:
        if not csv_path.exists():  # one already there may be being filled in place: left alone
            atomic_write_text(csv_path, _csv_text([{**row, "sheet_id": old.sheet_id, "key_hash": old.key_hash}
                                                   for row in rows]))
        return csv_path
    if old is not None and not force:
        raise RatingsError(f"{key_path} unblinds sheet {old.sheet_id}, which may be out with raters; a new sheet "
                           "(other answers or another --seed) would replace it and its filled copies could no longer "
                           "be read. Pass --force-new-sheet to replace it anyway, or use another --out")
    sheet_id, salt = secrets.token_hex(6), secrets.token_hex(16)
    key_hash = _key_hash(sheet_id, salt, items)
    write_json(key_path, {"sheet_id": sheet_id, "key_hash": key_hash, "salt": salt, "rows_sha256": rows_sha256,
                          "items": items})
    atomic_write_text(csv_path, _csv_text([{**row, "sheet_id": sheet_id, "key_hash": key_hash} for row in rows]))
    return csv_path


def read_sheet_rows(path: str | Path) -> list[dict[str, str]]:
    """A sheet's rows as dicts of its columns (the blank sheet the rating page shows, or a filled one)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheet programs add a BOM
            return list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise RatingsError(f"{path}: not UTF-8 text (byte {e.start}); save the sheet as CSV in UTF-8") from None
    except OSError as e:
        raise RatingsError(f"{path}: cannot read the sheet: {e.strerror}") from None


def write_filled_sheet(path: str | Path, rows: list[dict[str, str]], scores: dict[str, dict[str, int]],
                       rater: str) -> None:
    """A rater's sheet, written whole and atomically: the blank rows with `scores[item_id][column]` filled in and
    every other score cell left empty, in the format read_ratings reads."""
    filled = [{**row, **{c: str(scores.get(row["item_id"], {}).get(c, "")) for c in SCORE_COLUMNS}, "rater": rater}
              for row in rows]
    atomic_write_text(path, _csv_text(filled))


_SCORE = re.compile(r"([1-5])(?:\.0*)?")


def read_filled_sheet(path: str | Path, key: RatingKey) -> list[tuple[str, str, dict[str, int | None]]]:
    """One filled sheet as (rater, item_id, {score column: score or None}) per row, still blinded (A and B).

    The sheet must be the key's own (same sheet id and key hash in every row); a score cell holds an integer 1-5 or
    nothing. Every problem is an error naming the file, and the line and column where there is one.
    """
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheet programs add a BOM
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise RatingsError(f"{path}: the file is empty")
            header = [h.strip() for h in header]
            absent = [c for c in ["item_id", *SCORE_COLUMNS, "sheet_id", "key_hash"] if c not in header]
            if absent:
                hint = (" (a sheet written before sheets carried the id of their key)"
                        if absent == ["sheet_id", "key_hash"] else "")
                raise RatingsError(f"{path}:1: missing column(s) {', '.join(absent)}{hint}")
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
                sheet_id, key_hash = row[column["sheet_id"]].strip(), row[column["key_hash"]].strip()
                if (sheet_id, key_hash) != (key.sheet_id, key.key_hash):
                    raise RatingsError(
                        f"{path}: line {line}: this row is from sheet {sheet_id or '(none)'} (key hash "
                        f"{key_hash or '(none)'}), but {key.file} unblinds sheet {key.sheet_id} (key hash "
                        f"{key.key_hash}): read it with the key written with its sheet (--ratings-key)")
                item_id = row[column["item_id"]].strip()
                if item_id not in key.items:
                    raise RatingsError(f"{path}: line {line}: column 'item_id': {item_id!r} is not in the rating key")
                rater = (row[column["rater"]].strip() if "rater" in column else "") or path.stem
                if (rater, item_id) in seen:
                    raise RatingsError(f"{path}: line {line}: rater {rater!r} rated {item_id} twice")
                seen.add((rater, item_id))
                scores: dict[str, int | None] = {}
                for name in SCORE_COLUMNS:
                    cell = row[column[name]].strip()
                    match = _SCORE.fullmatch(cell)
                    if cell and not match:
                        raise RatingsError(f"{path}: line {line}: column {name!r}: {cell!r} is not an integer "
                                           f"score 1-5 (item {item_id})")
                    scores[name] = int(match.group(1)) if match else None
                rows.append((rater, item_id, scores))
    except UnicodeDecodeError as e:
        raise RatingsError(f"{path}: not UTF-8 text (byte {e.start}); save the sheet as CSV in UTF-8") from None
    except OSError as e:
        raise RatingsError(f"{path}: cannot read the sheet: {e.strerror}") from None
    return rows


def _read_sheet(path: Path, key: RatingKey) -> tuple[list[tuple[str, str, str, str, int | None]], int]:
    """One filled sheet unblinded as (rater, item_id, system, criterion, score) rows, and how many score cells were
    empty."""
    ratings, empty = [], 0
    for rater, item_id, scores in read_filled_sheet(path, key):
        for name, score in scores.items():
            label, criterion = name.split("_", 1)
            empty += score is None
            ratings.append((rater, item_id, key.items[item_id][label], criterion, score))
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

    Every sheet must carry the key's sheet id and hash. A rater is named by the sheet's `rater` column, or by the
    file name where that is empty. A score cell must hold an integer 1-5 or nothing: anything else is an error naming
    the file, line and column; an empty cell is a missing score and is counted, and so are the cells of an item a
    rater's sheet leaves out (`absent_items`). Each item's score is the mean over the raters who gave one; means and
    bootstrap CIs are over items. `systems` fixes the order for the paired difference (second minus first); by
    default names are sorted.
    """
    key = read_key(key_file)
    names = key.systems
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
    # An item left off a rater's sheet (a row deleted) is missing in full, so a shortened sheet never reads complete.
    rated = {(r[0], r[1]) for r in ratings}
    absent = len(raters) * len(key.items) - len(rated)
    missing += absent * len(SCORE_COLUMNS)

    given = {(rater, item, system, criterion): score for rater, item, system, criterion, score in ratings
             if score is not None}
    items = list(key.items)
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
            "absent_items": absent, "items": len(items)}
