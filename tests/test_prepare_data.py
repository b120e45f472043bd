"""prepare_data.py end to end and stage by stage, on small inline datasets (one test runs the bundled data)."""
from __future__ import annotations

import csv
import json
import random
import itertools
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

import prepare_data
from chat_server import chat_server
from howto.chat import encode_example
from howto.collect import collect_inputs
from howto.records import read_records
from howto.runio import RunError

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json", "report.md", "distributions.png")

# The specification's example as written: the sixth step has no comma after it.
SPEC_EXAMPLE = """{
  "prompt": "How do I reset my password in the e-commerce XX mobile app?",
  "response": [
    "Open the app",
    "Go to the login page",
    "Tap on the 'Forgot Password' link",
    "Enter your registered email address",
    "Tap 'Submit' to request a reset link",
    "Check your email and verify the reset request"
    "Follow the link to set a new password"
  ]
}
"""

SYLLABLES = ("ka", "lo", "mi", "ter", "shu", "ven", "dra", "po", "lix", "zen", "qua", "rin", "bel", "tor", "fa", "gor")


def distinct_records(category: str, n: int, seed: int = 0) -> list[dict]:
    """n records that share no content words, so none is a near-duplicate of another."""
    rng = random.Random(f"{category}-{seed}")
    used: set[str] = set()

    def word() -> str:
        while True:
            w = "".join(rng.choice(SYLLABLES) for _ in range(5))
            if w not in used:
                used.add(w)
                return w

    return [{"prompt": f"How do I {word()} my {word()} in {word().capitalize()}?",
             "response": [f"Open {word()} settings.", f"Tap '{word()} {word()}'.", f"Choose {word()}.",
                          f"Confirm {word()} {word()}."],
             "category": category} for _ in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(*args: str | Path) -> int:
    return prepare_data.main([str(a) for a in args])


def read_split(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def all_records(out: Path) -> list[dict]:
    return [r for name in prepare_data.SPLITS for r in read_split(out, name)]


# ---------------------------------------------------------------------------------------------- 1. validation
def test_spec_example_missing_comma_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(SPEC_EXAMPLE, encoding="utf-8")
    with pytest.raises(RunError) as err:
        read_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}:10:5: malformed JSON at line 10, column 5: Expecting ',' delimiter")
    assert "comma is probably missing at the end of line 9" in message
    assert '"Follow the link to set a new password"' in message

    assert prepare(path, "--out", tmp_path / "out", "--skip-invalid") == 1  # not skippable: no silent merge
    stderr = capsys.readouterr().err
    assert "line 10, column 5" in stderr and "comma" in stderr
    assert not (tmp_path / "out").exists()


def test_json_records_report_the_line_where_each_record_starts(tmp_path):
    text = '[\n  {"prompt": "a?", "response": ["x", "y"]},\n\n  {\n    "prompt": "b?",\n' \
           '    "response": ["x", "y"]\n  }, {"prompt": "c?", "response": ["x", "y"]}\n]\n'
    path = tmp_path / "list.json"
    path.write_text(text, encoding="utf-8")
    assert [(r.line, r.index) for r in read_records(path)] == [(2, 0), (4, 1), (7, 2)]


BAD_RECORDS = [
    ({"response": ["a", "b"]}, "prompt", "missing"),
    ({"prompt": 5, "response": ["a", "b"]}, "prompt", "must be a string, got number"),
    ({"prompt": "q?", "response": []}, "response", "empty step list"),
    ({"prompt": "q?", "response": ["Open the app"]}, "response", "only one step"),
    ({"prompt": "q?", "response": ["a", 3]}, "response[1]", "step must be a string, got number"),
    ({"prompt": "q?", "response": ["a", "  "]}, "response[1]", "empty step"),
    ({"prompt": "q?", "response": "Open the app"}, "response", "must be a list of steps"),
    ({"prompt": "q?"}, "response", "missing"),
    ({"prompt": "q?", "response": ["a", "b"], "category": ["x"]}, "category", "must be a string, got array"),
    (["not", "an", "object"], "(record)", "expected an object"),
]


@pytest.mark.parametrize("bad,field,problem", BAD_RECORDS)
def test_invalid_record_is_reported_with_file_line_index_and_field(tmp_path, capsys, bad, field, problem):
    records = distinct_records("shopping", 3)
    text = "[\n" + ",\n".join(json.dumps(r) for r in records[:2]) + ",\n" + json.dumps(bad, indent=2) + ",\n" \
        + json.dumps(records[2]) + "\n]\n"
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    assert prepare(path, "--out", tmp_path / "out") == 1
    stderr = capsys.readouterr().err
    assert f"{path}:4: record index 2, field '{field}': {problem}" in stderr
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_broken_jsonl_line_names_line_and_column(tmp_path, capsys):
    good = distinct_records("email", 2)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good[0]) + "\n" + '{"prompt": "x?" "response": ["a", "b"]}\n' + json.dumps(good[1]),
                    encoding="utf-8")
    assert prepare(path, "--out", tmp_path / "out") == 1
    assert f"{path}:2:17: malformed JSON at line 2, column 17" in capsys.readouterr().err


