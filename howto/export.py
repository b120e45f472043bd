"""Export a fine-tuned adapter for serving: merged 16-bit weights, GGUF files for llama.cpp, an Ollama Modelfile.

The GGUF path uses llama.cpp's own tools, never a re-implementation: `convert_hf_to_gguf.py` writes an f16 GGUF and
llama.cpp's quantizer makes the smaller types. llama.cpp comes from `--llama-cpp DIR`, `$LLAMA_CPP_DIR`, or the
source distribution of the installed `llama-cpp-python` (its `vendor/llama.cpp`), downloaded once and cached, so the
converter is the very version whose quantizer and runtime are installed.

The trap this module closes: a GGUF that rambles in llama.cpp or Ollama because it carries the wrong chat template
or end-of-sequence token. Mistral exports carry Mistral's template and `</s>` (id 2) in the GGUF and in the Modelfile.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from howto.chat import SYSTEM_PROMPT
from howto.generate import REPEAT_LAST_N, SHIPPED_DECODING
from howto.models import (
    MISTRAL_CHAT_TEMPLATE, UNSLOTH_4BIT, cache_dir, is_mistral, load_tokenizer, resolve_model,
    save_mistral_tokenizer,
)
from howto.runio import atomic_dir, atomic_write_text, library_versions, write_json

console = Console(stderr=True)

MERGED_DTYPES = ("float16", "bfloat16", "float32")
FULL_PRECISION = {four_bit: full for full, four_bit in UNSLOTH_4BIT.items()}
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from the llama.cpp tree: the script, its model classes, the gguf package it was written
# against, and the bundled chat templates some model classes read.
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "requirements/", "LICENSE")
# Files the converter's staging folder writes itself instead of linking (see _stage_for_converter).
STAGED_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "chat_template.json")

MISTRAL_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "clean_up_tokenization_spaces": False,
}

# Ollama speaks Go templates, not Jinja. These render a conversation exactly as the Jinja templates in the GGUF do
# (Mistral: the system prompt joins the last user turn, as mistral-common does), in Ollama's own conventions.
OLLAMA_MISTRAL_TEMPLATE = """{{- if .Messages }}
{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}
{{- else }}[INST] {{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }}[/INST]
{{- if .Response }} {{ .Response }}</s>{{ end }}
{{- end }}"""
OLLAMA_CHATML_TEMPLATE = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
{{- end }}"""
OLLAMA_CHAT = {
    "mistral": (OLLAMA_MISTRAL_TEMPLATE, ["</s>", "[INST]", "[/INST]"]),
    "chatml": (OLLAMA_CHATML_TEMPLATE, ["<|im_end|>", "<|im_start|>"]),
}


# ---------------------------------------------------------------------------------------------------------------
# Merged 16-bit weights
# ---------------------------------------------------------------------------------------------------------------

