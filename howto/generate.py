"""Answers from a model for evaluation: left-padded batches through transformers, or a GGUF file through llama.cpp.

Both are fed the token ids of the canonical chat format (howto.chat), so a model is asked exactly the question it
was trained on, and both give (text, generated tokens without the end-of-sequence token) per prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from howto.chat import decode_answer, prompt_ids

Answer = tuple[str, int]


def generate_ids(lm: Any, tokenizer: Any, ids: list[list[int]], max_new_tokens: int,
                 temperature: float = 0.0, streamer: Any = None) -> list[Answer]:
    """Answers to several tokenized prompts at once.

    The prompts are left-padded by hand with an attention mask, since the chat template builds ids that a
    tokenizer's own padding would not see; decoder-only models must be padded on the left so that every answer
    continues right after its prompt. A `streamer` (transformers' TextIteratorStreamer, one prompt) gets the tokens
    as they come, for the chat page.
    """
    import torch

    width = max(len(x) for x in ids)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=lm.device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=lm.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else \
        {"do_sample": False}
    with torch.no_grad():
        out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=pad, streamer=streamer, **sampling)
    answers = []
    for row in out[:, width:].tolist():
        end = row.index(eos) if eos in row else len(row)
        answers.append((decode_answer(tokenizer, row[:end]), end))
    return answers


def generate_batch(lm: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   temperature: float = 0.0) -> list[Answer]:
    """Answers to several questions at once, each asked in the canonical chat format."""
    return generate_ids(lm, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], max_new_tokens, temperature)


@dataclass
class HFGenerator:
    """A transformers model with its tokenizer, answering a batch of questions at a time."""
    lm: Any
    tokenizer: Any
    max_new_tokens: int
    temperature: float = 0.0

    def __call__(self, prompts: list[str]) -> list[Answer]:
        return generate_batch(self.lm, self.tokenizer, prompts, self.max_new_tokens, self.temperature)


class GGUFGenerator:
    """A GGUF file through llama.cpp, one question at a time.

    llama-cpp-python keeps the KV cache of the previous prompt and, when the next prompt starts with the same tokens
    (every prompt shares the system prompt; a question asked again shares all of it), evaluates only the rest. A
    token evaluated alone goes through other kernels than in a batch: on SmolLM2's Q4_1 GGUF the logits of a
    question's last token differed by up to 0.56 between the two ways, so greedy decoding drifted and the same
    question got two answers. The state is reset before every prompt, so each prompt is evaluated whole, the same
    way whatever came before (measured bitwise equal, with 1 or 2 threads), at the cost of re-reading the system
    prompt (a few dozen tokens).
    """
    lm = None
    tokenizer = None

    def __init__(self, gguf: str, tokenizer: Any, context: int, max_new_tokens: int, temperature: float, seed: int,
                 gpu: bool):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_ctx=context, seed=seed, verbose=False, n_gpu_layers=-1 if gpu else 0)
        self.canonical_tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    def __call__(self, prompts: list[str]) -> list[Answer]:
        answers = []
        for prompt in prompts:
            out = self.completion(prompt, self.max_new_tokens, self.temperature)
            answers.append((out["choices"][0]["text"].strip(), int(out["usage"]["completion_tokens"])))
        return answers

    def completion(self, prompt: str, max_new_tokens: int, temperature: float, stream: bool = False) -> Any:
        """llama.cpp's completion of one question, evaluated whole (see above); with `stream`, an iterator of
        chunks as the tokens come, for the chat page."""
        self.llm.reset()
        return self.llm.create_completion(prompt_ids(self.canonical_tokenizer, prompt), max_tokens=max_new_tokens,
                                          temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                          seed=self.seed, stream=stream)


def is_gguf_file(path: str) -> bool:
    """A GGUF file starts with the magic bytes `GGUF`."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