def test_unreadable_inputs_are_clear_errors(tmp_path, capsys):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "Comment réinitialiser?", "response": ["a", "b"]}\n'.encode("latin-1"))
    assert prepare(latin1, "--out", tmp_path / "out") == 1
    assert prepare(tmp_path / "missing.json", "--out", tmp_path / "out") == 1
    (tmp_path / "notes.docx").write_text("hello")  # .txt is a raw source now (howto.collect)
    assert prepare(tmp_path / "notes.docx", "--out", tmp_path / "out") == 1
    stderr = capsys.readouterr().err
    assert f"{latin1}: not UTF-8 text" in stderr
    assert f"{tmp_path / 'missing.json'}: no such file or folder" in stderr
    assert "notes.docx: unsupported file type" in stderr


def test_skip_invalid_keeps_the_valid_records_and_lists_the_skipped_ones(tmp_path, capsys):
    records = distinct_records("travel", 10)
    records[3] = {"prompt": "q?", "response": ["just one step"], "category": "travel"}
    records[7] = {"prompt": "q?", "response": ["a", None], "category": "travel"}
    path = write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "out"
    assert prepare(path, "--out", out, "--skip-invalid") == 0
    assert len(all_records(out)) == 8
    skipped = json.loads((out / "stats.json").read_text())["validation"]["skipped"]
    assert skipped == [f"{path}:4: record index 3, field 'response': only one step: a how-to answer needs at least two",
                       f"{path}:8: record index 7, field 'response[1]': step must be a string, got null"]
    report = (out / "report.md").read_text()
    assert all(s in report for s in skipped)
    assert "skipped: " in capsys.readouterr().err


def test_unknown_fields_give_one_warning(tmp_path, capsys):
    records = distinct_records("banking", 6)
    for r in records[:4]:
        r["rating"] = 5
    records[0]["url_slug"] = "x"
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unknown fields" in line]
    assert warnings == ["warning: ignoring unknown fields 'rating' (4 records), 'url_slug' (1 records)"]
    assert all(set(r) == {"prompt", "response", "category"} for r in all_records(out))


