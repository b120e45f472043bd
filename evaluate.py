"""Evaluate: does the fine-tuned model write better step-by-step instructions than its base model, and where?

Every test prompt goes through the base model and the fine-tuned one (a LoRA adapter, a merged folder or a GGUF
file) in the canonical chat format that training used; both outputs are parsed into steps and scored against the
reference steps with BERTScore, step-order accuracy, step coverage, exact order, format validity and step-count
error; the fine-tuned minus base difference of every metric gets a bootstrap 95% CI and a Wilcoxon p-value. Optional
1-5 ratings (an LLM judge, or blinded sheets for people) go into the same report.

    python evaluate.py --data data/prepared --finetuned runs/r1 --out eval/r1
    python evaluate.py --data data/prepared --base tiny --finetuned runs/r1 --out eval/r1 --bertscore-model minilm
    python evaluate.py --predictions base=base.jsonl gpt=gpt.jsonl --out eval/cmp --bertscore-model minilm

Writes OUT/metrics.json, OUT/report.md, OUT/report.html, and per system OUT/<name>/predictions.jsonl (generation
only; also the cache a rerun reuses) and OUT/<name>/scores.jsonl.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from howto.chat import SYSTEM_PROMPT, decode_answer, parse_steps, prompt_ids, render_steps
from howto.metrics import (DEFAULT_ALIGN_THRESHOLD, LOWER_IS_BETTER, METRICS, MINILM, BertScore, BertScoreUnavailable,
                           StepEncoder, mean_defined, paired_comparison, score_examples)
from howto.runio import (atomic_write_bytes, atomic_write_text, hash_files, parse_args, read_jsonl_lines, write_json,
                         write_jsonl, write_run_info)

console = Console(stderr=True)

METRIC_LABELS = {
    "bertscore_p": "BERTScore precision", "bertscore_r": "BERTScore recall", "bertscore_f1": "BERTScore F1",
    "order_accuracy": "Step-order accuracy", "step_coverage": "Step coverage", "exact_order": "Exact order rate",
    "format_valid": "Format validity", "step_count_error": "Step-count error (|gen - ref|)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="prepare_data.py output folder (its test.jsonl is used) or a test JSONL file")
    p.add_argument("--base", help="base model: hub id, folder, 'tiny' or 'smollm2'; default: the base_model in the "
                                  "fine-tuned run's run_info.json, else the toolkit's default model")
    p.add_argument("--finetuned", help="finetune.py run folder, LoRA adapter folder, merged model folder or .gguf file")
    p.add_argument("--predictions", nargs="+", metavar="NAME=FILE",
                   help="score these predictions files instead of generating (JSONL: prompt, reference or "
                        "response, output as a string or a list of steps, category optional); the first is the "
                        "baseline every other system is compared with")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, help="evaluate only the first N test prompts")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, the bootstrap and rating order")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per answer")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding; above 0 samples")
    gen.add_argument("--gguf-context", type=int, default=2048,
                     help="context length (prompt + answer) for a GGUF model; its KV cache is allocated up front")
    sc = p.add_argument_group("scoring")
    sc.add_argument("--bertscore-model", help="BERTScore encoder: a local folder or hub id, or 'minilm' for the "
                                              "bundled all-MiniLM-L6-v2; default: roberta-large, rescaled with "
                                              "bert-score's baseline (the reference settings; needs the hub once)")
    sc.add_argument("--bertscore-layers", type=int, help="encoder layer BERTScore uses (default: bert-score's choice "
                                                         "for a model it knows, else the last layer)")
    sc.add_argument("--bertscore-batch-size", type=int, default=64, help="pairs per BERTScore batch")
    sc.add_argument("--align-model", default=MINILM, help="sentence encoder that aligns generated steps to "
                                                          "reference steps: a folder, hub id, or 'minilm'")
    sc.add_argument("--align-threshold", type=float, default=DEFAULT_ALIGN_THRESHOLD,
                    help="least cosine similarity for two steps to count as the same step")
    sc.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    sc.add_argument("--show-examples", type=int, default=5, help="examples shown where two systems differ most")
    rt = p.add_argument_group("1-5 ratings")
    rt.add_argument("--judge-url", help="OpenAI-compatible endpoint (with /v1) of an LLM that rates every output")
    rt.add_argument("--judge-model", help="model name for the judge endpoint")
    rt.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    rt.add_argument("--rating-sheet", action="store_true",
                    help="write a blinded rating sheet (CSV and HTML form) of the first two systems for people")
    rt.add_argument("--ratings", nargs="+", metavar="FILE", help="filled rating sheets to read back and report")
    rt.add_argument("--ratings-key", help="key that unblinds the sheets (default: OUT/rating_key.json)")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------------------------------------------------

def test_file(data: str) -> Path:
    path = Path(data)
    file = path / "test.jsonl" if path.is_dir() else path
    if not file.is_file():
        hint = " (expected test.jsonl in the folder)" if path.is_dir() else ""
        raise SystemExit(f"--data {data}: no such file{hint}")
    return file


def _jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        rows = read_jsonl_lines(path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for lineno, record in rows:
        if not isinstance(record, dict):
            raise SystemExit(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return rows


def _steps_field(value: Any, where: str, field: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s.strip() for s in value):
        raise SystemExit(f"{where}: field {field!r} must be a non-empty list of non-empty strings")
    return [s.strip() for s in value]


def load_test_set(file: Path, limit: int | None) -> list[dict[str, Any]]:
    """Test records as examples {prompt, reference, category}; a prompt seen twice is evaluated once."""
    examples: dict[str, dict[str, Any]] = {}
    for lineno, record in _jsonl_records(file):
        where = f"{file}:{lineno}"
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SystemExit(f"{where}: field 'prompt' must be a non-empty string")
        reference = _steps_field(record.get("response"), where, "response")
        if prompt in examples:
            console.print(f"[yellow]{where}: duplicate prompt, evaluated once[/]")
            continue
        examples[prompt] = {"prompt": prompt, "reference": reference,
                            "category": str(record.get("category") or "uncategorized")}
    if not examples:
        raise SystemExit(f"{file}: no test records")
    return list(examples.values())[:limit]


# ---------------------------------------------------------------------------------------------------------------------
# Systems and generation
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class System:
    """One model to generate with: a base model, optionally with a LoRA adapter, or a GGUF file."""
    name: str
    model: str | None = None  # a name for howto.models (hub id, folder, tiny, smollm2)
    adapter: str | None = None
    gguf: str | None = None
    tokenizer_model: str | None = None  # where the canonical tokenizer comes from (for GGUF)


def _run_info(path: Path) -> dict[str, Any]:
    """finetune.py's run_info.json for a run folder, or for its merged/ or gguf/ subfolder."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "run_info.json", folder.parent / "run_info.json"):
        if candidate.is_file():
            info = json.loads(candidate.read_text(encoding="utf-8"))
            if "base_model" in info:
                return info
    return {}


