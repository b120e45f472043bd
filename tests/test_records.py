"""howto.records: one reader for JSON, JSONL and CSV records, every problem named with file and line."""
from __future__ import annotations

import json

import pytest

from howto.records import read_clean, read_records
from howto.runio import RunError


def test_read_clean_gives_clean_records_with_their_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": " q? ", "response": ["1. a", "2. b"], "category": "x"}\n\n'
                    '{"prompt": "r?", "response": ["c", "d"], "source": "faq"}\n')
    assert read_clean(path) == [(1, {"prompt": "q?", "response": ["a", "b"], "category": "x"}),
                                (3, {"prompt": "r?", "response": ["c", "d"], "category": "uncategorized",
                                     "source": "faq"})]


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "q?", "response": "a"}', "t.jsonl:2: field 'response': must be a list of steps, a JSON array of "
                                          "strings like"),
    ('{"prompt": "q?", "response": ["a", "b"]', "t.jsonl:2:40: malformed JSON at line 2, column 40: Expecting ',' delimiter; the text ends before"),
    ('{"prompt": "q?", "prompt": "r?", "response": ["a", "b"]}', "t.jsonl:2: record index 1, key 'prompt' written"),
    ('["q?"]', "t.jsonl:2: field '(record)': expected an object"),
])
def test_read_clean_stops_at_the_first_problem(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "q?", "response": ["a", "b"]}\n' + line + "\n")
    with pytest.raises(RunError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_clean(path)


def test_csv_rows_keep_their_lines_through_quoted_line_breaks(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,steps\n"q?","1. a\n2. b"\n\n"r?","' + json.dumps(["c", "d"]).replace('"', '""') + '"\n')
    assert [(raw.line, raw.index, raw.problem) for raw in read_records(path)] == [(2, 0, None), (5, 1, None)]
    path.write_text("prompt,steps,prompt\nq?,a,b\n")
    with pytest.raises(RunError, match=r"d\.csv:1: column 'prompt' named twice in the header"):
        read_records(path)


def test_jsonl_lines_are_counted_with_blank_ones_and_a_broken_line_names_its_column(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(raw.line, raw.data) for raw in read_records(path)] == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_text('{"a": 1}\n{"a": 2,,}\n')
    assert read_records(path)[1].problem.startswith(f"{path}:2:9: malformed JSON at line 2, column 9")


def test_a_string_where_a_list_of_steps_belongs_says_what_to_write(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "q?", "response": "Open the app. Tap Settings."}\n')
    with pytest.raises(RunError) as error:
        read_clean(path)
    assert str(error.value) == (f"{path}:1: field 'response': must be a list of steps, a JSON array of strings like "
                                '["Open the app.", "Tap Settings."], got string (one string holds no steps: split '
                                "it, one string a step)")