def test_alpaca_csv_and_folder_inputs_become_the_same_record(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "alpaca.json").write_text(json.dumps([
        {"instruction": "How do I export contacts?", "input": "On Android.",
         "output": "Here are the steps:\n1. Open Contacts.\n2. Tap Export.\n3. Pick a folder."},
        {"instruction": "How do I mute a chat?", "output": ["Open the chat.", "Tap Mute."], "category": "email"},
    ]), encoding="utf-8")
    with open(folder / "rows.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "steps", "category"])
        writer.writerow(["How do I pay a bill?", json.dumps(["Open Pay.", "Tap Bills.", "Tap Pay."]), "banking"])
        writer.writerow(["How do I freeze a card?", "1. Open Cards.\n2. Tap Freeze.", ""])
        writer.writerow(["How do I close it?", "Step 1: only this", "banking"])
    files = prepare_data.find_input_files([str(folder)])
    raws = prepare_data.load_inputs(files, collect_inputs(files))
    items, invalid, unknown = prepare_data.validate_records(raws)
    assert not any(raw.problem for raw in raws) and not unknown
    assert [i.record for i in items] == [
        {"prompt": "How do I export contacts?\nOn Android.",
         "response": ["Open Contacts.", "Tap Export.", "Pick a folder."], "category": "uncategorized"},
        {"prompt": "How do I mute a chat?", "response": ["Open the chat.", "Tap Mute."], "category": "email"},
        {"prompt": "How do I pay a bill?", "response": ["Open Pay.", "Tap Bills.", "Tap Pay."], "category": "banking"},
        {"prompt": "How do I freeze a card?", "response": ["Open Cards.", "Tap Freeze."],
         "category": "uncategorized"},
    ]
    assert invalid == [f"{folder / 'rows.csv'}:5: record index 2, field 'steps': only one step: a how-to answer "
                       "needs at least two"]


def test_rerun_on_a_folder_does_not_read_its_own_outputs(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "d.jsonl", distinct_records("email", 10))
    for _ in range(2):
        assert prepare(folder, "--out", folder / "prepared") == 0
    assert json.loads((folder / "prepared" / "stats.json").read_text())["inputs"] == [
        {"file": str(folder / "d.jsonl"), "records": 10}]


# -------------------------------------------------------------------------------------------- 2. normalisation
def test_normalisation_lowercases_strips_punctuation_and_keeps_placeholders():
    text = "Tap 'Forgot Password' — then e-mail [EMAIL], don't   wait! Code: 4821."
    assert prepare_data.normalize_text(text) == "tap forgot password then e mail [EMAIL] dont wait code 4821"
    assert prepare_data.normalize_text(text, lowercase=False) == \
        "Tap Forgot Password then e mail [EMAIL] dont wait Code 4821"
    assert prepare_data.normalize_text(text, strip_punctuation=False) == \
        "tap 'forgot password' — then e-mail [EMAIL], don't wait! code: 4821."
    assert prepare_data.normalize_text("Call ([PHONE]) or [EMAIL].\n") == "call [PHONE] or [EMAIL]"


def test_normalisation_flags_change_the_written_records(tmp_path):
    records = distinct_records("streaming", 5)
    records[0]["prompt"] = "How do I Reset my PIN, quickly?"
    path = write_jsonl(tmp_path / "d.jsonl", records)
    prepare(path, "--out", tmp_path / "a", "--split", "1,0,0")
    prepare(path, "--out", tmp_path / "b", "--split", "1,0,0", "--keep-case", "--keep-punctuation")
    assert read_split(tmp_path / "a", "train")[0]["prompt"] == "how do i reset my pin quickly"
    assert read_split(tmp_path / "b", "train")[0]["prompt"] == "How do I Reset my PIN, quickly?"


def test_numbering_written_into_the_steps_is_dropped(tmp_path):
    records = distinct_records("streaming", 5)
    records[0]["response"] = ["1. Open the app", "2. Tap 'Profile'", "3. Tap 'Sign out'"]
    prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", tmp_path / "a", "--split", "1,0,0", "--keep-case")
    written = {r["prompt"]: r["response"] for r in read_split(tmp_path / "a", "train")}
    assert written[prepare_data.normalize_text(records[0]["prompt"], lowercase=False)] == \
        ["Open the app", "Tap Profile", "Tap Sign out"]


# ------------------------------------------------------------------------------------------------------ 3. PII
PLANTED = ["maria.lopez@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32",
           "192.168.10.24", "https://admin:hunter2@files.example.com/share"]


def test_pii_is_replaced_before_anything_is_written(tmp_path):
    records = distinct_records("banking", 12)
    records[0]["prompt"] = f"How do I send money to {PLANTED[0]} and {PLANTED[1]}?"
    records[1]["response"][1] = f"Enter card {PLANTED[2]}."
    records[2]["response"][2] = f"Paste the IBAN {PLANTED[3]}."
    records[3]["prompt"] = f"Why can't I reach the router at {PLANTED[4]}?"
    records[4]["response"][0] = f"Open {PLANTED[5]} in a browser."
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out) == 0
    for path in out.iterdir():
        data = path.read_bytes()
        for secret in PLANTED + ["maria.lopez", "hunter2", "7946", "1111 1111", "5698"]:
            assert secret.encode() not in data, f"{secret} leaked into {path.name}"
    written = json.dumps(all_records(out))
    for placeholder in ("[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[IP]", "[URL]"):
        assert placeholder in written
    pii = json.loads((out / "stats.json").read_text())["pii"]
    assert pii["replaced"] == {"CARD": 1, "EMAIL": 1, "IBAN": 1, "IP": 1, "PHONE": 1, "URL": 1}
    assert pii["records_with_pii"] == 5


