"""General conversations mixed into training (replay): the bundled prompts, the base model's own answers as
self-distillation (cached), how they are encoded, and a run that mixes them in."""
from __future__ import annotations

import json

import pytest

import finetune
from howto import forgetting, replay
from howto.runio import RunError

TINY = ["--model", "tiny", "--lora-r", "8", "--lora-alpha", "16", "--max-seq-length", "128", "--grad-accum", "1",
        "--no-compile"]


def write_split(folder, split, apps):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"How do I reset my password in the {app} app?",
             "response": [f"Open the {app} app", "Tap 'Forgot password'", "Enter your email address"]}
            for app in apps]
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bundled_general_prompts_stay_apart_from_the_forgetting_probe():
    prompts = [r["prompt"] for r in replay.read_general(replay.BUNDLED)]
    probe = {r["prompt"].casefold() for r in forgetting.read_probe(forgetting.BUNDLED)}
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert not [p for p in prompts if p.casefold() in probe]
    assert not [p for p in prompts if p.lower().startswith(("how do i", "how to"))]  # no how-tos: manners only


def test_bad_general_records_name_the_file_line_and_field(tmp_path):
    path = tmp_path / "general.jsonl"
    path.write_text('{"prompt": "Hi", "answer": "Hello!"}\n{"prompt": "What is 2 + 2?", "answer": 4}\n')
    with pytest.raises(RunError, match=r"general.jsonl:2: field 'answer' must be a non-empty string"):
        replay.read_general(path)
    path.write_text('{"answer": "Hello!"}\n')
    with pytest.raises(RunError, match=r"general.jsonl:1: field 'prompt'"):
        replay.read_general(path)
    with pytest.raises(RunError, match="no such file"):
        replay.read_general(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("text,complete,expected", [
    ("Canberra is the capital.", True, "Canberra is the capital."),
    ("A first sentence that is long enough to keep. Then a cut", False, "A first sentence that is long enough to keep."),
    ("An answer cut off before its first sentence ended", False, None),
    ("Short. Then a very long second sentence that ran past the token cap and never came to its end", False, None),
    ("   ", True, None),
])
def test_answers_are_kept_whole_or_cut_at_a_sentence(text, complete, expected):
    assert replay.finish(text, complete) == expected


def test_general_conversations_train_the_answer_alone_without_the_system_prompt(tiny_model, mistral_tokenizer):
    encoded = replay.encode_general(mistral_tokenizer, "What is 2 + 2?", "2 + 2 is 4.")
    ids, mask = encoded["input_ids"], encoded["completion_mask"]
    start = mask.index(1)
    assert mask == [0] * start + [1] * (len(ids) - start)
    assert ids[-1] == mistral_tokenizer.eos_token_id  # the answer ends, and the model learns where
    assert ids[:start] == forgetting.question_ids(mistral_tokenizer, "What is 2 + 2?")
    assert "ordered steps" not in mistral_tokenizer.decode(ids)


def test_distilled_answers_are_generated_once_and_cached(tiny_model, tmp_path, monkeypatch):
    prompts = ["What is the capital of Italy?", "Tell me a joke."]
    calls = []

    def fake_distill(lm, tokenizer, asked, batch_size):
        calls.append(list(asked))
        return [{"prompt": p, "answer": f"An answer to {p}"} for p in asked]

    monkeypatch.setattr(replay, "distill", fake_distill)
    first = replay.distilled(tiny_model, prompts, 8, tmp_path)
    assert first == replay.distilled(tiny_model, prompts, 8, tmp_path) and calls == [prompts]
    assert len(list(tmp_path.glob("*.jsonl"))) == 1
    replay.distilled(tiny_model, prompts[:1], 8, tmp_path)  # other prompts: answered anew
    assert calls == [prompts, prompts[:1]]


def test_distill_asks_the_model_itself(tiny_model):
    from howto.models import load_for_generation

    lm, tokenizer = load_for_generation(tiny_model)
    rows = replay.distill(lm, tokenizer, ["What is 2 + 2?", "Hello!"], batch_size=2)
    assert all(r["prompt"] in ("What is 2 + 2?", "Hello!") and r["answer"] for r in rows)


def test_mix_general_adds_the_conversations_to_training(tmp_path):
    data = tmp_path / "data"
    write_split(data, "train", ["Shopee", "Grab", "Gojek", "Dana", "OVO", "BCA", "Blibli", "Traveloka", "Tokopedia",
                                "Lazada"])
    write_split(data, "val", ["Jenius", "Bukalapak"])
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": f"{i} + {i} is {2 * i}."})
                               + "\n" for i in range(20)))
    out = tmp_path / "run"
    finetune.main(["--data", str(data), "--out", str(out), *TINY, "--engine", "hf", "--epochs", "1",
                   "--batch-size", "4", "--mix-general", "0.5", "--general-data", str(general)])
    mixed = [json.loads(line) for line in (out / "general.jsonl").read_text().splitlines()]
    written = [json.loads(line) for line in general.read_text().splitlines()]
    assert len(mixed) == 5 and all(r in written for r in mixed)
    info = json.loads((out / "run_info.json").read_text())
    assert info["general"] == {"n": 5, "fraction": 0.5, "source": str(general)}
    assert info["status"] == "done"
    assert info["train_tokens"] > 0


def test_mix_general_out_of_range_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--mix-general", "1.5"])
    assert "--mix-general must be in [0, 1]" in capsys.readouterr().err


def test_the_forgetting_section_says_what_training_mixed_in():
    from howto.report import forgetting_blocks

    section = {"n_prompts": 0, "data": "probe.jsonl", "max_new_tokens": 48, "skipped": "no weights",
               "general_mixed": {"n": 68, "fraction": 0.25, "source": "base model's answers to general_prompts.jsonl"}}
    text = " ".join(str(block) for block in forgetting_blocks(section))
    assert "Training mixed in 68 general conversations (base model's answers to general_prompts.jsonl; " \
           "--mix-general 0.25)" in text
