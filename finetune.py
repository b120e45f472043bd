#!/usr/bin/env python
"""Fine-tune a chat model with QLoRA so that it answers a how-to question with an ordered list of steps.

    python finetune.py --data runs/data --out runs/mistral --config configs/t4.yaml    # Mistral-7B, Unsloth, T4
    python finetune.py --data runs/data --out runs/x --config configs/t4.yaml --dry-run  # the preflight alone
    python finetune.py --data runs/data --out runs/sweep --sweep --sweep-lr 1e-4,2e-4 --sweep-epochs 2,3
    python finetune.py --data runs/data --out runs/mistral --resume        # continue an interrupted run
    python finetune.py --out runs/mistral --export-only --export gguf      # export a finished run

Settings: flags with the defaults of a 16 GB T4 (configs/t4.yaml gives the reasons), or `--config FILE`: 3 epochs,
lr 2e-4, batch 2 x grad-accum 4, LoRA r 16 / alpha 16 on all seven projections, 1024 tokens, early stopping after 2
evaluations without a better validation loss.

`--data` is the folder prepare_data.py wrote (train.jsonl, val.jsonl): it decided the records and their lengths.
Every run starts with the preflight (howto/preflight.py) before any weights load: the peak GPU memory estimated
against the GPU found or `--gpu-memory`, one training example token by token with checks on every record, and
llama.cpp's tools when `--export gguf` is asked. The run folder receives preflight.txt, the best LoRA adapter (by
validation loss) with its tokenizer, checkpoints/, run_info.json, config.yaml, metrics.json, loss.png and exports.

Two engines load the model; everything after loading is one code path, TRL's SFTTrainer on the same pre-tokenized
records (howto.chat.encode_example) with the loss on the answer only. `unsloth` (default): FastLanguageModel in
4-bit with Unsloth's kernels. `hf`: transformers + peft, the QLoRA paper's recipe (NF4 4-bit, paged 8-bit AdamW) on
CUDA; the benchmark's baseline, the engine for several GPUs under `accelerate launch`, and the CPU loop's engine
(configs/cpu.yaml), unquantized in bf16 where the CPU has it natively, else fp32, with eager attention and each decoder
layer compiled by torch.compile (howto.device.cpu_plan; `--no-compile` to skip), the LM head and loss on the answer
positions alone, as TRL's fused head computes them on a GPU, under the run's mixed precision, with torch's fused
AdamW. Gradient checkpointing is on where memory needs it (always on a GPU) and off where not
(howto.device.checkpointing_needed).
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import os
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.console import Console
from rich.table import Table

from howto import chat, device, flops, models, preflight, replay, runtime, trainlog
from howto.models import choose_precision
from howto.records import read_clean
from howto.runio import (
    RunError, atomic_write_bytes, atomic_write_text, check_out_dir, hash_files, load_yaml, markdown_table, parse_args,
    run_script, write_json, write_jsonl, write_run_info,
)

REQUIRED_SPLITS = ("train", "val")
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
TRIAL_KEYS = ("lr", "epochs", "batch_size")
# Flags that describe where and how a run is launched rather than what it trains; a sweep's best config leaves
# them out so that it can be reused for a final run anywhere.
NOT_IN_BEST_CONFIG = {"out", "config", "sweep", "sweep_lr", "sweep_epochs", "sweep_batch_size",
                      "sweep_optuna_trials", "resume", "export", "export_only", "quant", "llama_cpp", "dry_run",
                      "gpu_memory"}
INTERRUPTED_EXIT = 130
# Above this no learning rate trains anything: AdamW moves every weight by about the rate each step, so a rate over 1
# overwrites the model in a step or two (LoRA recipes use 1e-5 to 1e-3). `--lr 2e4` is a typo for 2e-4.
MAX_LR = 1.0
# What --resume must share with the run it continues: what the adapter is (model, engine, LoRA shape, sequence
# length) and what the checkpoint's optimizer, scheduler and data order were set up with (a resumed scheduler keeps
# its own learning rate, so another --lr would be recorded but never used). --epochs may change: it extends a run.
RESUME_SETTINGS = ("model", "engine", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "load_in_4bit",
                   "max_seq_length", "packing", "lr", "scheduler", "warmup_ratio", "batch_size", "grad_accum", "seed")


class Diverged(RunError):
    """Training that diverged: stopped, no adapter kept as its result, exit code 1."""


def is_main_process() -> bool:
    """Under `accelerate launch` every process runs this script; only the first one talks and writes."""
    return int(os.environ.get("RANK", "0")) == 0


console = Console(quiet=not is_main_process())


def main(argv: list[str] | None = None) -> None:
    runtime.setup()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    out_dir = Path(args.out)
    if args.export_only:
        export(args, finished_run_base(out_dir), out_dir)
        return
    records = load_splits(Path(args.data))  # cheap checks before the slow imports
    announce_model(args)
    check_resume(args, out_dir, records["files"])
    if not args.dry_run:
        import_engine(args.engine)
        models.hide_loading_bars()
    base_path = models.resolve_model(args.model)
    preflight_console = Console(record=True, quiet=console.quiet)  # what it prints also goes to OUT/preflight.txt
    preflight.check_memory(base_path, args, preflight_console)  # before anything is downloaded
    if "gguf" in args.export:
        preflight.check_gguf_tools(args.llama_cpp, preflight_console)
    tokenizer = models.load_tokenizer(base_path, offline=args.dry_run)
    data = tokenize_splits(args, tokenizer, records, out_dir, preflight_console)
    if args.dry_run:
        return
    if args.mix_general:
        data["general"] = mix_general(args, base_path, tokenizer, data, out_dir)
    console.print(f"{base_path} ({args.engine} engine): {len(data['train'])} training and {len(data['val'])} "
                  f"validation records")
    if args.sweep:
        run_sweep(args, out_dir, base_path, tokenizer, data, argv)
        return
    train_once(args, out_dir, base_path, tokenizer, data, argv)
    if args.export and is_main_process():
        export(args, base_path, out_dir)


# -------------------------------------------------------------------------------------------------------- Settings

def sibling_parsers() -> list[argparse.ArgumentParser]:
    """The other two scripts' parsers: a top-level key of a --config file that one of them has is meant for it."""
    import evaluate
    import prepare_data

    return [evaluate.build_parser(), prepare_data.build_parser()]


