"""The canonical prompt format: Mistral token ids equal mistral-common's, masks cover the answer only, and the
step parser reads the shapes models really write."""
from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from howto.chat import SYSTEM_PROMPT, encode_example, parse_steps, prompt_ids, render_steps, strip_numbering
from howto.models import load_tokenizer, mistral_tokenizer_file

CONVERSATIONS = [
    ("How do I reset my password in the XX app?", ["Open the app", "Go to the login page", "Tap 'Forgot Password'"]),
    ("How do I  reset   my password?", ["Open the  app", "Tap    'Login'", "Done"]),
    ("  leading and trailing spaces  ", ["  step with leading spaces", "tabs\there\t\tand there"]),
    ("naïve café — “quotes”, 日本語 and emoji 🙂", ["Ouvrez l'application", "Appuyez sur « OK »"]),
    ("line\n\nbreaks in the question", ["a\nmulti-line step", "x" * 40 + "     " + "y"]),
]


def mistral_common_ids(prompt: str, steps: list[str] | None) -> list[int]:
    mode = ValidationMode.finetuning if steps is not None else ValidationMode.test
    tokenizer = MistralTokenizer.from_file(str(mistral_tokenizer_file()), mode=mode)
    messages = [SystemMessage(content=SYSTEM_PROMPT), UserMessage(content=prompt.strip())]
    if steps is not None:
        messages.append(AssistantMessage(content=render_steps(steps)))
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


@pytest.mark.parametrize("prompt,steps", CONVERSATIONS)
def test_mistral_ids_match_mistral_common(mistral_tokenizer, prompt, steps):
    assert prompt_ids(mistral_tokenizer, prompt) == mistral_common_ids(prompt, None)
    assert encode_example(mistral_tokenizer, prompt, steps)["input_ids"] == mistral_common_ids(prompt, steps)


def test_mistral_special_tokens(mistral_tokenizer):
    assert len(mistral_tokenizer) == 32768
    ids = prompt_ids(mistral_tokenizer, "How?")
    assert ids[:2] == [1, 3] and ids[-1] == 4  # <s> [INST] ... [/INST]


def test_completion_mask_covers_the_answer_only(mistral_tokenizer):
    example = encode_example(mistral_tokenizer, "How do I log out?", ["Open settings", "Tap 'Log out'"])
    ids, mask = example["input_ids"], example["completion_mask"]
    head = prompt_ids(mistral_tokenizer, "How do I log out?")
    assert mask == [0] * len(head) + [1] * (len(ids) - len(head))
    answer = [i for i, m in zip(ids, mask) if m]
    assert answer[-1] == 2  # the model learns to stop
    assert mistral_tokenizer.decode(answer, skip_special_tokens=True) == "1. Open settings\n2. Tap 'Log out'"


def test_chatml_template_for_smollm2(smollm2_model):
    tokenizer = load_tokenizer(smollm2_model)
    example = encode_example(tokenizer, "How do I log out?", ["Open settings", "Tap 'Log out'"])
    ids, mask = example["input_ids"], example["completion_mask"]
    prompt_text = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    answer_text = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert prompt_text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert answer_text == "1. Open settings\n2. Tap 'Log out'<|im_end|>"
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("text,expected", [
    ("1. Open the app\n2. Tap login\n3. Done", ["Open the app", "Tap login", "Done"]),
    ("1) Open\n2) Tap", ["Open", "Tap"]),
    ("Step 1: Open the app\nStep 2: Tap login", ["Open the app", "Tap login"]),
    ("step 1 open the app\nstep 2 tap login", ["open the app", "tap login"]),
    ("- Open\n* Tap\n• Done", ["Open", "Tap", "Done"]),
    ('["Open the app", "Tap login"]', ["Open the app", "Tap login"]),
    ('Sure! ```json\n["Open", "Tap"]\n```', ["Open", "Tap"]),
    ("Here are the steps:\n\n1. Open\n2. Tap\n\nHope this helps!", ["Open", "Tap"]),
    ("1. Open the app and\n   go to settings\n2. Tap", ["Open the app and go to settings", "Tap"]),
    ("open the app\ntap login", ["open the app", "tap login"]),
    ("", []),
])
def test_parse_steps(text, expected):
    assert parse_steps(text) == expected


def test_render_then_parse_round_trip():
    steps = ["Open the app", "Tap 'Settings' (top right)", "Choose 2. option"]
    assert parse_steps(render_steps(steps)) == steps


@pytest.mark.parametrize("steps,expected", [
    (["1. Open the app", "2. Tap login"], ["Open the app", "Tap login"]),
    (["Step 1: Open", "Step 2: Tap", "step 3) Done"], ["Open", "Tap", "Done"]),
    (["5: wait five minutes", "Tap login"], ["5: wait five minutes", "Tap login"]),  # not a numbering
    (["1. Open", "3. Tap"], ["1. Open", "3. Tap"]),  # not consecutive: left alone
    (["Open the app", "Tap login"], ["Open the app", "Tap login"]),
])
def test_strip_numbering_only_removes_a_real_enumeration(steps, expected):
    assert strip_numbering(steps) == expected
