"""Looping answers: caught per answer, counted in the report, and never called better than a baseline that loops
less; an export that loops more than its adapter is worse."""
from __future__ import annotations

import json

import pytest

import evaluate
from howto import parity
from howto.metrics import is_looping, repeated_steps

LOOP = ["open the app", "tap the device", "tap the device", "tap the device", "tap the device", "tap the device"]


@pytest.mark.parametrize("steps,share,looping", [
    (LOOP, 4 / 6, 1),
    (["Open the app.", "tap the device", "Tap the device!", "TAP THE DEVICE"], 0.5, 1),  # case and punctuation aside
    (["open settings", "tap next", "enter the code", "tap next", "tap done"], 0.2, 0),  # one repeat is a list
    (["tap next", "tap next", "tap next"], 2 / 3, 0),  # too short to call a loop
    ([], 0.0, 0),
])
def test_repeated_steps_and_loops(steps, share, looping):
    assert repeated_steps(steps) == pytest.approx(share)
    assert is_looping(steps) == looping


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RECORDS = [{"prompt": f"How do I do task {i} in the app?", "category": "apps",
            "response": [f"open the app for task {i}", f"tap option {i}", f"enter value {i}", f"tap save {i}"]}
           for i in range(8)]


@pytest.fixture(scope="module")
def looping_run(tmp_path_factory):
    """A baseline that answers each reference once, against a system that matches more of the words but loops."""
    root = tmp_path_factory.mktemp("looping")
    base = [{"prompt": r["prompt"], "response": r["response"], "output": r["response"][:3]} for r in RECORDS]
    loops = [{"prompt": r["prompt"], "response": r["response"],
              "output": r["response"] + [r["response"][-1]] * (8 if i < 5 else 0)} for i, r in enumerate(RECORDS)]
    out = root / "out"
    metrics = evaluate.main([
        "--predictions", f"base={write_jsonl(root / 'base.jsonl', base)}", f"loops={write_jsonl(root / 'l.jsonl', loops)}",
        "--out", str(out), "--bertscore-model", "minilm", "--bootstrap", "200"])
    return out, metrics


def test_looping_answers_are_counted_and_never_called_better(looping_run):
    out, metrics = looping_run
    assert metrics["systems"]["loops"]["means"]["looping"] == pytest.approx(5 / 8)
    assert metrics["systems"]["base"]["means"]["looping"] == 0
    assert metrics["verdicts"]["loops"] == "not better: loops loops on 5 of 8 answers, base on 0"
    assert [ex["n_gen_steps"] for ex in metrics["looping"]["loops"]] == [12] * 5
    report = (out / "report.md").read_text()
    assert "Looping answers (share)" in report and "| loops | 5 of 8 |" in report
    assert "not better: loops loops on 5 of 8 answers" in report
    assert RECORDS[0]["response"][-1] in report.split("## Looping answers")[1]  # the worst answers, as generated
    assert "not better" in (out / "report.html").read_text()


def comparison(delta, low, high, n=20):
    return {"delta": delta, "ci_low": low, "ci_high": high, "n": n}


def test_an_export_that_loops_more_than_its_adapter_is_worse():
    same = comparison(0.0, 0.0, 0.0)
    assert parity.verdict({"bertscore_f1": same, "order_accuracy": same,
                           "looping": comparison(0.15, 0.05, 0.25)}, tolerance=0.02) == "worse"
    assert parity.verdict({"bertscore_f1": same, "order_accuracy": same,
                           "looping": comparison(-0.15, -0.25, -0.05)}, tolerance=0.02) == "better"


def test_repeat_penalty_is_llama_cpps_over_the_last_generated_tokens():
    import torch

    from howto.generate import RepeatPenalty

    prompt = [[7, 8]]
    generated = [1, 2, 3, 3]
    scores = torch.tensor([[2.0, 2.0, -2.0, 2.0, 1.0, 0.0, 0.0, 2.0, 2.0]])
    out = RepeatPenalty(2.0, window=3, prompt_length=2)(torch.tensor([prompt[0] + generated]), scores.clone())
    # Tokens 2 and 3 are among the last three generated: positive logits halved, negative doubled. Token 1 fell out
    # of the window, and the prompt's tokens 7 and 8 are never penalised.
    assert out.tolist() == [[2.0, 2.0, -4.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0]]
    assert RepeatPenalty(2.0, 3, prompt_length=6)(torch.tensor([prompt[0] + generated]), scores).equal(scores)


def test_repeat_penalty_ends_a_loop_that_greedy_decoding_runs(tiny_model):
    from howto.chat import prompt_ids
    from howto.generate import generate_ids
    from howto.models import load_for_generation

    lm, tokenizer = load_for_generation(tiny_model)
    ids = [prompt_ids(tokenizer, "How do I reset my password?")]
    (greedy, _), = generate_ids(lm, tokenizer, ids, 48, repeat_penalty=1.0)
    (penalised, _), = generate_ids(lm, tokenizer, ids, 48, repeat_penalty=1.5)
    tokens = [tokenizer.encode(t, add_special_tokens=False) for t in (greedy, penalised)]
    distinct = [len(set(t)) / max(len(t), 1) for t in tokens]
    assert distinct[1] > distinct[0]  # the random model repeats itself greedily; the penalty spreads its tokens
