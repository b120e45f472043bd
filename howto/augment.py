"""Grow thin categories with another LLM: new how-to records and paraphrased prompts, within a budget.

What comes back is raw: prepare_data.py validates, redacts and deduplicates it exactly like input data, so nothing
here trusts or repairs the model's answer; an answer that is not the JSON asked for is counted and skipped.
"""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict

from howto.chat import render_steps
from howto.llm import ChatClient, LLMError

EXAMPLES_PER_REQUEST = 3
RECORDS_PER_REQUEST = 5

SYSTEM = ("You write training data for an assistant that answers how-to questions about apps and products with "
          "ordered, concrete steps. Answer with JSON only.")

NEW_RECORDS = """Here are {n_examples} real questions of the category "{category}" with their steps:

{examples}

Write {n} new, different how-to questions of the same category, each with 3 to 12 concrete steps in order.
Do not repeat or reword the questions above. Use no real personal data (names, emails, phone numbers, addresses).
Answer as JSON: {{"records": [{{"prompt": "...", "response": ["step", "step", ...]}}]}}"""

PARAPHRASES = """Here is a real question of the category "{category}" with its steps:

{examples}

Write {n} paraphrases of the question: the same request in other words, as different users would ask it, so that
the same steps still answer it. Answer as JSON: {{"records": [{{"prompt": "..."}}]}}"""


def _show(record: dict) -> str:
    return f"Question: {record['prompt']}\nSteps:\n{render_steps(record['response'])}"


def parse_answer(text: str) -> list[dict] | None:
    """The records of a JSON answer, tolerating a Markdown code fence around it; None when it is not that JSON."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None
    records = value.get("records") if isinstance(value, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    return records


def augment(records: list[dict], thin_categories: dict[str, int], client: ChatClient, max_records: int,
            max_requests: int, seed: int = 0) -> tuple[list[dict], dict]:
    """New raw records for the thin categories (category -> how many wanted), and a report of what it cost."""
    rng = random.Random(seed)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_category[record.get("category")].append(record)
    new: list[dict] = []
    attempts_before = client.requests_made
    per_category = {c: {"wanted": n, "new": 0, "paraphrases": 0} for c, n in sorted(thin_categories.items())}
    report = {"requests": 0, "records_received": 0, "malformed_answers": 0, "per_category": per_category}
    for category, wanted in sorted(thin_categories.items()):
        examples = by_category.get(category, [])
        if not examples:  # nothing to show the model what the category is about
            continue
        to_paraphrase = rng.sample(examples, len(examples))
        counts = per_category[category]
        paraphrase_turn = False
        while counts["new"] + counts["paraphrases"] < wanted and len(new) < max_records \
                and report["requests"] < max_requests:
            n = min(RECORDS_PER_REQUEST, wanted - counts["new"] - counts["paraphrases"], max_records - len(new))
            original = to_paraphrase.pop() if paraphrase_turn and to_paraphrase else None
            paraphrase_turn = not paraphrase_turn
            if original is not None:
                prompt = PARAPHRASES.format(category=category, examples=_show(original), n=n)
            else:
                shown = rng.sample(examples, min(EXAMPLES_PER_REQUEST, len(examples)))
                prompt = NEW_RECORDS.format(category=category, n_examples=len(shown), n=n,
                                            examples="\n\n".join(map(_show, shown)))
            report["requests"] += 1
            try:
                answer = client.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                     temperature=0.9, max_tokens=2048)
            except LLMError as e:
                raise LLMError(f"augmentation of category {category!r} stopped: {e}") from e
            received = parse_answer(answer)
            if received is None:
                report["malformed_answers"] += 1
                continue
            for item in received[:n]:
                item = {**item, "category": category, "source": "augmented"}
                if original is not None:
                    item.update(response=list(original["response"]), paraphrase_of=original["prompt"])
                    counts["paraphrases"] += 1
                else:
                    counts["new"] += 1
                new.append(item)
            report["records_received"] += len(received)
    report["records_kept"] = len(new)
    report["http_attempts"] = client.requests_made - attempts_before  # requests plus retries
    return new, report
