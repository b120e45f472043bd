"""The preflight (howto/preflight.py) on real tokenizers and collators: each check fails on the broken case it is
for, the memory estimate agrees with peft's own parameter count and refuses what cannot fit, and `finetune.py
--dry-run` runs it alone with no model loaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import finetune
from howto import chat, preflight
from howto.runio import RunError

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"prompt": "How do I reset my password in the Shopee app?",
     "response": ["Open the Shopee app", "Tap 'Forgot password'", "Enter your email address"]},
    {"prompt": "How do I turn on notifications?", "response": ["Open Settings", "Tap 'Notifications'"]},
]


def placed(records: list[dict]) -> list[dict]:
    return [{**r, "split": "train", "file": "train.jsonl", "line": n} for n, r in enumerate(records, 1)]


@pytest.fixture
def encoded(mistral_tokenizer) -> list[dict]:
    finetune.set_pad_token(mistral_tokenizer)
    return [chat.encode_example(mistral_tokenizer, r["prompt"], r["response"]) for r in RECORDS]


def checks(tokenizer, encoded: list[dict], max_len: int = 1024, collate=None) -> dict[str, preflight.Check]:
    found = preflight.check_examples(tokenizer, placed(RECORDS), encoded, max_len,
                                     collate or finetune.sft_collator(tokenizer))
    return {c.name: c for c in found}


def test_every_check_passes_on_the_canonical_encoding(mistral_tokenizer, encoded):
    found = checks(mistral_tokenizer, encoded)
    assert set(found) == {"one BOS", "answer's EOS trained", "padding never trained", "trained share",
                          "within --max-seq-length"}
    assert all(c.ok for c in found.values()), found
    assert "padding positions in a test batch, all labelled -100" in found["padding never trained"].detail


def test_all_labels_masked_fails(mistral_tokenizer, encoded):
    encoded[1]["completion_mask"] = [0] * len(encoded[1]["completion_mask"])
    found = checks(mistral_tokenizer, encoded)
    assert not found["trained share"].ok and "train.jsonl:2 (train)" in found["trained share"].detail
    assert "all labels masked" in found["trained share"].detail


def test_prompt_trained_too_fails(mistral_tokenizer, encoded):
    encoded[0]["completion_mask"] = [1] * len(encoded[0]["completion_mask"])
    found = checks(mistral_tokenizer, encoded)
    assert not found["trained share"].ok and "prompt included" in found["trained share"].detail


def test_missing_eos_fails(mistral_tokenizer, encoded):
    for example in encoded:
        del example["input_ids"][-1], example["completion_mask"][-1]
    found = checks(mistral_tokenizer, encoded)
    assert not found["answer's EOS trained"].ok
    assert "2 record(s) do not end with a trained </s>" in found["answer's EOS trained"].detail


def test_double_bos_fails(mistral_tokenizer, encoded):
    bos = mistral_tokenizer.bos_token_id
    encoded[0]["input_ids"].insert(0, bos)
    encoded[0]["completion_mask"].insert(0, 0)
    found = checks(mistral_tokenizer, encoded)
    assert not found["one BOS"].ok and "start with 2 BOS tokens, e.g. train.jsonl:1" in found["one BOS"].detail


def test_trained_padding_fails(mistral_tokenizer, encoded):
    collate = finetune.sft_collator(mistral_tokenizer)

    def labels_everywhere(examples):  # a collator that forgot to mask its padding
        batch = collate(examples)
        batch["labels"] = batch["input_ids"].clone()
        return batch

    found = checks(mistral_tokenizer, encoded, collate=labels_everywhere)
    assert not found["padding never trained"].ok and "padding positions carry a label" in \
        found["padding never trained"].detail


def test_lengths_cut_prompt_is_an_error_and_a_cut_answer_a_warning(mistral_tokenizer, encoded):
    prompt_len = encoded[0]["completion_mask"].index(1)
    found = preflight.check_examples(mistral_tokenizer, placed(RECORDS), encoded, prompt_len,
                                     finetune.sft_collator(mistral_tokenizer))
    errors = [c for c in found if c.name == "within --max-seq-length"]
    assert [c.fatal for c in errors] == [True, False]
    assert "1 record(s) would train on no token" in errors[0].detail and "train.jsonl:1 (train)" in errors[0].detail
    assert "2 train record(s) are longer than" in errors[1].detail


def test_show_examples_exits_on_a_failed_check_and_saves_the_token_view(mistral_tokenizer, encoded, tmp_path):
    console = Console(record=True, width=100)
    listing = preflight.show_examples(mistral_tokenizer, placed(RECORDS), encoded, 1024,
                                      finetune.sft_collator(mistral_tokenizer), console)
    saved = preflight.save(console, listing, tmp_path).read_text()
    assert "Preflight checks" in saved and "One training example" in saved
    rows = [line.split("\t") for line in listing.splitlines()[1:]]
    assert len(rows) == len(encoded[0]["input_ids"])
    assert rows[0][2:] == ["masked", "'<s>'"] and rows[-1][2:] == ["trained", "'</s>'"]
    encoded[1]["completion_mask"] = [0] * len(encoded[1]["completion_mask"])
    with pytest.raises(RunError, match=r"^preflight: (.|\n)*1 record\(s\) train on no token"):
        preflight.show_examples(mistral_tokenizer, placed(RECORDS), encoded, 1024,
                                finetune.sft_collator(mistral_tokenizer), Console(record=True))


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

def mistral() -> preflight.Architecture:
    arch, source = preflight.architecture("mistralai/Mistral-7B-Instruct-v0.3")
    assert source.endswith("mistral-7b-v0.3.json")
    return arch


def t4_estimate(**changes) -> dict[str, float]:
    settings = dict(four_bit=True, lora_r=16, target_modules=list(preflight.Architecture.projections(mistral())),
                    batch_size=2, seq_len=1024, checkpointing="offload", fused=True, optimizer_bytes=2)
    return preflight.estimate_memory(mistral(), **{**settings, **changes})


def test_bundled_mistral_architecture_is_v03():
    arch = mistral()
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.intermediate, arch.vocab) == \
        (4096, 32, 32, 8, 14336, 32768)


def test_estimate_for_the_t4_profile_fits_16_gb_and_grows_with_its_settings():
    parts = t4_estimate()
    assert 3.9e9 < parts["base weights"] < 4.3e9  # 7.2B parameters, NF4 for the linear layers, 16-bit embeddings
    assert parts["LoRA adapter, gradients, optimizer"] == 16 * 81920 * 32 * 10  # 42M parameters x 10 bytes
    assert sum(parts.values()) < 16e9
    assert t4_estimate(four_bit=False)["base weights"] > 14e9
    assert t4_estimate(checkpointing="on", fused=False)["activations"] > parts["activations"]
    assert t4_estimate(checkpointing="off")["activations"] > t4_estimate(checkpointing="on")["activations"]
    assert t4_estimate(fused=False)["activations"] > parts["activations"]
    assert sum(t4_estimate(batch_size=16, seq_len=8192).values()) > 16e9


def test_lora_count_matches_peft_on_the_tiny_model(tiny_model):
    """The estimate's adapter size is peft's own count of trainable parameters for the same settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    arch, _ = preflight.architecture(tiny_model)
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = preflight.estimate_memory(arch, four_bit=False, lora_r=8, target_modules=targets, batch_size=1,
                                      seq_len=16, checkpointing="on", fused=False, optimizer_bytes=8)
    assert parts["LoRA adapter, gradients, optimizer"] == trainable * 16
    weights = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert parts["base weights"] == weights * 2