def resolve_systems(base: str | None, finetuned: str) -> list[System]:
    """The base and fine-tuned systems, with the base that training used unless --base says otherwise."""
    from howto.models import default_model

    path = Path(finetuned)
    if not path.exists():
        raise SystemExit(f"--finetuned {finetuned}: no such file or folder")
    adapter_config = path / "adapter_config.json"
    trained_on = _run_info(path).get("base_model")
    if trained_on is None and adapter_config.is_file():
        trained_on = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    base = base or trained_on or default_model()
    if path.suffix == ".gguf":
        tuned = System("finetuned", gguf=str(path), tokenizer_model=base)
    elif adapter_config.is_file():
        tuned = System("finetuned", model=base, adapter=str(path))
    elif (path / "config.json").is_file():
        tuned = System("finetuned", model=str(path))
    else:
        raise SystemExit(f"--finetuned {finetuned}: expected a run or adapter folder (adapter_config.json), a merged "
                         "model folder (config.json) or a .gguf file")
    return [System("base", model=base), tuned]


def _weights_fingerprint(path: Path) -> list[Any]:
    """Sizes and modification times of weight files: cheap, and changes whenever the weights are rewritten."""
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"})
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def settings_hash(system: System, args: argparse.Namespace) -> str:
    """What makes a cached output reusable: model weights, prompt format and decoding settings (not batch size)."""
    from howto.models import resolve_model

    model = resolve_model(system.model) if system.model else None
    identity: dict[str, Any] = {
        **asdict(system), "name": None, "system_prompt": SYSTEM_PROMPT, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "seed": args.seed if args.temperature > 0 else None,
        "model_weights": _weights_fingerprint(Path(model)) if model and Path(model).is_dir() else model,
        "adapter_sha256": hash_files(Path(system.adapter).glob("adapter_*")) if system.adapter else None,
        "gguf_weights": _weights_fingerprint(Path(system.gguf)) if system.gguf else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


Generator = Callable[[list[str]], list[tuple[str, int]]]


def generate_batch(lm: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   temperature: float = 0.0) -> list[tuple[str, int]]:
    """Answers to several prompts at once: (text, generated tokens without the end-of-sequence token).

    The prompts are tokenized in the canonical format and left-padded by hand with an attention mask, since the
    chat template builds ids that a tokenizer's own padding would not see; decoder-only models must be padded on
    the left so that every answer continues right after its prompt.
    """
    import torch

    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    width = max(len(x) for x in ids)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=lm.device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=lm.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else \
        {"do_sample": False}
    with torch.no_grad():
        out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=pad, **sampling)
    answers = []
    for row in out[:, width:].tolist():
        end = row.index(eos) if eos in row else len(row)
        answers.append((decode_answer(tokenizer, row[:end]), end))
    return answers