def build_parser() -> argparse.ArgumentParser:
    """Defaults: the recipe that fits Mistral-7B QLoRA on a 16 GB T4 (configs/t4.yaml gives the reasons)."""
    p = argparse.ArgumentParser(
        description="QLoRA fine-tuning of a chat model (Mistral-7B-Instruct-v0.3 by default) on how-to steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", help="folder written by prepare_data.py --out (train.jsonl, val.jsonl); required "
                                  "unless --export-only")
    p.add_argument("--out", required=True, help="run folder: adapter, checkpoints/, run_info.json, loss.png, exports")
    p.add_argument("--model", default=None,
                   help="hub id or local folder of a causal LM, or 'mistral' / 'smollm2' / 'tiny' (random weights, "
                        "for tests). Default: Mistral-7B-Instruct-v0.3 on a GPU, SmolLM2-135M-Instruct on a CPU")
    p.add_argument("--engine", default="unsloth", choices=("unsloth", "hf"),
                   help="unsloth: Unsloth's 4-bit kernels, about 2x faster and lighter on one GPU; hf: plain "
                        "transformers + peft QLoRA, the baseline and the multi-GPU path (accelerate launch)")
    p.add_argument("--epochs", type=int, default=3,
                   help="passes over the training split (early stopping keeps the best epoch)")
    p.add_argument("--lr", type=float, default=2e-4,
                   help="peak learning rate; 2e-4 is the QLoRA paper's and Unsloth's rate for 7B LoRA adapters")
    p.add_argument("--batch-size", type=int, default=2,
                   help="sequences per device and step; 2 x 1024 tokens fits a 7B 4-bit model on a 16 GB T4")
    p.add_argument("--grad-accum", type=int, default=4,
                   help="steps accumulated per optimizer update: an effective batch of 8 without the memory of 8")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank; higher costs memory for little on one format")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling (alpha / r = 1, Unsloth's advice)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the LoRA path; 0 keeps Unsloth's fast fused path")
    p.add_argument("--target-modules", default=ALL_PROJECTIONS, type=comma_list(str),
                   help="comma-separated linear layers that get adapters; all seven, as the QLoRA paper found "
                        "adapting every layer is what matches full fine-tuning")
    p.add_argument("--max-seq-length", type=int, default=1024,
                   help="tokens per training sequence; prepare_data.py drops or cuts longer records")
    p.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="share of the steps spent warming the learning rate up from 0 (QLoRA paper: 3%%)")
    p.add_argument("--scheduler", default="linear", choices=SCHEDULERS,
                   help="learning-rate schedule after warmup; linear decay as in Unsloth's Mistral recipe")
    p.add_argument("--seed", type=int, default=3407, help="seed of LoRA initialisation and data order")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                   help="pack short records into one sequence; off, since without FlashAttention packed records "
                        "attend to each other")
    p.add_argument("--mix-general", type=float, default=0.0, metavar="FRACTION",
                   help="mix general conversations into training, this fraction of the training records' number "
                        "(replay, against forgetting: a model trained on steps alone answers every question with a "
                        "list); 0 = none")
    p.add_argument("--general-data", default=None, metavar="FILE",
                   help="general conversations to mix in (JSONL: prompt, answer); default: the base model's own "
                        "answers to data/general_prompts.jsonl, generated once and cached")
    p.add_argument("--eval-steps", type=int, default=0,
                   help="evaluate on the validation split every N optimizer steps; 0 = once per epoch")
    p.add_argument("--patience", type=int, default=2,
                   help="stop after this many evaluations in a row without a better validation loss; 0 = never")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True,
                   help="QLoRA: base weights in 4-bit NF4 (the hf engine on a CPU trains in full precision)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each decoder layer (fuses norms, RoPE and activations between the matmuls); "
                        "default: on for the hf engine on a CPU with a C++ compiler (howto.device.cpu_plan), off on "
                        "a GPU, where Unsloth brings its own kernels")
    p.add_argument("--sweep", action="store_true",
                   help="hyperparameter search: one real run per trial in OUT/sweep/trial-K, ranked by validation "
                        "loss; writes OUT/sweep/best_config.yaml for a final run")
    p.add_argument("--sweep-lr", default="1e-4,2e-4", type=comma_list(float),
                   help="learning rates of the grid (with Optuna: the range, sampled log-uniformly)")
    p.add_argument("--sweep-epochs", default="1,3", type=comma_list(int),
                   help="epoch counts of the grid (with Optuna: the choices)")
    p.add_argument("--sweep-batch-size", default="2", type=comma_list(int),
                   help="per-device batch sizes of the grid (with Optuna: the choices)")
    p.add_argument("--sweep-optuna-trials", type=int, default=0,
                   help="this many trials of Optuna's TPE sampler (seeded by --seed) instead of the grid; 0 = grid")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in OUT/checkpoints (a sweep: its unfinished trials)")
    p.add_argument("--export", nargs="+", default=[], choices=("merged", "gguf"),
                   help="after training, also write merged 16-bit weights (OUT/merged) and/or GGUF files with an "
                        "Ollama Modelfile (OUT/gguf; implies merged)")
    p.add_argument("--export-only", action="store_true",
                   help="no training: export the finished run in OUT, e.g. on a machine with more memory")
    p.add_argument("--quant", default="q4_k_m", help="comma-separated GGUF types, e.g. q4_k_m,q8_0,f16")
    p.add_argument("--llama-cpp", default=None,
                   help="llama.cpp folder for the GGUF export (default: $LLAMA_CPP_DIR, else built once from the "
                        "llama-cpp-python source distribution)")
    p.add_argument("--report-to", default="none", choices=("none", "tensorboard", "wandb"),
                   help="where the Trainer also sends its logs (tensorboard: OUT/checkpoints/runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="the preflight alone (memory estimate, one example token by token, the record checks), "
                        "under a minute on a CPU with no download")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="GPU memory to fit in, in GB as cards are sold (16 for a T4); default: the GPU found")
    return p


