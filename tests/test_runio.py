"""Run bookkeeping: YAML configs feed the flags, outputs are atomic, every run records what it ran on."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from howto.runio import (RunError, atomic_dir, atomic_write_text, check_out_dir, figure_png, hash_files, load_yaml,
                         markdown_code, markdown_fence, markdown_table, markdown_text, parse_args, positive_int, pyplot,
                         write_json, write_jsonl, write_run_info)

ROOT = Path(__file__).resolve().parents[1]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=3)
    return parser


def test_config_sets_defaults_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": "d", "learning_rate": 1e-3, "epochs": 5,
                                      "finetune": {"epochs": 7}, "evaluate": {"limit": 3}}))
    args = parse_args(make_parser(), ["--config", str(config), "--epochs", "9"], section="finetune")
    assert (args.data, args.learning_rate, args.epochs) == ("d", 1e-3, 9)
    args = parse_args(make_parser(), ["--config", str(config)], section="finetune")
    assert args.epochs == 7  # the script's own section beats the top level


def test_unknown_key_in_the_scripts_section_is_an_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: d\nbatch_size: 4\nfinetune:\n  learning_rat: 0.1\n")
    sibling = argparse.ArgumentParser()
    sibling.add_argument("--batch-size", type=int)
    args = parse_args(make_parser(), ["--config", str(config)], section="evaluate", siblings=lambda: [sibling])
    assert args.data == "d" and not hasattr(args, "batch_size")  # shared keys another script uses are skipped
    with pytest.raises(SystemExit):
        parse_args(make_parser(), ["--config", str(config)], section="finetune", siblings=lambda: [sibling])
    assert "unknown setting 'learning_rat' under finetune:" in capsys.readouterr().err


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new " * 1000)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_run_info_records_config_versions_and_data_hash(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "x"}\n')
    write_run_info(tmp_path / "run", {"epochs": 3}, [data], extra={"engine": "unsloth"})
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["data_sha256"] == hash_files([data])
    assert info["versions"]["transformers"] and info["engine"] == "unsloth"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == {"epochs": 3}
    data.write_text('{"prompt": "y"}\n')
    assert hash_files([data]) != info["data_sha256"]


def test_atomic_dir_keeps_a_cache_replaces_an_export_and_never_leaves_half_a_folder(tmp_path):
    target = tmp_path / "model"

    def build(text):
        return lambda folder: (folder / "weights").write_text(text)

    assert atomic_dir(target, build("v1")) == target
    atomic_dir(target, build("v2"))  # a cache: built once, kept
    assert (target / "weights").read_text() == "v1"
    atomic_dir(target, build("v3"), replace=True)  # an export: the new build replaces the old one
    assert (target / "weights").read_text() == "v3"

    def crash(folder):
        (folder / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(target, crash, replace=True)
    assert (target / "weights").read_text() == "v3"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # the usual folder mode, not mkdtemp's private 0700


def test_config_values_are_converted_and_checked_like_flags(tmp_path, capsys):
    parser = make_parser()
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export", nargs="+", default=[], choices=("merged", "gguf"))
    config = tmp_path / "run.yaml"
    config.write_text('data: d\nlearning_rate: "1e-4"\nresume: "no"\nexport: gguf\nfinetune:\n  epochs: 2\n')
    args = parse_args(parser, ["--config", str(config)], section="finetune")
    assert (args.learning_rate, args.resume, args.export, args.epochs) == (1e-4, False, ["gguf"], 2)
    for text, message in (("epochs: 2.5", "argument --epochs: invalid int value: '2.5'"),
                          ("resume: sometimes", "--resume: expected true or false, got 'sometimes'"),
                          ("export: [merged, zip]", "argument --export: invalid choice: 'zip'"),
                          ("epochs_typo: 3", "unknown setting 'epochs_typo' (no script has such a flag)"),
                          ("finetune: 3", "finetune: expected a mapping of setting: value")):
        config.write_text(f"data: d\n{text}\n")
        parser = make_parser()
        parser.add_argument("--resume", action="store_true")
        parser.add_argument("--export", nargs="+", default=[], choices=("merged", "gguf"))
        with pytest.raises(SystemExit) as exit_:
            parse_args(parser, ["--config", str(config)], section="finetune")
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_run_error_is_one_line_and_exit_code_1(tmp_path):
    error = RunError("data.jsonl:3: field 'prompt': missing")
    assert isinstance(error, Exception), "an ordinary exception: a notebook's `except Exception` catches it"
    assert str(error) == error.message == "data.jsonl:3: field 'prompt': missing"
    script = tmp_path / "fails.py"
    script.write_text("from howto.runio import RunError, run_script\n\n\ndef main(argv):\n"
                      "    raise RunError('it cannot work')\n\n\nrun_script(main)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (proc.returncode, proc.stderr) == (1, "error: it cannot work\n")


def test_check_out_dir_refuses_a_file_before_any_work(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(RunError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "f")
    with pytest.raises(RunError, match=f"--data {tmp_path / 'f' / 'x'}: {tmp_path / 'f'} is a file"):
        check_out_dir(tmp_path / "f" / "x", flag="--data")


def test_check_out_dir_names_a_folder_it_cannot_write_in(tmp_path, monkeypatch):
    def read_only(**kwargs):  # what mkdtemp meets in a read-only folder (root writes anywhere, so it is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    with pytest.raises(RunError, match=f"--out {tmp_path / 'a' / 'b'}: cannot write in {tmp_path} "
                                       r"\(Permission denied\)"):
        check_out_dir(tmp_path / "a" / "b")


def test_positive_int():
    assert positive_int("3") == 3
    for text in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(text)


def test_markdown_table_and_png():
    assert markdown_table(["a", "b"], [[1, "x|y\nz"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y z |"
    plt = pyplot()

    def figure() -> bytes:
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        return figure_png(fig)

    png = figure()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == figure()  # same figure, same bytes
    assert not plt.get_fignums()  # closed


BILLION_LAUGHS = """data: d
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
learning_rate: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.timeout(20)
def test_config_with_a_billion_laughs_of_aliases_is_refused_at_once_naming_the_file(tmp_path, capsys):
    config = tmp_path / "laughs.yaml"
    config.write_text(BILLION_LAUGHS)
    with pytest.raises(SystemExit) as exit_:
        parse_args(make_parser(), ["--config", str(config)], section="finetune")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # after argparse's usage lines
    assert error.endswith(f"--config {config}:3:8: YAML alias *a is not accepted here (aliases can stand for "
                          "billions of values); write the value out")


