"""The one canonical prompt format: how a record becomes a conversation, tokens and back.

Training, evaluation and token counting all go through this module, so the model is always asked the
question in exactly the form it was trained on.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

SYSTEM_PROMPT = (
    "You are a helpful assistant that explains how to do a task. "
    "Answer with the ordered steps only, one step a line, numbered 1., 2., 3., ..."
)

Message = dict[str, str]


def render_steps(steps: list[str]) -> str:
    """Steps as the assistant writes them: numbered lines, one step a line."""
    return "\n".join(f"{i}. {step.strip()}" for i, step in enumerate(steps, 1))


def to_messages(prompt: str, steps: list[str] | None = None) -> list[Message]:
    """A record as chat messages; without steps, the conversation the model must answer."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt.strip()}]
    if steps is not None:
        messages.append({"role": "assistant", "content": render_steps(steps)})
    return messages


_STEP_PREFIX = re.compile(
    r"""^\s*(?:
        (?:step\s*)?\d+\s*[.):\-]\s*   # 1.  1)  1:  step 1:  step 2 -
      | step\s+\d+\s+                  # step 3 open the app
      | [-*\u2022\u2023\u25e6\u2043]\s+  # bullets
      | \(\d+\)\s*                     # (1)
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_PREAMBLE = re.compile(r"(?:here are|here's|follow these|the steps|steps to|to do this|:\s*$)", re.IGNORECASE)


_NUMBERED = re.compile(r"^\s*(?:step\s*)?(\d+)\s*[.):]\s+", re.IGNORECASE)


def strip_numbering(steps: list[str]) -> list[str]:
    """Drop numbers that a dataset wrote into its steps ("1. Open", "Step 2: Tap"), which render_steps would number
    again. Only when every step carries the next number 1, 2, 3...: a lone "5: wait" may be part of the text."""
    matches = [_NUMBERED.match(step) for step in steps]
    if all(m and int(m.group(1)) == i for i, m in enumerate(matches, 1)):
        return [step[m.end():].strip() for step, m in zip(steps, matches)]
    return steps


def _parse_json_list(text: str) -> list[str] | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    return None


def parse_steps(text: str) -> list[str]:
    """Turn model output back into a list of steps.

    Accepts a JSON array of strings, numbered lines ("1.", "1)", "Step 1:"), bullets, and plain lines when nothing
    is marked. Lines before the first marked step (a preamble like "Here are the steps:") and after the last one (a
    closing remark) are dropped when the list itself is marked, since they are not steps.
    """
    text = text.strip()
    if not text:
        return []
    as_json = _parse_json_list(text)
    if as_json is not None:
        return as_json
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    marked = [bool(_STEP_PREFIX.match(line)) for line in lines]
    if not any(marked):
        return [line.strip() for line in lines if not _PREAMBLE.search(line)]
    first = marked.index(True)
    last = len(marked) - 1 - marked[::-1].index(True)
    steps: list[str] = []
    for line, is_marked in zip(lines[first : last + 1], marked[first : last + 1]):
        if is_marked:
            step = _STEP_PREFIX.sub("", line, count=1).strip()
            if step:
                steps.append(step)
        elif steps:  # a wrapped continuation of the step above
            steps[-1] = f"{steps[-1]} {line.strip()}"
    return steps


def decode_answer(tokenizer: Any, ids: list[int]) -> str:
    """Generated ids as text. Special tokens are always skipped: MistralCommonBackend otherwise returns raw
    SentencePiece pieces ("▁1.▁Open<0x0A>") instead of text."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _ids(encoded: Any) -> list[int]:
    """apply_chat_template returns a list, a BatchEncoding or a dict depending on the tokenizer class."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def is_mistral_common(tokenizer: Any) -> bool:
    return type(tokenizer).__name__ == "MistralCommonBackend"


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the question, ready for the model to write its answer."""
    return _ids(tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=True))


def encode_example(tokenizer: Any, prompt: str, steps: list[str]) -> dict[str, list[int]]:
    """Token ids of a whole training conversation and a mask that marks the assistant's tokens.

    The loss is computed on the masked tokens only (the steps and the end-of-turn token), never on the prompt.
    For Mistral (mistral-common), the assistant turn is its content's tokens then `</s>`, as mistral-common encodes
    it for fine-tuning; for other chat templates the full conversation is rendered and the prompt must be a prefix.
    """
    head = prompt_ids(tokenizer, prompt)
    if is_mistral_common(tokenizer):
        tail = _ids(tokenizer.encode(render_steps(steps), add_special_tokens=False)) + [tokenizer.eos_token_id]
        full = head + tail
    else:
        full = _ids(tokenizer.apply_chat_template(to_messages(prompt, steps), tokenize=True))
        if full[: len(head)] != head:
            raise ValueError("the chat template renders the prompt differently with and without an answer")
        full = _strip_trailing_after_eos(tokenizer, full)
    mask = [0] * len(head) + [1] * (len(full) - len(head))
    return {"input_ids": full, "completion_mask": mask}