# ------------------------------------------------------------------------------------------------ 4. duplicates
def duplicate_fixture() -> list[prepare_data.Item]:
    records = distinct_records("shopping", 30) + distinct_records("travel", 30)
    exact = {**records[5], "prompt": records[5]["prompt"].upper() + "!!"}
    paraphrase = {**records[9], "prompt": records[9]["prompt"].replace("How do I", "What are the steps to")}
    paraphrase2 = {**records[40], "prompt": "help me with " + records[40]["prompt"].lower(),
                   "response": records[40]["response"][:3] + ["Confirm it."]}
    items = [prepare_data.Item(dict(r), f"rec {i}") for i, r in enumerate(records + [exact, paraphrase, paraphrase2])]
    items, _ = prepare_data.normalize_items(items, lowercase=True, strip_punctuation=True)
    return items


def test_exact_duplicates_are_removed_and_near_duplicates_grouped():
    items, report = prepare_data.deduplicate(duplicate_fixture(), threshold=0.6)
    assert len(items) == 62
    assert report["exact_duplicates_removed"] == 1
    assert report["exact_duplicates"][0]["removed"] == "rec 60" and report["exact_duplicates"][0]["kept"] == "rec 5"
    groups = sorted(sorted(m["origin"] for m in g) for g in report["groups"])
    assert groups == [["rec 40", "rec 62"], ["rec 61", "rec 9"]]
    assert report["near_duplicate_groups"] == 2 and report["records_in_near_duplicate_groups"] == 4


@pytest.mark.parametrize("seed", range(6))
def test_near_duplicates_never_straddle_splits(seed):
    items, _ = prepare_data.deduplicate(duplicate_fixture(), threshold=0.6)
    splits = prepare_data.split_records(items, (0.34, 0.33, 0.33), seed)
    where = {item.origin: name for name, part in splits.items() for item in part}
    assert where["rec 9"] == where["rec 61"] and where["rec 40"] == where["rec 62"]
    assert sum(len(part) for part in splits.values()) == len(items)


def test_same_prompt_with_different_steps_is_grouped():
    records = distinct_records("email", 4)
    twin = {**records[0], "response": ["Something else entirely.", "And more."]}
    items = [prepare_data.Item(r, str(i)) for i, r in enumerate(records + [twin])]
    _, report = prepare_data.deduplicate(items, threshold=0.9)
    assert [[m["origin"] for m in g] for g in report["groups"]] == [["0", "4"]]


# ------------------------------------------------------------------------------------- 5. balance and diversity
def test_balance_report_flags_thin_categories_and_plots(tmp_path):
    records = distinct_records("shopping", 25) + distinct_records("banking", 22) + distinct_records("travel", 6)
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out, "--thin-threshold", "20") == 0
    stats = json.loads((out / "stats.json").read_text())
    balance = stats["balance"]
    assert balance["categories"] == {"shopping": 25, "banking": 22, "travel": 6}
    assert balance["thin"] == {"travel": 6}
    assert balance["steps_per_record"]["histogram"] == {"4": 53}
    # prompts "how do i W my W in W": 5 shared words and 3 own ones each; bigrams: 2 shared and 5 own
    assert balance["distinct_1"] == round((5 + 3 * 53) / (8 * 53), 4)
    assert balance["distinct_2"] == round((2 + 5 * 53) / (7 * 53), 4)
    assert "| travel | 6 | yes |" in (out / "report.md").read_text()
    assert (out / "distributions.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_distinct_n():
    assert prepare_data.distinct_n(["a b c", "a b d"], 1) == round(4 / 6, 4)
    assert prepare_data.distinct_n(["a b c", "a b d"], 2) == round(3 / 4, 4)


# ------------------------------------------------------------------------------------------------- 7. tokens
@pytest.fixture(scope="module")
def tokenizer():
    from howto.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("mistral"))


def long_dataset() -> list[dict]:
    records = distinct_records("work_tools", 10)
    records[4]["response"] = [f"Step {k}: fill in field number {k} of the long form carefully." for k in range(40)]
    return records