def comma_list(cast: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """argparse type of a comma-separated flag (runio passes a YAML config's list joined by commas)."""
    def parse_list(text: str) -> list[Any]:
        try:
            return [cast(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"a comma-separated list has a bad value ({e})") from None

    return parse_list


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse settings that would fail hours later or train on nothing, with the flag's name."""
    checks = [
        (args.data is not None or args.export_only, "--data is required (the folder prepare_data.py wrote)"),
        (bool(args.export) or not args.export_only, "--export-only needs --export merged and/or gguf"),
        (args.lr > 0, "--lr must be > 0"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.grad_accum >= 1, "--grad-accum must be >= 1"),
        (args.lora_r >= 1, "--lora-r must be >= 1"),
        (args.lora_alpha > 0, "--lora-alpha must be > 0"),
        (0 <= args.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (args.max_seq_length >= 16, "--max-seq-length must be >= 16"),
        (0 <= args.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        (args.eval_steps >= 0, "--eval-steps must be >= 0"),
        (0 <= args.mix_general <= 1, "--mix-general must be in [0, 1]"),
        (args.patience >= 0, "--patience must be >= 0"),
        (args.sweep_optuna_trials >= 0, "--sweep-optuna-trials must be >= 0"),
        (args.gpu_memory is None or args.gpu_memory > 0, "--gpu-memory must be > 0 (GB)"),
        (not (args.dry_run and args.export_only), "--dry-run checks a training run; --export-only trains nothing"),
    ]
    for flag in ("lr", "lora_dropout", "warmup_ratio", "gpu_memory"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            parser.error(f"--{flag.replace('_', '-')} {value}: must be a finite number")
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if args.lr > MAX_LR:
        parser.error(f"--lr {args.lr:g} is far above any learning rate that trains (at most {MAX_LR:g}; LoRA uses "
                     f"1e-5 to 1e-3, the default is 2e-4){typo_hint(args.lr)}")
    # --quant stays a string flag, so that a config's `quant: q4_k_m` reads as written
    args.quant = [quant.strip() for quant in args.quant.split(",") if quant.strip()]
    if not args.target_modules:
        parser.error("--target-modules names no layer")
    if args.sweep:
        for flag in ("sweep_lr", "sweep_epochs", "sweep_batch_size"):
            values = getattr(args, flag)
            if not values or any(not math.isfinite(v) or v <= 0 for v in values):
                parser.error(f"--{flag.replace('_', '-')} needs one or more values, each > 0 and finite")
        if any(lr > MAX_LR for lr in args.sweep_lr):
            parser.error(f"--sweep-lr: every learning rate must be at most {MAX_LR:g} (LoRA uses 1e-5 to 1e-3)")
    if args.sweep and args.export:
        parser.error("--export exports a final run: run the sweep's best_config.yaml without --sweep to export it")
    if "gguf" in args.export and not args.quant:
        parser.error("--export gguf needs at least one --quant type")
    if "gguf" in args.export:
        from howto.export import quant_ftype

        for quant in args.quant:
            try:
                quant_ftype(quant)  # a typo fails now, not after hours of training
            except ValueError as e:
                parser.error(f"--quant: {e}")


def typo_hint(lr: float) -> str:
    """`: did you mean 2e-4?` for 2e4, a rate written with its exponent's minus sign left out."""
    exponent = math.floor(math.log10(lr))
    return f": did you mean {lr / 10 ** exponent:g}e-{exponent}?" if exponent >= 1 else ""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args(parser, argv, section="finetune", siblings=sibling_parsers)
    check_args(parser, args)
    check_out_dir(args.out)  # a file, or a folder without write access, fails now rather than after training
    return args


def announce_model(args: argparse.Namespace) -> None:
    if args.model is None:
        args.model = models.default_model()
        if args.model == "smollm2":
            console.print("No GPU found: fine-tuning SmolLM2-135M-Instruct on the CPU (--model to choose another).")
    if args.model == "tiny":
        console.print("[yellow]--model tiny has random weights: this run tests the pipeline, its losses and "
                      "scores mean nothing about quality.[/]")


# ---------------------------------------------------------------------------------------------- Data and preflight

def load_splits(data_dir: Path) -> dict[str, Any]:
    """The train and val records with their file, line and split, read by the one record reader (howto.records)."""
    if data_dir.is_file():
        raise RunError(f"--data {data_dir}: is a file; --data takes the folder prepare_data.py --out wrote "
                       f"(train.jsonl, val.jsonl), e.g. --data {data_dir.parent}")
    if not data_dir.is_dir():
        raise RunError(f"--data {data_dir}: no such folder; run prepare_data.py --out {data_dir} first")
    splits: dict[str, Any] = {"files": [data_dir / f"{split}.jsonl" for split in REQUIRED_SPLITS]}
    for split, path in zip(REQUIRED_SPLITS, splits["files"], strict=True):
        if not path.is_file():
            raise RunError(f"{path}: not found; --data must be the folder that prepare_data.py --out wrote")
        rows = read_clean(path)
        if not rows:
            raise RunError(f"{path}: the {split} split is empty; it needs at least one record")
        splits[split] = [{**record, "split": split, "file": str(path), "line": line} for line, record in rows]
    return splits


def check_resume(args: argparse.Namespace, out_dir: Path, files: list[Path]) -> None:
    """--resume continues a run on the data it trained on, with the settings it trained with (RESUME_SETTINGS):
    anything else is refused before anything is rewritten."""
    if not args.resume:
        return
    digest = hash_files(files)
    for folder in [out_dir, *sorted((out_dir / "sweep").glob("trial-*"))]:
        recorded = models.read_run_info(folder).get("data_sha256") if (folder / "run_info.json").is_file() else None
        if recorded and recorded != digest:
            raise RunError(f"--resume: {folder / 'run_info.json'} trained on other data (sha256 {recorded[:12]}, "
                           f"{', '.join(map(str, files))} hash to {digest[:12]}): resume with the --data it "
                           "trained on, or train the new data into another --out")
        differing = resume_differences(args, folder, trial=folder != out_dir)
        if differing:
            raise RunError(f"--resume: {folder} was trained with other settings: {'; '.join(differing)}: resume "
                           f"with the run's own settings ({folder / 'config.yaml'}), or train into another --out")


def resume_differences(args: argparse.Namespace, folder: Path, trial: bool) -> list[str]:
    """`--lora-r 8 (the run has 16)` for each of RESUME_SETTINGS where these settings and the run's config.yaml
    differ; a sweep's trial has its own learning rate, epochs and batch size, chosen by the sweep."""
    path = folder / "config.yaml"
    if not path.is_file():
        return []
    try:
        recorded = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunError(f"--resume: {path}: cannot be read ({e}); the run's settings are unknown") from None
    if not isinstance(recorded, dict):
        raise RunError(f"--resume: {path}: expected a mapping of setting: value")
    current = config_record(args)
    return [f"--{key.replace('_', '-')} {show_setting(current[key])} (the run has {show_setting(recorded[key])})"
            for key in RESUME_SETTINGS if key in recorded and recorded[key] != current[key]
            and not (trial and key in TRIAL_KEYS)]


def show_setting(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def tokenize_splits(args: argparse.Namespace, tokenizer: Any, records: dict[str, Any], out_dir: Path,
                    preflight_console: Console) -> dict[str, Any]:
    """Both splits as datasets of input_ids + completion_mask (howto.chat.encode_example, the one tokenization),
    once the preflight's token view and checks pass; what the preflight printed goes to OUT/preflight.txt."""
    from datasets import Dataset, disable_progress_bars

    set_pad_token(tokenizer)
    encoded = {split: [chat.encode_example(tokenizer, r["prompt"], r["response"]) for r in records[split]]
               for split in REQUIRED_SPLITS}
    listing = preflight.show_examples(tokenizer, [r for s in REQUIRED_SPLITS for r in records[s]],
                                      [e for s in REQUIRED_SPLITS for e in encoded[s]], args.max_seq_length,
                                      sft_collator(tokenizer), preflight_console)
    if is_main_process():
        console.print(f"preflight passed: {preflight.save(preflight_console, listing, out_dir)}")
    disable_progress_bars()
    return {"files": records["files"], **{split: Dataset.from_list(encoded[split]) for split in REQUIRED_SPLITS}}


def mix_general(args: argparse.Namespace, base_path: str, tokenizer: Any, data: dict[str, Any],
                out_dir: Path) -> dict[str, Any]:
    """General conversations added to the training split (howto.replay); what was mixed in goes to
    OUT/general.jsonl, and how much and from where into run_info.json."""
    from datasets import Dataset

    source = Path(args.general_data) if args.general_data else replay.BUNDLED
    chosen = replay.pick(replay.read_general(source), replay.how_many(args.mix_general, len(data["train"])),
                         args.seed)
    if any(not r["answer"] for r in chosen):
        console.print(f"general conversations: the base model answers {len(chosen)} prompts of {source} "
                      "(once; cached)")
        answers = {r["prompt"]: r["answer"] for r in replay.distilled(
            base_path, [r["prompt"] for r in chosen if not r["answer"]], 50, models.cache_dir() / "replay")}
        chosen = [{**r, "answer": r["answer"] or answers.get(r["prompt"], "")} for r in chosen]
    chosen = [r for r in chosen if r["answer"]]
    encoded = [replay.encode_general(tokenizer, r["prompt"], r["answer"]) for r in chosen]
    kept = [(r, e) for r, e in zip(chosen, encoded, strict=True) if len(e["input_ids"]) <= args.max_seq_length]
    if is_main_process():
        write_jsonl(out_dir / "general.jsonl", [r for r, _ in kept])
    data["train"] = Dataset.from_list(list(data["train"]) + [e for _, e in kept])
    console.print(f"general conversations: {len(kept)} mixed into training (OUT/general.jsonl)")
    return {"n": len(kept), "fraction": args.mix_general,
            "source": str(source) if args.general_data else f"base model's answers to {source.name}"}


def sft_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], Any]:
    """The collator SFTTrainer builds for pre-tokenized records, for the preflight's padding check."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------------------- Model

def import_engine(engine: str) -> None:
    """Unsloth patches transformers, TRL and peft when imported, so it must come before them in the process."""
    if engine == "unsloth":
        try:
            import unsloth  # noqa: F401
        except ImportError as e:
            raise RunError(f"--engine unsloth: Unsloth cannot be imported ({e}); "
                           "pip install -r requirements.txt, or use --engine hf") from None


def sharded_launch() -> bool:
    """FSDP and DeepSpeed place the weights themselves; a device map would fight them."""
    return any(os.environ.get(v, "").lower() in ("1", "true")
               for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def load_unsloth(args: argparse.Namespace, path: str, precision: str, checkpointing: bool) -> Any:
    """FastLanguageModel in 4-bit (Unsloth's pre-quantized repo for the default Mistral: no 15 GB download)."""
    from unsloth import FastLanguageModel

    weights = models.UNSLOTH_4BIT.get(path, path) if args.load_in_4bit else path
    model, _ = FastLanguageModel.from_pretrained(
        model_name=weights, max_seq_length=args.max_seq_length, dtype=models.torch_dtype(precision),
        load_in_4bit=args.load_in_4bit,
    )
    return FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules, bias="none",
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        random_state=args.seed, max_seq_length=args.max_seq_length,
    )


def load_hf(args: argparse.Namespace, path: str, precision: str, checkpointing: bool) -> Any:
    """transformers + peft: NF4 double-quantized 4-bit on CUDA (the QLoRA paper); on a CPU full precision with the
    attention howto.device.cpu_plan chose."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs = hf_load_kwargs(args, precision)
    four_bit = "quantization_config" in kwargs
    if args.load_in_4bit and not four_bit:
        console.print("hf engine on a CPU: full-precision weights (bitsandbytes 4-bit is for CUDA here)")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def hf_load_kwargs(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """from_pretrained's settings for the hf engine: on CUDA NF4 computing in the run's precision, on the process's
    own GPU; on a CPU full precision with the attention howto.device.cpu_plan chose."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = models.torch_dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if not cuda:
        kwargs["attn_implementation"] = device.CPU_ATTENTION
    if args.load_in_4bit and cuda:
        kwargs["quantization_config"] = models.nf4_config(dtype, storage=dtype if sharded_launch() else torch.uint8)
    if cuda and not sharded_launch():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one GPU per process under DDP
    return kwargs


def load_model(args: argparse.Namespace, path: str, precision: str) -> Any:
    import transformers

    transformers.set_seed(args.seed)
    checkpointing, why = device.checkpointing_needed(path, args, precision)
    console.print(f"gradient checkpointing {why}")
    model = (load_unsloth if args.engine == "unsloth" else load_hf)(args, path, precision, checkpointing)
    # Decided once: the resolved choice goes into the run's config and the trainer reads it from there
    args.compile, why = compile_wanted(args)
    console.print(f"torch.compile {why}")
    if args.compile:
        device.compile_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"LoRA r={args.lora_r} on {', '.join(args.target_modules)}: {trainable:,} trainable parameters")
    return model


def compile_wanted(args: argparse.Namespace) -> tuple[bool, str]:
    """Whether to compile the decoder layers, and why: --compile, else the CPU plan for the hf engine."""
    import torch

    if args.compile is not None:
        return args.compile, "on (--compile)" if args.compile else "off (--no-compile)"
    if torch.cuda.is_available() or args.engine != "hf":
        return False, "off (GPU or Unsloth engine: their own kernels)"
    plan = device.cpu_plan()
    return plan["compile"], plan["compile_reason"]


def set_pad_token(tokenizer: Any) -> None:
    """Pad with the tokenizer's own pad token when it is a real vocabulary entry, else with `</s>`.

    Mistral's `<pad>` is not in its vocabulary. Padded positions carry label -100 and attention 0, so `</s>` as
    padding never teaches the model anything.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token not in tokenizer.get_vocab():
        tokenizer.pad_token = tokenizer.eos_token


# --------------------------------------------------------------------------------------------------------- Trainer

def optimizer_for(engine: str) -> str:
    """8-bit AdamW on a GPU (Unsloth's recipe; the paged variant is the QLoRA paper's); on a CPU torch's fused AdamW
    (transformers' default), one kernel over all the LoRA weights where torch's plain AdamW runs one per weight."""
    import torch

    if not torch.cuda.is_available():
        return "adamw_torch_fused"
    return "adamw_8bit" if engine == "unsloth" else "paged_adamw_8bit"


def sft_config_kwargs(args: argparse.Namespace, out_dir: Path, precision: str, epoch_steps: int,
                      resuming: bool = False) -> dict:
    """Every SFTConfig setting this script uses (a test builds SFTConfig from exactly these, to catch TRL drift)."""
    import torch

    strategy = "steps" if args.eval_steps else "epoch"
    return dict(
        output_dir=str(out_dir / "checkpoints"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=args.scheduler, optim=optimizer_for(args.engine), weight_decay=0.01, seed=args.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        eval_strategy=strategy, save_strategy=strategy, eval_steps=args.eval_steps or None,
        save_steps=args.eval_steps or None,
        save_total_limit=2,  # the best checkpoint and the last one, which --resume continues from
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward pass
        # The untrained model's validation loss first: the baseline every later evaluation is read against. Not on
        # --resume, where it would count the checkpoint's own evaluation twice against the patience.
        eval_on_start=not resuming,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=min(10, max(1, epoch_steps // 4)), report_to=args.report_to,
        # A NaN or infinite loss is logged as it is, for the divergence guard; transformers' default logs the mean
        # of the finite ones in its place, and a diverged run looks fine until its adapter is all NaN.
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding",
        max_length=args.max_seq_length, packing=args.packing, completion_only_loss=True,
        train_sampling_strategy="group_by_length",  # batches of similar lengths: little padding, same loss mask
        # Both loaders already switched on their own gradient checkpointing (Unsloth's offloaded one for Unsloth);
        # the Trainer must not wrap the model a second time.
        gradient_checkpointing=False,
    )


def steps_per_epoch(args: argparse.Namespace, n_train: int) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, math.ceil(n_train / (args.batch_size * world)) // args.grad_accum)


def build_trainer(model: Any, tokenizer: Any, train: Any, val: Any, args: argparse.Namespace, out_dir: Path,
                  precision: str, resuming: bool = False) -> Any:
    """TRL's SFTTrainer on the pre-tokenized records: with completion_only_loss it turns `completion_mask` into
    labels that are -100 on the prompt, and its collator pads them with -100."""
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig
    from trl.trainer.callbacks import RichProgressCallback

    set_pad_token(tokenizer)
    config = SFTConfig(**sft_config_kwargs(args, out_dir, precision, steps_per_epoch(args, len(train)), resuming))
    callbacks = [RichProgressCallback()]  # TRL's progress bars and latest logs, in place of tqdm's
    if args.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.patience))
    trainer = trainer_class(args)(model=model, args=config, train_dataset=train, eval_dataset=val,
                                  processing_class=tokenizer, callbacks=callbacks)
    # transformers' own bar, or its log-dict printer where its logger is quieter than warnings (howto.models)
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    return trainer


def trainer_class(args: argparse.Namespace) -> type:
    """TRL's SFTTrainer on a GPU, whose fused LM head computes the loss on the answers alone, and for Unsloth, which
    patches it; the hf engine on a CPU gets howto.device.cpu_sft_trainer, which computes the loss the same way."""
    import torch
    from trl import SFTTrainer

    if torch.cuda.is_available() or args.engine == "unsloth":
        return SFTTrainer
    return device.cpu_sft_trainer(bool(args.compile))


def divergence_guard() -> Any:
    """A Trainer callback that stops training as soon as a log entry shows it diverged (trainlog.divergence), before
    that step's checkpoint is saved; `reason` says why, None while training is sound."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        reason: str | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            self.reason = self.reason or trainlog.divergence(state.log_history[-1], state.log_history)
            if self.reason:
                control.should_training_stop = True
                control.should_save = False

    return DivergenceGuard()


# ------------------------------------------------------------------------------------------------ One training run

def last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = out_dir / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def peak_memory_gib() -> float:
    """GPU memory the tensors peaked at; on a CPU, the process's peak resident memory (over its whole life)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def save_adapter(trainer: Any, base_path: str, out_dir: Path) -> None:
    """The best adapter with the tokenizer beside it, so the run folder is all evaluate.py and the export need."""
    trainer.save_model(str(out_dir))  # the adapter, and the tokenizer it was given as processing_class
    if not trainer.is_world_process_zero():
        return
    base = Path(base_path)
    for name in ("tokenizer.model.v3", "tokenizer.model"):
        if (base / name).is_file():
            shutil.copy(base / name, out_dir / name)


def save_interrupted(trainer: Any, out_dir: Path, argv: list[str]) -> None:
    """Ctrl-C: save the trainer's full state as a checkpoint, then say how to continue."""
    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)  # progress bar, loggers
    print_loss_table(trainer.state.log_history)
    step = trainer.state.global_step
    if step == 0:
        console.print("\n[yellow]Interrupted before the first step[/]: nothing to save.")
        raise SystemExit(INTERRUPTED_EXIT) from None
    trainer._save_checkpoint(trainer.model, trial=None)
    command = shlex.join(["python", "finetune.py", *[a for a in argv if a != "--resume"], "--resume"])
    console.print(f"\n[yellow]Interrupted at step {step}[/]: checkpoint saved to "
                  f"{out_dir / 'checkpoints' / f'checkpoint-{step}'}. Continue with:")
    console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)


def config_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items())}