def load_generator(system: System, args: argparse.Namespace) -> Generator:
    """A function from prompts to answers for one system, with its model loaded."""
    if system.gguf:
        return _gguf_generator(system, args)
    from howto.models import load_for_generation

    lm, tokenizer = load_for_generation(system.model, adapter=system.adapter)
    return lambda prompts: generate_batch(lm, tokenizer, prompts, args.max_new_tokens, args.temperature)


def _gguf_generator(system: System, args: argparse.Namespace) -> Generator:
    """GGUF through llama.cpp, fed the canonical prompt's token ids so the format is exactly the one trained on."""
    from llama_cpp import Llama

    from howto.models import has_cuda, load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(system.tokenizer_model))
    llm = Llama(model_path=system.gguf, n_ctx=args.gguf_context, seed=args.seed, verbose=False,
                n_gpu_layers=-1 if has_cuda() else 0)

    def generate(prompts: list[str]) -> list[tuple[str, int]]:
        answers = []
        for prompt in prompts:
            out = llm.create_completion(prompt_ids(tokenizer, prompt), max_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=0, top_p=1.0, min_p=0.0,
                                        repeat_penalty=1.0, seed=args.seed)
            answers.append((out["choices"][0]["text"].strip(), int(out["usage"]["completion_tokens"])))
        return answers

    return generate


def cached_predictions(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Rows already generated with these settings, by prompt. A last line cut short by an interruption is dropped
    (that prompt is generated again); any other broken line is an error."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise SystemExit(f"{path}:{lineno}:{e.colno}: invalid JSON in the predictions cache ({e.msg}); delete "
                             "the file to generate again") from None
        if row.get("settings_hash") == key:
            rows[row["prompt"]] = row
    return rows


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


def generate_system(system: System, examples: list[dict[str, Any]], args: argparse.Namespace,
                    out_dir: Path) -> list[dict[str, Any]]:
    """Predictions of one system for every example, generating only what the cache does not hold yet.

    Each finished batch is appended to OUT/<name>/predictions.jsonl at once, so an interrupted run loses at most one
    batch; at the end the file is rewritten atomically in test order (rows of other prompts with the same settings
    are kept after them, so a --limit run does not throw work away). `seconds` is the batch's time shared evenly
    among its prompts.
    """
    key = settings_hash(system, args)
    path = out_dir / system.name / "predictions.jsonl"
    cache = cached_predictions(path, key)
    write_jsonl(path, cache.values())  # drops a cut-short line before appending
    todo = sorted((ex for ex in examples if ex["prompt"] not in cache), key=lambda ex: len(ex["prompt"]))
    console.print(f"[bold]{system.name}[/]: {len(examples) - len(todo)} cached, {len(todo)} to generate "
                  f"({system.gguf or system.model}{' + ' + system.adapter if system.adapter else ''})")
    if todo:
        generate = load_generator(system, args)
        if args.temperature > 0:
            import torch

            torch.manual_seed(args.seed)
        batch_size = 1 if system.gguf else args.batch_size
        with open(path, "a", encoding="utf-8") as f, _progress() as progress:
            task = progress.add_task(f"generating ({system.name})", total=len(todo))
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                began = time.perf_counter()
                answers = generate([ex["prompt"] for ex in batch])
                seconds = (time.perf_counter() - began) / len(batch)
                for ex, (text, n_tokens) in zip(batch, answers, strict=True):
                    row = {"prompt": ex["prompt"], "reference": ex["reference"], "category": ex["category"],
                           "output": text, "steps": parse_steps(text), "n_tokens": n_tokens,
                           "seconds": round(seconds, 4), "settings_hash": key}
                    cache[ex["prompt"]] = row
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                progress.advance(task, len(batch))
        del generate
        _free_memory()
    rows = [cache[ex["prompt"]] for ex in examples]
    ours = {ex["prompt"] for ex in examples}
    write_jsonl(path, rows + [row for prompt, row in cache.items() if prompt not in ours])
    return rows