def test_token_lengths_are_reported_and_overlong_records_dropped(tmp_path, tokenizer):
    records = long_dataset()
    lengths = sorted(len(encode_example(tokenizer, prepare_data.normalize_text(r["prompt"]),
                                        [prepare_data.normalize_text(s) for s in r["response"]])["input_ids"])
                     for r in records)
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out, "--max-seq-length", "200") == 0
    tokens = json.loads((out / "stats.json").read_text())["tokens"]
    assert tokens["max"] == lengths[-1] > 200 and tokens["p95"] == lengths[-1]
    assert tokens["over_limit"] == 1
    assert tokens["overlong"] == [{"origin": f"{tmp_path / 'd.jsonl'}:5: record index 4", "tokens": lengths[-1],
                                   "action": "dropped"}]
    assert len(all_records(out)) == 9
    assert "over 200 tokens: 1 (drop)" in (out / "report.md").read_text()


def test_overlong_records_can_be_truncated_by_whole_steps(tmp_path, tokenizer):
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", long_dataset()), "--out", out, "--max-seq-length", "200",
                   "--overlong", "truncate") == 0
    records = all_records(out)
    assert len(records) == 10
    long = next(r for r in records if len(r["response"]) > 4)
    assert long["response"] == [f"step {k} fill in field number {k} of the long form carefully"
                                for k in range(len(long["response"]))]
    assert all(len(encode_example(tokenizer, r["prompt"], r["response"])["input_ids"]) <= 200 for r in records)
    action = json.loads((out / "stats.json").read_text())["tokens"]["overlong"][0]["action"]
    assert action.startswith(f"truncated to {len(long['response'])} steps")


VARIED_EXAMPLES = [
    ("How do I log out?", ["Open settings", "Tap 'Log out'"]),
    ("  how   do i    reset\tmy  password  ", ["open   the   app", "  tap    forgot   password  ", "done\t\tnow"]),
    ("Comment réinitialiser mon café-crème ? Ünïcödé ß", ["Öffne die App", "Appuyez sur « Réglages »", "完成设置"]),
    ("Bagaimana cara ganti nomor HP 😀 di aplikasi?", ["Buka aplikasi 😀😀", "Pilih menu → Akun", "Simpan…"]),
    ("what is [EMAIL] and [INST] doing here [/INST]?", ["send to [EMAIL]", "call [PHONE]", "</s> is text here"]),
    ("long steps", [" ".join(f"word{k} and   more,  text;" for k in range(120)), "x" * 900, "1. 2. 3.\n\n\n4."]),
    ("How do I log out?", ["Open settings", "Tap 'Log out'", "Confirm"]),
    ("tabs\tand\nnewlines\r\ninside", ["a\n\nb", "   ", "c"]),
]


@pytest.mark.parametrize("which", ["mistral", "smollm2"])
def test_batched_token_lengths_equal_encode_example(which, mistral_tokenizer, smollm2_model):
    from howto import chat
    from howto.chat import example_lengths
    from howto.models import load_tokenizer

    tokenizer = mistral_tokenizer if which == "mistral" else load_tokenizer(smollm2_model)
    examples = VARIED_EXAMPLES * 5 + [(f"question {k}{' ' * k}?", [f"step {k} " * k, "last"]) for k in range(40)]
    expected = [len(encode_example(tokenizer, prompt, steps)["input_ids"]) for prompt, steps in examples]
    assert example_lengths(tokenizer, examples) == expected
    if which == "mistral":  # the batched SentencePiece path itself, not the record-by-record fallback
        assert chat._mistral_lengths(tokenizer, examples) == expected


def test_a_mistral_tokenizer_of_another_format_falls_back_to_encode_example(monkeypatch, mistral_tokenizer):
    from howto import chat

    monkeypatch.setattr(chat, "_mistral_lengths", lambda tokenizer, examples: [1] * len(examples))
    assert chat.example_lengths(mistral_tokenizer, VARIED_EXAMPLES) == [
        len(encode_example(mistral_tokenizer, prompt, steps)["input_ids"]) for prompt, steps in VARIED_EXAMPLES]


