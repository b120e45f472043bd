"""The preflight: what finetune.py checks in a minute on a CPU, before any weights load, so that a run which cannot
work fails now rather than at step 300.

- memory: peak GPU memory estimated from the architecture alone (Mistral-7B-v0.3's is bundled, so no hub), the
  engine, 4-bit or 16-bit weights, LoRA rank, batch size and sequence length, against the GPU found or
  `--gpu-memory`; too big is one line naming the flags to turn down.
- tools: with `--export gguf`, llama.cpp's converter and quantizer are found (fetched once) now, not after training.
- examples: one training example shown token by token, trained or masked, and checks over every record: exactly one
  BOS, the answer's EOS trained, padding never trained, a trained share strictly between 0% and 100%, every record
  within `--max-seq-length`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from howto import models
from howto.runio import RunError, atomic_write_text

GB = 1e9  # GPUs are sold in GB: a T4 is "16 GB"
MISTRAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mistral-7b-v0.3.json"
BUNDLED_CONFIGS = {models.DEFAULT_MODEL: MISTRAL_CONFIG, models.UNSLOTH_4BIT[models.DEFAULT_MODEL]: MISTRAL_CONFIG}
# NF4 with double quantization: 4 bits a weight, plus an 8-bit absmax per block of 64 and an fp32 constant per 256
# blocks (the QLoRA paper's 0.127 bits a parameter).
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# CUDA context, cuBLAS workspace and allocator slack: memory the card loses that no tensor accounts for.
RUNTIME_BYTES = 0.75 * GB
# TRL's and Unsloth's fused LM heads compute the loss over tiles of the logits, never all of them: counted as the
# vocabulary-sized rows of this many tokens (16-bit logits, fp32 log-probabilities and their gradient).
LOSS_CHUNK_TOKENS = 1024
ERROR_SHOWN = 20


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama/Mistral-style decoder, read from its config.json."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Architecture:
        heads = int(c["num_attention_heads"])
        return cls(hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
                   intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
                   tied=bool(c.get("tie_word_embeddings", False)))

    def projections(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each linear layer of one decoder block."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def architecture(model: str) -> tuple[Architecture | None, str]:
    """The model's shape and where it came from: the bundled config (Mistral-7B-v0.3), the folder's own config.json,
    or the hub cache; never a download."""
    source = BUNDLED_CONFIGS.get(model)
    if source is None and Path(model).is_dir():
        source = Path(model) / "config.json"
    if source is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        source = Path(cached) if isinstance(cached, str) else None
    if source is None or not source.is_file():
        return None, f"no config.json for {model} on this machine"
    try:
        return Architecture.from_config(json.loads(source.read_text(encoding="utf-8"))), str(source)
    except (KeyError, TypeError, ValueError) as e:
        return None, f"{source}: not a Llama/Mistral-style decoder ({e})"


def estimate_memory(arch: Architecture, *, four_bit: bool, lora_r: int, target_modules: list[str], batch_size: int,
                    seq_len: int, checkpointing: str, fused: bool, optimizer_bytes: int) -> dict[str, float]:
    """Peak GPU memory of one training step, in bytes, by part.

    `checkpointing` is "offload" (Unsloth keeps each layer's input in CPU memory), "on" (each layer's input stays on
    the GPU and the layer is recomputed in the backward pass) or "off" (every layer's activations are kept).
    Activations are counted in 16-bit for a SwiGLU block with fused attention (no sequence-squared scores), whose
    backward holds one layer's recomputed activations and the gradients of its MLP. `fused` is Unsloth's kernels:
    RoPE, RMSNorm and SwiGLU in place, so a layer keeps fewer tensors. The loss is fused over tiles of the
    vocabulary-sized logits (TRL's and Unsloth's fused LM heads). The LoRA weights and their gradients are fp32, the
    optimizer's two moments `optimizer_bytes` a parameter in all (2 for 8-bit AdamW, 8 for fp32 AdamW).
    """
    h, i, layers = arch.hidden, arch.intermediate, arch.layers
    shapes = arch.projections()
    linear = layers * sum(a * b for a, b in shapes.values())
    other = arch.vocab * h * (1 if arch.tied else 2) + layers * 2 * h + h  # embeddings, head, norms: 16-bit
    weights = linear * (NF4_BYTES if four_bit else 2) + other * 2
    lora = layers * lora_r * sum(a + b for name, (a, b) in shapes.items() if name in target_modules)
    tokens = batch_size * seq_len
    kv = arch.kv_heads * arch.head_dim
    if fused:  # norm outputs, q, k, v, attention out, residuals; gate, up and their product
        saved_per_layer, backward_extra = 2 * (5 * h + 2 * kv + 3 * i), 2 * 2 * i
    else:  # norm inputs and outputs, q/k/v and rotated q/k, attention out; gate, up, activation, product
        saved_per_layer, backward_extra = 2 * (8 * h + 3 * kv + 4 * i), 2 * 3 * i  # + the MLP's gradients
    if checkpointing == "off":
        activations = tokens * (layers * saved_per_layer + backward_extra)
    else:
        kept = 2 * h * (2 if checkpointing == "offload" else layers)  # layer inputs on the GPU
        activations = tokens * (kept + saved_per_layer + backward_extra)
    loss = min(tokens, LOSS_CHUNK_TOKENS) * arch.vocab * (2 + 4 + 4) + tokens * h * 2 * 2
    return {
        "base weights": weights,
        "LoRA adapter, gradients, optimizer": lora * (4 + 4 + optimizer_bytes),
        "activations": activations,
        "logits and loss": loss,
        "CUDA context and workspace": RUNTIME_BYTES,
    }


def estimate_for(arch: Architecture, args: Any) -> dict[str, float]:
    """estimate_memory for finetune.py's settings (engine, load_in_4bit, lora_r, target_modules, batch_size,
    max_seq_length), with 8-bit AdamW as on a GPU: Unsloth offloads its checkpointed activations and fuses its
    kernels, the hf engine keeps them on the GPU."""
    unsloth = args.engine == "unsloth"
    return estimate_memory(arch, four_bit=args.load_in_4bit, lora_r=args.lora_r, target_modules=args.target_modules,
                           batch_size=args.batch_size, seq_len=args.max_seq_length,
                           checkpointing="offload" if unsloth else "on", fused=unsloth, optimizer_bytes=2)


def gpu_budget(gpu_memory: float | None, dry_run: bool = False) -> tuple[float | None, str]:
    """The memory to fit in: the GPU found, or --gpu-memory when that is smaller (a profile for a smaller card).
    --gpu-memory above the GPU found counts only in a --dry-run, which plans a run for another card: a real run
    loads on this one, and a profile for a larger card (configs/a100_80.yaml on a T4) must stop here, not at load."""
    import torch

    given = (gpu_memory * GB, f"the {gpu_memory:g} GB of --gpu-memory") if gpu_memory else None
    if not torch.cuda.is_available():
        return given or (None, "no GPU found and no --gpu-memory given")
    props = torch.cuda.get_device_properties(0)
    card = (float(props.total_memory), f"the {props.total_memory / GB:.1f} GB of the {props.name}")
    if given is None or given[0] <= card[0] or dry_run:
        return given or card
    return card[0], f"{card[1]} found (--gpu-memory {gpu_memory:g} counts only in a --dry-run)"


def check_memory(model: str, args: Any, console: Console) -> None:
    """The estimate for finetune.py's settings against gpu_budget; exit naming the flags to turn down when it does
    not fit."""
    arch, source = architecture(model)
    if arch is None:
        console.print(f"memory: not estimated ({source})")
        return
    parts = estimate_for(arch, args)
    total = sum(parts.values())
    console.print(f"memory estimate for {Path(model).name}, {args.engine} engine, {4 if args.load_in_4bit else 16}-bit "
                  f"weights, LoRA r={args.lora_r}, {args.batch_size} x {args.max_seq_length} tokens ({source}):")
    table = Table(title="Estimated peak GPU memory", title_justify="left")
    table.add_column("part")
    table.add_column("GB", justify="right")
    for name, value in parts.items():
        table.add_row(name, f"{value / GB:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{total / GB:.2f}[/]")
    console.print(table)
    budget, where = gpu_budget(args.gpu_memory, args.dry_run)
    if budget is None:
        console.print(f"memory: {where}: not checked")
    elif total <= budget:
        console.print(f"memory: the estimated {total / GB:.1f} GB fit in {where}")
    else:
        raise RunError(f"the run needs about {total / GB:.1f} GB of GPU memory, more than {where}: turn down "
                       f"{flags_to_turn_down(parts, args)}")


def flags_to_turn_down(parts: dict[str, float], args: Any) -> str:
    """The settings whose parts are large, with their present values."""
    flags = []
    if parts["activations"] + parts["logits and loss"] > 0.2 * sum(parts.values()):
        flags += [f"--batch-size (now {args.batch_size}; raise --grad-accum to keep the effective batch)",
                  f"--max-seq-length (now {args.max_seq_length})"]
    if parts["LoRA adapter, gradients, optimizer"] > 1 * GB:
        flags.append(f"--lora-r (now {args.lora_r})")
    if not args.load_in_4bit:
        flags.append("--load-in-4bit (16-bit weights now)")
    return ", ".join(flags) or "--batch-size, --max-seq-length, --lora-r"


# ---------------------------------------------------------------------------------------------------------------
# Export tools
# ---------------------------------------------------------------------------------------------------------------

def check_gguf_tools(llama_cpp: str | None, console: Console) -> None:
    """llama.cpp's converter (the folder given, or the sources fetched once and cached) and its quantizer."""
    from howto.export import CONVERTER, llama_cpp_dir

    try:
        folder = llama_cpp_dir(llama_cpp)
        import llama_cpp as binding
    except (OSError, RuntimeError, ImportError) as e:
        raise RunError(f"--export gguf: llama.cpp's tools cannot be had now ({str(e).splitlines()[0]}); "
                         "pass --llama-cpp DIR (a llama.cpp checkout) or drop --export gguf") from None
    if not hasattr(binding, "llama_model_quantize"):
        raise RunError("--export gguf: the installed llama-cpp-python has no quantizer "
                         "(llama_model_quantize); pip install -r requirements.txt")
    console.print(f"GGUF export: converter {folder / CONVERTER}, quantizer llama-cpp-python {binding.__version__}")