def train_once(args: argparse.Namespace, out_dir: Path, base_path: str, tokenizer: Any,
               data: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """One real run: load, train with evaluation and early stopping, keep the best adapter, record everything."""
    import torch

    checkpoint = None
    if args.resume:
        checkpoint = last_checkpoint(out_dir)
        if checkpoint is None:
            raise RunError(f"--resume: no checkpoint in {out_dir / 'checkpoints'} to continue from")
        console.print(f"resuming from {checkpoint}")
    elif last_checkpoint(out_dir) is not None:
        raise RunError(f"{out_dir / 'checkpoints'} holds checkpoints of an earlier run: pass --resume to continue "
                       "it, or choose another --out")

    precision, why = choose_precision(args.engine) if torch.cuda.is_available() else device.cpu_precision()
    console.print(f"precision: [bold]{precision}[/] ({why})")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = load_model(args, base_path, precision)
    trainer = build_trainer(model, tokenizer, data["train"], data["val"], args, out_dir, precision,
                            resuming=checkpoint is not None)
    guard = divergence_guard()
    trainer.add_callback(guard)
    info = {"base_model": base_path, "model_name": args.model, "engine": args.engine, "precision": precision,
            "precision_reason": why, "general": data.get("general"), "status": "running"}
    if is_main_process():
        write_run_info(out_dir, config_record(args), data["files"], info)

    history_before = 0
    tokens_before = 0
    if checkpoint:
        from transformers import TrainerState

        resumed = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        history_before, tokens_before = len(resumed.log_history), resumed.num_input_tokens_seen
        info["resumed_from_step"] = resumed.global_step
    batches = flops.watch_batches(trainer)  # lengths, padding and answer positions, for MFU and padding waste
    peak_before, _ = flops.peak_flops(precision)
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        save_interrupted(trainer, out_dir, argv)
        if is_main_process():
            write_run_info(out_dir, config_record(args), data["files"],
                           {**info, "status": "interrupted", "interrupted_at_step": trainer.state.global_step})
        raise SystemExit(INTERRUPTED_EXIT) from None
    except Exception as e:  # out of memory, a full disk: the record must not go on saying "running"
        if is_main_process():
            write_run_info(out_dir, config_record(args), data["files"],
                           {**info, "status": "failed", "error": f"{type(e).__name__}: {e}",
                            "failed_at_step": trainer.state.global_step})
        raise
    wall = time.perf_counter() - start
    if guard.reason:
        stop_diverged(args, out_dir, data["files"], info, trainer.state, guard.reason)
        del trainer, model
        models.free_memory()
        raise Diverged(f"training diverged: {guard.reason}. The learning rate is the likely cause: --lr {args.lr:g} "
                       f"is too high for this model and data (the default is 2e-4); train again with a lower --lr "
                       f"into another --out. No adapter was saved; {out_dir / 'checkpoints'} holds the run's "
                       "checkpoints, the later ones diverged")

    state = trainer.state
    eval_time = sum(h.get("eval_runtime", 0.0) for h in state.log_history[history_before:])
    tokens = state.num_input_tokens_seen - tokens_before
    save_adapter(trainer, base_path, out_dir)
    best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
    best_step = int(best.split("-")[-1]) if best else None
    curves = trainlog.loss_curves(state.log_history)
    info.update({
        "status": "done",
        "peak_memory_gib": round(peak_memory_gib(), 3),
        "wall_time_s": round(wall, 2),
        "train_tokens": int(tokens),
        "train_tokens_per_s": round(tokens / max(wall - eval_time, 1e-9), 1),
        **flops.run_usage(model, batches, max(wall - eval_time, 1e-9), args, precision, peak_before),
        "world_size": trainer.args.world_size,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "start_val_loss": curves["val"][0]["loss"] if curves["val"] and curves["val"][0]["step"] == 0 else None,
        "best_val_loss": state.best_metric,
        "best_checkpoint": f"checkpoints/{best}" if best else None,
        "best_step": best_step,
        "stopped_early": state.global_step < state.max_steps,
        "train_loss": output.training_loss,
    })
    if is_main_process():
        write_json(out_dir / "metrics.json", {**curves, "best_val_loss": state.best_metric, "best_step": best_step})
        atomic_write_bytes(out_dir / "loss.png", trainlog.loss_png(curves, best_step))
        write_run_info(out_dir, config_record(args), data["files"], info)
        print_loss_table(state.log_history)
        print_summary(info, out_dir)
    del trainer, model
    models.free_memory()
    return info


def stop_diverged(args: argparse.Namespace, out_dir: Path, files: list[Path], info: dict[str, Any], state: Any,
                  reason: str) -> None:
    """A diverged run's record: its loss curves (null where a loss was not finite) and status, no adapter."""
    if not is_main_process():
        return
    curves = trainlog.loss_curves(state.log_history)
    write_json(out_dir / "metrics.json", {**curves, "best_val_loss": None, "best_step": None, "diverged": reason})
    atomic_write_bytes(out_dir / "loss.png", trainlog.loss_png(curves, None))
    write_run_info(out_dir, config_record(args), files,
                   {**info, "status": "diverged", "diverged": reason, "global_step": state.global_step})
    print_loss_table(state.log_history)


def print_loss_table(history: list[dict[str, Any]]) -> None:
    """The loss table on a line of its own: TRL's live progress panel ends without a newline where the output is
    not a terminal (a log file)."""
    if not console.is_terminal:
        console.line()
    console.print(trainlog.loss_table(history))


def print_summary(info: dict[str, Any], out_dir: Path) -> None:
    table = Table(title=f"Run {out_dir}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key in ("engine", "precision", "start_val_loss", "best_val_loss", "best_checkpoint", "stopped_early",
                "global_step", "wall_time_s", "train_tokens_per_s", "train_tflops_per_s", "mfu", "padding_waste",
                "peak_memory_gib"):
        value = info.get(key)
        if isinstance(value, float) and key in ("mfu", "padding_waste"):
            table.add_row(key, f"{value:.1%}" + (f" of {info['peak_source']}" if key == "mfu" else ""))
        else:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) and key.endswith("val_loss") else str(value))
    console.print(table)
    if info.get("stopped_early"):
        console.print("Stopped early: the validation loss stopped improving (see loss.png).")