def test_too_big_names_the_flags_to_turn_down():
    args = finetune.parse(["--data", "DATA", "--out", "OUT", "--gpu-memory", "16", "--batch-size", "16",
                           "--max-seq-length", "8192", "--no-load-in-4bit", "--lora-r", "256"])
    with pytest.raises(RunError, match=r"more than the 16 GB of --gpu-memory: turn down --batch-size \(now 16; "
                                         r".*--max-seq-length \(now 8192\), --lora-r \(now 256\), --load-in-4bit"):
        preflight.check_memory("mistralai/Mistral-7B-Instruct-v0.3", args, Console(record=True))
    args = finetune.parse(["--data", "DATA", "--out", "OUT", "--gpu-memory", "16"])  # the T4 defaults fit
    preflight.check_memory("mistralai/Mistral-7B-Instruct-v0.3", args, Console(record=True))


# ---------------------------------------------------------------------------------------------------------------
# finetune.py --dry-run
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "val"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return folder


def dry_run(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *flags, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_dry_run_on_the_t4_profile_shows_the_example_and_the_estimate(data_dir, tmp_path):
    out = tmp_path / "run"
    result = dry_run("--data", str(data_dir), "--out", str(out), "--config", "configs/t4.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Estimated peak GPU memory" in result.stdout and "fit in the 16 GB of --gpu-memory" in result.stdout
    assert "One training example" in result.stdout and "[/INST]" in result.stdout
    saved = (out / "preflight.txt").read_text()
    assert "Preflight checks" in saved and "trained\t'</s>'" in saved
    assert sorted(p.name for p in out.iterdir()) == ["preflight.txt"]  # no model, no checkpoint, no run record


def test_dry_run_refuses_what_a_t4_cannot_hold(data_dir, tmp_path):
    result = dry_run("--data", str(data_dir), "--out", str(tmp_path / "run"), "--config", "configs/t4.yaml",
                     "--batch-size", "16", "--max-seq-length", "8192")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the run needs about") and "--batch-size (now 16" in error
    assert "--max-seq-length (now 8192)" in error
    assert not (tmp_path / "run").exists()


def test_gguf_export_without_llama_cpp_is_refused_before_training(data_dir, tmp_path):
    with pytest.raises(RunError, match="--export gguf: llama.cpp's tools cannot be had now"):
        finetune.main(["--data", str(data_dir), "--out", str(tmp_path / "run"), "--model", "tiny", "--export",
                       "gguf", "--quant", "q8_0", "--llama-cpp", str(tmp_path / "no-llama-cpp"), "--dry-run"])


def test_estimate_is_within_20_percent_of_published_measurements():
    """The figures the manual compares with: LLaMA-Factory's Unsloth runs of LLaMA2-7B (batch 1, r 8) and Unsloth's
    longest Llama-3.1-8B sequence in 16 GB (batch 1, r 32)."""
    llama2 = preflight.Architecture.from_config({"hidden_size": 4096, "num_hidden_layers": 32,
                                                  "num_attention_heads": 32, "intermediate_size": 11008,
                                                  "vocab_size": 32000})
    llama31 = preflight.Architecture.from_config({"hidden_size": 4096, "num_hidden_layers": 32,
                                                   "num_attention_heads": 32, "num_key_value_heads": 8,
                                                   "intermediate_size": 14336, "vocab_size": 128256})

    def unsloth(arch: preflight.Architecture, r: int, tokens: int) -> float:
        return sum(preflight.estimate_memory(arch, four_bit=True, lora_r=r, target_modules=list(arch.projections()),
                                             batch_size=1, seq_len=tokens, checkpointing="offload", fused=True,
                                             optimizer_bytes=2).values()) / 1e9

    for tokens, published in ((1024, 5), (4096, 7), (16384, 10)):
        assert unsloth(llama2, 8, tokens) == pytest.approx(published, rel=0.2), tokens
    assert unsloth(llama31, 32, 40724) == pytest.approx(16, rel=0.2)


def test_gguf_export_tools_are_had_before_training(data_dir, tmp_path):
    """llama.cpp's converter (fetched once into the cache, as the export would) and the quantizer, named in the
    preflight's record of the run."""
    out = tmp_path / "run"
    finetune.main(["--data", str(data_dir), "--out", str(out), "--model", "tiny", "--export", "gguf", "--quant",
                   "q8_0", "--dry-run"])
    saved = " ".join((out / "preflight.txt").read_text().split())  # the console wraps long lines
    assert "GGUF export: converter" in saved and "convert_hf_to_gguf.py, quantizer llama-cpp-python" in saved
