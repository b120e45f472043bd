"""The CPU training plan: precision from the CPU's own bf16, gradient checkpointing only where memory needs it."""
from __future__ import annotations

import pytest

from howto import device

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_checkpointing_only_where_memory_needs_it(monkeypatch, smollm2_model):
    """Off for SmolLM2 on a CPU with memory to spare, on when the memory available would not hold a step without it,
    on for any model on a GPU; the estimate is preflight's, at --batch-size x --max-seq-length."""
    import argparse
    from collections import namedtuple

    import psutil
    import torch

    args = argparse.Namespace(load_in_4bit=False, lora_r=16, target_modules=TARGETS, batch_size=8, max_seq_length=384)
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(16e9))
    assert device.checkpointing_needed(smollm2_model, args, "fp32")[0] is False
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(8e9))
    on, why = device.checkpointing_needed(smollm2_model, args, "fp32")
    assert on and "GB" in why
    assert device.checkpointing_needed(smollm2_model, args, "bf16")[0] is False  # half the bytes of fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.checkpointing_needed(smollm2_model, args, "bf16")[0] is True


@pytest.mark.parametrize("flags, precision", [({"avx2", "avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                              ({"avx2", "fma"}, "fp32"), (set(), "fp32")])
def test_cpu_precision_follows_native_bf16(monkeypatch, flags, precision):
    """bf16 only where the CPU has it in hardware (an AVX2-only EPYC trains in fp32); the plan never picks 4-bit."""
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    assert device.cpu_precision()[0] == precision
    plan = device.cpu_plan()
    assert plan["precision"] == precision and plan["four_bit"] is False and plan["engine"] == "hf"
    assert plan["attention"] == "eager"