def test_token_lengths_are_remembered_so_a_rerun_loads_no_tokenizer(tmp_path, monkeypatch, tokenizer):
    import howto.models

    monkeypatch.setenv("HOWTO_CACHE", str(tmp_path / "cache"))
    records = long_dataset()
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert prepare(path, "--out", tmp_path / "a", "--overlong", "truncate", "--max-seq-length", "200") == 0
    monkeypatch.setattr(howto.models, "load_tokenizer", lambda model: pytest.fail("the tokenizer was loaded again"))
    assert prepare(path, "--out", tmp_path / "b", "--overlong", "truncate", "--max-seq-length", "200") == 0
    assert (tmp_path / "a" / "stats.json").read_bytes() == (tmp_path / "b" / "stats.json").read_bytes()
    monkeypatch.undo()
    monkeypatch.setenv("HOWTO_CACHE", str(tmp_path / "cache"))
    records[0]["response"].append("Then one more step.")  # a changed record is encoded again, the others are not
    loads = []
    monkeypatch.setattr(howto.models, "load_tokenizer", lambda model: loads.append(model) or tokenizer)
    assert prepare(write_jsonl(path, records), "--out", tmp_path / "c") == 0
    changed = [r for r in all_records(tmp_path / "c") if r["response"][-1] == "then one more step"][0]
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert len(loads) == 1 and stats["tokens"]["max"] >= len(encode_example(tokenizer, changed["prompt"],
                                                                             changed["response"])["input_ids"])


# -------------------------------------------------------------------------------------------------- 8. split
def test_split_is_stratified_by_category(tmp_path):
    records = distinct_records("shopping", 40) + distinct_records("email", 20) + distinct_records("travel", 10)
    random.Random(1).shuffle(records)
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out) == 0
    counts = {name: Counter(r["category"] for r in read_split(out, name)) for name in prepare_data.SPLITS}
    assert counts["train"] == {"shopping": 32, "email": 16, "travel": 8}
    assert counts["val"] == {"shopping": 4, "email": 2, "travel": 1}
    assert counts["test"] == {"shopping": 4, "email": 2, "travel": 1}
    assert all(set(r) == {"prompt", "response", "category"} and isinstance(r["response"], list)
               for r in all_records(out))


def test_same_input_and_seed_give_byte_identical_outputs(tmp_path):
    records = distinct_records("shopping", 30) + distinct_records("travel", 15)
    records.append({**records[3], "prompt": records[3]["prompt"].replace("How do I", "How can I")})
    path = write_jsonl(tmp_path / "d.jsonl", records)
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert prepare(path, "--out", tmp_path / name, "--seed", seed) == 0
    for output in OUTPUTS:
        assert (tmp_path / "a" / output).read_bytes() == (tmp_path / "b" / output).read_bytes(), output
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert info["data_sha256"] and "timings_s" in info
    assert all(info["versions"].get(name) for name in ("numpy", "scipy", "mistral-common", "sentencepiece",
                                                        "phonenumbers"))  # the libraries this script uses
    assert "seed: 7" in (tmp_path / "a" / "config.yaml").read_text()


def test_config_file_sets_the_flags(tmp_path):
    records = distinct_records("shopping", 20)
    config = tmp_path / "run.yaml"
    config.write_text("seed: 3\nprepare_data:\n  split: 0.5,0.25,0.25\n  keep_case: true\n", encoding="utf-8")
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out, "--config", config) == 0
    assert [len(read_split(out, name)) for name in prepare_data.SPLITS] == [10, 5, 5]
    assert read_split(out, "train")[0]["prompt"][0] == "H"


# ------------------------------------------------------------------------------------------- 6. augmentation
def augmenting_llm() -> Callable[[dict], str]:
    """An LLM that writes records for the asked category: one of them invalid, one with an email to redact."""
    calls = itertools.count(1)

    def answer(body: dict) -> str:
        user = body["messages"][-1]["content"]
        n = int(re.search(r"Write (\d+)", user).group(1))
        k = next(calls)
        if "paraphrases" in user:
            return json.dumps({"records": [{"prompt": f"Could you explain, request {k} variant {i}?"}
                                           for i in range(n)]})
        records = [{"prompt": f"How do I book a {['yoga', 'pilates', 'spin', 'boxing', 'rowing'][i]} class, "
                              f"batch {k}?",
                    "response": [f"Open the gym app, batch {k}.", f"Find the {i} timetable.",
                                 "Mail coach.kim@example.com to confirm."]} for i in range(n)]
        records[-1] = {"prompt": "One step is not a how-to?", "response": ["Just do it."]}
        return json.dumps({"records": records})

    return answer


@pytest.fixture
def llm_server():
    with chat_server(augmenting_llm()) as (url, received):
        yield SimpleNamespace(url=url, requests=received)


