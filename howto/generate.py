"""Answers from a model for evaluation: left-padded batches through transformers, or a GGUF file through llama.cpp.

Both are fed the token ids of the canonical chat format (howto.chat), so a model is asked exactly the question it
was trained on, and both give (text, generated tokens without the end-of-sequence token) per prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from howto.chat import decode_answer, prompt_ids

Answer = tuple[str, int]
# The decoding evaluate.py measures by default and the exports ship with: greedy, with llama.cpp's repeat penalty of
# 1.05 over the last REPEAT_LAST_N generated tokens (a token among them has its logit divided by 1.05, or multiplied
# when negative). Greedy decoding alone let a small fine-tuned model repeat a step until the token cap ("3. tap the
# device / 4. tap the device / ..."): SmolLM2 fine-tuned two epochs looped on 11 of 34 test answers. 1.05 was chosen
# over 1.1 (Ollama's own default) on the validation split, where it scored at least as well on every metric and
# 1.1 cut lists short (4.5 steps an answer against the references' 6.2; 5.2 at 1.05); docs/evaluation.md#decoding.
# The Ollama Modelfile carries it as it is; transformers' generation_config.json can only say repetition_penalty,
# which also counts the prompt's tokens.
SHIPPED_DECODING = {"temperature": 0.0, "repeat_penalty": 1.05}
REPEAT_LAST_N = 64


class RepeatPenalty:
    """llama.cpp's repeat penalty as a transformers logits processor: each token among the last `window` generated
    tokens has its logit divided by `penalty` (multiplied when negative). transformers' own repetition_penalty also
    counts the prompt's tokens, which pushed answers away from the question's own words ("open your banking app"
    for a question about unemployment benefits), and it is not what a GGUF answers with."""

    def __init__(self, penalty: float, window: int, prompt_length: int):
        self.penalty, self.window, self.prompt_length = penalty, window, prompt_length

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        recent = input_ids[:, self.prompt_length:][:, -self.window:]
        if recent.shape[1] == 0:
            return scores
        picked = scores.gather(1, recent)
        return scores.scatter(1, recent, torch.where(picked > 0, picked / self.penalty, picked * self.penalty))


def generate_ids(lm: Any, tokenizer: Any, ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 repeat_penalty: float = SHIPPED_DECODING["repeat_penalty"], streamer: Any = None) -> list[Answer]:
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
    from transformers import LogitsProcessorList

    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else \
        {"do_sample": False}
    penalty = LogitsProcessorList([RepeatPenalty(repeat_penalty, REPEAT_LAST_N, width)] if repeat_penalty != 1 else [])
    with torch.no_grad():
        out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=pad, streamer=streamer, logits_processor=penalty,
                          **sampling)
    answers = []
    for row in out[:, width:].tolist():
        end = row.index(eos) if eos in row else len(row)
        answers.append((decode_answer(tokenizer, row[:end]), end))
    return answers


def generate_batch(lm: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                   repeat_penalty: float = SHIPPED_DECODING["repeat_penalty"]) -> list[Answer]:
    """Answers to several questions at once, each asked in the canonical chat format."""
    return generate_ids(lm, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], max_new_tokens, temperature,
                        repeat_penalty)


@dataclass
class HFGenerator:
    """A transformers model with its tokenizer, answering a batch of questions at a time."""
    lm: Any
    tokenizer: Any
    max_new_tokens: int
    temperature: float = 0.0
    repeat_penalty: float = SHIPPED_DECODING["repeat_penalty"]

    def __call__(self, prompts: list[str]) -> list[Answer]:
        return generate_batch(self.lm, self.tokenizer, prompts, self.max_new_tokens, self.temperature,
                              self.repeat_penalty)


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
                 gpu: bool, repeat_penalty: float = SHIPPED_DECODING["repeat_penalty"]):
        self.llm = open_gguf(gguf, context, seed, gpu, last_n_tokens_size=REPEAT_LAST_N)
        self.canonical_tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.repeat_penalty = repeat_penalty

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
                                          temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
                                          repeat_penalty=self.repeat_penalty,
                                          seed=self.seed, stream=stream)


def open_gguf(path: str, context: int, seed: int, gpu: bool, **llama_kwargs: Any) -> Any:
    """A GGUF file loaded by llama.cpp, without its AMX weight buffers on a CPU that has AMX; `llama_kwargs` go to
    llama_cpp.Llama as they are (`logits_all`, `vocab_only`).

    llama.cpp built for a CPU with AMX (Intel Sapphire Rapids and later) repacks the weights into AMX buffers, and
    its AMX matmul crashed the process (SIGSEGV in ggml_backend_amx_mul_mat, seen on a 2-core Xeon VM with amx_int8).
    llama-cpp-python has no flag for llama.cpp's `use_extra_bufts` (llama-server's --no-repack), so the model
    parameters it starts from are changed while this one model loads; the same weights then run on AVX-512.
    """
    import llama_cpp
    from llama_cpp import llama as llama_module

    from howto.device import cpu_flags

    defaults = llama_module.llama_cpp.llama_model_default_params
    if not gpu and "amx_int8" in cpu_flags():
        def no_extra_buffers() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = no_extra_buffers
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=context, seed=seed, verbose=False, n_gpu_layers=-1 if gpu else 0,
                               **llama_kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def gguf_problem(path: str) -> str | None:
    """What makes a GGUF file unloadable, found by reading its header, metadata and tensor table (gguf's reader, no
    weights loaded): a file cut short or corrupt fails here in a second rather than when llama.cpp loads it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        return f"not a complete GGUF file, cut short or corrupt ({e})"
    size = Path(path).stat().st_size
    past_end = [t.name for t in reader.tensors if t.data_offset + t.n_bytes > size]
    if past_end:
        return f"tensor {past_end[0]} ends past the end of the file (cut short?)"
    if not reader.tensors:
        return "holds no tensors"
    return None


def model_folder_problem(folder: Path) -> str | None:
    """What makes a model or adapter folder unloadable, found without loading it: a config that is not a JSON
    object, a safetensors file cut short or with a corrupt header."""
    from safetensors import SafetensorError, safe_open

    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            try:
                config = json.loads((folder / name).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return f"{name} is not JSON ({e})"
            if not isinstance(config, dict):
                return f"{name} is not a JSON object"
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "np"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{file.name}: {e}"
    return None


def is_gguf_file(path: str) -> bool:
    """A GGUF file starts with the magic bytes `GGUF`."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