# ----------------------------------------------------------------------------------------------------------- Sweep

def trial_args(args: argparse.Namespace, choice: dict[str, Any], resume: bool = False) -> argparse.Namespace:
    """One trial's settings: the run's, with the trial's choice, training one run."""
    return argparse.Namespace(**{**vars(args), **choice, "sweep": False, "export": [], "resume": resume})


class SweepStopped(BaseException):
    """A trial's RunError on its way past Optuna, which would catch an Exception, log it with its traceback and mark
    the trial failed: like Ctrl-C, it leaves the trial RUNNING in the study, so that --resume continues it."""

    def __init__(self, error: RunError):
        super().__init__(str(error))
        self.error = error


def run_sweep(args: argparse.Namespace, out_dir: Path, base_path: str, tokenizer: Any, data: dict[str, Any],
              argv: list[str]) -> list[dict[str, Any]]:
    """Each trial a real run with early stopping in OUT/sweep/trial-K, chosen by Optuna: every point of the grid
    (GridSampler) or --sweep-optuna-trials draws of TPE, seeded by --seed. The study lives in OUT/sweep/optuna.db:
    --resume keeps its finished trials and continues an interrupted one from its last checkpoint."""
    import optuna
    from optuna.trial import TrialState

    sweep_dir = out_dir / "sweep"
    db = sweep_dir / "optuna.db"
    if db.exists() and not args.resume:
        raise RunError(f"{sweep_dir} holds an earlier Optuna study: pass --resume or another --out")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    space = {"lr": args.sweep_lr, "epochs": args.sweep_epochs, "batch_size": args.sweep_batch_size}
    if args.sweep_optuna_trials:
        sampler, size = optuna.samplers.TPESampler(seed=args.seed), args.sweep_optuna_trials
    else:
        sampler, size = optuna.samplers.GridSampler(space, seed=args.seed), math.prod(map(len, space.values()))
    study = optuna.create_study(study_name="finetune", storage=f"sqlite:///{db.resolve()}", load_if_exists=True,
                                direction="minimize", sampler=sampler)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    for t in finished:
        console.print(f"trial {t.user_attrs['folder']}: finished earlier, " + (
            f"best val loss {t.value:.4f}" if t.state == TrialState.COMPLETE else t.user_attrs.get("diverged", "")))
    # A trial whose process was stopped stays RUNNING in the study: its choice runs again in its folder, from its
    # last checkpoint (the grid returns to every unfinished point by itself; TPE is handed the choice again).
    interrupted = {tuple(t.params[k] for k in TRIAL_KEYS): t.user_attrs["folder"] for t in study.trials
                   if t.state == TrialState.RUNNING and "folder" in t.user_attrs}
    for choice in interrupted if args.sweep_optuna_trials else ():
        study.enqueue_trial(dict(zip(TRIAL_KEYS, choice, strict=True)))
    folders = itertools.count(1 + max((t.user_attrs.get("folder", 0) for t in study.trials), default=0))
    low, high = min(args.sweep_lr), max(args.sweep_lr)

    def objective(trial: optuna.Trial) -> float:
        choice = {
            "lr": trial.suggest_float("lr", low, high, log=True) if args.sweep_optuna_trials and high > low
            else trial.suggest_categorical("lr", args.sweep_lr),
            "epochs": trial.suggest_categorical("epochs", args.sweep_epochs),
            "batch_size": trial.suggest_categorical("batch_size", args.sweep_batch_size),
        }
        folder = interrupted.pop(tuple(choice.values()), None) or next(folders)
        trial.set_user_attr("folder", folder)
        trial_dir = sweep_dir / f"trial-{folder}"
        console.rule(f"trial {folder}: " + ", ".join(f"{k}={v}" for k, v in choice.items()))
        resume = args.resume and last_checkpoint(trial_dir) is not None
        try:
            info = train_once(trial_args(args, choice, resume), trial_dir, base_path, tokenizer, data, argv)
        except Diverged as e:  # a rate of the grid too high: this trial ends, the sweep goes on
            console.print(f"trial {folder}: {e}", style="yellow", markup=False, highlight=False)
            trial.set_user_attr("diverged", f"diverged at lr {choice['lr']:g}")
            raise optuna.TrialPruned(str(e)) from None
        except RunError as e:
            raise SweepStopped(e) from None
        trial.set_user_attr("result", {**choice, "trial": folder, **info})
        return info["best_val_loss"]

    try:
        study.optimize(objective, n_trials=max(0, size - len(finished)))
    except SweepStopped as stopped:
        raise stopped.error from None
    ranked = sorted((t.user_attrs["result"] for t in study.trials if t.state == TrialState.COMPLETE),
                    key=lambda r: r["best_val_loss"])
    if not ranked:
        raise RunError(f"every trial of the sweep diverged (see {sweep_dir}): lower --sweep-lr")
    if is_main_process():
        write_sweep_results(ranked, sweep_dir)
        best = {k: v for k, v in config_record(trial_args(args, {k: ranked[0][k] for k in TRIAL_KEYS})).items()
                if k not in NOT_IN_BEST_CONFIG}
        atomic_write_text(sweep_dir / "best_config.yaml",
                          "# The best trial's settings; use them with: python finetune.py --config "
                          f"{sweep_dir / 'best_config.yaml'} --out RUN_DIR\n"
                          + yaml.safe_dump({"finetune": best}, sort_keys=True))
        console.print(f"Best: trial {ranked[0]['trial']} " + ", ".join(f"{k}={ranked[0][k]}" for k in TRIAL_KEYS)
                      + ". Final run:")
        console.print(f"  python finetune.py --config {sweep_dir / 'best_config.yaml'} --out RUN_DIR", soft_wrap=True,
                      markup=False, highlight=False)
    return ranked