def test_augmentation_fills_thin_categories_through_the_full_pipeline(tmp_path, llm_server, monkeypatch):
    monkeypatch.setenv("AUG_KEY", "sk-test-not-logged-123")
    records = distinct_records("shopping", 24) + distinct_records("health_fitness", 4)
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out, "--augment", "--augment-url",
                   llm_server.url, "--augment-model", "test-model", "--augment-key-env", "AUG_KEY",
                   "--thin-threshold", "16", "--augment-max-requests", "3") == 0
    assert len(llm_server.requests) == 3  # 12 records wanted: 5 new, 5 paraphrases, 2 new
    assert llm_server.requests[0]["path"] == "/v1/chat/completions"
    assert llm_server.requests[0]["authorization"] == "Bearer sk-test-not-logged-123"
    assert llm_server.requests[0]["body"]["model"] == "test-model"

    written = all_records(out)
    augmented = [r for r in written if r.get("source") == "augmented"]
    # each batch of new records ends with a one-step record, which validation rejects; paraphrases keep the
    # steps of the record they reword
    new = [r for r in augmented if "book a" in r["prompt"]]
    paraphrases = [r for r in augmented if "could you explain" in r["prompt"]]
    assert (len(new), len(paraphrases), len(augmented)) == (4 + 1, 5, 10)
    assert all(r["category"] == "health_fitness" for r in augmented)
    assert all(r["prompt"] == r["prompt"].lower() for r in augmented)
    assert all("[EMAIL]" in r["response"][2] for r in new)
    stats = json.loads((out / "stats.json").read_text())
    aug = stats["augmentation"]
    assert aug["requests"] == 3 and aug["added"] == len(augmented)
    assert aug["rejected"] == [f"<augmented>: record index {i}, field 'response': only one step: a how-to answer "
                               "needs at least two" for i in (4, 11)]
    assert aug["pii_replaced"]["EMAIL"] == len(new)
    assert stats["balance"]["categories"]["health_fitness"] == 4 + len(augmented)
    assert all(b"sk-test-not-logged-123" not in p.read_bytes() for p in out.iterdir())
    assert b"coach.kim" not in b"".join(p.read_bytes() for p in out.iterdir())
    split_of = {r["prompt"]: name for name in prepare_data.SPLITS for r in read_split(out, name)}
    groups = stats["dedup"]["groups"]  # a paraphrase shares its original's steps: grouped, so in one split
    assert any(sum("could you explain" in m["prompt"] for m in g) == 5 and len(g) == 6 for g in groups)
    assert all(len({split_of[m["prompt"]] for m in g}) == 1 for g in groups)


def test_unreachable_augmentation_endpoint_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import howto.llm

    monkeypatch.setattr(howto.llm.time, "sleep", lambda seconds: None)
    records = distinct_records("shopping", 24) + distinct_records("health_fitness", 4)
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", tmp_path / "out", "--augment",
                   "--augment-url", "http://127.0.0.1:9/v1", "--augment-model", "m") == 1
    assert "cannot reach http://127.0.0.1:9/v1/chat/completions" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.jsonl").exists()


# -------------------------------------------------------------------------------------------- bundled dataset
@pytest.mark.skipif(not (ROOT / "data" / "howto_steps.jsonl").exists(), reason="bundled dataset not present")
def test_bundled_dataset(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_data.main([str(ROOT / "data" / "howto_steps.jsonl"), "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["validation"]["skipped_count"] == 0
    assert stats["dedup"]["exact_duplicates_removed"] + stats["dedup"]["near_duplicate_groups"] == 13
    assert (f"or the same answer: {stats['dedup']['groups_joined_by_near_copies']}; largest split unit: "
            f"{stats['dedup']['largest_split_unit']} records") in (out / "report.md").read_text()
    assert set(stats["balance"]["thin"]) == {"government_services", "health_fitness"}
    assert stats["tokens"]["over_limit"] == 0
    blob = b"".join((out / name).read_bytes() for name in OUTPUTS)
    assert b"@example.com" not in blob and b"NL91ABNA0417164300" not in blob
    split_of = {r["prompt"]: name for name in prepare_data.SPLITS for r in read_split(out, name)}
    assert all(len({split_of[m["prompt"]] for m in g}) == 1 for g in stats["dedup"]["groups"])
    assert "prepare_data" in capsys.readouterr().out  # the summary table