def example_lengths(tokenizer: Any, examples: list[tuple[str, list[str]]]) -> list[int]:
    """`len(encode_example(tokenizer, prompt, steps)["input_ids"])` of each (prompt, steps), the same numbers in
    batches: encoding records one at a time spends most of its time in wrappers, not in the tokenizer.

    Mistral (mistral-common): a conversation is a fixed frame of special tokens ([BOS] [INST] ... [/INST] ... </s>)
    around two texts encoded on their own, the system prompt joined to the question, and the rendered steps
    (mistral-common's instruct tokenizer and encode_example build it so); only those texts are encoded, each
    distinct one once, in a multi-threaded SentencePiece batch. The frame's size is read off encode_example, and
    examples spread over the batch are checked against it: a tokenizer whose format differs goes record by record.
    Other tokenizers render and encode the conversations through their chat template, a batch at a time.
    """
    if not examples:
        return []
    if is_mistral_common(tokenizer):
        lengths = _mistral_lengths(tokenizer, examples)
        checked = range(0, len(examples), max(1, len(examples) // _CHECKED))
        if lengths is not None and all(lengths[i] == _slow_length(tokenizer, *examples[i]) for i in checked):
            return lengths
        return [_slow_length(tokenizer, prompt, steps) for prompt, steps in examples]
    return [n for start in range(0, len(examples), _BATCH) for n in
            _template_lengths(tokenizer, examples[start:start + _BATCH])]


_CHECKED = 32  # examples of a batch compared with encode_example itself
_BATCH = 512  # conversations a chat template renders and encodes at once


def _slow_length(tokenizer: Any, prompt: str, steps: list[str]) -> int:
    return len(encode_example(tokenizer, prompt, steps)["input_ids"])


def _mistral_lengths(tokenizer: Any, examples: list[tuple[str, list[str]]]) -> list[int] | None:
    """Frame + encoded question + encoded steps; None for a tokenizer that does not encode its texts this way."""
    raw = getattr(getattr(getattr(tokenizer, "tokenizer", None), "instruct_tokenizer", None), "tokenizer", None)
    if raw is None:
        return None
    heads = [f"{SYSTEM_PROMPT}\n\n{prompt.strip()}" for prompt, _ in examples]
    tails = [render_steps(steps) for _, steps in examples]
    texts = list(dict.fromkeys(heads + tails))
    model = getattr(raw, "_model", None)  # mistral-common's SentencePieceTokenizer.encode is model.encode(text)
    if type(model).__name__ == "SentencePieceProcessor":
        encoded = model.encode(texts, num_threads=os.cpu_count() or 1)
    else:
        encoded = [raw.encode(text, bos=False, eos=False) for text in texts]
    size = {text: len(ids) for text, ids in zip(texts, encoded)}
    frame = _slow_length(tokenizer, *examples[0]) - size[heads[0]] - size[tails[0]]
    return [frame + size[head] + size[tail] for head, tail in zip(heads, tails)]


def _template_lengths(tokenizer: Any, examples: list[tuple[str, list[str]]]) -> list[int]:
    """encode_example's lengths through a chat template, each batch rendered and encoded in one call."""
    heads = _ids(tokenizer.apply_chat_template([to_messages(prompt) for prompt, _ in examples],
                                               add_generation_prompt=True, tokenize=True))
    fulls = _ids(tokenizer.apply_chat_template([to_messages(prompt, steps) for prompt, steps in examples],
                                               tokenize=True))
    lengths = []
    for head, full in zip(heads, fulls):
        if list(full[: len(head)]) != list(head):
            raise ValueError("the chat template renders the prompt differently with and without an answer")
        lengths.append(len(_strip_trailing_after_eos(tokenizer, list(full))))
    return lengths


def _strip_trailing_after_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    """ChatML templates end a turn with `<|im_end|>` then a newline; training stops at the end-of-turn token."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        return ids[: last + 1]
    return ids