def export_merged(base_model: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float16") -> Path:
    """Fold the LoRA adapter into the base weights and save a plain transformers folder (safetensors).

    The adapter is merged into the original 16-bit weights, never into 4-bit ones: merging into 4-bit weights rounds
    the sum back onto the 4-bit grid and loses most of what the adapter learned, so a QLoRA adapter goes into the
    full-precision model (Unsloth's pre-quantized repo is mapped back to it). The merge streams the base model's
    safetensors shards one at a time, W + (alpha / r) * B @ A computed in fp32 and rounded once, so a 7B model needs
    the RAM of one shard (about 5 GB), not of the whole model (15 GB, more than a free Colab has). fp16 is the
    default because llama.cpp converts from it without loss. Mistral folders get the tokenizer files and chat
    template that llama.cpp and transformers both read, so the folder stands alone. The folder is built beside
    `out_dir` and renamed into place, replacing an older export only once the new one is complete.
    """
    if dtype not in MERGED_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(MERGED_DTYPES)}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json, not a LoRA adapter folder")
    if base_model in FULL_PRECISION:
        console.print(f"merging into {FULL_PRECISION[base_model]}, the full-precision model behind {base_model}")
    base = _local_weights(resolve_model(FULL_PRECISION.get(base_model, base_model)))
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    method = _quant_method(config)
    if method not in (None, "gguf"):
        raise ValueError(f"{base} is a quantized checkpoint ({method}): merge into the full-precision base model "
                         "instead, merging into quantized weights loses the adapter's precision")
    config.pop("quantization_config", None)  # a folder transformers dequantized from a GGUF (SmolLM2) still names it
    config.update({key: dtype for key in ("dtype", "torch_dtype") if key in config} or {"dtype": dtype})
    mistral = is_mistral(str(base)) or (adapter_dir / "tokenizer.model.v3").is_file()
    console.print(f"merging {adapter_dir} into {base} ({dtype}, one shard at a time)")

    def build(folder: Path) -> None:
        _merge_lora_shards(base, adapter_dir, folder, dtype)
        (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if (base / "model.safetensors.index.json").is_file():
            shutil.copy(base / "model.safetensors.index.json", folder / "model.safetensors.index.json")
        write_generation_config(base, folder)
        if mistral:
            _save_mistral_tokenizer(folder, [adapter_dir, base])
        else:
            tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
            load_tokenizer(str(tokenizer_source)).save_pretrained(folder)

    atomic_dir(out_dir, build, replace=True)
    console.print(f"merged model written to {out_dir}")
    return out_dir


def _local_weights(model: str) -> Path:
    """The folder holding a model's safetensors: the path itself, or the hub snapshot, downloaded once."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json", "tokenizer*"]))


def _lora_factors(adapter_dir: Path) -> tuple[float, dict[str, tuple[Any, Any]]]:
    """The LoRA scale (alpha / r) and, per base weight name, its (A, B) factors, for plain LoRA adapters as
    finetune.py trains them; other peft variants are refused rather than merged wrongly."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if cfg.get(k)]
    if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters are merged here, this one uses "
                         f"{', '.join(unsupported) or cfg.get('peft_type')}")
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors = {key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"):
               (a, tensors[key.replace(".lora_A.", ".lora_B.")]) for key, a in tensors.items() if ".lora_A." in key}
    if not factors:
        raise ValueError(f"{adapter_dir}: the adapter holds no LoRA weights")
    return scale, factors


