"""Every decision the scripts make only on a GPU, on simulated cards: torch is made to report a T4, an RTX 3090 or
4090, an A100 40 or 80 GB or an H100 (name, compute capability, memory), and each decision is checked against what
that card needs. No GPU is touched and no model is loaded, except one tiny merge for the export's dtype.

torch.cuda.is_bf16_supported() is patched too, in both of the states a real process can find it in: torch's own
(its default counts emulation, so a T4 answers True) and Unsloth's replacement (imported first, it answers False
there). The toolkit's answer must not depend on which.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

import finetune
from howto import device, flops, metrics, models, preflight, runio
from howto.runio import RunError

ALL_CONFIGS = {"t4", "rtx24", "a100_80"}
SMALL_CONFIGS = {"t4", "rtx24"}


@dataclass(frozen=True)
class Card:
    name: str
    capability: tuple[int, int]
    memory: int  # bytes, as torch reports total_memory: a little under the size the card is sold as
    precision: str
    peak_tflops: float | None  # the rated dense peak of that precision (howto.flops' table)
    fits: dict[str, set[str]]  # engine -> the bundled configs whose estimate fits the card
    rocm_arch: str | None = None


CARDS = [
    Card("Tesla T4", (7, 5), 15_835_660_288, "fp16", 65.0, {"unsloth": SMALL_CONFIGS, "hf": SMALL_CONFIGS}),
    Card("NVIDIA GeForce RTX 3090", (8, 6), 25_438_126_080, "bf16", 71.0,
         {"unsloth": ALL_CONFIGS, "hf": SMALL_CONFIGS}),
    Card("NVIDIA GeForce RTX 4090", (8, 9), 25_393_692_672, "bf16", 165.2,
         {"unsloth": ALL_CONFIGS, "hf": SMALL_CONFIGS}),
    Card("NVIDIA A100-SXM4-40GB", (8, 0), 42_505_273_344, "bf16", 312.0,
         {"unsloth": ALL_CONFIGS, "hf": SMALL_CONFIGS}),
    Card("NVIDIA A100-SXM4-80GB", (8, 0), 85_089_566_720, "bf16", 312.0, {"unsloth": ALL_CONFIGS, "hf": ALL_CONFIGS}),
    Card("NVIDIA H100 80GB HBM3", (9, 0), 85_045_526_528, "bf16", 989.0, {"unsloth": ALL_CONFIGS, "hf": ALL_CONFIGS}),
]
ROCM_CARDS = [
    Card("AMD Instinct MI250X", (9, 0), 68_702_699_520, "bf16", None, {}, rocm_arch="gfx90a:sramecc+:xnack-"),
    Card("AMD Radeon RX 6800 XT", (10, 3), 17_163_091_968, "fp16", None, {}, rocm_arch="gfx1030"),
]
IMPORT_ORDERS = {
    "torch's own is_bf16_supported (emulation counts)": lambda card: lambda including_emulation=True: True,
    "Unsloth's, imported first": lambda card: lambda including_emulation=False: card.capability >= (8, 0),
}


def simulate(monkeypatch: pytest.MonkeyPatch, card: Card, import_order: str) -> None:
    """torch reports `card` as device 0, and is_bf16_supported answers as it would after `import_order`."""
    props = SimpleNamespace(name=card.name, major=card.capability[0], minor=card.capability[1],
                            total_memory=card.memory, multi_processor_count=108, gcnArchName=card.rocm_arch or "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card.name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: card.capability)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card.memory - 2**30, card.memory))
    monkeypatch.setattr(torch.version, "hip", "6.4.0" if card.rocm_arch else None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", IMPORT_ORDERS[import_order](card))


@pytest.fixture(params=CARDS, ids=[c.name for c in CARDS])
def card(request) -> Card:
    return request.param


@pytest.fixture(params=list(IMPORT_ORDERS), ids=["torch-first", "unsloth-first"])
def import_order(request) -> str:
    return request.param


def finetune_args(*flags: str) -> argparse.Namespace:
    return finetune.parse(["--data", "DATA", "--out", "OUT", *flags])


def test_precision_for_training_generation_nf4_and_the_run_record(card, import_order, monkeypatch):
    simulate(monkeypatch, card, import_order)
    dtype = models.torch_dtype(card.precision)
    for engine in ("unsloth", "hf"):
        precision, why = finetune.choose_precision(engine)
        assert precision == card.precision and card.name in why
        assert ("supports bfloat16" if precision == "bf16" else "has no bfloat16") in why
        assert f"compute capability {card.capability[0]}.{card.capability[1]}" in why
        training = finetune.hf_load_kwargs(finetune_args("--engine", engine), precision)
        assert training["dtype"] == dtype and training["quantization_config"].bnb_4bit_compute_dtype == dtype
        assert training["quantization_config"].bnb_4bit_quant_storage == torch.uint8
        assert training["device_map"] == {"": 0}
        sft = finetune.sft_config_kwargs(finetune_args("--engine", engine), Path("OUT"), precision, 10)
        assert (sft["bf16"], sft["fp16"], sft["use_cpu"]) == (card.precision == "bf16", card.precision == "fp16",
                                                              False)
        assert sft["optim"] == {"unsloth": "adamw_8bit", "hf": "paged_adamw_8bit"}[engine]
    assert models.compute_dtype() == dtype
    generation = models.generation_load_kwargs()
    assert generation["dtype"] == dtype and generation["device_map"] == "auto"
    nf4 = generation["quantization_config"]
    assert (nf4.load_in_4bit, nf4.bnb_4bit_quant_type, nf4.bnb_4bit_compute_dtype) == (True, "nf4", dtype)
    info = runio.gpu_info()
    assert info == {"gpu": card.name, "gpu_memory_gib": round(card.memory / 2**30, 1),
                    "gpu_capability": f"{card.capability[0]}.{card.capability[1]}",
                    "bf16_supported": card.precision == "bf16"}


def test_the_t4_is_fp16_whatever_was_imported_first(monkeypatch):
    """The bug this pins: torch 2.14's is_bf16_supported() says True on a T4 (it can hold a bf16 tensor)."""
    t4 = CARDS[0]
    for import_order in IMPORT_ORDERS:
        simulate(monkeypatch, t4, import_order)
        assert torch.cuda.is_bf16_supported() is (import_order == next(iter(IMPORT_ORDERS)))  # the trap is set
        assert not models.gpu_has_bf16()
        assert models.choose_precision("hf")[0] == models.choose_precision("unsloth")[0] == "fp16"
        assert models.compute_dtype() == torch.float16
        assert models.generation_load_kwargs()["quantization_config"].bnb_4bit_compute_dtype == torch.float16
        assert runio.gpu_info()["bf16_supported"] is False


