"""prepare_data.py on bad input (issue 11's list): one clear line, nothing lost quietly, no half-written outputs."""
from __future__ import annotations

import json
import os
import re

import pytest

import prepare_data
from howto.runio import RunError
from test_prepare_data import OUTPUTS, all_records, distinct_records, prepare, read_split, write_jsonl


def stats_of(out) -> dict:
    return json.loads((out / "stats.json").read_text())


# ----------------------------------------------------------------------------------------- 1. small datasets
@pytest.mark.parametrize("n", [3, 10, 20])
def test_small_data_gives_val_and_test_a_record_and_says_so(tmp_path, capsys, n):
    records = [r for category in ("a", "b", "c", "d", "e") for r in distinct_records(category, max(1, n // 5))][:n]
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out) == 0
    sizes = [len(read_split(out, name)) for name in prepare_data.SPLITS]
    assert sum(sizes) == n and min(sizes) >= 1
    if n == 3:
        assert "warning: the split train 1 / val 1 / test 1 is off the fractions asked" in capsys.readouterr().err


def test_too_few_records_for_three_splits_is_an_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", distinct_records("a", 2))
    assert prepare(path, "--out", tmp_path / "out") == 1
    assert "error: 2 records (2 once near-duplicates are grouped) cannot give train, val, test a record each" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert prepare(path, "--out", tmp_path / "out", "--split", "0.5,0.5,0") == 0  # two splits asked: enough


def test_many_small_categories_keep_the_fractions(tmp_path):
    records = [r for k in range(30) for r in distinct_records(f"c{k}", 3)]  # 3 records a category: 2.4/0.3/0.3
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out) == 0
    assert [len(read_split(out, name)) for name in prepare_data.SPLITS] == [72, 9, 9]


# ------------------------------------------------------------------------------- 2. --config, checked as flags
@pytest.mark.parametrize("setting,message", [
    ("split: [0.5, 0.2, 0.2]", "argument --split: expected three fractions that sum to 1"),
    ("split: [0.8, 0.1]", "argument --split: expected three fractions that sum to 1"),
    ("prepare_data:\n  overlong: cut", "argument --overlong: invalid choice: 'cut'"),
    ("skip_invalid: maybe", "--skip-invalid: expected true or false, got 'maybe'"),
    ("max_seq_lenght: 512", "unknown setting 'max_seq_lenght' (no script has such a flag)"),
])
def test_config_values_go_through_the_flags_checks(tmp_path, capsys, setting, message):
    config = tmp_path / "run.yaml"
    config.write_text(setting + "\n", encoding="utf-8")
    path = write_jsonl(tmp_path / "d.jsonl", distinct_records("a", 10))
    with pytest.raises(SystemExit) as exit_:
        prepare(path, "--out", tmp_path / "out", "--config", config)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_switch_written_as_no_is_off(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text('skip_invalid: "no"\nprepare_data:\n  keep_case: "yes"\n  split: [0.6, 0.2, 0.2]\n')
    args = prepare_data.parse(["d.jsonl", "--out", "o", "--config", str(config)])
    assert (args.skip_invalid, args.keep_case, args.split) == (False, True, (0.6, 0.2, 0.2))


# --------------------------------------------------------------------------------- 5. keys written twice
def test_a_key_written_twice_is_refused_with_its_line(tmp_path, capsys):
    good = distinct_records("a", 10)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in good[:2])
                     + '{"prompt": "a?", "response": ["x", "y"], "prompt": "b?"}\n'
                     + "".join(json.dumps(r) + "\n" for r in good[2:]), encoding="utf-8")
    assert prepare(jsonl, "--out", tmp_path / "out") == 1
    assert f"error: {jsonl}:3: record index 2, key 'prompt' written twice in one object" in capsys.readouterr().err
    listed = tmp_path / "l.json"
    listed.write_text('[\n{"prompt": "a?", "response": ["x", "y"]},\n'
                      '{"prompt": "b?", "response": ["x", "y"], "category": "a", "category": "b"}\n]\n')
    assert prepare(listed, "--out", tmp_path / "out") == 1
    assert f"{listed}:3: record index 1, key 'category' written twice" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 6. one line, not a traceback
