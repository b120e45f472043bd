"""Export round trip on the tiny model: LoRA adapter -> merged fp16 folder -> GGUF (f16, q8_0, q4_k_m) -> llama.cpp.

The adapter is made here with peft directly (random LoRA B, so it changes the output) and the reference is the
transformers model; llama.cpp's logits must match it within what each quantization allows, its tokenizer must give
mistral-common's ids for a chat prompt, and generation must stop on the GGUF's end-of-sequence token.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from howto.chat import SYSTEM_PROMPT, prompt_ids, to_messages
from howto.models import MISTRAL_CHAT_TEMPLATE

PROMPT = "How do I reset my password in the   XX app?"
SPACED_PROMPTS = [PROMPT, "a  b   c    d", "  lead and trail  ", "code:    indent\n        more",
                  "tabs\tand\nnewlines  x", "Ünïcödé ✓ 日本語   spaces"]
QUANTS = ["q4_k_m", "q8_0", "f16"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(folder: str | Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def _llama(path: Path, **kwargs):
    """llama.cpp as evaluate.py opens it (howto.generate.open_gguf: no AMX weight buffers, whose matmul crashes)."""
    import llama_cpp

    from howto.generate import open_gguf

    return open_gguf(str(path), context=256, seed=llama_cpp.LLAMA_DEFAULT_SEED, gpu=False, **kwargs)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model, adapter) -> Path:
    from howto.export import export_merged

    return export_merged(tiny_model, adapter, tmp_path_factory.mktemp("run") / "merged")


@pytest.fixture(scope="module")
def ids(mistral_tokenizer) -> list[int]:
    return prompt_ids(mistral_tokenizer, PROMPT)


@pytest.fixture(scope="module")
def reference(merged, ids) -> np.ndarray:
    return _logits(merged, ids)


@pytest.fixture(scope="module")
def ggufs(merged) -> dict[str, Path]:
    from howto.export import export_gguf

    paths = export_gguf(merged, merged.parent / "gguf", QUANTS)
    return {path.stem.removeprefix("model-"): path for path in paths}


def test_merged_folder_matches_base_plus_adapter(tiny_model, adapter, merged, ids, reference, mistral_tokenizer):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from howto.models import load_tokenizer

    with_adapter = _logits(tiny_model, ids, adapter=adapter)
    base = _logits(tiny_model, ids)
    scale = with_adapter.std()
    adapter_effect = np.abs(with_adapter - base).max()
    merge_error = np.abs(with_adapter - reference).max()
    print(f"\nmerged fp16 vs base+adapter: max|d|={merge_error:.5f}, adapter effect {adapter_effect:.3f}, "
          f"logit std {scale:.3f}")
    assert adapter_effect > 0.5 * scale  # the adapter matters, so a merge that drops it fails below
    assert merge_error < 0.05 * scale

    with safe_open(merged / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    config = json.loads((merged / "tokenizer_config.json").read_text())
    assert config["chat_template"] == MISTRAL_CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    assert (merged / "tokenizer.model").read_bytes() == (Path(tiny_model) / "tokenizer.model.v3").read_bytes()
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert generation["do_sample"] is False and generation["repetition_penalty"] == 1.05  # as evaluated
    assert prompt_ids(load_tokenizer(str(merged)), PROMPT) == ids
    assert AutoTokenizer.from_pretrained(merged).eos_token_id == 2


def test_sharded_base_merges_shard_by_shard_like_a_single_file(tmp_path, tiny_model, adapter, ids, reference):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from howto.export import export_merged
    from howto.models import save_mistral_tokenizer

    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).save_pretrained(base, max_shard_size="2MB")
    save_mistral_tokenizer(base)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2
    out = export_merged(str(base), adapter, tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    with safe_open(out / shards[-1], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    np.testing.assert_allclose(_logits(out, ids), reference, atol=1e-5)


def test_adapters_that_are_not_plain_lora_are_refused(tmp_path, tiny_model, adapter):
    from howto.export import export_merged

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA adapters are merged here, this one uses use_dora"):
        export_merged(tiny_model, dora, tmp_path / "merged")


def test_gguf_logits_match_merged_model(ggufs, merged, tiny_model, ids, reference):
    base = _logits(tiny_model, ids)
    scale = reference.std()
    adapter_effect = np.abs(reference - base).mean()
    limits = {"f16": (0.05, 0.9999), "q8_0": (0.75, 0.999), "q4_k_m": (3.0, 0.95)}  # (max|d| / std, correlation)
    for quant, path in ggufs.items():
        llm = _llama(path, logits_all=True)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        llm.close()
        diff = np.abs(got - reference)
        corr = np.corrcoef(got[-1], reference[-1])[0, 1]
        # llama.cpp's pick at each position must be a top choice of the reference, within its tolerance
        picked = reference[np.arange(len(ids)), got.argmax(1)]
        print(f"\n{quant}: max|d|={diff.max():.5f} ({diff.max() / scale:.3f} std), mean|d|={diff.mean():.5f}, "
              f"next-token corr={corr:.6f}, argmax agreement={np.mean(got.argmax(1) == reference.argmax(1)):.2f}")
        max_ratio, min_corr = limits[quant]
        assert diff.max() < max_ratio * scale, quant
        assert corr > min_corr, quant
        assert diff.mean() < 0.5 * adapter_effect, quant  # nearer the merged model than the base: adapter is in
        if quant == "f16":
            assert np.all(reference.max(1) - picked <= 2 * diff.max())


def test_gguf_carries_mistral_template_and_special_tokens(ggufs, mistral_tokenizer):
    import jinja2

    llm = _llama(ggufs["f16"], vocab_only=True)
    meta = llm.metadata
    assert meta["tokenizer.ggml.eos_token_id"] == "2"
    assert meta["tokenizer.ggml.bos_token_id"] == "1"
    assert meta["tokenizer.chat_template"] == MISTRAL_CHAT_TEMPLATE
    template = jinja2.Environment().from_string(meta["tokenizer.chat_template"])
    mismatches = []
    for prompt in SPACED_PROMPTS:
        text = template.render(messages=to_messages(prompt), bos_token="<s>", eos_token="</s>",
                               add_generation_prompt=True)
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        if got != prompt_ids(mistral_tokenizer, prompt):
            mismatches.append(prompt)
    llm.close()
    assert mismatches == []


def test_gguf_generation_follows_reference_and_runs_to_the_limit(ggufs, merged, ids):
    llm = _llama(ggufs["f16"])
    out = llm.create_completion(prompt=ids, max_tokens=8, temperature=0.0)
    llm.reset()
    chosen = []
    for token in llm.generate(ids, temp=0.0):
        chosen.append(token)
        if len(chosen) == 8:
            break
    llm.close()
    # this random model never picks </s> here, so generation must run to max_tokens; the stop test below flips it
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 8 and 2 not in chosen
    steps = _logits(merged, ids + chosen[:-1])[len(ids) - 1:]
    assert np.all(steps.max(1) - steps[np.arange(len(chosen)), chosen] < 0.01)  # greedy choices agree


def test_generation_stops_on_eos(merged, ids, tmp_path):
    """A merged model edited so that </s> wins after the prompt must stop at once in llama.cpp, chat and raw."""
    from transformers import AutoModelForCausalLM

    from howto.export import export_gguf

    folder = tmp_path / "eos-model"
    shutil.copytree(merged, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        logits = model.lm_head(hidden)
        model.lm_head.weight[2] = hidden * (logits.max() + 5.0) / hidden.dot(hidden)
        assert model.lm_head(hidden).argmax().item() == 2
    model.to(torch.float16).save_pretrained(folder)
    gguf = export_gguf(folder, tmp_path / "gguf", ["f16"])[0]

    llm = _llama(gguf)
    raw = llm.create_completion(prompt=ids, max_tokens=32, temperature=0.0)
    chat = llm.create_chat_completion(messages=to_messages(PROMPT), max_tokens=32, temperature=0.0)
    chat_prompt = llm.input_ids[: llm.n_tokens].tolist()
    llm.close()
    assert raw["choices"][0]["finish_reason"] == "stop"
    assert raw["usage"]["completion_tokens"] <= 1 and raw["choices"][0]["text"] == ""
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["choices"][0]["message"]["content"].strip() == ""
    assert chat_prompt == ids  # llama-cpp-python rendered the GGUF's template into mistral-common's ids


def test_modelfile(ggufs):
    text = (ggufs["f16"].parent / "Modelfile").read_text()
    from_line = next(line for line in text.splitlines() if line.startswith("FROM "))
    target = ggufs["f16"].parent / from_line.split(maxsplit=1)[1]
    assert target.is_file() and target == ggufs["q4_k_m"]  # the smallest file
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "[INST]" in template and "[/INST]" in template and "$.System" in template
    assert 'PARAMETER stop "</s>"' in text and 'PARAMETER stop "[INST]"' in text
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in text
    assert "PARAMETER temperature 0\n" in text and "PARAMETER repeat_penalty 1.05\n" in text  # as evaluated
    assert "PARAMETER repeat_last_n 64\n" in text
    info = json.loads((ggufs["f16"].parent / "gguf_info.json").read_text())
    assert set(info["files"]) == {p.name for p in ggufs.values()} and info["chat_family"] == "mistral"


def test_modelfile_for_chatml_model(tmp_path):
    from howto.export import write_modelfile

    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    text = write_modelfile(tmp_path, tmp_path / "model-q8_0.gguf", chatml).read_text()
    assert "FROM ./model-q8_0.gguf" in text and "<|im_start|>assistant" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "[INST]" not in text and "</s>" not in text


def test_second_export_uses_cached_llama_cpp(merged, tmp_path, monkeypatch):
    import howto.export as export

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    cached = export.llama_cpp_dir()
    stamp = cached.stat().st_mtime_ns

    def no_download(*args, **kwargs):
        raise AssertionError("llama.cpp was downloaded again")

    monkeypatch.setattr(export, "download_sdist", no_download)
    paths = export.export_gguf(merged, tmp_path / "again", ["q8_0"])
    assert [p.name for p in paths] == ["model-q8_0.gguf"]
    assert not (tmp_path / "again" / "model-f16.gguf").exists()  # the intermediate f16 is not kept unasked
    assert cached.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cached.iterdir()) == [
        "LICENSE", "conversion", "convert_hf_to_gguf.py", "gguf-py", "models", "requirements"]


def test_llama_quantize_binary_in_llama_cpp_dir_is_used(merged, tmp_path, monkeypatch):
    """A llama.cpp checkout with a built llama-quantize: its converter and that binary do the work."""
    import howto.export as export

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    source = export.llama_cpp_dir()
    checkout = tmp_path / "llama.cpp"
    (checkout / "build" / "bin").mkdir(parents=True)
    for item in source.iterdir():
        (checkout / item.name).symlink_to(item)
    calls = tmp_path / "calls.txt"
    binary = checkout / "build" / "bin" / "llama-quantize"
    binary.write_text(  # llama-quantize's command line, backed by the same llama.cpp library
        f"#!{sys.executable}\n"
        "import sys, llama_cpp\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[3:]) + '\\n')\n"
        "params = llama_cpp.llama_model_quantize_default_params()\n"
        "params.ftype = getattr(llama_cpp, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3])\n"
        "params.nthread = int(sys.argv[4])\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))\n")
    binary.chmod(0o755)
    paths = export.export_gguf(merged, tmp_path / "out", ["q8_0"], llama_cpp=str(checkout))
    assert calls.read_text().split()[0] == "Q8_0"
    llm = _llama(paths[0], vocab_only=True)
    assert llm.metadata["general.file_type"] == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
    llm.close()
    assert json.loads((tmp_path / "out" / "gguf_info.json").read_text())["quantizer"] == str(binary)


def test_converter_failure_shows_its_output(tmp_path):
    from howto.export import export_gguf

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(RuntimeError, match="NoSuchModelForCausalLM is not supported"):
        export_gguf(folder, tmp_path / "gguf", ["f16"])
    assert list((tmp_path / "gguf").iterdir()) == []  # no half-written file left behind


def test_bad_inputs_give_clear_errors(tmp_path, tiny_model, monkeypatch):
    from howto.export import export_gguf, export_merged, llama_cpp_dir

    with pytest.raises(ValueError, match="unknown quantization type 'q9_9'"):
        export_gguf(tmp_path, tmp_path / "gguf", ["q9_9"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "gguf", ["f16"])
    with pytest.raises(FileNotFoundError, match="--llama-cpp=/nowhere"):
        llama_cpp_dir("/nowhere")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LLAMA_CPP_DIR="):
        llama_cpp_dir()
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        export_merged(tiny_model, tmp_path, tmp_path / "merged")
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (tmp_path / "adapter_config.json").write_text("{}")
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized checkpoint"):
        export_merged(str(quantized), tmp_path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_smollm2_merge_and_gguf_tokenize_and_answer_like_transformers(smollm2_model, tmp_path):
    """The CPU default model: its folder comes from a GGUF that transformers dequantized, so its config still names
    a GGUF quantizer (saving refused) and its tokenizer.json looks like a SentencePiece vocabulary to the converter,
    which made a GGUF that crashed llama.cpp on the first prompt."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from howto.export import export_gguf, export_merged
    from howto.models import load_tokenizer

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=1, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    merged = export_merged(smollm2_model, tmp_path / "adapter", tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    gguf = export_gguf(merged, tmp_path / "gguf", ["q8_0"])[0]

    tokenizer = load_tokenizer(str(merged))
    llm = _llama(gguf, logits_all=True)
    assert llm.metadata["tokenizer.ggml.model"] == "gpt2" and llm.metadata["tokenizer.ggml.pre"] == "smollm"
    assert llm.metadata["tokenizer.ggml.eos_token_id"] == str(tokenizer.eos_token_id)  # <|im_end|>
    for prompt in SPACED_PROMPTS:
        llm.create_chat_completion(messages=to_messages(prompt), max_tokens=1, temperature=0.0)
        expected = prompt_ids(tokenizer, prompt)
        assert llm.input_ids[: len(expected)].tolist() == expected, prompt
    ids = prompt_ids(tokenizer, PROMPT)
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[len(ids) - 1])
    llm.close()
    reference = _logits(merged, ids)[-1]
    corr = np.corrcoef(got, reference)[0, 1]
    print(f"\nSmolLM2 merged, q8_0 next-token logits: corr={corr:.5f}, max|d|={np.abs(got - reference).max():.3f}, "
          f"logit std {reference.std():.3f}, argmax {got.argmax()} vs {reference.argmax()}")
    assert corr > 0.99 and got.argmax() == reference.argmax()
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "gguf" / "Modelfile").read_text()