@pytest.mark.parametrize("card", ROCM_CARDS, ids=[c.name for c in ROCM_CARDS])
def test_rocm_cards_have_bf16_except_rdna_1_and_2(card, monkeypatch):
    simulate(monkeypatch, card, next(iter(IMPORT_ORDERS)))
    precision, why = models.choose_precision("hf")
    assert precision == card.precision and "ROCm" in why
    assert models.compute_dtype() == models.torch_dtype(card.precision)


def test_the_other_gpu_only_decisions(card, monkeypatch):
    simulate(monkeypatch, card, next(iter(IMPORT_ORDERS)))
    from trl import SFTTrainer

    assert models.default_model() == "mistral"
    assert metrics._device() == "cuda"  # BERTScore's encoder
    for engine in ("unsloth", "hf"):
        args = finetune_args("--engine", engine)
        assert finetune.trainer_class(args) is SFTTrainer  # TRL's fused LM head; CPUSFTTrainer is the CPU's
        assert finetune.compile_wanted(args) == (False, "off (GPU or Unsloth engine: their own kernels)")
        on, why = device.checkpointing_needed(models.DEFAULT_MODEL, args, card.precision)
        assert on and why.startswith("on (GPU")
    peak, source = flops.peak_flops(card.precision)
    assert peak == card.peak_tflops * 1e12 and source == f"{card.name} rated {card.precision} peak"