def _merge_lora_shards(base: Path, adapter_dir: Path, folder: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{base}: no safetensors weights to merge into")
    scale, factors = _lora_factors(adapter_dir)
    target = getattr(torch, dtype)
    for shard in shards:
        weights = load_file(str(shard))
        for name, weight in weights.items():
            if name in factors:  # W + scale * B @ A in fp32, one weight at a time, rounded once
                a, b = factors.pop(name)
                weight = weight.to(torch.float32).addmm_(b.to(torch.float32), a.to(torch.float32), alpha=scale)
            weights[name] = weight.to(target).contiguous()
        save_file(weights, str(folder / shard.name), metadata={"format": "pt"})
        del weights
    if factors:
        raise ValueError(f"{adapter_dir}: {len(factors)} adapted weights are not in {base}, e.g. {next(iter(factors))}")


def _quant_method(config: dict[str, Any]) -> str | None:
    """How a checkpoint's weights are quantized, from its config.json; None for plain weights."""
    quantization = config.get("quantization_config")
    return str(quantization.get("quant_method", "unknown")) if quantization else None


def _save_mistral_tokenizer(folder: Path, sources: list[Path]) -> None:
    """The v3 SentencePiece file under both names and a tokenizer_config.json with Mistral's chat template.

    The model's own v3 file is copied where the adapter or the base folder has one; a hub base falls back to the
    identical file inside mistral-common.
    """
    own = next((s / "tokenizer.model.v3" for s in sources if (s / "tokenizer.model.v3").is_file()), None)
    if own is None:
        save_mistral_tokenizer(folder)
    else:
        shutil.copy(own, folder / "tokenizer.model.v3")
        shutil.copy(own, folder / "tokenizer.model")
    config = {**MISTRAL_TOKENIZER_CONFIG, "chat_template": MISTRAL_CHAT_TEMPLATE}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_generation_config(base: Path, folder: Path) -> None:
    """The base model's generation_config.json with the decoding that was evaluated (SHIPPED_DECODING): greedy, and
    transformers' repetition_penalty at the evaluated value, the nearest it can say to llama.cpp's penalty over the
    last generated tokens (its own also counts the prompt's; howto.generate.RepeatPenalty is the exact rule)."""
    path = base / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key in ("temperature", "top_k", "top_p", "min_p", "typical_p"):
        config.pop(key, None)
    config.update(do_sample=SHIPPED_DECODING["temperature"] > 0,
                  repetition_penalty=SHIPPED_DECODING["repeat_penalty"])
    if config["do_sample"]:
        config["temperature"] = SHIPPED_DECODING["temperature"]
    write_json(folder / "generation_config.json", config)


# ---------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------

def export_gguf(merged_dir: str | Path, out_dir: str | Path, quants: list[str], llama_cpp: str | None = None,
                chat_template: str | None = None) -> list[Path]:
    """Convert a merged folder to `out_dir/model-<quant>.gguf` for each quant, and write an Ollama Modelfile.

    `chat_template` (Jinja) replaces the one the GGUF would take from the folder's tokenizer files; a Mistral folder
    without one gets Mistral's. The f16 file is the converter's output; the other types are quantized from it by
    llama.cpp, and it is removed afterwards unless asked for.
    """
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if not quants:
        raise ValueError("no quantization type asked for: give at least one of q4_k_m, q8_0, f16")
    quants = list(dict.fromkeys(q.strip().lower() for q in quants))
    for quant in quants:
        quant_ftype(quant)  # fail on a typo before the slow conversion
    if not (merged_dir / "config.json").is_file():
        raise FileNotFoundError(f"{merged_dir}: no config.json; export the merged model first (export_merged)")
    llama_dir = llama_cpp_dir(llama_cpp)
    template = chat_template or _folder_chat_template(merged_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    f16 = out_dir / "model-f16.gguf"
    tmp_f16 = out_dir / ".model-f16.gguf.tmp"
    try:
        convert_to_gguf(llama_dir, merged_dir, tmp_f16, template)
        outputs = []
        for quant in quants:
            path = out_dir / f"model-{quant}.gguf"
            if quant != "f16":
                tmp = out_dir / f".{path.name}.tmp"
                quantize(llama_dir, tmp_f16, tmp, quant)
                os.replace(tmp, path)
            outputs.append(path)
        if "f16" in quants:
            os.replace(tmp_f16, f16)
    finally:
        tmp_f16.unlink(missing_ok=True)
        for quant in quants:
            (out_dir / f".model-{quant}.gguf.tmp").unlink(missing_ok=True)

    smallest = min(outputs, key=lambda p: p.stat().st_size)
    write_modelfile(out_dir, smallest, template)
    write_json(out_dir / "gguf_info.json", {
        "merged_dir": str(merged_dir), "llama_cpp_dir": str(llama_dir), "quantizer": _quantizer_name(llama_dir),
        "files": {p.name: p.stat().st_size for p in outputs}, "chat_family": chat_family(template),
        "versions": library_versions(),
    })
    _print_outputs(outputs, out_dir / "Modelfile")
    return outputs


def chat_family(template: str | None) -> str | None:
    """Which Ollama template matches a Jinja chat template: `mistral`, `chatml`, or None when neither."""
    if template and "[INST]" in template:
        return "mistral"
    if template and "<|im_start|>" in template:
        return "chatml"
    return None


def _folder_chat_template(folder: Path) -> str | None:
    """The chat template the converter would read from the folder; Mistral's for a Mistral folder without one."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (folder / "tokenizer.model.v3").is_file():
        template = MISTRAL_CHAT_TEMPLATE
    return template if isinstance(template, str) else None


def llama_cpp_dir(explicit: str | Path | None = None) -> Path:
    """A llama.cpp tree with `convert_hf_to_gguf.py`: the one given, `$LLAMA_CPP_DIR`, or the cached sdist copy."""
    given = explicit or os.environ.get("LLAMA_CPP_DIR")
    if given:
        source = "--llama-cpp" if explicit else "LLAMA_CPP_DIR"
        path = Path(given).expanduser()
        if not (path / CONVERTER).is_file():
            raise FileNotFoundError(f"{source}={given}: no {CONVERTER} there; point it at a llama.cpp checkout")
        return path
    version = metadata.version("llama-cpp-python")
    return atomic_dir(cache_dir() / f"llama.cpp-{version}", lambda folder: _unpack_sdist(version, folder))


def download_sdist(version: str, dest: Path) -> Path:
    """Fetch llama-cpp-python's source distribution, which vendors the matching llama.cpp tree, through pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    console.print(f"downloading llama-cpp-python {version} sources for llama.cpp's converter (once, ~75 MB)")
    _run(cmd, "pip download of the llama-cpp-python sources")
    archives = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download left no llama_cpp_python-*.tar.gz in {dest}")
    return archives[0]


def _unpack_sdist(version: str, folder: Path) -> None:
    """Extract the converter's part of `vendor/llama.cpp` from the sdist into `folder` (a few MB of its ~75 MB)."""
    with tempfile.TemporaryDirectory(dir=folder.parent) as download:
        archive = download_sdist(version, Path(download))
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                parts = member.name.split("/", 3)
                if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3].startswith(CONVERTER_FILES):
                    member.name = parts[3]
                    members.append(member)
            tar.extractall(folder, members=members, filter="data")
    if not (folder / CONVERTER).is_file():
        raise RuntimeError(f"llama-cpp-python {version} sources hold no vendor/llama.cpp/{CONVERTER}")


def convert_to_gguf(llama_dir: Path, merged_dir: Path, outfile: Path, chat_template: str | None) -> None:
    """Run llama.cpp's converter to an f16 GGUF, with `chat_template` as the file's tokenizer.chat_template."""
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=outfile.parent) as stage_parent:
        stage = Path(stage_parent) / merged_dir.resolve().name  # the converter names the model after its folder
        stage.mkdir()
        _stage_for_converter(merged_dir, stage, chat_template)
        console.print(f"converting {merged_dir} to GGUF f16 with {llama_dir / CONVERTER}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(llama_dir / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.pop("NO_LOCAL_GGUF", None)
        _run([sys.executable, str(llama_dir / CONVERTER), str(stage), "--outfile", str(outfile), "--outtype", "f16"],
             "llama.cpp's convert_hf_to_gguf.py", env=env)


def _stage_for_converter(merged_dir: Path, stage: Path, chat_template: str | None) -> None:
    """Links to the merged files, with the few files the converter reads wrong for our models rewritten.

    - tokenizer_config.json carries `chat_template`: the converter copies it into the GGUF.
    - Mistral: `tokenizer.model.v3` is linked as the `tokenizer.model` the converter reads, and the GGUF gets
      `add_space_prefix = false`. llama.cpp otherwise puts a space before every piece of text that follows a
      special token, so the template's `[INST] You` became `[INST]`, `▁`, `▁You`, a token sequence the model never
      saw in training; without it llama.cpp's ids for a chat prompt equal mistral-common's. (Raw text given to
      llama.cpp without a template then starts without SentencePiece's leading space.)
    - A model that transformers dequantized from a GGUF (SmolLM2) still names its old quantization in config.json,
      and its tokenizer.json is a GPT-2 byte-level BPE marked with SentencePiece byte fallback: the converter would
      refuse the first and take the second for a Llama SentencePiece vocabulary, a GGUF on which llama.cpp crashes at
      the first prompt. Byte-level BPE never needs byte fallback, so the staged copy drops it.
    """
    for item in merged_dir.iterdir():
        if item.name not in STAGED_FILES and not item.name.startswith("."):
            (stage / item.name).symlink_to(item.resolve())

    def write(name: str, obj: dict[str, Any]) -> None:
        (stage / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")

    def read(name: str) -> dict[str, Any]:
        path = merged_dir / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    model_config = read("config.json")
    if _quant_method(model_config) == "gguf":
        del model_config["quantization_config"]
    write("config.json", model_config)

    tokenizer_config = read("tokenizer_config.json")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    mistral_v3 = merged_dir / "tokenizer.model.v3"
    if mistral_v3.is_file():
        tokenizer_config["add_prefix_space"] = False
        if not (stage / "tokenizer.model").exists():
            (stage / "tokenizer.model").symlink_to(mistral_v3.resolve())
    if tokenizer_config:
        write("tokenizer_config.json", tokenizer_config)

    tokenizer_json = read("tokenizer.json")
    if tokenizer_json:
        decoders = (tokenizer_json.get("decoder") or {}).get("decoders", [])
        byte_level = [d for d in decoders if d.get("type") == "ByteLevel"]
        if tokenizer_json["model"].get("byte_fallback") and byte_level:
            tokenizer_json["model"]["byte_fallback"] = False
            tokenizer_json["decoder"] = byte_level[0]
        write("tokenizer.json", tokenizer_json)


def _quantize_binary(llama_dir: Path) -> Path | None:
    """A `llama-quantize` built in the llama.cpp tree: it matches that tree's converter, so it is preferred."""
    for candidate in (llama_dir / "build" / "bin" / "llama-quantize", llama_dir / "llama-quantize"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _quantizer_name(llama_dir: Path) -> str:
    binary = _quantize_binary(llama_dir)
    return str(binary) if binary else f"llama-cpp-python {metadata.version('llama-cpp-python')} (llama_model_quantize)"


def quant_ftype(quant: str) -> int:
    """llama.cpp's file type for a quant name such as q4_k_m; the installed binding knows the full list."""
    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if quant == "f32" else f"LLAMA_FTYPE_MOSTLY_{quant.upper()}"
    if not hasattr(llama_cpp, name):
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_").lower() for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"unknown quantization type {quant!r}; llama.cpp knows: {', '.join(known)}")
    return getattr(llama_cpp, name)


def quantize(llama_dir: Path, src: Path, dst: Path, quant: str) -> None:
    """Quantize with llama.cpp's own quantizer: the tree's `llama-quantize` when built, else the installed binding.

    Tensors whose rows do not fit the type's block size (k-quants need multiples of 256) get llama.cpp's fallback
    type for that tensor, as `llama-quantize` does; the file is still valid.
    """
    threads = os.cpu_count() or 1
    binary = _quantize_binary(llama_dir)
    console.print(f"quantizing to {quant} with {binary or 'the llama-cpp-python binding'}")
    if binary:
        _run([str(binary), str(src), str(dst), quant.upper(), str(threads)], f"llama-quantize {quant}")
        return
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_ftype(quant)
    params.nthread = threads
    log = logging.getLogger("llama-cpp-python")  # the binding echoes llama.cpp's per-tensor log at this level
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        log.setLevel(level)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant} (status {status})")


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a tool with its output captured; on failure show its last lines, where the cause is."""
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")


# ---------------------------------------------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------------------------------------------

def write_modelfile(out_dir: Path, gguf_file: Path, chat_template: str | None) -> Path:
    """An Ollama Modelfile next to the GGUF, so `ollama create NAME -f Modelfile` works as it is.

    It carries the chat template in Ollama's Go syntax, the end-of-turn stops, the system prompt the model was
    trained with, and the decoding it was evaluated with (howto.generate.SHIPPED_DECODING). For a template that is neither Mistral nor ChatML it leaves TEMPLATE out: Ollama then derives one
    from the GGUF's own metadata.
    """
    family = chat_family(chat_template)
    lines = [f"FROM ./{gguf_file.name}", ""]
    if family is None:
        lines += ["# chat template: taken by Ollama from the GGUF's tokenizer.chat_template", ""]
    else:
        template, stops = OLLAMA_CHAT[family]
        lines += [f'TEMPLATE """{template}"""', ""]
        lines += [f'PARAMETER stop "{stop}"' for stop in stops] + [""]
    lines += ["# the decoding evaluate.py measured (howto.generate.SHIPPED_DECODING)",
              *(f"PARAMETER {name} {value:g}" for name, value in SHIPPED_DECODING.items()),
              f"PARAMETER repeat_last_n {REPEAT_LAST_N}", ""]
    lines += [f'SYSTEM """{SYSTEM_PROMPT}"""', ""]
    path = out_dir / "Modelfile"
    atomic_write_text(path, "\n".join(lines))
    return path


def _print_outputs(outputs: list[Path], modelfile: Path) -> None:
    table = Table(title="GGUF export")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path in [*outputs, modelfile]:
        table.add_row(str(path), f"{path.stat().st_size / 2**20:.1f} MiB")
    console.print(table)