def _free_memory() -> None:
    """Drop one model before the next loads: two 7B models need not share a GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Given predictions
# ---------------------------------------------------------------------------------------------------------------------

def read_predictions(spec: str, known: dict[str, dict[str, Any]]) -> tuple[str, Path, list[dict[str, Any]]]:
    """A NAME=FILE predictions file as rows like generate_system's. A missing reference or category is taken from
    --data when the prompt is there."""
    name, sep, file = spec.partition("=")
    if not sep or not name or not file:
        raise SystemExit(f"--predictions {spec}: expected NAME=FILE")
    if name in {"plots"} or "/" in name or name.startswith("."):
        raise SystemExit(f"--predictions {spec}: {name!r} cannot be used as a system name")
    path = Path(file)
    if not path.is_file():
        raise SystemExit(f"--predictions {spec}: no such file {file}")
    rows, seen = [], {}
    for lineno, record in _jsonl_records(path):
        where = f"{path}:{lineno}"
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SystemExit(f"{where}: field 'prompt' must be a non-empty string")
        if prompt in seen:
            raise SystemExit(f"{where}: duplicate prompt (first on line {seen[prompt]})")
        seen[prompt] = lineno
        test = known.get(prompt, {})
        field = "reference" if "reference" in record else "response"
        if field in record:
            reference = _steps_field(record[field], where, field)
        elif test:
            reference = test["reference"]
        else:
            raise SystemExit(f"{where}: field 'reference' (or 'response') is missing and the prompt is not in --data")
        output = record.get("output")
        if isinstance(output, list) and all(isinstance(s, str) for s in output):
            steps, text = [s.strip() for s in output if s.strip()], render_steps(output)
        elif isinstance(output, str):
            steps, text = parse_steps(output), output
        else:
            raise SystemExit(f"{where}: field 'output' must be a string or a list of strings")
        rows.append({"prompt": prompt, "reference": reference, "output": text, "steps": steps,
                     "category": str(record.get("category") or test.get("category") or "uncategorized"),
                     "n_tokens": record.get("n_tokens"), "seconds": record.get("seconds")})
    if not rows:
        raise SystemExit(f"{path}: no predictions")
    return name, path, rows


# ---------------------------------------------------------------------------------------------------------------------
# Scoring and comparison
# ---------------------------------------------------------------------------------------------------------------------

def load_scorers(args: argparse.Namespace) -> tuple[BertScore, StepEncoder]:
    try:
        bertscore = BertScore(args.bertscore_model, args.bertscore_layers, batch_size=args.bertscore_batch_size)
    except BertScoreUnavailable as e:
        raise SystemExit(str(e)) from None
    return bertscore, StepEncoder(args.align_model)


def score_system(rows: list[dict[str, Any]], bertscore: BertScore, encoder: StepEncoder,
                 threshold: float) -> list[dict[str, Any]]:
    scores = score_examples([r["steps"] for r in rows], [r["reference"] for r in rows], bertscore, encoder, threshold)
    return [{"prompt": r["prompt"], "category": r["category"], **s} for r, s in zip(rows, scores, strict=True)]


def summarise(scores: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means per metric (undefined order accuracies left out, with the count that is left), generation totals."""
    means, defined = {}, {}
    for metric in METRICS:
        means[metric], defined[metric] = mean_defined([s[metric] for s in scores])
    tokens = [r["n_tokens"] for r in rows if r.get("n_tokens") is not None]
    seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
    generation = None
    if tokens and seconds:
        generation = {"tokens": int(sum(tokens)), "seconds": round(float(sum(seconds)), 3),
                      "tokens_per_second": round(sum(tokens) / sum(seconds), 2) if sum(seconds) else None,
                      "mean_tokens": round(sum(tokens) / len(tokens), 1)}
    return {"n_examples": len(scores), "means": means, "n_defined": defined,
            "format_failures": sum(1 - s["format_valid"] for s in scores), "generation": generation}


