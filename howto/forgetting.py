"""Forgetting probe: did fine-tuning on how-to steps cost the model its general abilities?

A bundled set of general questions (facts, arithmetic, short writing, code, how-to outside the training domains;
`data/forgetting.jsonl`) is put to the base and the fine-tuned model in the model's own chat format, with no system
prompt (the way a user asks anything else). Three measures, each per prompt so that the two models pair up:

- the per-token loss of the reference answer under teacher forcing (mean negative log-likelihood of the answer's
  tokens and the end-of-turn token): forgetting shows as a rise;
- over-formatting: whether the model's own answer to a question that is not a how-to starts a numbered list, the
  habit a model trained only on numbered steps picks up;
- correct answers: for a question with a short right answer (a record's `expect`, e.g. "Canberra"), whether the
  model's own answer says it. The loss shows forgetting on average; this shows the answer a user reads turn wrong
  ("The capital of Australia is Sydney").
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from howto.chat import _ids, _strip_trailing_after_eos, is_mistral_common
from howto.generate import SHIPPED_DECODING, generate_ids
from howto.metrics import mean_defined, paired_comparison
from howto.records import read_text_records, string_list
from howto.runio import RunError

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "forgetting.jsonl"
KINDS = ("fact", "arithmetic", "writing", "code", "howto")
# The first lines of an answer decide whether it is a numbered list; 48 tokens hold two short items, and a
# shorter cap keeps the probe cheap (most answers to the other questions end well before it).
MAX_NEW_TOKENS = 48
_NUMBERED_LINE = re.compile(r"^\s*(?:step\s*)?(\d+)\s*[.):]\s+\S", re.IGNORECASE | re.MULTILINE)


def read_probe(path: str | Path) -> list[dict[str, Any]]:
    """The probe's records (prompt, answer, kind and, optionally, expect: the accepted short answers), each error
    naming the file, line and field."""
    records = []
    for where, record in read_text_records(path, "--forgetting-data", ("prompt", "answer")):
        if record.get("kind") not in KINDS:
            raise RunError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}")
        expect = record.get("expect")
        if expect is not None:
            expect = string_list(expect, where, "expect", ' (the accepted short answers, e.g. ["Canberra"])')
        records.append({"prompt": record["prompt"], "answer": record["answer"], "kind": record["kind"],
                        **({"expect": expect} if expect else {})})
    if not records:
        raise RunError(f"{path}: no probe records")
    return records


def is_numbered_list(text: str) -> bool:
    """Two lines or more numbered 1, 2 in order: the answer is a numbered list."""
    numbers = [int(m.group(1)) for m in _NUMBERED_LINE.finditer(text)]
    return len(numbers) >= 2 and numbers[:2] == [1, 2]


def mentions(text: str, term: str) -> int:
    """How often `term` stands in `text` as a word of its own, case aside: "7" is not in "7,147" nor "3.75"."""
    return len(re.findall(rf"(?<![\w])(?<!\d[.,]){re.escape(term)}(?![\w])(?![.,]\d)", text, re.IGNORECASE))


def is_correct(prompt: str, output: str, expect: list[str]) -> bool:
    """The answer says one of the expected short answers more often than the question does, so that restating the
    question ("144 divided by 12 equals 13.5") does not count as answering it."""
    return any(mentions(output, term) > mentions(prompt, term) for term in expect)


def question_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The question as the user turn alone, ready for the model's answer."""
    messages = [{"role": "user", "content": prompt}]
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], int]:
    """The whole conversation's ids and where the answer starts, as training renders an assistant turn."""
    head = question_ids(tokenizer, prompt)
    if is_mistral_common(tokenizer):
        return head + _ids(tokenizer.encode(answer, add_special_tokens=False)) + [tokenizer.eos_token_id], len(head)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    full = _strip_trailing_after_eos(tokenizer, _ids(tokenizer.apply_chat_template(messages, tokenize=True)))
    if full[: len(head)] != head:
        raise ValueError("the chat template renders the question differently with and without an answer")
    return full, len(head)


def answer_loss(lm: Any, tokenizer: Any, prompt: str, answer: str) -> tuple[float, int]:
    """Mean negative log-likelihood per answer token under teacher forcing, and the number of those tokens."""
    import torch

    ids, start = answer_ids(tokenizer, prompt, answer)
    input_ids = torch.tensor([ids], device=lm.device)
    labels = input_ids.clone()
    labels[0, :start] = -100
    with torch.no_grad():
        loss = lm(input_ids=input_ids, labels=labels).loss
    return float(loss), len(ids) - start


def probe_model(lm: Any, tokenizer: Any, records: list[dict[str, Any]], batch_size: int,
                repeat_penalty: float = SHIPPED_DECODING["repeat_penalty"]) -> list[dict[str, Any]]:
    """Per prompt: the reference answer's loss, the model's greedy answer (with the evaluation's repeat penalty),
    whether it is a numbered list and, where the record has `expect`, whether it is correct."""
    rows = []
    for record in records:
        loss, n_tokens = answer_loss(lm, tokenizer, record["prompt"], record["answer"])
        rows.append({**record, "loss": round(loss, 6), "answer_tokens": n_tokens})
    order = sorted(range(len(records)), key=lambda i: len(records[i]["answer"]))  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        answers = generate_ids(lm, tokenizer, [question_ids(tokenizer, records[i]["prompt"]) for i in batch],
                               MAX_NEW_TOKENS, repeat_penalty=repeat_penalty)
        for i, (text, n_tokens) in zip(batch, answers, strict=True):
            rows[i].update(output=text, output_tokens=n_tokens, numbered=int(is_numbered_list(text)))
            if "expect" in records[i]:
                rows[i]["correct"] = int(is_correct(records[i]["prompt"], text, records[i]["expect"]))
    return rows


def compare_probes(base: list[dict[str, Any]], tuned: list[dict[str, Any]], n_resamples: int,
                   seed: int) -> dict[str, Any]:
    """Fine-tuned minus base, paired by prompt: the answer loss over every prompt, the numbered-list rate over the
    questions that are not how-tos (over-formatting) and, as a check, over the how-tos, and the share of correct
    answers over the questions that have expected answers (when any has), with the questions the base model
    answered right and the fine-tuned one wrong."""
    by_prompt = {r["prompt"]: r for r in tuned}
    pairs = [(b, by_prompt[b["prompt"]]) for b in base if b["prompt"] in by_prompt]

    def measure(field: str, keep: Any) -> dict[str, Any]:
        kept = [(b, t) for b, t in pairs if keep(b) and field in b and field in t]
        result = paired_comparison([b[field] for b, _ in kept], [t[field] for _, t in kept], n_resamples, seed)
        return {"base": mean_defined([b[field] for b, _ in kept])[0],
                "finetuned": mean_defined([t[field] for _, t in kept])[0], **result}

    result = {
        "n_prompts": len(pairs),
        "loss": measure("loss", lambda r: True),
        "over_formatting": measure("numbered", lambda r: r["kind"] != "howto"),
        "howto_list_rate": measure("numbered", lambda r: r["kind"] == "howto"),
        "loss_by_kind": {kind: measure("loss", lambda r, k=kind: r["kind"] == k)
                         for kind in KINDS if any(b["kind"] == kind for b, _ in pairs)},
    }
    correct = measure("correct", lambda r: True)
    if correct["n"]:
        result["correct"] = correct
        result["turned_wrong"] = [{"prompt": b["prompt"], "expect": b["expect"], "base": b["output"],
                                   "finetuned": t["output"]}
                                  for b, t in pairs if b.get("correct") and t.get("correct") == 0]
    return result
