"""Evaluate: does the fine-tuned model write better step-by-step instructions than its base model, and where?

Every test prompt goes through the base model and the fine-tuned one (a LoRA adapter, a merged folder or a GGUF
file) in the canonical chat format that training used; both outputs are parsed into steps and scored against the
reference steps with BERTScore, step-order accuracy, step coverage, exact order, format validity and step-count
error; the fine-tuned minus base difference of every metric gets a bootstrap 95% CI and a Wilcoxon p-value.
When the run folder holds exports (GGUF files, else merged weights), they answer the same prompts and a parity
section says whether what ships is as good as the adapter. A forgetting probe (general questions, data/
forgetting.jsonl) compares the base and the fine-tuned model's loss on reference answers, how often they answer
a question that is not a how-to with a numbered list, and how often they get a fact or a sum right. Optional 1-5
ratings (an LLM judge, or blinded sheets for people) go into the same report.

    python evaluate.py --data data/prepared --finetuned runs/r1 --out eval/r1
    python evaluate.py --data data/prepared --base tiny --finetuned runs/r1 --out eval/r1 --bertscore-model minilm
    python evaluate.py --data data/prepared --finetuned runs/r1 --out eval/r1 --fail-on-regression
    python evaluate.py --predictions base=base.jsonl gpt=gpt.jsonl --out eval/cmp --bertscore-model minilm
    python evaluate.py --finetuned runs/r1 --out eval/r1 --serve     # chat and rate on http://127.0.0.1:7860

Settings (flags, or the `evaluate:` section of a --config YAML): greedy decoding of at most 256 new tokens, 8
prompts a batch (ordered by the reference's length so that a batch's answers end together); BERTScore with
roberta-large (--bertscore-model minilm offline); steps aligned by all-MiniLM-L6-v2 at cosine 0.5; 2000 bootstrap
resamples; exports judged against a tolerance of 0.02 on BERTScore F1 and step-order accuracy.

Writes OUT/metrics.json, OUT/report.md (plots in OUT/plots/), OUT/report.html, and per system
OUT/<name>/predictions.jsonl (generation only; also the cache a rerun reuses), OUT/<name>/scores.jsonl and
OUT/<name>/forgetting.jsonl (the probe, base and fine-tuned).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from howto import forgetting, parity, report, runtime
from howto.chat import SYSTEM_PROMPT, parse_steps, render_steps
from howto.generate import (SHIPPED_DECODING, GGUFGenerator, HFGenerator, gguf_problem, is_gguf_file,
                            model_folder_problem)
from howto.metrics import (DEFAULT_ALIGN_THRESHOLD, METRICS, MIN_PAIRED, MINILM, TOO_FEW, BertScore,
                           BertScoreUnavailable, StepEncoder, mean_defined, paired_comparison, prompt_key,
                           score_examples, too_few_pairs)
from howto.models import (default_model, free_memory, has_cuda, load_for_generation, load_tokenizer, read_run_info,
                          resolve_model)
from howto.records import read_clean, read_records, string_list
from howto.report import Rows
from howto.runio import (RunError, atomic_write_bytes, atomic_write_text, check_out_dir, hash_files, json_line,
                         parse_args, positive_int, run_script, write_json, write_jsonl, write_run_info)

console = Console(stderr=True)
# What evaluate.py writes at the top of OUT: no system may be named like one, since OUT/<name>/ holds its files
# ("ratings" is the folder the page of --serve saves its ratings to, howto.serve.RATINGS_DIR).
OUTPUTS = ("metrics.json", "report.md", "report.html", "plots", "config.yaml", "run_info.json", "judge.jsonl",
           "rating_sheet.csv", "rating_key.json", "ratings")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    runtime.setup()
    args = parse_args(build_parser(), argv, section="evaluate", siblings=sibling_parsers)
    out_dir = check_args(args)
    if args.serve:
        serve_page(args, out_dir)
        return {}
    data_file = test_file(args.data) if args.data else None
    examples = load_test_set(data_file, None) if data_file else []
    if args.predictions:
        systems, exports, probes = [], [], {}
        tables, sources = read_all_predictions(args.predictions, examples, args.limit)
    else:
        systems, exports, tables, probes = generate_all(args, examples[: args.limit], out_dir)
        sources = {}
    scorers = score_all(tables, args, out_dir)
    metrics = summarise_run(tables, systems, exports, args, data_file, sources, scorers)
    metrics["parity"] = parity_section(tables, exports, args)
    metrics["forgetting"] = forgetting_section(probes, args) if args.forgetting and systems else None
    metrics["ratings"] = collect_ratings(args, tables, out_dir)
    write_outputs(metrics, tables, args, [p for p in (data_file, *sources.values()) if p], out_dir)
    print_results(metrics, out_dir)
    check_regression(metrics, args)
    return metrics


def sibling_parsers() -> list[argparse.ArgumentParser]:
    """The other two scripts' parsers: a top-level key of a --config file that one of them has is meant for it."""
    import finetune
    import prepare_data

    return [finetune.build_parser(), prepare_data.build_parser()]


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
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N test prompts")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, the bootstrap and rating order")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256, help="most tokens generated per answer")
    gen.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together (left-padded)")
    gen.add_argument("--temperature", type=float, default=SHIPPED_DECODING["temperature"],
                     help="0 = greedy decoding; above 0 samples")
    gen.add_argument("--repeat-penalty", type=float, default=SHIPPED_DECODING["repeat_penalty"],
                     help="a token already in the context has its logit divided by this (multiplied when negative); "
                          "1 = none. The default is what the exports ship with (howto.generate.SHIPPED_DECODING)")
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
    sc.add_argument("--bootstrap", type=positive_int, default=2000,
                    help="bootstrap resamples for the confidence intervals")
    sc.add_argument("--show-examples", type=int, default=5, help="examples shown where two systems differ most")
    ex = p.add_argument_group("exports and forgetting")
    ex.add_argument("--parity", action=argparse.BooleanOptionalAction, default=True,
                    help="score the run folder's exports (GGUF files, else merged/) beside the adapter")
    ex.add_argument("--exports", nargs="+", metavar="PATH", help="exports to score instead of the run folder's: "
                                                                 ".gguf files or merged model folders")
    ex.add_argument("--parity-tolerance", type=float, default=parity.DEFAULT_TOLERANCE,
                    help="largest drop in BERTScore F1 or step-order accuracy an export may show and still be 'same'")
    ex.add_argument("--fail-on-regression", action="store_true", help="exit non-zero when an export is worse")
    ex.add_argument("--forgetting", action=argparse.BooleanOptionalAction, default=True,
                    help="run the forgetting probe on the base and the fine-tuned model")
    ex.add_argument("--forgetting-data", default=str(forgetting.BUNDLED),
                    help="probe questions (JSONL: prompt, answer, kind)")
    rt = p.add_argument_group("1-5 ratings")
    rt.add_argument("--judge-url", help="OpenAI-compatible endpoint (with /v1) of an LLM that rates every output")
    rt.add_argument("--judge-model", help="model name for the judge endpoint")
    rt.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    rt.add_argument("--rating-sheet", action="store_true",
                    help="write a blinded rating sheet (CSV) of the first two systems for people, and its key")
    rt.add_argument("--force-new-sheet", action="store_true",
                    help="let --rating-sheet or --serve replace a rating key whose sheet may be out with raters")
    rt.add_argument("--ratings", nargs="+", metavar="FILE", help="filled rating sheets to read back and report")
    rt.add_argument("--ratings-key", help="key that unblinds the sheets (default: OUT/rating_key.json)")
    pg = p.add_argument_group("the page: chat and rate in a browser")
    pg.add_argument("--serve", action="store_true",
                    help="serve a local page instead of evaluating: chat with the base and --finetuned models side "
                         "by side, and rate OUT's answers blind (saved to OUT/ratings/, read back by --ratings)")
    pg.add_argument("--host", default="127.0.0.1", help="address the page listens on (loopback: this machine only)")
    pg.add_argument("--port", type=positive_int, default=7860, help="port of the page")
    return p


