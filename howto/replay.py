"""General conversations mixed into fine-tuning (replay), so that the model keeps its manners outside the task.

Trained on numbered steps alone, a small model answers everything with a numbered list ("What is the capital of
Australia?" -> "1. ..."). Mixing general instruction data into training is the standard remedy. Without a file of
the user's (`--general-data`), the base model's own greedy answers to the bundled general prompts
(data/general_prompts.jsonl, none of them in the forgetting probe) serve: self-distillation keeps what the base
model did and needs no outside dataset. They are generated once per base model and cached.

A general conversation is trained as the forgetting probe asks it: the user's turn alone, without the toolkit's
system prompt, so that the list format stays tied to the system prompt that asks for it.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from howto.forgetting import answer_ids, question_ids
from howto.generate import REPEAT_LAST_N, SHIPPED_DECODING, generate_ids
from howto.records import read_text_records
from howto.runio import RunError, write_jsonl

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "general_prompts.jsonl"
# Long enough for the base model to finish most answers to a general question; an answer still unfinished there is
# cut at its last full sentence, or left out when that would lose most of it.
MAX_NEW_TOKENS = 192
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def read_general(path: str | Path) -> list[dict[str, Any]]:
    """Records with a `prompt` and, from a user's file, an `answer`; each error names the file, line and field."""
    records = [{"prompt": record["prompt"], "answer": record.get("answer", "")} for _, record in read_text_records(
        path, "--general-data", ("prompt",), ("answer",), "a JSON object with 'prompt' (and 'answer')")]
    if not records:
        raise RunError(f"{path}: no general prompts")
    return records


def how_many(fraction: float, n_train: int) -> int:
    """General conversations to mix in: `fraction` of the training records' number."""
    return max(1, round(fraction * n_train))


def pick(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """n records drawn with the run's seed; all of them when there are fewer."""
    return random.Random(seed).sample(records, min(n, len(records)))


def finish(text: str, complete: bool) -> str | None:
    """An answer fit to train on: as generated when it ended by itself, else cut at its last full sentence, or
    None when that leaves less than half of it (a model should not learn to stop mid-thought)."""
    text = text.strip()
    if complete:
        return text or None
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends and ends[-1] >= len(text) / 2 else None


def distill(lm: Any, tokenizer: Any, prompts: list[str], batch_size: int) -> list[dict[str, Any]]:
    """The model's own greedy answers to the prompts, asked as the user's turn alone; unusable answers left out."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        answers = generate_ids(lm, tokenizer, [question_ids(tokenizer, p) for p in batch], MAX_NEW_TOKENS)
        for prompt, (text, n_tokens) in zip(batch, answers, strict=True):
            answer = finish(text, n_tokens < MAX_NEW_TOKENS)
            if answer:
                rows.append({"prompt": prompt, "answer": answer})
    return rows


def cache_key(base_path: str, prompts: list[str]) -> str:
    """What decides the distilled answers: the base model's weights (by file names, sizes and times), the prompts
    and the decoding."""
    folder = Path(base_path)
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.glob("*")
                   if p.is_file()) if folder.is_dir() else [base_path]
    blob = json.dumps([str(folder.resolve()) if folder.exists() else base_path, files, prompts, MAX_NEW_TOKENS,
                       SHIPPED_DECODING, REPEAT_LAST_N])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def distilled(base_path: str, prompts: list[str], batch_size: int, cache: Path) -> list[dict[str, Any]]:
    """distill() through a cache file per base model and prompt set, since a run's first minutes should not be
    spent answering the same questions again."""
    path = cache / f"{cache_key(base_path, prompts)}.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from howto.models import free_memory, load_for_generation

    lm, tokenizer = load_for_generation(base_path)
    rows = distill(lm, tokenizer, prompts, batch_size)
    del lm
    free_memory()
    write_jsonl(path, rows)
    return rows


def encode_general(tokenizer: Any, prompt: str, answer: str) -> dict[str, list[int]]:
    """A general conversation as training ids with the answer's tokens (and its end of turn) marked for the loss."""
    ids, start = answer_ids(tokenizer, prompt, answer)
    return {"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)}