def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 10_000 + "]" * 10_000)
    assert prepare(deep, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {deep}: JSON nested too deeply to hold records"
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps(distinct_records("a", 1)[0]) + "\n" + '{"prompt": ' + "[" * 10_000 + "\n")
    assert prepare(lines, "--out", tmp_path / "out") == 1
    assert f"error: {lines}:2: record index 1, JSON nested too deeply to be a record" in capsys.readouterr().err


def test_csv_with_extra_columns_and_an_extra_cell(tmp_path, capsys):
    rows = ["prompt,steps,category,rating,notes"]
    rows += [f'"{r["prompt"]}","{json.dumps(r["response"]).replace(chr(34), chr(34) * 2)}",a,5,ok'
             for r in distinct_records("a", 10)]
    rows.insert(4, '"How do I x?","[""a"", ""b""]",a,5,ok,surplus')
    path = tmp_path / "d.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert prepare(path, "--out", tmp_path / "out") == 1
    assert f"error: {path}:5: record index 3, 6 cells in a row under a header of 5 columns" in capsys.readouterr().err
    assert prepare(path, "--out", tmp_path / "out", "--skip-invalid") == 0
    err = capsys.readouterr().err
    assert "warning: ignoring unknown fields 'notes' (10 records), 'rating' (10 records)" in err
    assert len(all_records(tmp_path / "out")) == 10


def test_out_is_checked_before_any_work(tmp_path, capsys):
    bad_input = tmp_path / "bad.json"
    bad_input.write_text("{")  # would fail loading: the --out error must come first
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert prepare(bad_input, "--out", a_file) == 1
    assert capsys.readouterr().err.strip() == f"error: --out {a_file}: is a file, not a folder"
    assert prepare(bad_input, "--out", a_file / "sub") == 1
    assert f"error: --out {a_file / 'sub'}: {a_file} is a file, not a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: a read-only folder is writable")
    assert prepare(bad_input, "--out", locked / "out") == 1
    assert f"error: --out {locked / 'out'}: cannot write in {locked}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 7. outputs atomically
def test_a_failed_rerun_leaves_the_previous_outputs_whole(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", distinct_records("a", 20))
    out = tmp_path / "out"
    assert prepare(path, "--out", out, "--seed", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == set(OUTPUTS + ("config.yaml", "run_info.json"))

    def broken_plot(*args):
        raise RunError("plotting failed")

    monkeypatch.setattr(prepare_data, "plot_distributions", broken_plot)
    assert prepare(path, "--out", out, "--seed", "2") == 1  # fails after the splits were written
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # no half-built folder left


def test_out_holding_other_files_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert prepare(write_jsonl(tmp_path / "d.jsonl", distinct_records("a", 10)), "--out", out) == 1
    assert "holds notes.md, which prepare_data.py did not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.md"]


# ------------------------------------------------------------------------------- 8. records that say nothing
def test_content_free_records_and_steps_are_dropped_and_counted(tmp_path, capsys):
    records = distinct_records("a", 12)
    records[1]["prompt"] = "maria.lopez@example.com"  # becomes only [EMAIL]
    records[2]["response"] = ["1.", "2."]
    records[3]["response"] = ["Open the app.", "!!!", "Tap Save."]
    records[4] = {**records[5]}  # an exact duplicate
    records[6]["response"] = [f"Fill in field {k} of the long form with care." for k in range(60)]
    records[7] = {"prompt": "q?", "response": ["one step"]}
    path = write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "out"
    assert prepare(path, "--out", out, "--skip-invalid", "--max-seq-length", "200") == 0
    stats = stats_of(out)
    assert stats["dropped"] == {"invalid record (skipped)": 1, "no words after normalisation": 2,
                                "exact duplicate": 1, "over 200 tokens": 1}
    assert stats["normalisation"]["dropped"] == [
        f"{path}:2: record index 1: prompt '[EMAIL]' has no words, dropped",
        f"{path}:3: record index 2: 0 of 2 steps have words, dropped"]
    assert stats["normalisation"]["steps_removed"] == [f"{path}:4: record index 3: step 2 '!!!' has no words, removed"]
    assert len(all_records(out)) == 12 - 5
    assert ["open the app", "tap save"] in [r["response"] for r in all_records(out)]
    report = (out / "report.md").read_text()
    assert "- no words after normalisation: 2" in report and "step 2 '!!!' has no words, removed" in report
    assert "normalisation dropped 2 records and removed 1 steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- 9. smaller
def test_errors_print_in_line_order_and_json_column_is_right_for_a_cut_line(tmp_path, capsys):
    good = [json.dumps(r) for r in distinct_records("a", 3)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good[0], '{"prompt": "q?"}', good[1], '{"prompt": "x", "response": ["a", "b"]',
                               good[2]]) + "\n")
    assert prepare(path, "--out", tmp_path / "out") == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors[0] == f"error: {path}:2: record index 1, field 'response': missing"
    assert errors[1].startswith(f"error: {path}:4:39: malformed JSON at line 4, column 39: Expecting ',' delimiter; "
                              "the text ends before the record does (a cut-off line?)")
    assert errors[2] == "error: 2 invalid records: fix them or run with --skip-invalid"


