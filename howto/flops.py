"""How much of the machine a LoRA training run uses: FLOPs per token, the peak, MFU and padding waste.

Training FLOPs of a decoder-only causal LM (Llama / Mistral shape: grouped-query attention, gated MLP), counted
as nanoGPT's `estimate_mfu` and PaLM's appendix B count them: a multiply-add is 2 FLOPs, the attention scores and
the weighted sum over the full T x T matrix (the causal mask does not halve it), norms and activations left out.
Per token of a sequence of length T, with N the weights of every matrix multiply (lm_head included, the input
embedding lookup not), d the attention width (heads x head_dim), L the layers and P the LoRA adapters' weights:

    forward             2N + 2P + 4LdT
    backward (LoRA)     2N + 4P + 8LdT   frozen weights need gradients for their inputs only (1x their forward),
                                         the adapters for their inputs and weights (2x), attention for both inputs
    recomputation       2N' + 2P + 4LdT  gradient checkpointing runs each decoder layer forward again
                                         (N' = N without lm_head, which is not checkpointed)

so 4N + 6P + 12LdT per token without checkpointing (a full fine-tune would be nanoGPT's 6N + 12LdT).
tests/test_flops.py checks these counts against torch's own FlopCounterMode on a real model.

The LM head's share of N counts on the positions whose next token is trained (the answers), not on every token:
the loss needs no logits for the prompt, TRL's fused LM head (the GPU path's loss) and finetune.py's CPU loss in
one process compute none there, and like padding, work a run could skip is not work the model needed. Where an
engine computes the head on every position anyway (Unsloth's own loss, several CPU processes under DDP), the MFU
understates rather than overstates.

MFU is the achieved model FLOP/s (useful tokens only, recomputation left out, as PaLM defines it) over the peak
FLOP/s of the precision the run computes in; HFU counts the recomputation too. The peak is the GPU's rated dense
figure for the GPUs below, and on a CPU a dense matmul of the same dtype measured on the spot, on the threads the
run uses: a ratio taken on a busy machine is then partly robust, since both sides slow down. Fully robust is the same
ratio per second of CPU time the process got (the matmul's FLOPs per CPU-second against the training's), which the
benchmark reports beside it. Padding tokens count as waste, apart: the hardware computes them, the model learns
nothing from them.
"""
from __future__ import annotations

import re
import time
from typing import Any, Sequence

from howto.preflight import Architecture

# Rated dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets and architecture whitepapers:
# T4 datasheet (65 FP16 mixed precision, 8.1 FP32); A100 datasheet (312 BF16/FP16, 19.5 FP32); H100 datasheet
# (SXM 989 BF16/FP16, 67 FP32; PCIe 756, 51); H200 datasheet (989, 67: the H100 SXM chip); L4 datasheet (121, 30.3);
# Ampere GA102 whitepaper, RTX 3090 (71 FP16/BF16 with FP32 accumulate, 35.6 FP32); Ada whitepaper, RTX 4090
# (165.2 with FP32 accumulate, 82.6 FP32). The T4 has no bf16; fp32 figures are the CUDA cores' without TF32.
GPU_PEAK_TFLOPS = {
    "T4": {"fp16": 65.0, "fp32": 8.1},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
}
PEAK_MATMUL_SIZE = 1024  # large enough to run at the kernels' full rate, small enough to time in a second on 2 cores


def linear_weights(arch: Architecture) -> tuple[int, int]:
    """Weights of the decoder layers' matrix multiplies, and of lm_head's (a matmul, tied to the embeddings or not)."""
    return arch.layers * sum(i * o for i, o in arch.projections().values()), arch.hidden * arch.vocab


def lora_weights(arch: Architecture, rank: int, targets: Sequence[str]) -> int:
    """Weights of the LoRA adapters: A (inputs x r) and B (r x outputs) on each targeted projection of each layer."""
    projections = arch.projections()
    return arch.layers * sum(rank * sum(projections[t]) for t in targets if t in projections)


def training_flops(arch: Architecture, lengths: Sequence[int], rank: int, targets: Sequence[str],
                   checkpointing: bool = False, predicted: int | None = None) -> float:
    """FLOPs of one forward and backward pass of LoRA training over sequences of these (unpadded) lengths, with the
    LM head on `predicted` positions (default: every token)."""
    layers, head = linear_weights(arch)
    adapters = lora_weights(arch, rank, targets)
    tokens = sum(lengths)
    attention = 4 * arch.layers * arch.heads * arch.head_dim * sum(t * t for t in lengths)  # forward, full T x T
    total = (4 * layers + 6 * adapters) * tokens + 4 * head * (tokens if predicted is None else predicted) \
        + 3 * attention
    if checkpointing:
        total += (2 * layers + 2 * adapters) * tokens + attention
    return float(total)