def write_sweep_results(ranked: list[dict[str, Any]], sweep_dir: Path) -> None:
    """results.csv, results.md and the console table, ranked by best validation loss."""
    columns = ["rank", "trial", *TRIAL_KEYS, "best_val_loss", "best_step", "global_step", "stopped_early",
               "train_tokens_per_s", "wall_time_s"]
    rows = [{"rank": i, **{c: r.get(c) for c in columns if c != "rank"}} for i, r in enumerate(ranked, 1)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "results.csv", buffer.getvalue())
    atomic_write_text(sweep_dir / "results.md", "# Sweep results, ranked by best validation loss\n\n"
                      + markdown_table(columns, ([row[c] for c in columns] for row in rows)) + "\n")
    table = Table(title="Sweep, ranked by best validation loss", title_justify="left")
    for column in columns[:8]:
        table.add_column(column.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns[:8]))
    console.print(table)


# ---------------------------------------------------------------------------------------------------------- Export

def finished_run_base(out_dir: Path) -> str:
    """The base model a finished run trained, from its run_info.json, for --export-only."""
    info = models.read_run_info(out_dir) if (out_dir / "adapter_model.safetensors").is_file() else {}
    if not info:
        raise RunError(f"--export-only: {out_dir} holds no finished run (adapter_model.safetensors and run_info.json)")
    return info["base_model"]


def export(args: argparse.Namespace, base_path: str, out_dir: Path) -> None:
    """Merged 16-bit weights, then GGUF files (which need the merged folder) with an Ollama Modelfile."""
    from howto.export import export_gguf, export_merged

    merged = export_merged(base_path, out_dir, out_dir / "merged")
    if "gguf" in args.export:
        template = models.MISTRAL_CHAT_TEMPLATE if models.is_mistral(base_path) else None
        export_gguf(merged, out_dir / "gguf", args.quant, llama_cpp=args.llama_cpp, chat_template=template)


if __name__ == "__main__":
    run_script(main)