@pytest.mark.parametrize("engine", ["unsloth", "hf"])
def test_preflight_memory_verdict_for_the_bundled_configs(card, engine, monkeypatch):
    """A profile's gpu_memory is what it was written for; a real run is checked against the card it will load on."""
    simulate(monkeypatch, card, next(iter(IMPORT_ORDERS)))
    for config in sorted(ALL_CONFIGS):
        args = finetune_args("--config", f"configs/{config}.yaml", "--engine", engine)
        console = Console(record=True, width=200)
        if config in card.fits[engine]:
            preflight.check_memory(models.DEFAULT_MODEL, args, console)
            assert "memory: the estimated" in console.export_text()
        else:
            with pytest.raises(RunError, match=rf"more than the {card.memory / 1e9:.1f} GB of the {card.name} "
                                                 rf"found \(--gpu-memory 80 counts only in a --dry-run\)"):
                preflight.check_memory(models.DEFAULT_MODEL, args, console)


def test_a_dry_run_plans_for_the_profiles_card_on_a_smaller_one(monkeypatch):
    simulate(monkeypatch, CARDS[0], next(iter(IMPORT_ORDERS)))
    console = Console(record=True, width=200)
    preflight.check_memory(models.DEFAULT_MODEL, finetune_args("--config", "configs/a100_80.yaml", "--dry-run"),
                           console)
    assert "fit in the 80 GB of --gpu-memory" in console.export_text()
    console = Console(record=True, width=200)  # a smaller --gpu-memory than the card: the tighter one counts
    preflight.check_memory(models.DEFAULT_MODEL, finetune_args("--gpu-memory", "8"), console)
    assert "fit in the 8 GB of --gpu-memory" in console.export_text()


def test_the_full_size_bench_rows_compute_in_the_cards_precision(card, monkeypatch):
    simulate(monkeypatch, card, next(iter(IMPORT_ORDERS)))
    import bench.train_bench as train_bench

    rows = train_bench.plan_cases(argparse.Namespace(full_size=True))
    assert [(r["engine"], r["precision"], r["four_bit"]) for r in rows] == [
        ("unsloth", card.precision, True), ("hf", card.precision, True)]


def test_the_installed_torch_has_kernels_for_every_card():
    """A CUDA build without sm_75 would leave the T4 out whatever the decisions say; 8.9 runs 8.6's kernels."""
    arch_flags = getattr(torch._C, "_cuda_getArchFlags", None)
    if arch_flags is None or not arch_flags():
        pytest.skip("a CPU-only torch build")
    digits = [flag.removeprefix("sm_").rstrip("af") for flag in arch_flags().split() if flag.startswith("sm_")]
    built = {(int(d[:-1]), int(d[-1])) for d in digits}
    for card in CARDS:
        major, minor = card.capability
        assert any(b[0] == major and b[1] <= minor for b in built), f"{card.name}: no sm_{major}x kernels in {built}"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     task_type="CAUSAL_LM")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("card", [CARDS[0], CARDS[-1]], ids=[CARDS[0].name, CARDS[-1].name])
def test_the_merged_export_is_fp16_on_every_card(card, monkeypatch, tiny_model, adapter, tmp_path):
    """fp16 whether training ran in fp16 (T4) or bf16: llama.cpp converts fp16 without loss, and the merge streams
    shards on the CPU, so the card never decides it."""
    from safetensors import safe_open

    from howto.export import export_merged

    simulate(monkeypatch, card, next(iter(IMPORT_ORDERS)))
    merged = export_merged(tiny_model, adapter, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float16"
    with safe_open(merged / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}
