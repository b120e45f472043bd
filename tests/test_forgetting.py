"""The forgetting probe: the bundled questions, the numbered-list detector, the teacher-forced answer loss checked
against a hand computation on the tiny model, and the paired comparison of base and fine-tuned."""
from __future__ import annotations

import json

import pytest

from howto import forgetting
from howto.runio import RunError


def test_bundled_probe_covers_every_kind_of_question():
    records = forgetting.read_probe(forgetting.BUNDLED)
    assert len(records) == 50 and len({r["prompt"] for r in records}) == 50
    kinds = [r["kind"] for r in records]
    assert set(kinds) == set(forgetting.KINDS) and kinds.count("howto") == 8
    assert not any(forgetting.is_numbered_list(r["answer"]) for r in records if r["kind"] != "howto")
    assert all(forgetting.is_numbered_list(r["answer"]) for r in records if r["kind"] == "howto")
    checked = [r for r in records if "expect" in r]
    assert {r["kind"] for r in checked} == {"fact", "arithmetic"} and len(checked) == 26
    assert all(forgetting.is_correct(r["prompt"], r["answer"], r["expect"]) for r in checked)  # references pass
    assert not any(forgetting.is_correct(r["prompt"], r["prompt"], r["expect"]) for r in checked)  # echoes do not


def test_bad_probe_records_name_the_line_and_field(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?", "answer": "Hello.", "kind": "fact"}) + "\n" +
                    json.dumps({"prompt": "Sum?", "answer": "", "kind": "arithmetic"}) + "\n")
    with pytest.raises(RunError, match=r"probe\.jsonl:2: field 'answer'"):
        forgetting.read_probe(path)
    path.write_text(json.dumps({"prompt": "Hi?", "answer": "Hello.", "kind": "poem"}) + "\n")
    with pytest.raises(RunError, match=r"probe\.jsonl:1: field 'kind'"):
        forgetting.read_probe(path)
    for expect in ("Canberra", [], ["Canberra", ""], [7]):
        path.write_text(json.dumps({"prompt": "Capital?", "answer": "Canberra.", "kind": "fact", "expect": expect}))
        with pytest.raises(RunError, match=r"probe\.jsonl:1: field 'expect' must be a non-empty list"):
            forgetting.read_probe(path)


@pytest.mark.parametrize("prompt,output,expect,correct", [
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", ["Canberra"], True),
    ("What is the capital of Australia?", "The capital of Australia is Sydney.", ["Canberra"], False),
    ("What is the capital of Australia?", "CANBERRA", ["Canberra"], True),
    ("How many continents are there on Earth?", "There are 7,147,984,270.", ["seven", "7"], False),
    ("How many continents are there on Earth?", "There are 7 continents.", ["seven", "7"], True),
    ("What is the square root of 81?", "It is 9.5.", ["9", "nine"], False),
    ("What is 1000 minus 387?", "1000 - 387 = 613.", ["613"], True),
    ("What is 96 divided by 8?", "96 divided by 8 equals 13.", ["12"], False),
    ("What is 12 times 1?", "12 times 1 is 12", ["12"], True),  # said again beyond the question's own 12
    ("What is 12 times 1?", "12 times 1 is 13", ["12"], False),  # the question restated is no answer
    ("Who painted the Mona Lisa?", "Leonardo da Vinci.", ["Leonardo", "da Vinci"], True),
])
def test_correct_answer_check(prompt, output, expect, correct):
    assert forgetting.is_correct(prompt, output, expect) is correct


@pytest.mark.parametrize("text,numbered", [
    ("1. Mix the flour.\n2. Bake it.", True),
    ("Sure:\n\n1) Open it\n2) Close it", True),
    ("Step 1: Open it\nStep 2: Close it", True),
    ("The capital of Australia is Canberra.", False),
    ("1. Only one item", False),
    ("In 1969, Apollo 11 landed.\n2 astronauts walked on the Moon.", False),
    ("- Open it\n- Close it", False),
    ("2. Second\n3. Third", False),
])
def test_numbered_list_detector(text, numbered):
    assert forgetting.is_numbered_list(text) is numbered


@pytest.mark.parametrize("model", ["tiny_model", "smollm2_model"])
def test_answer_ids_put_the_answer_after_the_question(model, request):
    from howto.models import load_tokenizer

    tokenizer = load_tokenizer(request.getfixturevalue(model))
    ids, start = forgetting.answer_ids(tokenizer, "What is 9 times 8?", "9 times 8 is 72.")
    assert ids[:start] == forgetting.question_ids(tokenizer, "What is 9 times 8?")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[start:], skip_special_tokens=True).strip() == "9 times 8 is 72."
    assert "helpful assistant that explains how to do a task" not in tokenizer.decode(ids[:start])  # no system prompt