def padding_waste(lengths: Sequence[int], padded_tokens: int) -> float:
    """Share of the computed token positions that were padding."""
    return 1.0 - sum(lengths) / padded_tokens if padded_tokens else 0.0


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """A known GPU's rated dense peak for the precision, in FLOP/s; None for a GPU not in the table."""
    for model in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if re.search(rf"\b{re.escape(model)}\b", name):
            tflops = GPU_PEAK_TFLOPS[model].get(precision)
            return tflops * 1e12 if tflops else None
    return None


def measured_peak_flops(precision: str, seconds: float = 1.0, size: int = PEAK_MATMUL_SIZE) -> tuple[float, float]:
    """The CPU's dense matmul rate in this dtype on torch's current threads: the best of short timed rounds in
    FLOP/s, and the FLOPs done per second of CPU time the process got (what a busy machine does not change)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: the kernel's first call picks its blocking and packs buffers
    best, rounds, cpu_start = 0.0, 0, time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
        rounds += 1
    return best, 2 * size**3 * rounds / max(time.process_time() - cpu_start, 1e-9)


def peak_flops(precision: str) -> tuple[float | None, str]:
    """The peak MFU is measured against, and where it comes from."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = gpu_peak_flops(name, precision)
        return peak, f"{name} rated {precision} peak" if peak else f"{name}: no rated peak known"
    return measured_peak_flops(precision)[0], f"{precision} matmul measured on {torch.get_num_threads()} thread(s)"


def higher_peak(*peaks: float | None) -> float | None:
    """The machine's peak is its fastest rate: contention during one of several measurements must not inflate MFU."""
    return max((p for p in peaks if p), default=None)


def watch_batches(trainer: Any) -> list[dict[str, Any]]:
    """A list that fills with every training batch the trainer computes a loss on: its lengths, its padded size and
    its positions whose next token is trained (evaluation batches, in eval mode, are left out). Seen at the
    trainer's compute_loss, which every engine's loss goes through, whichever forward it then runs."""
    batches: list[dict[str, Any]] = []
    compute_loss = trainer.compute_loss

    def watched(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
            lengths = mask.sum(dim=1).tolist() if mask is not None else [ids.shape[-1]] * ids.shape[0]
            batches.append({"lengths": [int(n) for n in lengths], "computed": int(ids.numel()),
                            "predicted": int((labels[:, 1:] != -100).sum()) if labels is not None else None})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = watched
    return batches


def usage(arch: Architecture, batches: list[dict[str, Any]], seconds: float, rank: int, targets: Sequence[str],
          checkpointing: bool, peak: float | None) -> dict[str, float | None]:
    """Achieved model FLOP/s, MFU, HFU and padding waste of training these batches in these seconds."""
    lengths = [n for batch in batches for n in batch["lengths"]]
    predicted = None if any(b.get("predicted") is None for b in batches) else sum(b["predicted"] for b in batches)
    model_flops = training_flops(arch, lengths, rank, targets, predicted=predicted)
    hardware_flops = training_flops(arch, lengths, rank, targets, checkpointing=checkpointing, predicted=predicted)
    return {"flops_per_token": model_flops / max(1, sum(lengths)), "flops_per_s": model_flops / seconds,
            "mfu": model_flops / seconds / peak if peak else None,
            "hfu": hardware_flops / seconds / peak if peak else None,
            "padding_waste": padding_waste(lengths, sum(batch["computed"] for batch in batches))}


def run_usage(model: Any, batches: list[dict[str, Any]], seconds: float, args: Any, precision: str,
              peak_before: float | None) -> dict[str, Any]:
    """A finished run's achieved FLOP/s, MFU and padding waste for its run_info.json and summary: the batches
    watch_batches saw, over the training time without evaluations, against the higher of the peaks measured (or
    rated) before training and now. The machine's peak is its fastest rate: a moment of contention during one
    measurement (seen: a third off the peak at a run's end) would otherwise inflate MFU."""
    peak_after, source = peak_flops(precision)
    peak = higher_peak(peak_before, peak_after)
    use = usage(Architecture.from_config(model.config.to_dict()), batches, seconds, args.lora_r, args.target_modules,
                bool(getattr(model, "is_gradient_checkpointing", False)), peak)
    return {"train_tflops_per_s": round(use["flops_per_s"] / 1e12, 4),
            "peak_tflops_per_s": round(peak / 1e12, 4) if peak else None, "peak_source": source,
            "mfu": None if use["mfu"] is None else round(use["mfu"], 4),
            "padding_waste": round(use["padding_waste"], 4)}