def breakdown(scores: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Means of the headline metrics per value of `key` (category, number of reference steps)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in scores:
        groups.setdefault(str(s[key]), []).append(s)
    order = sorted(groups, key=lambda g: (int(g) if g.isdigit() else 0, g))
    return {g: {"n": len(groups[g]), **{m: mean_defined([s[m] for s in groups[g]])[0]
                                        for m in ("bertscore_f1", "order_accuracy", "step_coverage")}}
            for g in order}


def compare(baseline: list[dict[str, Any]], other: list[dict[str, Any]], n_resamples: int,
            seed: int) -> tuple[dict[str, Any], list[str]]:
    """Paired comparison (other minus baseline) of every metric over the prompts both systems answered."""
    by_prompt = {s["prompt"]: s for s in other}
    common = [s["prompt"] for s in baseline if s["prompt"] in by_prompt]
    base = {s["prompt"]: s for s in baseline}
    result = {m: paired_comparison([base[p][m] for p in common], [by_prompt[p][m] for p in common],
                                   n_resamples=n_resamples, seed=seed)
              for m in METRICS}
    return result, common


def differing_examples(baseline: list[dict[str, Any]], other: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The prompts where the two systems' BERTScore F1 differ most, largest first."""
    base = {s["prompt"]: s for s in baseline}
    pairs = [(abs(s["bertscore_f1"] - base[s["prompt"]]["bertscore_f1"]), s["prompt"]) for s in other
             if s["prompt"] in base]
    return [{"prompt": prompt, "abs_delta_bertscore_f1": round(delta, 4)} for delta, prompt in
            sorted(pairs, key=lambda x: -x[0])[:k]]


# ---------------------------------------------------------------------------------------------------------------------
# 1-5 ratings
# ---------------------------------------------------------------------------------------------------------------------

def rating_examples(predictions: dict[str, list[dict[str, Any]]], systems: list[str]) -> list[dict[str, Any]]:
    """Prompts every named system answered, with each system's parsed steps, in the baseline's order."""
    by_system = {name: {r["prompt"]: r for r in predictions[name]} for name in systems}
    first = predictions[systems[0]]
    return [{"prompt": r["prompt"], "reference": r["reference"], "category": r["category"],
             "outputs": {name: by_system[name][r["prompt"]]["steps"] for name in systems}}
            for r in first if all(r["prompt"] in by_system[name] for name in systems)]


def collect_ratings(args: argparse.Namespace, predictions: dict[str, list[dict[str, Any]]],
                    out_dir: Path) -> dict[str, Any]:
    """Run whichever rating paths the flags ask for; the results go into metrics.json and the report."""
    if not (args.judge_url or args.judge_model or args.rating_sheet or args.ratings):
        return {}
    from howto import ratings

    systems = list(predictions)
    result: dict[str, Any] = {}
    if args.judge_url or args.judge_model:
        from howto.llm import ChatClient, LLMError

        try:
            client = ChatClient.from_settings(args.judge_url, args.judge_model, key_env=args.judge_key_env)
            result["judge"] = ratings.judge_outputs(rating_examples(predictions, systems), client, seed=args.seed)
        except LLMError as e:
            raise SystemExit(f"LLM judge: {e}") from None
        write_jsonl(out_dir / "judge.jsonl", result["judge"]["per_example"])
    if args.rating_sheet:
        if len(systems) < 2:
            raise SystemExit("--rating-sheet needs two systems")
        csv_path, html_path = ratings.write_rating_sheet(rating_examples(predictions, systems[:2]), out_dir,
                                                         seed=args.seed)
        result["rating_sheet"] = {"csv": str(csv_path), "html": str(html_path), "systems": systems[:2],
                                  "key": str(out_dir / "rating_key.json")}
        console.print(f"rating sheet: {csv_path} and {html_path} (keep {out_dir / 'rating_key.json'} from raters)")
    if args.ratings:
        key = Path(args.ratings_key) if args.ratings_key else out_dir / "rating_key.json"
        try:
            result["human"] = ratings.read_ratings([Path(f) for f in args.ratings], key, systems=systems[:2])
        except (ratings.RatingsError, ValueError) as e:
            raise SystemExit(f"--ratings: {e}") from None
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Plots and report
# ---------------------------------------------------------------------------------------------------------------------

def make_plots(scores: dict[str, list[dict[str, Any]]]) -> dict[str, bytes]:
    """PNG plots: per-example score distributions, scores by category, order accuracy by number of steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig: Any) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    plots = {}
    shown = ("bertscore_f1", "order_accuracy", "step_coverage")
    fig, axes = plt.subplots(1, len(shown), figsize=(13, 3.6))
    for ax, metric in zip(axes, shown, strict=True):
        values = [[s[metric] for s in rows if s[metric] is not None] for rows in scores.values()]
        ax.boxplot(values, tick_labels=list(scores), showmeans=True)
        for i, v in enumerate(values, 1):
            jitter = [i + 0.12 * ((j * 7919) % 11 - 5) / 5 for j in range(len(v))]
            ax.scatter(jitter, v, s=6, alpha=0.35)
        ax.set_title(METRIC_LABELS[metric])
    fig.suptitle("Per-example scores (box: quartiles, triangle: mean)")
    plots["distributions"] = png(fig)

    categories = sorted({s["category"] for rows in scores.values() for s in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(categories) + 1.6), sharey=True)
    height = 0.8 / len(scores)
    for ax, metric in zip(axes, ("bertscore_f1", "order_accuracy"), strict=True):
        for k, (name, rows) in enumerate(scores.items()):
            by_cat = breakdown(rows, "category")
            means = [by_cat.get(c, {}).get(metric) for c in categories]
            ax.barh([i + k * height for i in range(len(categories))],
                    [m if m is not None else float("nan") for m in means], height=height, label=name)
        ax.set_yticks([i + height * (len(scores) - 1) / 2 for i in range(len(categories))], categories)
        ax.set_title(f"{METRIC_LABELS[metric]} by category")
    axes[0].invert_yaxis()  # the axes share y: inverting one inverts both
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(scores), bbox_to_anchor=(0.5, 0))
    plots["by_category"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, rows in scores.items():
        by_n = breakdown(rows, "n_ref_steps")
        xs = [int(n) for n, v in by_n.items() if v["order_accuracy"] is not None]
        ax.plot(xs, [by_n[str(x)]["order_accuracy"] for x in xs], marker="o", label=name)
    ax.set_xlabel("number of reference steps")
    ax.set_ylabel("mean step-order accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.set_title("Step-order accuracy by number of reference steps")
    plots["order_by_steps"] = png(fig)
    return plots


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_delta(metric: str, comparison: dict[str, Any]) -> str:
    """The difference with an arrow when its CI excludes zero, pointing the way that is better."""
    delta = comparison["delta"]
    if delta is None:
        return "n/a"
    text = f"{delta:+.3f}"
    if comparison["ci_low"] > 0 or comparison["ci_high"] < 0:
        better = (delta < 0) if metric in LOWER_IS_BETTER else (delta > 0)
        text += " ▲" if better else " ▼"
    return text


Block = tuple[Any, ...]


def build_report(metrics: dict[str, Any], scores: dict[str, list[dict[str, Any]]],
                 predictions: dict[str, list[dict[str, Any]]], plots: dict[str, bytes]) -> list[Block]:
    """The report as blocks, rendered to Markdown and HTML alike."""
    settings = metrics["settings"]
    names = list(scores)
    baseline = metrics["baseline"]
    blocks: list[Block] = [("h1", "Evaluation: " + " vs ".join(names))]
    blocks.append(("p", f"{metrics['n_examples']} test prompts. Baseline: {baseline}; every difference is a system "
                        f"minus the baseline, with a {settings['bootstrap']['confidence']:.0%} paired bootstrap "
                        f"interval ({settings['bootstrap']['n_resamples']} resamples of prompts) and a two-sided "
                        "Wilcoxon signed-rank p. ▲/▼: the interval excludes zero, better/worse."))

    blocks.append(("h2", "Results"))
    for name, comparison in metrics["comparisons"].items():
        rows = []
        for m in METRICS:
            c = comparison[m]
            rows.append([METRIC_LABELS[m], fmt(metrics["systems"][baseline]["means"][m]),
                         fmt(metrics["systems"][name]["means"][m]), fmt_delta(m, c),
                         f"[{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]", fmt_p(c["p_value"]), str(c["n"])])
        blocks.append(("table", ["Metric", baseline, name, f"Δ ({name} − {baseline})", "95% CI", "p (Wilcoxon)",
                                 "n paired"], rows))
    if not metrics["comparisons"]:
        blocks.append(("table", ["Metric", *names],
                       [[METRIC_LABELS[m], *(fmt(metrics["systems"][n]["means"][m]) for n in names)]
                        for m in METRICS]))
    blocks.append(("p", "Order accuracy is undefined where fewer than two steps align; those prompts are left out "
                        "of its mean and its paired test. Prompts with a defined order accuracy: " +
                        ", ".join(f"{n} {metrics['systems'][n]['n_defined']['order_accuracy']}" for n in names) + "."))

    gen = [[n, fmt(s["generation"]["tokens"]), fmt(s["generation"]["mean_tokens"], 1),
            fmt(s["generation"]["seconds"], 1), fmt(s["generation"]["tokens_per_second"], 1)]
           for n, s in metrics["systems"].items() if s["generation"]]
    if gen:
        blocks += [("h2", "Generation"), ("table", ["System", "tokens", "tokens per answer", "seconds",
                                                    "tokens/s"], gen)]

    blocks.append(("h2", "Settings"))
    bs, al = settings["bertscore"], settings["alignment"]
    items = [f"BERTScore: {bs['model']}, layer {bs['num_layers']}, "
             f"{'rescaled with baseline' if bs['rescale_with_baseline'] else 'not rescaled'}, idf off, steps joined "
             f"one a line on both sides (bert-score hash `{bs['hash']}`). Scores compare only under equal settings.",
             f"Step alignment: {al['model']} sentence embeddings (cosine), Hungarian matching, threshold "
             f"{al['threshold']}."]
    if settings.get("generation"):
        g = settings["generation"]
        decoding = "greedy" if g["temperature"] == 0 else f"sampling at temperature {g['temperature']}"
        items.append(f"Generation: {decoding}, at most {g['max_new_tokens']} new tokens, batch size "
                     f"{g['batch_size']}, canonical chat format of howto.chat.")
        items += [f"System {s['name']}: " + ", ".join(f"{k} {v}" for k, v in s.items() if v and k != "name")
                  for s in g["systems"]]
    items.append(f"Data: {settings['data']}")
    blocks.append(("list", items))

    blocks.append(("h2", "Definitions"))
    blocks.append(("list", [
        "BERTScore P/R/F1: token-level cosine matching between the generated and reference steps, each side the "
        "steps one a line (Zhang et al., 2020, via the bert-score package).",
        "Step-order accuracy = (τ + 1) / 2, Kendall's τ between the reference positions and the generated positions "
        "of the aligned steps: the fraction of pairs of aligned steps in the same relative order. 1.0: same order; "
        "0.0: reversed; undefined with fewer than two aligned steps.",
        "Alignment: generated and reference steps paired one to one by Hungarian matching on sentence-embedding "
        "cosine similarity; pairs below the threshold are not aligned.",
        "Step coverage = aligned reference steps / reference steps. Exact order = 1 when every reference step is "
        "aligned and in the reference order.",
        "Format validity = the output parses into at least two steps. Step-count error = |generated steps − "
        "reference steps|.",
    ]))

    blocks.append(("h2", "Plots"))
    titles = {"distributions": "Per-example score distributions", "by_category": "Scores by category",
              "order_by_steps": "Order accuracy by number of reference steps"}
    for name, data in plots.items():
        blocks += [("h3", titles[name]), ("img", name, data)]

    blocks.append(("h2", "Scores by category"))
    cats = sorted({c for n in names for c in metrics["by_category"][n]})
    blocks.append(("table", ["Category", *(f"{n} F1 / order / n" for n in names)],
                   [[c, *(" / ".join([fmt(metrics["by_category"][n].get(c, {}).get("bertscore_f1")),
                                      fmt(metrics["by_category"][n].get(c, {}).get("order_accuracy")),
                                      str(metrics["by_category"][n].get(c, {}).get("n", 0))]) for n in names)]
                    for c in cats]))

    pred = {n: {r["prompt"]: r for r in rows} for n, rows in predictions.items()}
    by_prompt = {n: {s["prompt"]: s for s in rows} for n, rows in scores.items()}
    for name, examples in metrics["differing_examples"].items():
        blocks.append(("h2", f"Where {name} and {baseline} differ most (BERTScore F1)"))
        for ex in examples:
            p = ex["prompt"]
            blocks.append(("h3", p))
            blocks.append(("p", f"Category {pred[baseline][p]['category']}. " + "; ".join(
                f"{n}: F1 {fmt(by_prompt[n][p]['bertscore_f1'])}, order {fmt(by_prompt[n][p]['order_accuracy'])}, "
                f"coverage {fmt(by_prompt[n][p]['step_coverage'])}" for n in (baseline, name))))
            blocks.append(("steps", "Reference", pred[baseline][p]["reference"]))
            for n in (baseline, name):
                blocks.append(("steps", n, pred[n][p]["steps"]) if by_prompt[n][p]["format_valid"] else
                              ("pre", f"{n} (not parsed as steps)", pred[n][p]["output"] or "(empty)"))

    blocks.append(("h2", "Failures (outputs that do not parse into at least two steps)"))
    for name in names:
        failed = [r for r, s in zip(predictions[name], scores[name], strict=True) if not s["format_valid"]]
        shown = " (first 10 shown)." if len(failed) > 10 else "."
        blocks.append(("p", f"{name}: {len(failed)} of {len(scores[name])}{shown}"))
        for r in failed[:10]:
            blocks.append(("pre", r["prompt"], (r["output"] or "(empty)")[:600]))

    if metrics.get("ratings"):
        blocks += ratings_blocks(metrics["ratings"])
    return blocks


def ratings_blocks(ratings: dict[str, Any]) -> list[Block]:
    """The section "Ratings (1-5)": means with CIs per system and criterion, paired differences, agreement."""
    blocks: list[Block] = [("h2", "Ratings (1-5)")]
    for kind, title in (("judge", "LLM judge"), ("human", "People")):
        result = ratings.get(kind)
        if not result:
            continue
        systems = result["systems"]
        criteria = list(next(iter(result["means"].values())))
        blocks.append(("h3", title))
        if kind == "judge":
            blocks.append(("p", f"Judge model {result.get('judge_model')}; {result['missing']} scores missing after "
                                f"retries; {result.get('requests')} requests."))
        else:
            blocks.append(("p", f"Raters: {', '.join(result['raters'])}; {result['items']} items; "
                                f"{result['missing']} empty score cells."))
        header = ["Criterion", *(f"{s} mean [95% CI]" for s in systems)]
        paired = result.get("paired") or {}
        if paired:
            header += [f"Δ ({systems[1]} − {systems[0]}) [95% CI]", "p (Wilcoxon)"]
        rows = []
        for c in criteria:
            row = [c, *(f"{fmt(result['means'][s][c], 2)} [{fmt(result['ci'][s][c][0], 2)}, "
                        f"{fmt(result['ci'][s][c][1], 2)}]" for s in systems)]
            if paired:
                d = paired[c]
                row += [f"{fmt(d['delta_mean'], 2)} [{fmt(d['ci'][0], 2)}, {fmt(d['ci'][1], 2)}]",
                        fmt_p(d["p_wilcoxon"])]
            rows.append(row)
        blocks.append(("table", header, rows))
        if kind == "human" and len(result["raters"]) >= 2:
            blocks.append(("table", ["Criterion", "Krippendorff's α (ordinal)", "weighted κ (quadratic)"],
                           [[c, fmt(a["krippendorff_alpha"]), fmt(a["weighted_kappa"])]
                            for c, a in result["agreement"].items()]))
    if ratings.get("rating_sheet"):
        sheet = ratings["rating_sheet"]
        blocks.append(("p", f"Blinded rating sheet for people: {sheet['csv']} and {sheet['html']}; the key "
                            f"{sheet['key']} unblinds the filled sheets (--ratings FILE...)."))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], plot_dir: str) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[1]}]({plot_dir}/{block[1]}.png)")
        elif kind == "steps":
            out.append(f"**{block[1]}**\n\n" + (render_steps(block[2]) if block[2] else "(no steps)"))
        elif kind == "pre":
            out.append(f"**{block[1]}**\n\n```text\n{block[2]}\n```")
    return "\n\n".join(out) + "\n"


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:75rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}
th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:.6rem;white-space:pre-wrap}"""


def render_html(blocks: list[Block]) -> str:
    """A single self-contained page: plots are embedded as base64 PNG, nothing is loaded from elsewhere."""
    e = html.escape
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(block[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(block[2]).decode()
            out.append(f'<img alt="{e(block[1])}" src="data:image/png;base64,{data}">')
        elif kind == "steps":
            items = "".join(f"<li>{e(s)}</li>" for s in block[2])
            out.append(f"<p><b>{e(block[1])}</b></p>" + (f"<ol>{items}</ol>" if items else "<p>(no steps)</p>"))
        elif kind == "pre":
            out.append(f"<p><b>{e(block[1])}</b></p><pre>{e(block[2])}</pre>")
    title = e(blocks[0][1]) if blocks else "Evaluation"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def print_summary(metrics: dict[str, Any]) -> None:
    baseline = metrics["baseline"]
    for name, comparison in metrics["comparisons"].items():
        table = Table(title=f"{name} vs {baseline} ({metrics['n_examples']} prompts)")
        for column in ("metric", baseline, name, "Δ", "95% CI", "p"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for m in METRICS:
            c = comparison[m]
            table.add_row(METRIC_LABELS[m], fmt(metrics["systems"][baseline]["means"][m]),
                          fmt(metrics["systems"][name]["means"][m]), fmt_delta(m, c),
                          escape(f"[{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]"), fmt_p(c["p_value"]))
        console.print(table)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, section="evaluate")
    out_dir = Path(args.out)
    if not args.predictions and not (args.data and args.finetuned):
        raise SystemExit("give --data and --finetuned to generate, or --predictions NAME=FILE ... to score files")
    data_file = test_file(args.data) if args.data else None
    examples = load_test_set(data_file, None) if data_file else []

    systems: list[System] = []
    predictions: dict[str, list[dict[str, Any]]] = {}
    sources: list[Path] = [data_file] if data_file else []
    if args.predictions:
        known = {ex["prompt"]: ex for ex in examples}
        for spec in args.predictions:
            name, path, rows = read_predictions(spec, known)
            if name in predictions:
                raise SystemExit(f"--predictions: the name {name!r} is given twice")
            predictions[name] = rows[: args.limit]
            sources.append(path)
    else:
        examples = examples[: args.limit]
        systems = resolve_systems(args.base, args.finetuned)
        for system in systems:
            predictions[system.name] = generate_system(system, examples, args, out_dir)

    bertscore, encoder = load_scorers(args)
    scores = {}
    for name, rows in predictions.items():
        with console.status(f"scoring {name} ({len(rows)} outputs)"):
            scores[name] = score_system(rows, bertscore, encoder, args.align_threshold)
        write_jsonl(out_dir / name / "scores.jsonl", scores[name])

    names = list(predictions)
    baseline = names[0]
    comparisons, differing, paired_n = {}, {}, {}
    for name in names[1:]:
        comparisons[name], common = compare(scores[baseline], scores[name], args.bootstrap, args.seed)
        paired_n[name] = len(common)
        differing[name] = differing_examples(scores[baseline], scores[name], args.show_examples)
    metrics: dict[str, Any] = {
        "n_examples": len(scores[baseline]),
        "baseline": baseline,
        "settings": {
            "bertscore": bertscore.settings,
            "alignment": {**encoder.settings, "threshold": args.align_threshold},
            "bootstrap": {"n_resamples": args.bootstrap, "confidence": 0.95, "seed": args.seed},
            "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                           "temperature": args.temperature, "seed": args.seed,
                           "systems": [asdict(s) for s in systems]} if systems else None,
            "data": str(data_file) if data_file else None,
            "predictions": {name: str(path) for name, path in zip(names, sources[1 if data_file else 0 :], strict=True)}
            if args.predictions else None,
        },
        "systems": {name: summarise(scores[name], predictions[name]) for name in names},
        "comparisons": comparisons,
        "n_paired": paired_n,
        "by_category": {name: breakdown(scores[name], "category") for name in names},
        "by_n_ref_steps": {name: breakdown(scores[name], "n_ref_steps") for name in names},
        "differing_examples": differing,
        "failures": {name: [s["prompt"] for s in scores[name] if not s["format_valid"]] for name in names},
        "ratings": collect_ratings(args, predictions, out_dir),
    }
    plots = make_plots(scores)
    for name, data in plots.items():
        atomic_write_bytes(out_dir / "plots" / f"{name}.png", data)
    blocks = build_report(metrics, scores, predictions, plots)
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "report.md", render_markdown(blocks, "plots"))
    atomic_write_text(out_dir / "report.html", render_html(blocks))
    write_run_info(out_dir, vars(args), sources, extra={"systems": names})
    print_summary(metrics)
    console.print(f"wrote {out_dir / 'report.md'}, {out_dir / 'report.html'} and {out_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