def check_args(args: argparse.Namespace) -> Path:
    """Every check that needs no model, before any slow work; returns the output folder, created."""
    if args.serve and not args.finetuned:
        raise RunError("--serve needs --finetuned (the run to chat with) and --out (the evaluation whose answers are "
                       "rated)")
    if not args.serve and not args.predictions and not (args.data and args.finetuned):
        raise RunError("give --data and --finetuned to generate, or --predictions NAME=FILE ... to score files")
    if args.port > 65535:
        raise RunError(f"--port {args.port}: a port is 1-65535")
    if args.bootstrap < 100:
        raise RunError(f"--bootstrap {args.bootstrap}: a 95% interval needs at least 100 resamples (default 2000)")
    if args.parity_tolerance < 0:
        raise RunError(f"--parity-tolerance {args.parity_tolerance}: must be 0 or more")
    if args.fail_on_regression and (args.predictions or not args.parity):
        raise RunError("--fail-on-regression fails on an export worse than its adapter; "
                       + ("--predictions scores files and has no exports" if args.predictions else
                          "--no-parity scores no export"))
    out_dir = check_out_dir(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# Test data and predictions files
# ---------------------------------------------------------------------------------------------------------------------

def test_file(data: str) -> Path:
    path = Path(data)
    file = path / "test.jsonl" if path.is_dir() else path
    if not file.is_file():
        hint = " (expected test.jsonl in the folder)" if path.is_dir() else ""
        raise RunError(f"--data {data}: no such file{hint}")
    return file


def _jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for raw in read_records(path):
        if raw.problem:
            raise RunError(raw.problem)
        if not isinstance(raw.data, dict):
            raise RunError(f"{path}:{raw.line}: expected a JSON object, got {type(raw.data).__name__}")
        rows.append((raw.line, raw.data))
    return rows


def _prompt_field(record: dict[str, Any], where: str) -> str:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RunError(f"{where}: field 'prompt' must be a non-empty string")
    return prompt


def _count_field(record: dict[str, Any], field: str, where: str, whole: bool) -> int | float | None:
    """An optional count (`n_tokens`, whole) or duration (`seconds`): absent or null, else a finite number >= 0."""
    value = record.get(field)
    if value is None:
        return None
    number = isinstance(value, int) if whole else isinstance(value, int | float)
    if isinstance(value, bool) or not number or not math.isfinite(value) or value < 0:
        wanted = "a whole number" if whole else "a number"
        raise RunError(f"{where}: field {field!r} must be {wanted} >= 0 or null, got {json.dumps(value)}")
    return value


def load_test_set(file: Path, limit: int | None) -> list[dict[str, Any]]:
    """Test records as examples {prompt, response, category} (howto.records' clean records); a prompt seen twice
    is evaluated once."""
    examples: dict[str, dict[str, Any]] = {}
    for lineno, record in read_clean(file):
        if prompt_key(record["prompt"]) in examples:
            console.print(f"[yellow]{file}:{lineno}: duplicate prompt, evaluated once[/]")
            continue
        examples[prompt_key(record["prompt"])] = {k: record[k] for k in ("prompt", "response", "category")}
    if not examples:
        raise RunError(f"{file}: no test records")
    return list(examples.values())[:limit]


def read_predictions(spec: str, known: dict[str, dict[str, Any]]) -> tuple[str, Path, Rows]:
    """A NAME=FILE predictions file as a table like generate_system's. A missing reference or category is taken
    from --data when the prompt is there."""
    name, sep, file = spec.partition("=")
    if not sep or not name or not file:
        raise RunError(f"--predictions {spec}: expected NAME=FILE")
    if name.lower() in OUTPUTS or "/" in name or "\\" in name or name.startswith("."):
        raise RunError(f"--predictions {spec}: {name!r} cannot be used as a system name (OUT/{name} holds the "
                       f"system's files; the name must not contain a slash, start with a dot or be one of "
                       f"evaluate's outputs: {', '.join(OUTPUTS)})")
    path = Path(file)
    if not path.is_file():
        raise RunError(f"--predictions {spec}: no such file {file}")
    table: Rows = {}
    seen: dict[str, int] = {}
    for lineno, record in _jsonl_records(path):
        where = f"{path}:{lineno}"
        prompt = _prompt_field(record, where)
        key = prompt_key(prompt)
        if key in seen:
            raise RunError(f"{where}: duplicate prompt (first on line {seen[key]})")
        seen[key] = lineno
        test = known.get(key, {})
        field = "reference" if "reference" in record else "response"
        if field in record:
            response = string_list(record[field], where, field)
        elif test:
            response = test["response"]
        else:
            raise RunError(f"{where}: field 'reference' (or 'response') is missing and the prompt is not in --data")
        output = record.get("output")
        if isinstance(output, list) and all(isinstance(s, str) for s in output):
            steps, text = [s.strip() for s in output if s.strip()], render_steps(output)
        elif isinstance(output, str):
            steps, text = parse_steps(output), output
        else:
            raise RunError(f"{where}: field 'output' must be a string or a list of strings")
        table[key] = {"prompt": prompt, "response": response, "output": text, "steps": steps,
                      "category": str(record.get("category") or test.get("category") or "uncategorized"),
                      "n_tokens": _count_field(record, "n_tokens", where, whole=True),
                      "seconds": _count_field(record, "seconds", where, whole=False)}
    if not table:
        raise RunError(f"{path}: no predictions")
    return name, path, table


def read_all_predictions(specs: list[str], examples: list[dict[str, Any]],
                         limit: int | None) -> tuple[dict[str, Rows], dict[str, Path]]:
    known = {prompt_key(ex["prompt"]): ex for ex in examples}
    tables: dict[str, Rows] = {}
    sources: dict[str, Path] = {}
    for spec in specs:
        name, path, table = read_predictions(spec, known)
        if name in tables:
            raise RunError(f"--predictions: the name {name!r} is given twice")
        tables[name], sources[name] = dict(list(table.items())[:limit]), path
    return tables, sources


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


def as_system(name: str, path: Path, base: str, flag: str) -> System:
    """A GGUF file, an adapter folder or a merged model folder as a system, or a clear error naming the flag."""
    if path.is_file():
        if not is_gguf_file(str(path)):
            raise RunError(f"{flag} {path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        problem = gguf_problem(str(path))
        if problem:
            raise RunError(f"{flag} {path}: {problem}")
        return System(name, gguf=str(path), tokenizer_model=base)
    adapter = (path / "adapter_config.json").is_file()
    if not (adapter or (path / "config.json").is_file()):
        raise RunError(f"{flag} {path}: expected a run or adapter folder (adapter_config.json), a merged model "
                       "folder (config.json) or a .gguf file")
    problem = model_folder_problem(path)
    if problem:
        raise RunError(f"{flag} {path}: {problem}")
    return System(name, model=base, adapter=str(path)) if adapter else System(name, model=str(path))


def resolve_systems(base: str | None, finetuned: str) -> list[System]:
    """The base and fine-tuned systems, with the base that training used unless --base says otherwise."""

    path = Path(finetuned)
    if not path.exists():
        raise RunError(f"--finetuned {finetuned}: no such file or folder")
    adapter_config = path / "adapter_config.json"
    trained_on = read_run_info(path).get("base_model")
    if trained_on is None and adapter_config.is_file():
        trained_on = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    base = base or trained_on or default_model()
    return [System("base", model=base), as_system("finetuned", path, base, "--finetuned")]


def export_systems(args: argparse.Namespace, base: str) -> list[System]:
    """The exports to score beside the adapter: --exports, else what the run folder holds."""
    if args.exports:
        found = [(parity.export_name(Path(p)), Path(p)) for p in args.exports]
        for _, path in found:
            if not path.exists():
                raise RunError(f"--exports {path}: no such file or folder")
    else:
        found = parity.find_exports(Path(args.finetuned))
    names = [name for name, _ in found]
    if len(set(names)) < len(names) or {"base", "finetuned"} & set(names):
        raise RunError(f"--exports: the exports need distinct names other than base and finetuned, got {names}")
    return [as_system(name, path, base, "--exports") for name, path in found]


def generate_all(args: argparse.Namespace, examples: list[dict[str, Any]], out_dir: Path) -> tuple[
        list[System], list[System], dict[str, Rows], dict[str, list[dict[str, Any]] | None]]:
    """Base, fine-tuned and export systems, each one's answers, and the forgetting probe for base and fine-tuned
    (not for a GGUF file, which gives no teacher-forced loss here)."""
    systems = resolve_systems(args.base, args.finetuned)
    exports = export_systems(args, systems[0].model) if args.parity else []
    probe = forgetting.read_probe(args.forgetting_data) if args.forgetting else None
    tables, probes = {}, {}
    for system in systems + exports:
        tables[system.name], probes[system.name] = generate_system(
            system, examples, args, out_dir, None if system in exports or system.gguf else probe)
    return systems, exports, tables, probes


def _weights_fingerprint(path: Path) -> list[Any]:
    """Sizes and modification times of weight files: cheap, and changes whenever the weights are rewritten."""
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"})
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def settings_hash(system: System, args: argparse.Namespace) -> str:
    """What makes a cached output reusable: model weights, prompt format and decoding settings (not batch size)."""

    model = resolve_model(system.model) if system.model else None
    identity: dict[str, Any] = {
        **asdict(system), "name": None, "system_prompt": SYSTEM_PROMPT, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "seed": args.seed if args.temperature > 0 else None,
        "repeat_penalty": args.repeat_penalty,
        "model_weights": _weights_fingerprint(Path(model)) if model and Path(model).is_dir() else model,
        "adapter_sha256": hash_files(Path(system.adapter).glob("adapter_*")) if system.adapter else None,
        "gguf_weights": _weights_fingerprint(Path(system.gguf)) if system.gguf else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_generator(system: System, args: argparse.Namespace) -> HFGenerator | GGUFGenerator:
    """A function from prompts to answers for one system, with its model loaded."""

    if system.gguf:
        return GGUFGenerator(system.gguf, load_tokenizer(resolve_model(system.tokenizer_model)), args.gguf_context,
                             args.max_new_tokens, args.temperature, args.seed, has_cuda(), args.repeat_penalty)
    lm, tokenizer = load_for_generation(system.model, adapter=system.adapter)
    return HFGenerator(lm, tokenizer, args.max_new_tokens, args.temperature, args.repeat_penalty)


def cached_rows(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Rows already generated with these settings, by prompt_key. A last line cut short by an interruption is
    dropped (that prompt is generated again); any other broken line is an error."""
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
            raise RunError(f"{path}:{lineno}:{e.colno}: invalid JSON in the predictions cache ({e.msg}); delete "
                             "the file to generate again") from None
        if row.get("settings_hash") == key:
            rows[prompt_key(row["prompt"])] = row
    return rows


def _append_journal(path: Path) -> Any:
    """The predictions file opened for appending, cut back to its last complete line (an interrupted write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b")
    f.seek(0)
    data = f.read()
    if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
    return f


def generate_system(system: System, examples: list[dict[str, Any]], args: argparse.Namespace, out_dir: Path,
                    probe: list[dict[str, Any]] | None) -> tuple[Rows, list[dict[str, Any]] | None]:
    """Predictions of one system for every example, generating only what the cache does not hold yet, and the
    forgetting probe's rows when asked for (with the same loaded model).

    Prompts are generated in the order of their reference's length, so that a batch's answers end at about the same
    time instead of all waiting for one long one. Each finished batch is appended to OUT/<name>/predictions.jsonl
    at once, so an interrupted run loses at most one batch; when anything was generated the file is rewritten once,
    atomically, in test order (rows of other prompts with the same settings are kept after them, so a --limit run
    does not throw work away). `seconds` is the batch's time shared evenly among its prompts.
    """

    key = settings_hash(system, args)
    path = out_dir / system.name / "predictions.jsonl"
    cache = cached_rows(path, key)
    todo = sorted((ex for ex in examples if prompt_key(ex["prompt"]) not in cache),
                  key=lambda ex: len(render_steps(ex["response"])))
    probe_path, probe_key = out_dir / system.name / "forgetting.jsonl", _probe_key(key, probe)
    probe_rows = list(cached_rows(probe_path, probe_key).values()) if probe else None
    probe_todo = bool(probe) and len(probe_rows or []) < len(probe or [])
    console.print(f"[bold]{system.name}[/]: {len(examples) - len(todo)} cached, {len(todo)} to generate "
                  f"({system.gguf or system.model}{' + ' + system.adapter if system.adapter else ''})")
    if not todo and not probe_todo:
        return {prompt_key(ex["prompt"]): cache[prompt_key(ex["prompt"])] for ex in examples}, probe_rows
    generate = load_generator(system, args)
    if args.temperature > 0:
        import torch

        torch.manual_seed(args.seed)
    batch_size = 1 if system.gguf else args.batch_size
    with _append_journal(path) as f, _progress() as progress:
        task = progress.add_task(f"generating ({system.name})", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            began = time.perf_counter()
            answers = generate([ex["prompt"] for ex in batch])
            seconds = (time.perf_counter() - began) / len(batch)
            # Decoding steps: an answer's own (its tokens and its end), and its batch's, which every row waits out.
            steps = [min(n_tokens + 1, args.max_new_tokens) for _, n_tokens in answers]
            for ex, (text, n_tokens), own in zip(batch, answers, steps, strict=True):
                row = {**ex, "output": text, "steps": parse_steps(text), "n_tokens": n_tokens,
                       "seconds": round(seconds, 4), "decode_steps": own, "batch_steps": max(steps),
                       "settings_hash": key}
                cache[prompt_key(ex["prompt"])] = row
                f.write(json_line(row, path).encode())
            f.flush()
            os.fsync(f.fileno())
            progress.advance(task, len(batch))
    if probe_todo:
        with console.status(f"forgetting probe ({system.name}, {len(probe or [])} questions)"):
            probe_rows = forgetting.probe_model(generate.lm, generate.tokenizer, probe or [], args.batch_size,
                                                generate.repeat_penalty)
        write_jsonl(probe_path, [{**r, "settings_hash": probe_key} for r in probe_rows])
    del generate
    free_memory()
    table = {prompt_key(ex["prompt"]): cache[prompt_key(ex["prompt"])] for ex in examples}
    write_jsonl(path, [*table.values(), *(row for k, row in cache.items() if k not in table)])
    return table, probe_rows


def _probe_key(key: str, probe: list[dict[str, Any]] | None) -> str:
    identity = json.dumps([key, probe, forgetting.MAX_NEW_TOKENS], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


# ---------------------------------------------------------------------------------------------------------------------
# Scoring and comparison
# ---------------------------------------------------------------------------------------------------------------------

def score_all(tables: dict[str, Rows], args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Every system's rows scored, with BERTScore and the step encoder loaded once; their settings."""
    try:
        bertscore = BertScore(args.bertscore_model, args.bertscore_layers, batch_size=args.bertscore_batch_size)
    except BertScoreUnavailable as e:
        raise RunError(str(e)) from None
    encoder = StepEncoder(args.align_model)
    for name, table in tables.items():
        with console.status(f"scoring {name} ({len(table)} outputs)"):
            score_table(table, bertscore, encoder, args.align_threshold)
        write_jsonl(out_dir / name / "scores.jsonl", [score_row(r) for r in table.values()])
    return {"bertscore": bertscore.settings, "alignment": {**encoder.settings, "threshold": args.align_threshold}}


def score_table(table: Rows, bertscore: BertScore, encoder: StepEncoder, threshold: float) -> None:
    """Every metric of every row, added to the row."""
    rows = list(table.values())
    scores = score_examples([r["steps"] for r in rows], [r["response"] for r in rows], bertscore, encoder, threshold)
    for row, score in zip(rows, scores, strict=True):
        row.update(score)


def score_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of OUT/<name>/scores.jsonl: the prompt, its category and every per-example score."""
    fields = ("n_ref_steps", "n_gen_steps", "n_aligned", "alignment")
    return {"prompt": row["prompt"], "category": row["category"], **{k: row[k] for k in (*METRICS, *fields)}}


def summarise(table: Rows) -> dict[str, Any]:
    """Means per metric (undefined order accuracies left out, with the count that is left), generation totals."""
    rows = list(table.values())
    means, defined = {}, {}
    for metric in METRICS:
        means[metric], defined[metric] = mean_defined([r[metric] for r in rows])
    tokens = [r["n_tokens"] for r in rows if r.get("n_tokens") is not None]
    seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
    generation = None
    if tokens and seconds:
        generation = {"tokens": int(sum(tokens)), "seconds": round(float(sum(seconds)), 3),
                      "tokens_per_second": round(sum(tokens) / sum(seconds), 2) if sum(seconds) else None,
                      "mean_tokens": round(sum(tokens) / len(tokens), 1),
                      "useful_share": _useful_share(rows)}
    return {"n_examples": len(rows), "means": means, "n_defined": defined,
            "format_failures": sum(1 - r["format_valid"] for r in rows), "generation": generation}


def _useful_share(rows: list[dict[str, Any]]) -> float | None:
    """The answers' own decoding steps over the steps their batches ran: what stragglers and padding cost."""
    timed = [r for r in rows if r.get("batch_steps")]
    return round(sum(r["decode_steps"] for r in timed) / sum(r["batch_steps"] for r in timed), 3) if timed else None


def breakdown(table: Rows, key: str) -> dict[str, dict[str, Any]]:
    """Means of the headline metrics per value of `key` (category, number of reference steps)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in table.values():
        groups.setdefault(str(row[key]), []).append(row)
    order = sorted(groups, key=lambda g: (int(g) if g.isdigit() else 0, g))
    return {g: {"n": len(groups[g]), **{m: mean_defined([r[m] for r in groups[g]])[0]
                                        for m in ("bertscore_f1", "order_accuracy", "step_coverage")}}
            for g in order}


def paired_keys(baseline: Rows, other: Rows, names: tuple[str, str]) -> list[str]:
    """The prompts both systems answered (whitespace-normalised); none at all is an error."""
    common = [k for k in baseline if k in other]
    if not common:
        raise RunError(f"{names[1]} and {names[0]} answered no prompt in common ({len(other)} and {len(baseline)} "
                         "prompts): nothing to compare")
    if len(common) < max(len(baseline), len(other)):
        console.print(f"[yellow]{names[1]} vs {names[0]}: {len(common)} prompts paired ({len(other)} and "
                      f"{len(baseline)} answered); the differences are over the paired ones only[/]")
    return common


def compare(baseline: Rows, other: Rows, common: list[str], n_resamples: int, seed: int) -> dict[str, Any]:
    """Paired comparison (other minus baseline) of every metric over the prompts both systems answered."""
    return {m: paired_comparison([baseline[k][m] for k in common], [other[k][m] for k in common],
                                 n_resamples=n_resamples, seed=seed) for m in METRICS}


def differing_examples(baseline: Rows, other: Rows, common: list[str], k: int) -> list[dict[str, Any]]:
    """The prompts where the two systems' BERTScore F1 differ most, largest first."""
    pairs = [(abs(other[key]["bertscore_f1"] - baseline[key]["bertscore_f1"]), baseline[key]["prompt"])
             for key in common]
    return [{"prompt": prompt, "abs_delta_bertscore_f1": round(delta, 4)} for delta, prompt in
            sorted(pairs, key=lambda x: -x[0])[:k]]


def summarise_run(tables: dict[str, Rows], systems: list[System], exports: list[System], args: argparse.Namespace,
                  data_file: Path | None, sources: dict[str, Path], scorers: dict[str, Any]) -> dict[str, Any]:
    """metrics.json without the parity, forgetting and ratings sections: every system but the exports against the
    baseline."""
    names, export_names = list(tables), [e.name for e in exports]
    baseline = names[0]
    comparisons, differing, n_paired = {}, {}, {}
    for name in names[1:]:
        if name in export_names:
            continue
        common = paired_keys(tables[baseline], tables[name], (baseline, name))
        n_paired[name] = len(common)
        comparisons[name] = compare(tables[baseline], tables[name], common, args.bootstrap, args.seed)
        differing[name] = differing_examples(tables[baseline], tables[name], common, args.show_examples)
    return {
        "verdicts": {name: verdict(baseline, name, tables, comparisons[name]) for name in comparisons},
        "n_examples": len(tables[baseline]),
        "baseline": baseline,
        "settings": {
            **scorers,
            "bootstrap": {"n_resamples": args.bootstrap, "confidence": 0.95, "seed": args.seed},
            "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                           "temperature": args.temperature, "repeat_penalty": args.repeat_penalty,
                           "seed": args.seed,
                           "systems": [asdict(s) for s in systems + exports]} if systems else None,
            "data": str(data_file) if data_file else None,
            "predictions": {name: str(path) for name, path in sources.items()} or None,
        },
        "systems": {name: summarise(tables[name]) for name in names},
        "comparisons": comparisons,
        "n_paired": n_paired,
        "by_category": {name: breakdown(tables[name], "category") for name in names},
        "by_n_ref_steps": {name: breakdown(tables[name], "n_ref_steps") for name in names},
        "differing_examples": differing,
        "failures": {name: [r["prompt"] for r in tables[name].values() if not r["format_valid"]] for name in names},
        "looping": {name: looping_examples(tables[name], args.show_examples) for name in names},
    }


def verdict(baseline: str, name: str, tables: dict[str, Rows], comparison: dict[str, Any]) -> str:
    """One line on whether `name` answers better than `baseline`: BERTScore F1's interval decides, but a system
    that loops on more answers than its baseline is never called better, whatever its scores, and over fewer than
    MIN_PAIRED paired prompts nothing is judged."""
    loops = {n: sum(r["looping"] for r in tables[n].values()) for n in (baseline, name)}
    f1 = comparison["bertscore_f1"]
    if too_few_pairs(f1):
        return f"{TOO_FEW} ({f1['n']}, fewer than {MIN_PAIRED}): no difference judged"
    if loops[name] > loops[baseline]:
        return (f"not better: {name} loops on {loops[name]} of {len(tables[name])} answers, {baseline} on "
                f"{loops[baseline]}")
    if f1["ci_low"] is not None and f1["ci_low"] > 0:
        return f"better: BERTScore F1 {f1['delta']:+.3f} [{f1['ci_low']:.3f}, {f1['ci_high']:.3f}]"
    if f1["ci_high"] is not None and f1["ci_high"] < 0:
        return f"worse: BERTScore F1 {f1['delta']:+.3f} [{f1['ci_low']:.3f}, {f1['ci_high']:.3f}]"
    return "no clear difference: BERTScore F1's interval includes zero"


def looping_examples(table: Rows, k: int) -> list[dict[str, Any]]:
    """The worst looping answers (most repeated steps first), shown as generated."""
    rows = sorted((r for r in table.values() if r["looping"]), key=lambda r: (-r["repeated_steps"], -r["n_gen_steps"]))
    return [{"prompt": r["prompt"], "repeated_steps": round(r["repeated_steps"], 3), "n_gen_steps": r["n_gen_steps"],
             "n_ref_steps": r["n_ref_steps"], "output": r["output"]} for r in rows[:k]]


def parity_section(tables: dict[str, Rows], exports: list[System], args: argparse.Namespace) -> dict[str, Any] | None:
    """Each export against the fine-tuned system it was made from."""
    if not exports:
        return None
    reference = tables["finetuned"]
    result = {}
    for export in exports:
        paired_keys(reference, tables[export.name], ("finetuned", export.name))
        result[export.name] = {"path": export.gguf or export.model, **parity.export_parity(
            reference, tables[export.name], args.parity_tolerance, args.bootstrap, args.seed)}
    return {"reference": "finetuned", "tolerance": args.parity_tolerance, "metrics": list(parity.PARITY_METRICS),
            "exports": result}


def forgetting_section(probes: dict[str, list[dict[str, Any]] | None], args: argparse.Namespace) -> dict[str, Any]:
    """The probe's paired comparison of base and fine-tuned, or why it was skipped."""
    bundled = Path(args.forgetting_data).resolve() == forgetting.BUNDLED  # named without this machine's folders
    section: dict[str, Any] = {"data": "the bundled data/forgetting.jsonl" if bundled else args.forgetting_data,
                               "max_new_tokens": forgetting.MAX_NEW_TOKENS, "n_prompts": 0,
                               "general_mixed": read_run_info(args.finetuned).get("general")}
    if not probes.get("base") or not probes.get("finetuned"):
        return {**section, "skipped": "the probe needs transformers weights for both models (a GGUF file has no "
                                      "teacher-forced loss here); evaluate the adapter or merged folder"}
    return {**section, **forgetting.compare_probes(probes["base"], probes["finetuned"], args.bootstrap, args.seed)}


# ---------------------------------------------------------------------------------------------------------------------
# 1-5 ratings
# ---------------------------------------------------------------------------------------------------------------------

def rating_examples(tables: dict[str, Rows], systems: list[str]) -> list[dict[str, Any]]:
    """Prompts every named system answered, with each system's parsed steps, in the baseline's order."""
    first = tables[systems[0]]
    return [{"prompt": row["prompt"], "reference": row["response"], "category": row["category"],
             "outputs": {name: tables[name][key]["steps"] for name in systems}}
            for key, row in first.items() if all(key in tables[name] for name in systems)]


def collect_ratings(args: argparse.Namespace, tables: dict[str, Rows], out_dir: Path) -> dict[str, Any]:
    """Run whichever rating paths the flags ask for; the results go into metrics.json and the report."""
    if not (args.judge_url or args.judge_model or args.rating_sheet or args.ratings):
        return {}
    from howto import ratings

    systems = list(tables)
    result: dict[str, Any] = {}
    if args.judge_url or args.judge_model:
        from howto.llm import ChatClient, LLMError

        try:
            client = ChatClient.from_settings(args.judge_url, args.judge_model, key_env=args.judge_key_env)
            result["judge"] = ratings.judge_outputs(rating_examples(tables, systems), client, seed=args.seed)
        except LLMError as e:
            raise RunError(f"LLM judge: {e}") from None
        write_jsonl(out_dir / "judge.jsonl", result["judge"]["per_example"])
    if args.rating_sheet:
        if len(systems) < 2:
            raise RunError("--rating-sheet needs two systems")
        try:
            csv_path = ratings.write_rating_sheet(rating_examples(tables, systems[:2]), out_dir, seed=args.seed,
                                                  force=args.force_new_sheet)
        except ratings.RatingsError as e:
            raise RunError(f"--rating-sheet: {e}") from None
        result["rating_sheet"] = {"csv": str(csv_path), "systems": systems[:2],
                                  "key": str(out_dir / ratings.KEY_FILE)}
        console.print(f"rating sheet: {csv_path} (keep {out_dir / ratings.KEY_FILE} from raters; or rate on the "
                      "page of --serve)")
    if args.ratings:
        key = Path(args.ratings_key) if args.ratings_key else out_dir / ratings.KEY_FILE
        try:
            result["human"] = ratings.read_ratings([Path(f) for f in args.ratings], key, systems=systems[:2])
        except (ratings.RatingsError, ValueError) as e:
            raise RunError(f"--ratings: {e}") from None
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The page (--serve): chat with the models, rate the answers
# ---------------------------------------------------------------------------------------------------------------------

def serve_page(args: argparse.Namespace, out_dir: Path) -> None:
    """Chat with the run's models and rate OUT's answers on a local page, until interrupted. The models load once,
    here; what is missing (no adapter yet, no answers to rate) is said on the page instead of stopping."""
    from howto import serve

    systems, notices = chat_systems(args)
    desk, rate_notice = rating_desk(args, out_dir)
    loaded = []
    for system in systems:
        with console.status(f"loading {system.name} ({system.gguf or system.model})"):
            loaded.append(serve.ChatSystem(system.name, system_title(system), load_generator(system, args)))
    report_hint = (f"To put the ratings in the report: `python evaluate.py --data DATA --finetuned {args.finetuned} "
                   f"--out {out_dir} --ratings {out_dir / serve.RATINGS_DIR}/*.csv` (agreement when two or more "
                   "people rated).")
    page = serve.build_page(loaded, serve.Decoding(args.max_new_tokens, args.temperature, args.repeat_penalty, args.gguf_context),
                            notices, desk, rate_notice, report_hint)
    console.print(f"serving on http://{args.host}:{args.port} (Ctrl+C stops)")
    serve.launch(page, args.host, args.port)


def chat_systems(args: argparse.Namespace) -> tuple[list[System], list[str]]:
    """The chat's systems: base, fine-tuned and the run's GGUF files; a run folder with no model in it yet gives the
    base alone, and a notice for the page saying why."""
    path = Path(args.finetuned)
    if not path.exists():
        raise RunError(f"--finetuned {args.finetuned}: no such file or folder")
    try:
        systems = resolve_systems(args.base, args.finetuned)
    except RunError as e:
        base = args.base or read_run_info(path).get("base_model") or default_model()
        return [System("base", model=base)], [f"No fine-tuned model to chat with: {e}. The base model answers "
                                              "alone; train first (finetune.py) or point --finetuned at an adapter."]
    try:
        ggufs = [s for s in export_systems(args, systems[0].model) if s.gguf] if args.parity else []
    except RunError as e:
        return systems, [f"The run's exports are left out: {e}"]
    return systems + ggufs, []


def system_title(system: System) -> str:
    """A chat column's heading: which model answers there."""
    return f"{system.name}: {system.gguf or system.model}" + (f" + {system.adapter}" if system.adapter else "")


def rating_desk(args: argparse.Namespace, out_dir: Path) -> tuple[Any, str]:
    """The blinded sheet the rate tab shows: OUT's own (one written by --rating-sheet, or by an earlier page), else
    one written now from OUT's base and fine-tuned answers; with --force-new-sheet, written again from the answers
    as they are now. None and why not, for the page."""
    from howto import ratings, serve

    key_file, sheet = out_dir / ratings.KEY_FILE, out_dir / ratings.SHEET_FILE
    try:
        tables = {name: read_predictions(f"{name}={out_dir / name / 'predictions.jsonl'}", {})[2]
                  for name in ("base", "finetuned") if (out_dir / name / "predictions.jsonl").is_file()}
        if len(tables) == 2 and (args.force_new_sheet or not key_file.exists() or not sheet.exists()):
            ratings.write_rating_sheet(rating_examples(tables, list(tables))[: args.limit], out_dir, seed=args.seed,
                                       force=args.force_new_sheet)
        if not key_file.exists():
            return None, (f"Nothing to rate in {out_dir} yet: evaluate first (`python evaluate.py --data DATA "
                          f"--finetuned {args.finetuned} --out {out_dir}`); the base and fine-tuned answers it writes "
                          "are rated here.")
        key = ratings.read_key(key_file)
        rows = ratings.read_sheet_rows(sheet)
        if not rows or any((r.get("sheet_id"), r.get("key_hash")) != (key.sheet_id, key.key_hash) for r in rows):
            raise ratings.RatingsError(f"{sheet} is not the sheet of {key_file} (sheet {key.sheet_id}): write a new "
                                       "pair with --rating-sheet --force-new-sheet")
    except (RunError, ratings.RatingsError) as e:
        return None, str(e)
    return serve.RatingDesk(key, rows, out_dir / serve.RATINGS_DIR), ""


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------

def write_outputs(metrics: dict[str, Any], tables: dict[str, Rows], args: argparse.Namespace, sources: list[Path],
                  out_dir: Path) -> None:
    plots = report.make_plots(tables, metrics)
    for name, data in plots.items():
        atomic_write_bytes(out_dir / "plots" / f"{name}.png", data)
    blocks = report.build_report(metrics, tables, plots)
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "report.md", report.render_markdown(blocks, "plots"))
    atomic_write_text(out_dir / "report.html", report.render_html(blocks))
    write_run_info(out_dir, vars(args), sources, extra={"systems": list(tables)})


def print_results(metrics: dict[str, Any], out_dir: Path) -> None:
    """The report's results, parity and forgetting tables on the console."""
    def show(title: str, header: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for i, column in enumerate(header):
            table.add_column(escape(column), justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)

    baseline = metrics["baseline"]
    for name, line in metrics.get("verdicts", {}).items():
        console.print(f"{name} against {baseline}: {line}")
    for name in metrics["comparisons"]:
        show(f"{name} vs {baseline} ({metrics['n_paired'][name]} of {metrics['n_examples']} prompts paired)",
             report.results_header(baseline, name), report.results_rows(metrics, name))
    if metrics.get("parity"):
        show(f"parity: exports vs {metrics['parity']['reference']} (tolerance {metrics['parity']['tolerance']})",
             report.PARITY_HEADER, report.parity_rows(metrics["parity"]))
    probe = metrics.get("forgetting")
    if probe and not probe.get("skipped"):
        show(f"forgetting probe ({probe['n_prompts']} general questions)", report.FORGETTING_HEADER,
             report.forgetting_rows(probe))
        for wrong in probe.get("turned_wrong", []):
            console.print(f"turned wrong: {wrong['prompt']} (expected {' or '.join(wrong['expect'])}): base "
                          f"{wrong['base']!r}, fine-tuned {wrong['finetuned']!r}", markup=False, highlight=False)
    elif probe:
        console.print(f"forgetting probe skipped: {probe['skipped']}")
    console.print(f"wrote {out_dir / 'report.md'}, {out_dir / 'report.html'} and {out_dir / 'metrics.json'}")


def check_regression(metrics: dict[str, Any], args: argparse.Namespace) -> None:
    """An export worse than the adapter: said in red, and an error with --fail-on-regression, as is an export judged
    on too few prompts to tell (a gate that cannot tell does not pass)."""
    exports = (metrics.get("parity") or {}).get("exports") or {}
    worse = [name for name, p in exports.items() if p["verdict"] == "worse"]
    unjudged = [name for name, p in exports.items() if p["verdict"] == TOO_FEW]
    if worse and args.fail_on_regression:
        raise RunError(f"--fail-on-regression: {', '.join(worse)} scored worse than the adapter beyond the tolerance "
                       f"{args.parity_tolerance} (see the parity section of {Path(args.out) / 'report.md'})")
    if unjudged and args.fail_on_regression:
        raise RunError(f"--fail-on-regression: {', '.join(unjudged)}: {TOO_FEW} (fewer than {MIN_PAIRED}) to tell "
                       "whether it is worse than the adapter; evaluate on more test prompts")
    for name in worse:
        console.print(f"[red]{name} is worse than the adapter it was exported from (see the parity section)[/]")
    for name in unjudged:
        console.print(f"[yellow]{name}: {TOO_FEW} to compare it with the adapter it was exported from[/]")


if __name__ == "__main__":
    run_script(main)