def test_no_report_is_promised_when_none_is_written(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", distinct_records("a", 5))
    assert prepare(path, "--out", tmp_path / "out", "--max-seq-length", "10") == 1
    err = capsys.readouterr().err
    assert "warning: 5 records over 10 tokens, dropped" in err and "error: no record fits in --max-seq-length 10" in err
    assert "report.md" not in err


# ------------------------------------------------------------------------------------ 9. the second pass (issue 19)
@pytest.mark.parametrize("flags", [[], ["--keep-punctuation"], ["--keep-case", "--keep-punctuation"]])
def test_control_and_bidi_characters_are_dropped_whatever_the_punctuation_setting(tmp_path, flags):
    """Issue 19: NUL, ESC and bidi controls were kept in train.jsonl under --keep-punctuation."""
    records = distinct_records("a", 10)
    records[0]["prompt"] = "How do I\x00 reset\x1b[31m my \u202epin\u202c in \u2066Bank\u2069?\u200b"
    records[0]["response"][0] = "Open\x07 the \u200fapp\x9b.\ufeff"
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", records), "--out", out, "--split", "1,0,0", *flags) == 0
    written = read_split(out, "train")
    texts = [text for r in written for text in (r["prompt"], *r["response"])]
    invisible = "\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
    assert not [c for text in texts for c in text if ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or c in invisible]
    record = next(r for r in written if r["prompt"].lower().startswith("how do i reset my pin in bank"))
    assert record["response"][0].lower().startswith("open the app")


def test_html_in_records_and_file_names_is_shown_not_rendered_in_report_md(tmp_path):
    """Issue 19: raw `<script>` and `<img onerror>` from prompts and names went into report.md."""
    records = distinct_records("<img src=x onerror=alert(1)>", 10)
    records[3] = {**records[0], "prompt": "<script>alert(2)</script> " + records[0]["prompt"]}  # an exact duplicate
    records.append({"prompt": "<b>bold</b> How do I x?", "response": ["<script>alert(3)</script>"]})  # invalid
    folder = tmp_path / "<img src=x onerror=alert(4)>"
    folder.mkdir()
    out = tmp_path / "out"
    assert prepare(write_jsonl(folder / "d`<i>.jsonl", records), "--out", out, "--skip-invalid",
                   "--keep-case", "--keep-punctuation") == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "alert(1)" in report and "alert(4)" in report and "&lt;img src=x" in report
    outside_code = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", report)  # inline code spans render no HTML
    assert not re.search(r"<[A-Za-z/!?]", outside_code), re.findall(r".*<[A-Za-z/!?].*", outside_code)
    assert "``" in report  # the file name with a backtick in it is fenced by two


def test_front_matter_with_aliases_is_refused_like_a_config(tmp_path):
    """Issue 19: a YAML bomb under one key hung; a page's front matter goes through the same loader."""
    from howto.collect import markdown_blocks

    page = ("---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "title: [*b, *b]\n---\n1. Open the app\n2. Tap Save\n")
    blocks, title = markdown_blocks(page)
    assert title == "" and blocks