# ---------------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = True


def where(record: dict[str, Any]) -> str:
    return f"{record['file']}:{record['line']} ({record['split']})"


def leading(ids: list[int], token: int) -> int:
    n = 0
    while n < len(ids) and ids[n] == token:
        n += 1
    return n


def check_examples(tokenizer: Any, records: list[dict[str, Any]], encoded: list[dict[str, list[int]]],
                   max_len: int, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> list[Check]:
    """The checks over every record's tokens (as training sees them, before --max-seq-length cuts them)."""
    pairs = list(zip(records, encoded, strict=True))
    checks = []

    bos = tokenizer.bos_token_id
    if bos is None:
        checks.append(Check("one BOS", True, "the tokenizer has no BOS token"))
    else:
        bad = [(r, leading(e["input_ids"], bos)) for r, e in pairs if leading(e["input_ids"], bos) != 1]
        checks.append(Check("one BOS", not bad, f"every record starts with exactly one {tokenizer.bos_token}" if not bad
                            else f"{len(bad)} record(s) start with {bad[0][1]} BOS tokens, e.g. {where(bad[0][0])}"))

    eos = tokenizer.eos_token_id
    bad = [r for r, e in pairs if e["input_ids"][-1] != eos or e["completion_mask"][-1] != 1]
    checks.append(Check("answer's EOS trained", not bad, f"every answer ends with a trained {tokenizer.eos_token}"
                        if not bad else f"{len(bad)} record(s) do not end with a trained {tokenizer.eos_token} "
                                        f"(id {eos}), e.g. {where(bad[0])}: the model would never learn to stop"))

    checks.append(check_padding(encoded, collate))

    trained = sum(sum(e["completion_mask"]) for e in encoded)
    total = sum(len(e["input_ids"]) for e in encoded)
    none = [r for r, e in pairs if not any(e["completion_mask"])]
    every = [r for r, e in pairs if all(e["completion_mask"])]
    detail = f"{trained / total:.0%} of {total:,} tokens trained (answers and EOS), the prompts masked"
    if none:
        detail = f"{len(none)} record(s) train on no token (all labels masked), e.g. {where(none[0])}"
    elif every:
        detail = f"{len(every)} record(s) train on every token, prompt included, e.g. {where(every[0])}"
    checks.append(Check("trained share", 0 < trained < total and not none and not every, detail))

    checks.extend(check_lengths(pairs, max_len))
    return checks


def check_padding(encoded: list[dict[str, list[int]]], collate: Callable[[list[dict[str, Any]]], Any]) -> Check:
    """The shortest and the longest record batched by the trainer's collator, with labels built from
    completion_mask as SFTTrainer's dataset preparation builds them: padding must get label -100."""
    pair = [min(encoded, key=lambda e: len(e["input_ids"])), max(encoded, key=lambda e: len(e["input_ids"]))]
    batch = collate([{"input_ids": e["input_ids"],
                      "labels": [i if m else -100 for i, m in zip(e["input_ids"], e["completion_mask"], strict=True)]}
                     for e in pair])
    labels, attention = batch["labels"].tolist(), batch["attention_mask"].tolist()
    padded = sum(a == 0 for row in attention for a in row)
    trained_pads = sum(a == 0 and label != -100 for lrow, arow in zip(labels, attention, strict=True)
                       for label, a in zip(lrow, arow, strict=True))
    if trained_pads:
        return Check("padding never trained", False, f"{trained_pads} of {padded} padding positions carry a label")
    return Check("padding never trained", True, f"{padded} padding positions in a test batch, all labelled -100"
                 if padded else "records of one length: no padding")


def check_lengths(pairs: list[tuple[dict[str, Any], dict[str, list[int]]]], max_len: int) -> list[Check]:
    """Records whose prompt alone fills --max-seq-length would train on nothing (an error); longer ones lose their
    last steps and EOS (a warning: prepare_data.py with the same --max-seq-length drops or cuts them)."""
    cut = [(r, e["completion_mask"].index(1)) for r, e in pairs if 1 in e["completion_mask"]
           and e["completion_mask"].index(1) >= max_len]
    longer = {}
    for r, e in pairs:
        if len(e["input_ids"]) > max_len:
            longer[r["split"]] = longer.get(r["split"], 0) + 1
    checks = []
    if cut:
        lines = [f"  {where(r)}: prompt of {n} tokens: {r['prompt'][:100]!r}" for r, n in cut[:ERROR_SHOWN]]
        more = [f"  ... and {len(cut) - ERROR_SHOWN} more"] if len(cut) > ERROR_SHOWN else []
        checks.append(Check("within --max-seq-length", False,
                            f"{len(cut)} record(s) would train on no token: their prompt alone fills --max-seq-length "
                            f"{max_len}, so every step would be cut off. Raise --max-seq-length or shorten them:\n"
                            + "\n".join(lines + more)))
    if longer:
        checks.append(Check("within --max-seq-length", False, "; ".join(
            f"{n} {split} record(s) are longer than --max-seq-length {max_len}: their last steps and end-of-turn "
            "token are cut" for split, n in longer.items()), fatal=False))
    if not cut and not longer:
        checks.append(Check("within --max-seq-length", True, f"every record fits in {max_len} tokens"))
    return checks


def token_view(tokenizer: Any, example: dict[str, list[int]]) -> tuple[Text, str]:
    """The example's tokens coloured by role (terminal), and one line a token (the file)."""
    ids, mask = example["input_ids"], example["completion_mask"]
    pieces = [tokenizer.decode([i]) for i in ids]  # each id alone: special tokens by name
    text = Text()
    for piece, trained in zip(pieces, mask, strict=True):
        text.append(piece.replace("\n", "\\n\n"), style="bold black on green" if trained else "dim")
        text.append("|", style="grey50")
    lines = ["position\tid\tlabel\ttoken"]
    lines += [f"{n}\t{i}\t{'trained' if m else 'masked'}\t{p!r}" for n, (i, m, p) in enumerate(zip(ids, mask, pieces))]
    return text, "\n".join(lines) + "\n"


def show_examples(tokenizer: Any, records: list[dict[str, Any]], encoded: list[dict[str, list[int]]], max_len: int,
                  collate: Callable[[list[dict[str, Any]]], Any], console: Console) -> str:
    """The token view of the first training record and the checks table; exit on a failed check. Returns the
    token list for the run folder."""
    text, listing = token_view(tokenizer, encoded[0])
    trained = sum(encoded[0]["completion_mask"])
    console.rule(f"One training example, {where(records[0])}: {len(encoded[0]['input_ids'])} tokens, "
                 f"{trained} trained (green), the rest masked (dim)")
    console.print(text, soft_wrap=True)
    checks = check_examples(tokenizer, records, encoded, max_len, collate)
    table = Table(title="Preflight checks", title_justify="left")
    for column in ("check", "", "detail"):
        table.add_column(column)
    for c in checks:
        mark = "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.fatal else "[yellow]warn[/]")
        table.add_row(c.name, mark, c.detail.split("\n")[0])
    console.print(table)
    for c in checks:
        if not c.ok and not c.fatal:
            console.print(f"[yellow]warning: {c.detail}[/]")
    failed = [c for c in checks if not c.ok and c.fatal]
    if failed:
        raise RunError("preflight: " + "\n".join(c.detail for c in failed))
    return listing


def save(console: Console, listing: str, out_dir: Path) -> Path:
    """What the preflight printed, then the example's tokens one a line, in OUT/preflight.txt."""
    path = out_dir / "preflight.txt"
    atomic_write_text(path, console.export_text(clear=False) + "\nThe example's tokens:\n" + listing)
    return path