def test_answer_loss_is_the_mean_answer_token_nll(tiny_model):
    import torch

    from howto.models import load_for_generation

    lm, tokenizer = load_for_generation(tiny_model)
    loss, n = forgetting.answer_loss(lm, tokenizer, "What is the capital of Australia?", "Canberra.")
    ids, start = forgetting.answer_ids(tokenizer, "What is the capital of Australia?", "Canberra.")
    with torch.no_grad():
        logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), dim=-1)
    by_hand = -sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids))) / (len(ids) - start)
    assert n == len(ids) - start and loss == pytest.approx(by_hand, rel=1e-5)

    records = forgetting.read_probe(forgetting.BUNDLED)[:3]
    rows = forgetting.probe_model(lm, tokenizer, records, batch_size=2)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]
    for row in rows:
        assert row["loss"] > 0 and 0 < row["output_tokens"] <= forgetting.MAX_NEW_TOKENS
        assert row["numbered"] == int(forgetting.is_numbered_list(row["output"]))
        assert row["correct"] == int(forgetting.is_correct(row["prompt"], row["output"], row["expect"]))  # facts


def test_compare_probes_pairs_by_prompt():
    kinds = ["fact"] * 6 + ["howto"] * 2
    base = [{"prompt": f"q{i}", "kind": k, "loss": 1.0 + 0.1 * i, "numbered": int(k == "howto")}
            for i, k in enumerate(kinds)]
    tuned = [{**r, "loss": r["loss"] + 0.5, "numbered": 1} for r in reversed(base)]  # order does not matter
    result = forgetting.compare_probes(base, tuned, n_resamples=200, seed=0)
    assert result["n_prompts"] == 8
    assert result["loss"]["delta"] == pytest.approx(0.5) and result["loss"]["ci_low"] == pytest.approx(0.5)
    assert result["over_formatting"]["n"] == 6 and result["over_formatting"]["base"] == 0.0
    assert result["over_formatting"]["finetuned"] == 1.0 and result["over_formatting"]["delta"] == 1.0
    assert result["howto_list_rate"]["delta"] == 0.0
    assert set(result["loss_by_kind"]) == {"fact", "howto"}
    assert "correct" not in result and "turned_wrong" not in result  # no record expects a short answer


def test_compare_probes_counts_correct_answers_and_lists_those_that_turned_wrong():
    base = [{"prompt": f"q{i}", "kind": "fact", "loss": 1.0, "numbered": 0, "expect": [f"a{i}"],
             "output": f"a{i}", "correct": 1} for i in range(4)]
    base.append({"prompt": "q4", "kind": "writing", "loss": 1.0, "numbered": 0, "output": "prose"})
    tuned = [{**r, "output": "wrong", "correct": 0} if r["prompt"] == "q1" else r for r in base]
    result = forgetting.compare_probes(base, tuned, n_resamples=200, seed=0)
    assert result["correct"]["n"] == 4 and result["correct"]["base"] == 1.0
    assert result["correct"]["finetuned"] == 0.75 and result["correct"]["delta"] == -0.25
    assert result["turned_wrong"] == [{"prompt": "q1", "expect": ["a1"], "base": "a1", "finetuned": "wrong"}]


def test_report_shows_the_answers_that_turned_wrong():
    from howto import report

    base = [{"prompt": "What is the capital of Australia?", "kind": "fact", "loss": 1.0, "numbered": 0,
             "expect": ["Canberra"], "output": "The capital of Australia is Canberra.", "correct": 1}]
    tuned = [{**base[0], "output": "The capital of Australia is Sydney.", "correct": 0}]
    section = {"data": "probe.jsonl", "max_new_tokens": 48, "general_mixed": None,
               **forgetting.compare_probes(base, tuned, n_resamples=50, seed=0)}
    text = report.render_markdown(report.forgetting_blocks(section), "plots")
    assert "| Correct short answer (higher is better) | 1 | 1.000 | 0.000 | -1.000 |" in text
    assert "### Answers that turned wrong (1): right before fine-tuning, wrong after" in text
    assert ("| What is the capital of Australia? | Canberra | The capital of Australia is Canberra. | "
            "The capital of Australia is Sydney. |") in text


def test_probe_answers_with_the_evaluations_repeat_penalty(monkeypatch):
    """`evaluate.py --repeat-penalty 1.0` must reach the probe's answers, whose cache key and report name it."""
    seen = []

    def fake_generate(lm, tokenizer, ids, max_new_tokens, **kwargs):
        seen.append(kwargs["repeat_penalty"])
        return [("The capital of Australia is Canberra.", 9)] * len(ids)

    monkeypatch.setattr(forgetting, "answer_loss", lambda lm, tokenizer, prompt, answer: (1.0, 5))
    monkeypatch.setattr(forgetting, "generate_ids", fake_generate)
    monkeypatch.setattr(forgetting, "question_ids", lambda tokenizer, prompt: [1, 2])
    records = forgetting.read_probe(forgetting.BUNDLED)[:3]
    rows = forgetting.probe_model(None, None, records, batch_size=2, repeat_penalty=1.0)
    assert seen == [1.0, 1.0] and rows[0]["correct"] == 1
