"""Training on a CPU: what this CPU supports and what bench/train_bench.py measured decide the engine, precision,
attention and compilation (cpu_plan), whether gradient checkpointing pays, and the trainer whose loss runs on the
answer positions alone. finetune.py's GPU path needs none of it; on a CPU it takes its plan from here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from howto.preflight import architecture, estimate_memory


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="ignore").read()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.split(":", 1)[0].strip() in ("flags", "Features")), set())


def cpu_has_native_bf16() -> bool:
    """bfloat16 in hardware: AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm. Without it torch emulates
    bf16 matmuls and bf16 training runs slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


# transformers' eager attention on a CPU: see cpu_plan
CPU_ATTENTION = "eager"


def cpu_plan() -> dict[str, Any]:
    """Engine, precision, 4-bit, attention and threads for training on this CPU, from what it supports and what
    bench/train_bench.py measured (docs/benchmarks.md): on a CPU both engines train the same transformers model with
    the same kernels, at the same speed within noise, so the plain hf engine (no Unsloth import and patching); bf16
    where the CPU has it natively (more tokens/s than fp32 there); no 4-bit, since bitsandbytes dequantizes every
    layer on every step on a CPU; transformers' eager attention (two batched matmuls around a softmax), since the
    CPU kernel behind `sdpa` took a fifth of a step in its backward pass and eager made about 1.2x its tokens/s
    over a whole epoch; torch's own thread count, one a core; each decoder layer compiled by torch.compile where a
    C++ compiler is found (Inductor's CPU backend builds C++), which fuses the norms, RoPE, activations and residual
    adds that run one op at a time between the matmuls in eager mode."""
    import torch

    precision, reason = cpu_precision()
    compiler = working_cxx()
    compile_reason = (f"on (Inductor with {compiler}: fused ops between the matmuls)" if compiler else
                      "off (no working C++ compiler for Inductor: install g++ or set CXX)")
    return {"engine": "hf", "precision": precision, "four_bit": False, "attention": CPU_ATTENTION,
            "compile": compiler is not None, "compile_reason": compile_reason,
            "threads": torch.get_num_threads(), "reason": reason}


def working_cxx() -> str | None:
    """The C++ compiler Inductor would build with ($CXX, else g++), if it answers `--version` as Inductor checks it."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None
    try:
        subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return compiler


def cpu_precision() -> tuple[str, str]:
    """bf16 where the CPU computes it natively, else fp32, and why (the CPU's kernel level as torch reports it)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if cpu_has_native_bf16():
        return "bf16", f"CPU ({capability}) with native bfloat16, faster than float32 in bench/train_bench.py"
    return "fp32", f"CPU ({capability}) without native bfloat16, which torch would emulate: float32"


def checkpointing_needed(model: str, args: Any, precision: str) -> tuple[bool, str]:
    """Whether to turn gradient checkpointing on, and why. It recomputes every layer's forward pass in the backward
    pass (about a third more FLOPs a token for LoRA), which pays only where keeping every layer's activations would
    not fit. On a GPU it stays on: the 7B-on-a-T4 recipe needs it, and Unsloth's offloaded variant costs little there.
    On a CPU it is off when preflight's estimate of a step without it (at --batch-size x --max-seq-length, doubled in
    float32) takes under half the memory available now: always for a 135M model, not for a 7B one."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return True, "on (GPU: activations of every layer would not fit a 7B run on a T4)"
    arch, source = architecture(model)
    if arch is None:
        return True, f"on (memory not estimated: {source})"
    parts = estimate_memory(arch, four_bit=args.load_in_4bit, lora_r=args.lora_r, target_modules=args.target_modules,
                            batch_size=args.batch_size, seq_len=args.max_seq_length, checkpointing="off",
                            fused=False, optimizer_bytes=8)
    need = (sum(parts.values()) - parts["CUDA context and workspace"]) * (2 if precision == "fp32" else 1)
    available = psutil.virtual_memory().available
    if need < available / 2:
        return False, f"off (a step without it needs about {need / 1e9:.1f} GB of {available / 1e9:.1f} GB available)"
    return True, f"on (a step without it would need about {need / 1e9:.1f} GB of {available / 1e9:.1f} GB available)"


def compile_layers(model: Any) -> None:
    """torch.compile every decoder layer, each compiled once with dynamic shapes (a batch's length varies) and the
    same code reused by all layers: Inductor fuses the small ops between the matmuls that eager mode runs one by one
    in bf16/fp32 round trips. Compiling the whole model would unroll all its layers into one graph, which takes
    several times longer to compile. Inductor caches what it built (howto.runtime.compile_cache: beside the toolkit's
    models), so later runs start in seconds."""
    base = model.get_base_model()
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    for module in base.modules():
        if type(module).__name__ in layer_classes:
            module.compile(dynamic=True)


def cpu_sft_trainer(compiled: bool) -> type:
    """SFTTrainer whose loss is computed, as TRL's fused LM head computes it, on the answer positions alone.

    TRL 1.x projects through the LM head only the positions whose next token has a label, in a fused kernel that is
    Triton's, which has no CPU backend; Unsloth's CPU fallback routes it to a CPU kernel, the plain hf engine on a
    CPU needs this instead. The prompt's positions (about half of the loop's) then cost no LM head and no
    log-softmax over the vocabulary; with `compiled` the cross-entropy is compiled too, so its float32 logits are
    never written out whole.
    """
    import torch
    import torch.nn.functional as F
    from transformers import Trainer
    from trl import SFTTrainer

    def summed_cross_entropy(hidden: Any, weight: Any, targets: Any) -> Any:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")

    head_loss = torch.compile(summed_cross_entropy, dynamic=True) if compiled else summed_cross_entropy

    class CPUSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            # The logits asked for, or a model wrapped for several processes (DDP), whose own forward prepares the
            # gradients' all-reduce: the model's own forward over every position
            if return_outputs or model is not self.accelerator.unwrap_model(model):
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            causal_lm = model.get_base_model()
            targets = inputs["labels"][:, 1:]  # position t predicts token t + 1
            answer = targets != -100
            # accelerate's mixed precision wraps the model's own forward, which this bypasses: without it the fp32
            # LoRA weights would pull their matmuls to fp32
            with self.accelerator.autocast():
                hidden = causal_lm.base_model(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
                loss = head_loss(hidden[:, :-1][answer], causal_lm.get_output_embeddings().weight, targets[answer])
            loss = loss / (answer.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the gradients
            return loss

    return CPUSFTTrainer
