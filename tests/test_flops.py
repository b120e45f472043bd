"""howto.flops against torch's own count: a real Mistral-architecture model with LoRA adapters, one forward and
backward pass under torch.utils.flop_counter.FlopCounterMode, with and without gradient checkpointing. The model
uses eager attention (plain matmuls): the counter has no formula for the CPU's fused SDPA kernel and would leave the
attention out, where the eager path lets it check the T x T terms too."""
from __future__ import annotations

import pytest

from howto import chat, flops
from howto.preflight import Architecture

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8


def lora_model(checkpointing: bool, targets: list[str] = TARGETS):
    """A small Mistral (grouped-query attention, gated MLP, untied lm_head) with peft's LoRA, as finetune.py's hf
    engine builds it: frozen weights, adapters trainable, inputs that require gradients under checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    return model, config


def torch_count(model, batch: int, length: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_flops_match_torchs_count(checkpointing):
    model, config = lora_model(checkpointing)
    counted = torch_count(model, batch=2, length=96)
    arch = Architecture.from_config(config.to_dict())
    ours = flops.training_flops(arch, [96, 96], RANK, TARGETS, checkpointing=checkpointing)
    assert ours == pytest.approx(counted, rel=0.02)


def test_lora_on_some_projections_and_a_longer_sequence():
    """Attention grows with the square of the length, the adapters with their targets: both must be counted."""
    targets = ["q_proj", "v_proj"]
    model, config = lora_model(checkpointing=False, targets=targets)
    counted = torch_count(model, batch=1, length=200)
    arch = Architecture.from_config(config.to_dict())
    ours = flops.training_flops(arch, [200], RANK, targets)
    assert ours == pytest.approx(counted, rel=0.02)
    shorter = flops.training_flops(arch, [100, 100], RANK, targets)
    assert shorter < ours  # same tokens, half the attention context


def test_recomputation_adds_a_forward_of_the_decoder_layers():
    arch = Architecture.from_config(lora_model(False)[1].to_dict())
    plain = flops.training_flops(arch, [64], RANK, TARGETS)
    again = flops.training_flops(arch, [64], RANK, TARGETS, checkpointing=True)
    assert plain < again < plain * 1.5  # a forward is about a third of a full-training step, less the lm_head


def test_padding_waste_counts_pad_positions():
    assert flops.padding_waste([10, 30], padded_tokens=60) == pytest.approx(1 / 3)
    assert flops.padding_waste([10, 30], padded_tokens=40) == 0.0


@pytest.mark.parametrize("name, precision, tflops", [
    ("Tesla T4", "fp16", 65.0), ("Tesla T4", "bf16", None), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA L4", "bf16", 121.0), ("NVIDIA L40S", "bf16", None), ("NVIDIA GeForce RTX 4090", "fp32", 82.6),
])
def test_gpu_rated_peaks(name, precision, tflops):
    peak = flops.gpu_peak_flops(name, precision)
    assert peak == (pytest.approx(tflops * 1e12) if tflops else None)


def test_mfu_takes_the_higher_of_the_peaks_measured():
    """A peak measured during a moment of contention is lower than the machine's: the higher one counts, and a
    missing one (no rated peak for a GPU) is left out."""
    assert flops.higher_peak(253e9, 410e9) == flops.higher_peak(410e9, None) == 410e9
    assert flops.higher_peak(None, None) is None


def test_cpu_peak_is_measured_and_plausible():
    """A dense fp32 matmul timed on the spot: a rate between 0.1 GFLOP/s and 100 TFLOP/s, not a constant, and per
    CPU-second no more than the threads can give in a second of wall time."""
    import torch

    best, per_cpu_second = flops.measured_peak_flops("fp32", seconds=0.2, size=256)
    assert 1e8 < best < 1e14
    assert 1e8 < per_cpu_second < best * 1.5
    assert per_cpu_second * torch.get_num_threads() > best * 0.2


def test_batches_of_similar_lengths_keep_the_loss_mask_and_cut_padding(tmp_path):
    """finetune.py's trainer draws batches of similar lengths (TRL/transformers' group_by_length): in every batch its
    own dataloader makes, the prompt and the padding are masked out of the loss and every assistant token is in it,
    and less of each batch is padding than in random order."""
    import torch
    from test_finetune import TINY, TRAIN_APPS, VAL_APPS, build_trainer, howto_records, write_split

    data = tmp_path / "data"
    records = howto_records(TRAIN_APPS)
    for i, record in enumerate(records):  # lengths that differ enough for the order to matter
        record["response"] = record["response"] + [f"Check step {j} again" for j in range(i % 7)]
    write_split(data, "train", records)
    write_split(data, "val", howto_records(VAL_APPS)[:4])
    trainer, tokenizer = build_trainer(["--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf",
                                        "--batch-size", "4"])
    assert trainer.args.train_sampling_strategy == "group_by_length"
    limit = trainer.args.max_length  # TINY's --max-seq-length cuts the longest records' last steps
    encoded = [chat.encode_example(tokenizer, r["prompt"], r["response"]) for r in records]
    masks = {tuple(e["input_ids"][:limit]): e["completion_mask"][:limit] for e in encoded}

    def waste(loader) -> float:
        batches = [{"lengths": b["attention_mask"].sum(dim=1).tolist(), "computed": b["input_ids"].numel()}
                   for b in loader]
        return flops.padding_waste([n for b in batches for n in b["lengths"]], sum(b["computed"] for b in batches))

    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(attention.sum())
            mask = torch.tensor(masks[tuple(ids[:n].tolist())])
            assert torch.equal(labels[:n], torch.where(mask.bool(), ids[:n], -100))  # prompt out, every step in
            assert (labels[n:] == -100).all() and (attention[n:] == 0).all()  # padding never trained
            seen += 1
    assert seen == len(trainer.train_dataset)
    grouped = waste(trainer.get_train_dataloader())
    trainer.args.train_sampling_strategy = "random"
    assert grouped < waste(trainer.get_train_dataloader())


def test_head_flops_count_on_the_predicted_positions_alone():
    arch = Architecture.from_config(lora_model(False)[1].to_dict())
    every = flops.training_flops(arch, [64], RANK, TARGETS)
    answers = flops.training_flops(arch, [64], RANK, TARGETS, predicted=20)
    assert every - answers == pytest.approx(4 * arch.hidden * arch.vocab * (64 - 20))


def test_cpu_loss_runs_the_head_on_the_answers_as_counted(tmp_path):
    """finetune.py's CPU loss projects only the answer positions through the LM head: torch's count of one training
    step agrees with training_flops given the positions watch_batches saw (one record, so no padding; not compiled,
    since the counter does not see inside Inductor's kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    from test_finetune import PROJECTIONS, TINY, TRAIN_APPS, VAL_APPS, build_trainer, howto_records, write_split

    data = tmp_path / "data"
    write_split(data, "train", howto_records(TRAIN_APPS))
    write_split(data, "val", howto_records(VAL_APPS)[:4])
    trainer, _ = build_trainer(["--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf",
                                "--batch-size", "1", "--no-compile"])
    batches = flops.watch_batches(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    trainer.compute_loss(trainer.model, dict(batch))
    assert batches == []  # evaluation passes are not training
    trainer.model.train()
    with FlopCounterMode(display=False) as counter:
        trainer.compute_loss(trainer.model, dict(batch)).backward()
    (seen,) = batches
    length, answers = batch["input_ids"].shape[1], int((batch["labels"][:, 1:] != -100).sum())
    assert seen == {"lengths": [length], "computed": length, "predicted": answers} and 0 < answers < length
    arch = Architecture.from_config(trainer.model.config.to_dict())
    ours = flops.training_flops(arch, seen["lengths"], 8, PROJECTIONS, predicted=seen["predicted"])
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.02)