def test_yaml_loader_reads_plain_yaml_and_refuses_aliases_and_python_tags():
    assert load_yaml("a: 1\nb: [x, y]\n") == {"a": 1, "b": ["x", "y"]}
    assert load_yaml("a: &anchor 1\n") == {"a": 1}  # an anchor alone repeats nothing
    for text in ("a: &x 1\nb: *x\n", "a: !!python/object/apply:os.system [echo]\n"):
        with pytest.raises(yaml.YAMLError):
            load_yaml(text)


def test_non_finite_values_are_refused_before_any_json_is_written(tmp_path):
    with pytest.raises(RunError, match=r"metrics.json: not written: val\[1\].loss is nan, which JSON cannot hold"):
        write_json(tmp_path / "metrics.json", {"val": [{"loss": 1.0}, {"loss": float("nan")}]})
    with pytest.raises(RunError, match=r"rows.jsonl: not written: seconds is -inf"):
        write_jsonl(tmp_path / "rows.jsonl", [{"seconds": 1.0}, {"seconds": float("-inf")}])
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "ok.json", {"best_val_loss": None, "n": 3})  # null: a value legitimately undefined
    assert json.loads((tmp_path / "ok.json").read_text()) == {"best_val_loss": None, "n": 3}


def test_markdown_helpers_show_html_from_data_as_written():
    assert markdown_text("<script>alert(1)</script> p <0.001, a < b") == \
        "&lt;script>alert(1)&lt;/script> p <0.001, a < b"
    assert markdown_text('<img src=x onerror="alert(1)"><!-- x -->') == '&lt;img src=x onerror="alert(1)">&lt;!-- x -->'
    assert markdown_table(["<b>name</b>"], [["<img src=x onerror=alert(1)>"]]) == \
        "| &lt;b>name&lt;/b> |\n|---|\n| &lt;img src=x onerror=alert(1)> |"
    assert markdown_code("a`b") == "``a`b``" and markdown_code("`x") == "`` `x ``"
    assert markdown_fence("```\n<script>") == "````text\n```\n<script>\n````"
