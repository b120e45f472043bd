"""1-5 ratings: the LLM judge against a real chat-completions server on loopback, and the human rating sheet."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from chat_server import chat_server
from howto.chat import render_steps
from howto.llm import ChatClient
from howto.ratings import (CRITERIA, RUBRIC, RUBRIC_ANCHORS, RatingsError, judge_outputs, read_ratings,
                           write_rating_sheet)


SECRET = "sk-test-0123456789-do-not-leak"
MARKER = "Double-check"  # the scripted judge prefers whichever output contains this word
BASE, TUNED = "sys_base_model", "sys_tuned_model"
SHEET_COLUMNS = ["item_id", "prompt", "reference", "output_A", "output_B", "A_correctness", "A_completeness",
                 "A_clarity", "B_correctness", "B_completeness", "B_clarity", "rater", "sheet_id", "key_hash"]


def shown_outputs(body: dict[str, Any]) -> dict[str, str]:
    """The candidates as the judge sees them: label -> text."""
    return dict(re.findall(r'<output id="([A-Z])">\n(.*?)\n</output>', body["messages"][1]["content"], re.DOTALL))


def marker_judge(body: dict[str, Any]) -> str:
    """Scores 5 for the output with the marker word and 2 for the other, on every criterion; some prompts misbehave."""
    question = body["messages"][1]["content"]
    is_retry = len(body["messages"]) > 2
    scores = {label: {"rationale": "scripted", **{c: 5 if MARKER in text else 2 for c in CRITERIA}}
              for label, text in shown_outputs(body).items()}
    if "never-json" in question:
        return "Both answers look fine to me, A is a bit better."
    if "out-of-range" in question:
        scores["A"]["correctness"] = 6
    if "float-score" in question:
        scores["B"]["clarity"] = 4.5
    if "string-score" in question:
        scores["A"]["completeness"] = "4"
    if "fix-on-retry" in question and not is_retry:
        del scores["B"]
    return json.dumps(scores)


def make_examples(n: int, tasks: list[str] | None = None) -> list[dict[str, Any]]:
    tasks = tasks or [f"task {i}" for i in range(n)]
    return [{"prompt": f"How do I do {task} in the app?", "category": "shopping" if i % 2 else "banking",
             "reference": [f"Open the app for {task}", "Go to Settings", f"Finish {task}"],
             "outputs": {BASE: ["Open the app", "Do it"],
                         TUNED: ["Open the app", "Go to Settings", f"{MARKER} the form", "Tap Save"]}}
            for i, task in enumerate(tasks)]


@pytest.fixture
def client_for(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ChatClient]:
    monkeypatch.setenv("HOWTO_TEST_JUDGE_KEY", SECRET)
    return lambda url: ChatClient.from_settings(url, "judge-test", key_env="HOWTO_TEST_JUDGE_KEY", backoff=0.0)


def test_judge_sees_rubric_and_reference_and_scores_follow_the_system_not_the_position(client_for):
    examples = make_examples(10)
    with chat_server(marker_judge) as (url, received):
        result = judge_outputs(examples, client_for(url), seed=0)

    assert len(received) == 10 and result["requests"] == 10 and result["missing"] == 0
    for request, example in zip(received, examples):
        body = request["body"]
        assert request["authorization"] == f"Bearer {SECRET}"
        assert body["model"] == "judge-test" and body["temperature"] == 0
        assert body["response_format"] == {"type": "json_object"}
        system_message, user_message = body["messages"][0]["content"], body["messages"][1]["content"]
        assert RUBRIC in system_message
        assert all(anchor in system_message for anchors in RUBRIC_ANCHORS.values() for anchor in anchors.values())
        assert render_steps(example["reference"]) in user_message and example["prompt"] in user_message
        assert BASE not in user_message and TUNED not in user_message  # blinded

    positions = [next(label for label, text in shown_outputs(r["body"]).items() if MARKER in text) for r in received]
    assert set(positions) == {"A", "B"}  # both orders occur with this seed
    for row, position in zip(result["per_example"], positions):
        assert row["positions"][position] == TUNED
        assert row["scores"] == {TUNED: dict.fromkeys(CRITERIA, 5), BASE: dict.fromkeys(CRITERIA, 2)}
        assert row["rationales"] == {TUNED: "scripted", BASE: "scripted"}
    assert [row["category"] for row in result["per_example"][:2]] == ["banking", "shopping"]

    assert result["systems"] == [BASE, TUNED]
    for criterion in CRITERIA:
        assert result["means"][TUNED][criterion] == 5.0 and result["means"][BASE][criterion] == 2.0
        assert result["ci"][TUNED][criterion] == [5.0, 5.0]
        paired = result["paired"][criterion]  # second system minus first
        assert paired["delta_mean"] == 3.0 and paired["ci"] == [3.0, 3.0] and paired["n"] == 10
        assert paired["p_wilcoxon"] == pytest.approx(2 / 2**10)  # exact two-sided test, all 10 differences positive
    assert result["rubric"] == RUBRIC and result["judge_model"] == "judge-test"
    assert SECRET not in json.dumps(result)

    with chat_server(marker_judge) as (url, _):
        again = judge_outputs(examples, client_for(url), seed=0)
        other_seed = judge_outputs(examples, client_for(url), seed=1)
    assert [r["positions"] for r in again["per_example"]] == [r["positions"] for r in result["per_example"]]
    assert [r["positions"] for r in other_seed["per_example"]] != [r["positions"] for r in result["per_example"]]


def test_malformed_answers_are_retried_then_missing_never_guessed(client_for):
    tasks = ["fine", "never-json", "out-of-range", "float-score", "string-score", "fix-on-retry"]
    examples = make_examples(len(tasks), tasks)
    with chat_server(marker_judge) as (url, received):
        result = judge_outputs(examples, client_for(url), seed=3, max_retries=2)

    # 1 request for the good one, 3 (1 + 2 retries) for each of the four broken ones, 2 for the one fixed on retry
    assert len(received) == result["requests"] == 1 + 4 * 3 + 2
    rows = {row["prompt"].split(" ")[4]: row for row in result["per_example"]}
    for task in ["never-json", "out-of-range", "float-score", "string-score"]:
        assert rows[task]["scores"] == {BASE: dict.fromkeys(CRITERIA), TUNED: dict.fromkeys(CRITERIA)}
        assert rows[task]["error"]
    assert "not JSON" in rows["never-json"]["error"] and "6" in rows["out-of-range"]["error"]
    for task in ["fine", "fix-on-retry"]:
        assert rows[task]["scores"][TUNED] == dict.fromkeys(CRITERIA, 5) and rows[task]["error"] is None
    assert result["missing"] == 4 * 2 * len(CRITERIA)
    assert result["means"][TUNED]["correctness"] == 5.0 and result["means"][BASE]["correctness"] == 2.0
    assert result["paired"]["clarity"]["n"] == 2

    retry = next(r["body"] for r in received if "fix-on-retry" in r["body"]["messages"][1]["content"]
                 and len(r["body"]["messages"]) > 2)
    assert retry["messages"][-1]["role"] == "user" and "no object for candidate 'B'" in retry["messages"][-1]["content"]
    assert SECRET not in json.dumps(result)


# --- the rating sheet for people --------------------------------------------------------------------------------------

def fill_sheet(sheet: Path, key: dict[str, dict[str, str]], scores: dict[str, dict[str, list[int | None]]],
               out: Path, rater: str = "") -> Path:
    """Fill a sheet as a rater would: `scores[system][criterion][i]` goes into whichever column holds that system."""
    with open(sheet, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        for label, system in key[row["item_id"]].items():
            for criterion in CRITERIA:
                value = scores[system][criterion][i]
                row[f"{label}_{criterion}"] = "" if value is None else str(value)
        row["rater"] = rater
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out


KNOWN = {BASE: {"correctness": [2, 3, 2, 4, 3, 2], "completeness": [1, 2, 2, 3, 2, 1], "clarity": [3, 3, 4, 3, 2, 3]},
         TUNED: {"correctness": [4, 5, 4, 5, 5, 3], "completeness": [4, 4, 5, 3, 4, 5], "clarity": [5, 4, 5, 5, 4, 4]}}


@pytest.fixture
def sheet(tmp_path: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    csv_path = write_rating_sheet(make_examples(6), tmp_path / "sheet", seed=0)
    key = json.loads((tmp_path / "sheet" / "rating_key.json").read_text())["items"]
    return csv_path, key


def test_rating_sheet_is_blinded_complete_and_carries_its_keys_id(sheet):
    csv_path, key = sheet
    examples = make_examples(6)
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == SHEET_COLUMNS and len(rows) == 6
    assert {tuple(v.values()) for v in key.values()} == {(BASE, TUNED), (TUNED, BASE)}  # both orders per prompt
    full_key = json.loads((csv_path.parent / "rating_key.json").read_text())
    for row, example in zip(rows, examples):
        assert row["prompt"] == example["prompt"] and row["reference"] == render_steps(example["reference"])
        for label in "AB":
            assert row[f"output_{label}"] == render_steps(example["outputs"][key[row["item_id"]][label]])
        assert all(row[c] == "" for c in SHEET_COLUMNS[5:12])
        assert (row["sheet_id"], row["key_hash"]) == (full_key["sheet_id"], full_key["key_hash"])
    text = csv_path.read_text()
    assert BASE not in text and TUNED not in text and full_key["salt"] not in text  # which is which: the key only
    assert not list(csv_path.parent.glob("*.html"))  # the static form is gone: people rate on the page


def test_round_trip_identical_raters_agree_fully(sheet, tmp_path):
    csv_path, key = sheet
    alice = fill_sheet(csv_path, key, KNOWN, tmp_path / "alice.csv")  # named by the file
    bob = fill_sheet(csv_path, key, KNOWN, tmp_path / "sheet_2.csv", rater="bob")  # named by the column
    result = read_ratings([alice, bob], tmp_path / "sheet" / "rating_key.json", systems=[BASE, TUNED])

    assert result["raters"] == ["alice", "bob"] and result["missing"] == 0
    for system in (BASE, TUNED):
        for criterion in CRITERIA:
            assert result["means"][system][criterion] == pytest.approx(sum(KNOWN[system][criterion]) / 6)
            assert result["n"][system][criterion] == 6
            lo, hi = result["ci"][system][criterion]
            assert min(KNOWN[system][criterion]) <= lo <= result["means"][system][criterion] <= hi
    assert result["paired"]["correctness"]["delta_mean"] == pytest.approx((26 - 16) / 6)
    for criterion in CRITERIA:
        assert result["agreement"][criterion] == {"krippendorff_alpha": pytest.approx(1.0),
                                                  "weighted_kappa": pytest.approx(1.0)}


def test_disagreeing_raters_agree_less_and_empty_cells_are_missing(sheet, tmp_path):
    csv_path, key = sheet
    noisy = {s: {c: list(v) for c, v in by_c.items()} for s, by_c in KNOWN.items()}
    noisy[BASE]["correctness"] = [4, 2, 3, 2, 5, 3]
    noisy[TUNED]["correctness"] = [3, 5, 5, 4, 3, 4]
    noisy[TUNED]["clarity"][0] = None
    alice = fill_sheet(csv_path, key, KNOWN, tmp_path / "alice.csv")
    carol = fill_sheet(csv_path, key, noisy, tmp_path / "carol.csv")
    result = read_ratings([alice, carol], tmp_path / "sheet" / "rating_key.json", systems=[BASE, TUNED])

    assert result["missing"] == 1 and result["n"][TUNED]["clarity"] == 6
    # the first item's score is alice's alone: (5 + 4 + 5 + 5 + 4 + 4) / 6, not the pooled 49 / 11
    assert result["means"][TUNED]["clarity"] == pytest.approx(4.5)
    assert result["means"][BASE]["correctness"] == pytest.approx((16 + 19) / 12)
    correctness = result["agreement"]["correctness"]
    assert correctness["krippendorff_alpha"] < 0.5 and correctness["weighted_kappa"] < 0.5
    assert result["agreement"]["completeness"]["krippendorff_alpha"] == pytest.approx(1.0)


def test_alpha_and_kappa_match_hand_computed_values(tmp_path):
    """Two raters, four units (item x answer) with scores (1,1) (2,2) (3,3) (1,3).

    Krippendorff's ordinal alpha: the coincidence matrix has o11 = o22 = o33 = 2, o13 = o31 = 1, so n1 = 3, n2 = 2,
    n3 = 3, n = 8. Ordinal distances d(c,k) = (sum of n_g for g from c to k - (n_c + n_k) / 2)^2: d12 = 2.5^2 = 6.25,
    d23 = 6.25, d13 = (8 - 3)^2 = 25. Observed: sum o*d = 2 * 25 = 50. Expected: sum n_c n_k d = 2 * (3*2*6.25 +
    3*3*25 + 2*3*6.25) = 600. alpha = 1 - (n - 1) * 50 / 600 = 5/12.

    Quadratic-weighted kappa: observed disagreement sum w*O = 1 * (1-3)^2 = 4; rows (1: 2, 2: 1, 3: 1) and columns
    (1: 1, 2: 1, 3: 2) give an expected sum w*E = (2*(1*1 + 2*4) + 1*(1*1 + 2*1) + 1*(1*4 + 1*1)) / 4 = 6.5;
    kappa = 1 - 4 / 6.5 = 5/13.
    """
    examples = make_examples(2)
    csv_path = write_rating_sheet(examples, tmp_path, seed=0)
    by_label = {"ann": [(1, 2), (3, 1)], "ben": [(1, 2), (3, 3)]}  # per item: (A_correctness, B_correctness)
    files = []
    for rater, per_item in by_label.items():
        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        for row, (a, b) in zip(rows, per_item):
            row.update({"A_correctness": a, "B_correctness": b, "A_completeness": 3, "B_completeness": 4,
                        "A_clarity": 5, "B_clarity": 5, "rater": rater})
        files.append(tmp_path / f"{rater}.csv")
        with open(files[-1], "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    result = read_ratings(files, tmp_path / "rating_key.json")
    assert result["agreement"]["correctness"]["krippendorff_alpha"] == pytest.approx(5 / 12)
    assert result["agreement"]["correctness"]["weighted_kappa"] == pytest.approx(5 / 13)
    # identical ratings with a single value everywhere: there is no disagreement to expect, so no alpha or kappa
    assert result["agreement"]["clarity"] == {"krippendorff_alpha": None, "weighted_kappa": None}


@pytest.mark.parametrize("bad", ["7", "good", "4.5", "0"])
def test_a_bad_cell_names_file_line_and_column(sheet, tmp_path, bad):
    csv_path, key = sheet
    filled = fill_sheet(csv_path, key, KNOWN, tmp_path / "dora.csv")
    with open(filled, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[3]["B_clarity"] = bad
    with open(filled, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    # the multi-line cells before it push the row far below line 5: find where its record starts
    line = next(i for i, text in enumerate(filled.read_text().splitlines(), 1) if text.startswith("item-004,"))
    assert line > 5
    with pytest.raises(RatingsError) as error:
        read_ratings([filled], tmp_path / "sheet" / "rating_key.json")
    message = str(error.value)
    assert str(filled) in message and f"line {line}" in message and "'B_clarity'" in message and repr(bad) in message


def test_unknown_item_and_missing_columns_are_errors(sheet, tmp_path):
    csv_path, key = sheet
    filled = fill_sheet(csv_path, key, KNOWN, tmp_path / "erin.csv")
    text = filled.read_text()
    (tmp_path / "renamed.csv").write_text(text.replace("item-002,", "item-999,"))
    with pytest.raises(RatingsError, match=r"renamed\.csv: line \d+: column 'item_id': 'item-999'"):
        read_ratings([tmp_path / "renamed.csv"], tmp_path / "sheet" / "rating_key.json")
    (tmp_path / "nocol.csv").write_text(text.replace(",A_clarity,", ",A_clearness,", 1))
    with pytest.raises(RatingsError, match=r"nocol\.csv:1: missing column\(s\) A_clarity"):
        read_ratings([tmp_path / "nocol.csv"], tmp_path / "sheet" / "rating_key.json")


def test_a_sheet_read_with_a_rewritten_key_is_refused_not_unblinded_backwards(sheet, tmp_path):
    """Issue 19: a key rewritten with another seed used to unblind an old sheet backwards without a word."""
    csv_path, key = sheet
    filled = fill_sheet(csv_path, key, KNOWN, tmp_path / "gil.csv", rater="gil")
    old_key = json.loads((csv_path.parent / "rating_key.json").read_text())
    other = tmp_path / "other"
    write_rating_sheet(make_examples(6), other, seed=3)
    new_key = json.loads((other / "rating_key.json").read_text())
    assert new_key["items"] != old_key["items"]
    with pytest.raises(RatingsError) as error:
        read_ratings([filled], other / "rating_key.json", systems=[BASE, TUNED])
    message = str(error.value)
    assert str(filled) in message and "line 2" in message
    assert old_key["sheet_id"] in message and new_key["sheet_id"] in message and "--ratings-key" in message
    assert read_ratings([filled], csv_path.parent / "rating_key.json")["means"][TUNED]["correctness"] == \
        pytest.approx(26 / 6)  # with its own key it reads as rated


def test_a_key_with_a_sheet_out_is_kept_on_a_rerun_and_replaced_only_when_forced(sheet, tmp_path):
    csv_path, key = sheet
    folder = csv_path.parent
    before = (folder / "rating_key.json").read_text()
    filled = fill_sheet(csv_path, key, KNOWN, tmp_path / "hana.csv", rater="hana")
    write_rating_sheet(make_examples(6), folder, seed=0)  # the same sheet again: key and sheet untouched
    write_rating_sheet(make_examples(6), folder, seed=0, force=True)
    assert (folder / "rating_key.json").read_text() == before
    with pytest.raises(RatingsError, match=r"rating_key\.json unblinds sheet \w+, which may be out with raters.*"
                                           r"--force-new-sheet"):
        write_rating_sheet(make_examples(6), folder, seed=3)
    assert (folder / "rating_key.json").read_text() == before
    write_rating_sheet(make_examples(6), folder, seed=3, force=True)
    assert json.loads((folder / "rating_key.json").read_text())["sheet_id"] != json.loads(before)["sheet_id"]
    with pytest.raises(RatingsError, match="hana.csv: line 2: this row is from sheet"):
        read_ratings([filled], folder / "rating_key.json")


def test_a_key_edited_by_hand_or_without_a_sheet_id_is_refused(sheet, tmp_path):
    csv_path, key = sheet
    filled = fill_sheet(csv_path, key, KNOWN, tmp_path / "ida.csv")
    data = json.loads((csv_path.parent / "rating_key.json").read_text())
    swapped = {item: {"A": labels["B"], "B": labels["A"]} for item, labels in data["items"].items()}
    (tmp_path / "edited.json").write_text(json.dumps({**data, "items": swapped}))
    with pytest.raises(RatingsError, match=r"edited\.json: the key's hash does not match"):
        read_ratings([filled], tmp_path / "edited.json")
    (tmp_path / "legacy.json").write_text(json.dumps(data["items"]))  # the format before keys had ids
    with pytest.raises(RatingsError, match=r"legacy\.json: a rating key without a sheet id"):
        read_ratings([filled], tmp_path / "legacy.json")


def test_a_sheet_with_rows_deleted_is_not_reported_complete(sheet, tmp_path):
    csv_path, key = sheet
    filled = fill_sheet(csv_path, key, KNOWN, tmp_path / "jo.csv", rater="jo")
    with open(filled, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(filled, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[:4])  # two items deleted, every remaining cell filled
    result = read_ratings([filled], csv_path.parent / "rating_key.json", systems=[BASE, TUNED])
    assert result["absent_items"] == 2 and result["missing"] == 2 * 6 and result["items"] == 6
    assert result["n"][TUNED]["clarity"] == 4


def test_a_binary_sheet_names_the_file(sheet, tmp_path):
    csv_path, _ = sheet
    binary = tmp_path / "scan.csv"
    binary.write_bytes(b"item_id,A_correctness\n\xff\xfe\x00\x81garbage\n")
    with pytest.raises(RatingsError, match=r"scan\.csv: not UTF-8 text \(byte \d+\)"):
        read_ratings([binary], csv_path.parent / "rating_key.json")
