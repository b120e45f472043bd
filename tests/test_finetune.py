"""finetune.py on the tiny random Mistral model, on the CPU: training, early stopping, sweeps, resume, label masks,
refusals and the TRL settings it relies on.

Runs that use the Unsloth engine go through a subprocess: Unsloth patches transformers, TRL and peft when imported,
and must not leak into the other tests of this process. hf-engine runs call main(argv) directly.
"""
from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import finetune
from howto import chat, device
from howto.runio import RunError

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = ["--model", "tiny", "--lora-r", "8", "--lora-alpha", "16", "--max-seq-length", "128", "--grad-accum", "1"]
# For the long hf-engine runs whose subject is not compilation: on the tiny model torch.compile's tracing costs far
# more than it saves (the compiled path has its own tests, and the Ctrl-C and accelerate tests run compiled).
NOT_COMPILED = ["--no-compile"]

TASKS = {
    "reset my password": ["Open the {app} app", "Tap 'Forgot password'", "Enter your email address",
                          "Open the link in the email", "Set a new password"],
    "change my phone number": ["Open the {app} app", "Go to 'Profile'", "Tap 'Phone number'", "Enter the new number"],
    "delete my account": ["Open the {app} app", "Go to 'Settings'", "Tap 'Delete account'", "Confirm with your PIN",
                          "Tap 'Delete'", "Wait for the confirmation email"],
    "turn on notifications": ["Open the {app} app", "Go to 'Settings'", "Tap 'Notifications'"],
    "update my address": ["Open the {app} app", "Go to 'Profile'", "Tap 'Address'", "Enter the new address",
                          "Tap 'Save'"],
}
TRAIN_APPS = ["Shopee", "Tokopedia", "Gojek", "Grab", "Dana", "OVO", "BCA", "Traveloka"]
VAL_APPS = ["Lazada", "Blibli"]


def howto_records(apps: list[str]) -> list[dict]:
    """The same five tasks in every app: a pattern the tiny model can learn in a few steps."""
    return [{"prompt": f"How do I {task} in the {app} app?", "response": [s.format(app=app) for s in steps],
             "category": "apps"} for app in apps for task, steps in TASKS.items()]


def write_split(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def learnable_data(tmp_path) -> Path:
    """40 training and 8 validation records of the same how-to pattern (validation in unseen apps)."""
    folder = tmp_path / "data"
    write_split(folder, "train", howto_records(TRAIN_APPS))
    write_split(folder, "val", howto_records(VAL_APPS)[:8])
    write_split(folder, "test", howto_records(VAL_APPS)[8:])
    return folder


@pytest.fixture
def small_data(tmp_path) -> Path:
    """4 training records of one pattern and 2 validation records of another: training on the first soon stops
    helping the second, so the validation loss turns up and early stopping has something to catch."""
    folder = tmp_path / "small"
    write_split(folder, "train", [
        {"prompt": f"How do I reset my password in the {app} app?",
         "response": [f"Open the {app} app", "Tap 'Forgot password'", "Enter your email address",
                      "Open the link in the email"]} for app in TRAIN_APPS[:4]])
    write_split(folder, "val", [
        {"prompt": f"How do I bake bread number {i}?",
         "response": ["Mix flour water yeast and salt", "Knead for ten minutes", "Let it rise for two hours",
                      "Bake at 220 degrees"]} for i in range(2)])
    return folder


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
            "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def trainer_state(out: Path, step: int) -> dict:
    return read_json(out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json")


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Training through the CLI, Unsloth engine
# ---------------------------------------------------------------------------------------------------------------

def test_unsloth_training_lowers_validation_loss(learnable_data, tmp_path, tiny_model):
    out = tmp_path / "run"
    result = run_cli(["--data", str(learnable_data), "--out", str(out), *TINY, "--epochs", "2", "--lr", "2e-2",
                      "--batch-size", "8"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "random weights" in result.stdout and "mean nothing about quality" in result.stdout

    info = read_json(out / "run_info.json")
    assert info["status"] == "done" and info["engine"] == "unsloth" and info["model_name"] == "tiny"
    assert info["base_model"] == tiny_model
    assert info["start_val_loss"] - info["best_val_loss"] > 0.3, info  # clearly learned the pattern
    assert info["best_checkpoint"] == f"checkpoints/checkpoint-{info['best_step']}" and not info["stopped_early"]
    assert info["precision"] in ("bf16", "fp32") and info["precision_reason"]
    assert info["train_tokens"] > 0 and info["train_tokens_per_s"] > 0 and info["peak_memory_gib"] > 0.1
    assert info["wall_time_s"] > 0 and info["data_sha256"] and info["versions"]["unsloth"]
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 2e-2

    adapter = read_json(out / "adapter_config.json")
    assert adapter["r"] == 8 and sorted(adapter["target_modules"]) == sorted(PROJECTIONS)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.model.v3").is_file()

    metrics = read_json(out / "metrics.json")
    assert [p["step"] for p in metrics["val"]] == [0, 5, 10]
    assert metrics["best_val_loss"] == pytest.approx(info["best_val_loss"])
    evals = [h["eval_loss"] for h in trainer_state(out, 10)["log_history"] if "eval_loss" in h]
    assert evals == pytest.approx([p["loss"] for p in metrics["val"]])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# Overfitting: early stopping keeps the best adapter, not the last
# ---------------------------------------------------------------------------------------------------------------

def test_early_stopping_stops_and_keeps_the_best_checkpoint(small_data, tmp_path):
    out = tmp_path / "run"
    finetune.main(["--data", str(small_data), "--out", str(out), *TINY, *NOT_COMPILED, "--engine", "hf", "--epochs",
                   "20", "--lr", "5e-2", "--batch-size", "4", "--patience", "1"])
    info = read_json(out / "run_info.json")
    assert info["stopped_early"] and info["global_step"] < info["max_steps"] == 20
    best_step = info["best_step"]
    last = trainer_state(out, info["global_step"])
    assert last["global_step"] == info["global_step"] < 20
    val = {h["step"]: h["eval_loss"] for h in last["log_history"] if "eval_loss" in h and h["step"] > 0}
    assert min(val, key=val.get) == best_step
    assert [step for step in val if step > best_step] == [info["global_step"]]  # patience 1: one worse evaluation

    final, best, latest = (adapter_tensors(out), adapter_tensors(out / "checkpoints" / f"checkpoint-{best_step}"),
                           adapter_tensors(out / "checkpoints" / f"checkpoint-{info['global_step']}"))
    assert final.keys() == best.keys()
    assert all((final[k] == best[k]).all() for k in final)
    assert any((final[k] != latest[k]).any() for k in final)


# ---------------------------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------------------------

def test_grid_sweep_ranks_its_trials_and_writes_a_reusable_best_config(small_data, tmp_path):
    out = tmp_path / "sweep-run"
    finetune.main(["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--sweep",
                   "--sweep-lr", "1e-4,3e-2", "--sweep-epochs", "1,2", "--sweep-batch-size", "4"])
    with open(out / "sweep" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert sorted((float(r["lr"]), int(r["epochs"])) for r in rows) == [(1e-4, 1), (1e-4, 2), (3e-2, 1), (3e-2, 2)]
    for row in rows:  # each trial is a real run of its own
        info = read_json(out / "sweep" / f"trial-{row['trial']}" / "run_info.json")
        assert info["best_val_loss"] == pytest.approx(float(row["best_val_loss"]))
        assert (info["max_steps"], info["status"]) == (int(row["epochs"]), "done")
    assert "| rank |" in (out / "sweep" / "results.md").read_text()

    best = yaml.safe_load((out / "sweep" / "best_config.yaml").read_text())["finetune"]
    assert (best["lr"], best["epochs"]) == (float(rows[0]["lr"]), int(rows[0]["epochs"]))
    assert "out" not in best and "sweep" not in best
    args = finetune.parse(["--config", str(out / "sweep" / "best_config.yaml"), "--out", str(tmp_path / "final")])
    assert (args.lr, args.epochs, args.engine, args.data) == (best["lr"], best["epochs"], "hf", str(small_data))


def test_optuna_sweep_is_seeded_and_resume_continues_the_study(small_data, tmp_path):
    out = tmp_path / "optuna-run"
    flags = ["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--sweep", "--sweep-lr",
             "1e-4,3e-2", "--sweep-epochs", "1", "--sweep-batch-size", "4"]
    finetune.main([*flags, "--sweep-optuna-trials", "1"])
    first = read_json(out / "sweep" / "trial-1" / "run_info.json")
    with pytest.raises(RunError, match="holds an earlier Optuna study: pass --resume"):
        finetune.main([*flags, "--sweep-optuna-trials", "2"])
    finetune.main([*flags, "--sweep-optuna-trials", "2", "--resume"])
    assert read_json(out / "sweep" / "trial-1" / "run_info.json") == first  # the finished trial is kept, not rerun
    with open(out / "sweep" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == ["1", "2"]
    assert float(rows[0]["best_val_loss"]) <= float(rows[1]["best_val_loss"])
    first_lr = yaml.safe_load((out / "sweep" / "trial-1" / "config.yaml").read_text())["lr"]
    assert all(1e-4 <= float(r["lr"]) <= 3e-2 for r in rows)
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3407))  # --seed's default
    assert study.ask().suggest_float("lr", 1e-4, 3e-2, log=True) == pytest.approx(first_lr)  # seeded: reproducible


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and --resume
# ---------------------------------------------------------------------------------------------------------------

def interrupt_at_first_checkpoint(flags: list[str], run: Path) -> str:
    """finetune.py run through its command line and stopped with Ctrl-C (SIGINT) once `run` holds checkpoint-2;
    what it printed, after checking it exited as interrupted."""
    # Ctrl-C as a terminal delivers it: a child inherits an ignored SIGINT (what some tools leave in the test process),
    # and Python then never turns it into KeyboardInterrupt, so the child starts with the default disposition.
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *flags], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == finetune.INTERRUPTED_EXIT, output[-3000:]
    return output


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_from_it(small_data, tmp_path):
    out = tmp_path / "run"
    flags = ["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--lr", "1e-2",
             "--batch-size", "2", "--patience", "0"]
    output = interrupt_at_first_checkpoint([*flags, "--epochs", "50"], out)
    assert "Interrupted at step" in output and "--resume" in output
    info = read_json(out / "run_info.json")
    stopped = info["interrupted_at_step"]
    assert info["status"] == "interrupted" and 2 <= stopped < 12, info
    saved = trainer_state(out, stopped)
    assert saved["global_step"] == stopped

    result = run_cli([*flags, "--epochs", "6", "--resume"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{stopped}'}" in result.stdout.replace("\n", "")
    info = read_json(out / "run_info.json")
    assert info["resumed_from_step"] == stopped and info["global_step"] == 12 and info["status"] == "done"
    history = trainer_state(out, 12)["log_history"]
    assert history[: len(saved["log_history"])] == saved["log_history"]  # the interrupted run's history, kept
    resumed_steps = [h["step"] for h in history[len(saved["log_history"]):] if "loss" in h]
    assert resumed_steps == list(range(stopped + 1, 13))  # training went on from the saved step, not from 0


def test_resume_without_a_checkpoint_and_reuse_of_a_run_folder_are_refused(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(RunError, match="no checkpoint in .*checkpoints to continue from"):
        finetune.main(["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--resume"])
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(RunError, match="holds checkpoints of an earlier run: pass --resume"):
        finetune.main(["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf"])


def test_interrupted_sweep_continues_its_trial_from_the_checkpoint(small_data, tmp_path):
    """Ctrl-C in a sweep leaves the trial unfinished in the Optuna study; --resume runs the same choice again in the
    same folder, from its last checkpoint."""
    out = tmp_path / "sweep-run"
    flags = ["--data", str(small_data), "--out", str(out), *TINY, *NOT_COMPILED, "--engine", "hf", "--sweep",
             "--sweep-lr", "1e-2", "--sweep-epochs", "10", "--sweep-batch-size", "2", "--patience", "0"]
    trial = out / "sweep" / "trial-1"
    interrupt_at_first_checkpoint(flags, trial)
    stopped = read_json(trial / "run_info.json")["interrupted_at_step"]
    assert stopped < 20

    result = run_cli([*flags, "--resume"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = read_json(trial / "run_info.json")
    assert (info["status"], info["resumed_from_step"], info["global_step"]) == ("done", stopped, 20)
    assert sorted(p.name for p in (out / "sweep").glob("trial-*")) == ["trial-1"]
    with open(out / "sweep" / "results.csv", newline="") as f:
        assert [row["trial"] for row in csv.DictReader(f)] == ["1"]


def test_resume_with_other_data_is_refused_and_rewrites_nothing(small_data, learnable_data, tmp_path):
    """Issue 11: --resume on another --data used to train nothing, exit 0 and rewrite the run's records."""
    from howto.runio import write_run_info

    out = tmp_path / "run"
    files = [small_data / "train.jsonl", small_data / "val.jsonl"]
    write_run_info(out, {"data": str(small_data)}, files, {"base_model": "tiny", "status": "interrupted"})
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    before = {name: (out / name).read_bytes() for name in ("run_info.json", "config.yaml")}
    with pytest.raises(RunError, match=r"--resume: .*run_info.json trained on other data .*resume with the --data"):
        finetune.main(["--data", str(learnable_data), "--out", str(out), *TINY, "--engine", "hf", "--resume"])
    assert {name: (out / name).read_bytes() for name in before} == before


def finished_run(out: Path, data: Path, argv: list[str]) -> dict[str, bytes]:
    """A finished run's records as finetune.py writes them (config.yaml of these settings, run_info.json with the
    training's results), and their bytes."""
    from howto.runio import write_run_info

    args = finetune.parse(["--data", str(data), "--out", str(out), *argv])
    write_run_info(out, finetune.config_record(args), [data / "train.jsonl", data / "val.jsonl"],
                   {"base_model": "tiny", "status": "done", "best_checkpoint": "checkpoints/checkpoint-4",
                    "best_val_loss": 9.5, "global_step": 6})
    (out / "checkpoints" / "checkpoint-6").mkdir(parents=True)
    return {name: (out / name).read_bytes() for name in ("run_info.json", "config.yaml")}


def test_resume_with_other_lora_rank_leaves_the_run_untouched(small_data, tmp_path):
    """Issue 19: `--resume --lora-r 8` on a finished r=16 run rewrote config.yaml and run_info.json, then crashed on
    the adapter's shapes."""
    out = tmp_path / "run"
    before = finished_run(out, small_data, [*TINY, "--engine", "hf", "--lora-r", "16"])
    with pytest.raises(RunError, match=rf"^--resume: {out} was trained with other settings: --lora-r 8 "
                                         r"\(the run has 16\): resume with the run's own settings"):
        finetune.main(["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--resume"])
    with pytest.raises(RunError, match=r"--lora-r 8 \(the run has 16\); --lr 0.001 \(the run has 0.0002\)"):
        finetune.main(["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--lr", "1e-3",
                       "--resume"])
    assert {name: (out / name).read_bytes() for name in before} == before
    args = finetune.parse(["--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--lora-r", "16",
                           "--epochs", "9", "--resume"])
    finetune.check_resume(args, out, [small_data / "train.jsonl", small_data / "val.jsonl"])  # more epochs: fine


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "2e4"], "--lr 20000 is far above any learning rate that trains (at most 1; LoRA uses 1e-5 to 1e-3, "
                      "the default is 2e-4): did you mean 2e-4?"),
    (["--lr", "1.5"], "--lr 1.5 is far above any learning rate that trains"),
    (["--warmup-ratio", "nan"], "--warmup-ratio nan: must be a finite number"),
    (["--lora-dropout=-inf"], "--lora-dropout -inf: must be a finite number"),
    (["--gpu-memory", "inf"], "--gpu-memory inf: must be a finite number"),
    (["--sweep", "--sweep-lr", "1e-4,inf"], "--sweep-lr needs one or more values, each > 0 and finite"),
    (["--sweep", "--sweep-lr", "1e-4,2e4"], "--sweep-lr: every learning rate must be at most 1"),
])
def test_lr_inf_is_refused_by_the_preflight(flags, message, learnable_data, tmp_path, capsys):
    """Issue 19: `--lr inf` passed the checks and saved an adapter of NaNs; `--lr 2e4` (for 2e-4) diverged."""
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--data", str(learnable_data), "--out", str(tmp_path / "run"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_diverged_training_stops_keeps_no_adapter_and_exits_non_zero(small_data, tmp_path, monkeypatch):
    """Issue 19: a run whose loss became NaN exited 0 with an adapter of NaNs and bare NaN in metrics.json. Here the
    loss turns NaN from the fourth step (what a learning rate far too high does to a real model; the tiny model's
    random head keeps its loss near ln(vocabulary) whatever the rate)."""
    real = device.cpu_sft_trainer

    def diverging_trainer(compiled: bool) -> type:
        class Diverging(real(compiled)):
            def compute_loss(self, model, inputs, *args, **kwargs):
                loss = super().compute_loss(model, inputs, *args, **kwargs)
                return loss * float("nan") if model.training and self.state.global_step >= 3 else loss

        return Diverging

    monkeypatch.setattr(device, "cpu_sft_trainer", diverging_trainer)
    out = tmp_path / "run"
    with pytest.raises(finetune.Diverged) as exc:  # a RunError: run_script makes it `error: ...` and exit code 1
        finetune.main(["--data", str(small_data), "--out", str(out), *TINY, *NOT_COMPILED, "--engine", "hf",
                       "--epochs", "5", "--batch-size", "2", "--lr", "1e-3"])
    message = str(exc.value)
    assert message.startswith("training diverged: the training loss became nan at step 4. The learning rate is the "
                              "likely cause: --lr 0.001 is too high"), message
    assert "No adapter was saved" in message and isinstance(exc.value, RunError) and exc.value.message == message
    assert not (out / "adapter_model.safetensors").exists()  # no adapter as the run's result
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]  # none after the NaN

    def no_nan(constant):
        raise AssertionError(f"{constant} in a JSON file")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=no_nan)
    info = json.loads((out / "run_info.json").read_text(), parse_constant=no_nan)
    assert metrics["diverged"] == info["diverged"] == "the training loss became nan at step 4"
    assert metrics["best_val_loss"] is None and metrics["train"][-1] == {"step": 4, "epoch": 2.0, "loss": None}
    assert (info["status"], info["global_step"]) == ("diverged", 4)


def test_training_that_fails_is_recorded_as_failed_not_running(small_data, tmp_path, monkeypatch):
    """An error in the middle of training (here at the fourth step, as CUDA's out-of-memory error would come) goes
    on to the user unchanged, and run_info.json says the run failed, where and why, instead of "running"."""
    real = device.cpu_sft_trainer

    def failing_trainer(compiled: bool) -> type:
        class Failing(real(compiled)):
            def compute_loss(self, model, inputs, *args, **kwargs):
                if model.training and self.state.global_step >= 3:
                    raise RuntimeError("out of memory (simulated)")
                return super().compute_loss(model, inputs, *args, **kwargs)

        return Failing

    monkeypatch.setattr(device, "cpu_sft_trainer", failing_trainer)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        finetune.main(["--data", str(small_data), "--out", str(out), *TINY, *NOT_COMPILED, "--engine", "hf",
                       "--epochs", "5", "--batch-size", "2"])
    info = json.loads((out / "run_info.json").read_text())
    assert (info["status"], info["failed_at_step"]) == ("failed", 3), info
    assert info["error"] == "RuntimeError: out of memory (simulated)"
    assert not (out / "adapter_model.safetensors").exists()


def test_sweep_trial_that_diverges_is_pruned_and_the_sweep_goes_on(small_data, tmp_path, monkeypatch):
    """A rate of the grid that diverges ends its own trial; the others are ranked, the best config is written."""
    real = device.cpu_sft_trainer

    def diverging_at_high_rates(compiled: bool) -> type:
        class Diverging(real(compiled)):
            def compute_loss(self, model, inputs, *args, **kwargs):
                loss = super().compute_loss(model, inputs, *args, **kwargs)
                return loss * float("nan") if model.training and self.args.learning_rate > 0.1 else loss

        return Diverging

    monkeypatch.setattr(device, "cpu_sft_trainer", diverging_at_high_rates)
    out = tmp_path / "sweep-run"
    finetune.main(["--data", str(small_data), "--out", str(out), *TINY, *NOT_COMPILED, "--engine", "hf", "--sweep",
                   "--sweep-lr", "1e-3,0.5", "--sweep-epochs", "1", "--sweep-batch-size", "2"])
    with open(out / "sweep" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == [1e-3]
    trials = [read_json(p) for p in (out / "sweep").glob("trial-*/run_info.json")]
    assert sorted(info["status"] for info in trials) == ["diverged", "done"]
    assert yaml.safe_load((out / "sweep" / "best_config.yaml").read_text())["finetune"]["lr"] == 1e-3


def test_divergence_is_a_non_finite_loss_or_a_validation_loss_far_above_the_start():
    from howto.trainlog import divergence

    history = [{"eval_loss": 2.0, "step": 0}, {"loss": 1.5, "step": 10}, {"eval_loss": 1.2, "step": 10}]
    assert divergence(history[2], history) is None
    assert divergence({"eval_loss": 5.9, "step": 20}, history) is None  # overfitting, or noise: not divergence
    assert divergence({"eval_loss": 6.5, "step": 20}, history) == \
        "the validation loss rose to 6.5 at step 20, over 3 times the untrained model's 2"
    assert divergence({"loss": float("inf"), "step": 3}, history) == "the training loss became inf at step 3"
    assert divergence({"eval_loss": float("nan"), "step": 5}, []) == "the validation loss became nan at step 5"


def test_data_file_and_out_file_are_refused_before_any_work(learnable_data, tmp_path):
    base = [*TINY, "--engine", "hf"]
    with pytest.raises(RunError, match="is a file; --data takes the folder prepare_data.py --out wrote"):
        finetune.main(["--data", str(learnable_data / "train.jsonl"), "--out", str(tmp_path / "run"), *base])
    (tmp_path / "taken").write_text("a file\n")
    with pytest.raises(RunError, match="--out .*taken: is a file, not a folder"):
        finetune.main(["--data", str(learnable_data), "--out", str(tmp_path / "taken"), *base])


# ---------------------------------------------------------------------------------------------------------------
# The label mask, token by token, for both engines
# ---------------------------------------------------------------------------------------------------------------

def build_trainer(argv: list[str], precision: str | None = None) -> tuple:
    """The trainer finetune.py would train with, built by its own functions, and the tokenizer it was given."""
    from howto import models

    args = finetune.parse(argv)
    finetune.import_engine(args.engine)
    records = finetune.load_splits(Path(args.data))
    base = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(base)
    data = finetune.tokenize_splits(args, tokenizer, records, Path(args.out), Console(record=True))
    precision = precision or finetune.choose_precision(args.engine)[0]
    model = finetune.load_model(args, base, precision)
    return finetune.build_trainer(model, tokenizer, data["train"], data["val"], args, Path(args.out), precision), \
        tokenizer


def collated_batch(argv: list[str]) -> dict:
    """The batch the trainer's data collator makes of the whole training split."""
    trainer, _ = build_trainer(argv)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    return {k: batch[k].tolist() for k in ("input_ids", "labels", "attention_mask")}


@pytest.mark.parametrize("engine", ["hf", "unsloth"])
def test_labels_cover_the_assistant_steps_only(engine, learnable_data, tmp_path, mistral_tokenizer):
    argv = ["--data", str(learnable_data), "--out", str(tmp_path / "run"), *TINY, "--engine", engine]
    if engine == "hf":
        batch = collated_batch(argv)
    else:  # Unsloth patches the libraries it is imported before: its own process
        code = ("import unsloth, json; from tests.test_finetune import collated_batch; "
                f"print('BATCH=' + json.dumps(collated_batch({argv!r})))")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        batch = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("BATCH="))[6:])

    tok = mistral_tokenizer
    expected = {}  # Mistral's format, restated: the prompt's tokens, then the steps' tokens and </s>
    for record in howto_records(TRAIN_APPS):
        prompt = chat.prompt_ids(tok, record["prompt"])
        steps = list(tok.encode(chat.render_steps(record["response"]), add_special_tokens=False))
        expected[tuple(prompt + steps + [tok.eos_token_id])] = (record, len(prompt))
    assert len(batch["input_ids"]) == len(expected)
    width = len(batch["input_ids"][0])
    seen = set()
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        n = sum(attention)
        record, prompt_len = expected[tuple(ids[:n])]
        seen.add(tuple(ids[:n]))
        assert labels[:prompt_len] == [-100] * prompt_len  # no prompt token is trained on
        assert labels[prompt_len:n] == ids[prompt_len:n]  # every assistant token is
        assert labels[n - 1] == ids[n - 1] == tok.eos_token_id == 2  # including the final </s>
        steps_text = tok.decode(labels[prompt_len:n], skip_special_tokens=True).strip()
        assert steps_text == chat.render_steps(record["response"])
        assert labels[n:] == [-100] * (width - n) and attention[n:] == [0] * (width - n)
    assert len(seen) == len(expected)
    assert min(sum(a) for a in batch["attention_mask"]) < width  # the batch had padding to check


# ---------------------------------------------------------------------------------------------------------------
# Refusals and clear errors
# ---------------------------------------------------------------------------------------------------------------

def test_records_that_would_train_on_nothing_are_refused_by_name(tmp_path, capsys):
    folder = tmp_path / "data"
    long_steps = [f"Step number {i} of a very long procedure with many words" for i in range(20)]
    write_split(folder, "train", howto_records(TRAIN_APPS[:2])[:3]
                + [{"prompt": "How do I do a long thing?", "response": long_steps}])
    long_prompt = "How do I " + "really " * 80 + "reset my password?"
    write_split(folder, "val", [howto_records(VAL_APPS)[0],
                                {"prompt": long_prompt, "response": ["Open the app", "Tap 'Reset'"]}])
    with pytest.raises(RunError) as exc:
        finetune.main(["--data", str(folder), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf"])
    message = str(exc.value)
    assert "1 record(s) would train on no token" in message
    assert f"{folder / 'val.jsonl'}:2 (val)" in message and "How do I really really" in message
    assert "1 train record(s) are longer than --max-seq-length 128" in capsys.readouterr().out.replace("\n", " ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--engine", "deepspeed"], "argument --engine: invalid choice: 'deepspeed'"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--sweep", "--sweep-lr", "0,1e-4"], "--sweep-lr needs one or more values, each > 0"),
    (["--sweep-epochs", "1,one"], "--sweep-epochs: a comma-separated list has a bad value"),
    (["--export", "gguf", "--quant", "q4_k_n"], "--quant: unknown quantization type 'q4_k_n'"),
])
def test_bad_flags_are_refused(flags, message, learnable_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--data", str(learnable_data), "--out", str(tmp_path / "run"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_empty_or_broken_splits_name_the_file(learnable_data, tmp_path):
    base = ["--out", str(tmp_path / "run"), *TINY, "--engine", "hf"]
    with pytest.raises(RunError, match="no such folder"):
        finetune.main(["--data", str(tmp_path / "nowhere"), *base])
    (learnable_data / "val.jsonl").unlink()
    with pytest.raises(RunError, match=f"{learnable_data / 'val.jsonl'}: not found"):
        finetune.main(["--data", str(learnable_data), *base])
    (learnable_data / "val.jsonl").write_text("\n")
    with pytest.raises(RunError, match=f"{learnable_data / 'val.jsonl'}: the val split is empty"):
        finetune.main(["--data", str(learnable_data), *base])
    write_split(learnable_data, "train", [howto_records(TRAIN_APPS)[0], {"prompt": "How?", "response": "Open it"}])
    with pytest.raises(RunError, match=f"{learnable_data / 'train.jsonl'}:2: field 'response'"):
        finetune.main(["--data", str(learnable_data), *base])


def test_cli_error_exits_non_zero_and_names_the_file(tmp_path):
    result = run_cli(["--data", str(tmp_path), "--out", str(tmp_path / "run"), *TINY])
    assert result.returncode == 1
    assert f"{tmp_path / 'train.jsonl'}: not found" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Settings that users of Unsloth and TRL keep tripping on
# ---------------------------------------------------------------------------------------------------------------

def test_precision_on_a_cpu_is_full_for_the_hf_engine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert finetune.choose_precision("hf")[0] == "fp32"


def test_no_gpu_means_smollm2_and_says_so(monkeypatch, capsys):
    from howto import models

    monkeypatch.setattr(models, "has_cuda", lambda: False)
    args = argparse.Namespace(model=None)
    finetune.announce_model(args)
    assert args.model == "smollm2"
    assert "No GPU found" in capsys.readouterr().out


def test_trl_api_pin(learnable_data, tmp_path):
    """The SFTConfig and SFTTrainer keywords this script passes: a TRL rename fails here, not in a user's run."""
    import inspect

    from trl import SFTConfig, SFTTrainer

    argv = ["--data", str(learnable_data), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf"]
    kwargs = finetune.sft_config_kwargs(finetune.parse(argv), tmp_path / "run", "fp32", epoch_steps=20)
    config = SFTConfig(**kwargs)  # an unknown keyword is a TypeError
    for key in ("max_length", "completion_only_loss", "packing", "eval_strategy", "load_best_model_at_end",
                "metric_for_best_model", "include_num_input_tokens_seen", "eval_on_start", "warmup_steps",
                "gradient_checkpointing"):
        assert getattr(config, key) == kwargs[key], key
    assert (config.max_length, config.completion_only_loss) == (128, True)
    assert (config.eval_strategy, config.save_strategy) == ("epoch", "epoch")
    assert (config.lr_scheduler_type, config.optim) == ("linear", "adamw_torch_fused")
    assert "processing_class" in inspect.signature(SFTTrainer.__init__).parameters

    trainer, tokenizer = build_trainer(argv)  # SFTTrainer(..., processing_class=tokenizer)
    assert isinstance(trainer, SFTTrainer) and trainer.processing_class is tokenizer
    assert trainer.args.max_length == 128 and trainer.args.completion_only_loss
    assert trainer.data_collator.pad_token_id == tokenizer.eos_token_id  # Mistral's <pad> is no vocabulary entry
    assert trainer.model.config._attn_implementation == "eager"  # device.cpu_plan's attention, on a CPU


def test_cpu_plan_compiles_decoder_layers_to_the_same_loss_and_gradients(learnable_data, tmp_path):
    """On a CPU with a C++ compiler (this machine's and CI's) the hf engine compiles every decoder layer; the
    compiled layers give the loss and LoRA gradients of the same layers run op by op, over batches of two lengths
    (one compilation with dynamic shapes serves both)."""
    import torch

    argv = ["--data", str(learnable_data), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf"]
    compiled, _ = build_trainer(argv)
    eager, _ = build_trainer([*argv, "--no-compile"])
    layers = [m for m in compiled.model.modules() if type(m).__name__ == "MistralDecoderLayer"]
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in eager.model.modules())
    batches = list(itertools.islice(iter(compiled.get_train_dataloader()), 3))
    assert len({b["input_ids"].shape[1] for b in batches}) > 1

    def loss_and_grads(trainer, batch):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]

    for batch in batches:
        (loss_c, grads_c), (loss_e, grads_e) = loss_and_grads(compiled, batch), loss_and_grads(eager, batch)
        assert loss_c == pytest.approx(loss_e, rel=1e-4)
        for a, b in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_loss_on_the_answers_equals_the_models_own(compiled, learnable_data, tmp_path):
    """The CPU trainer's loss (the LM head on the answer positions only, as TRL's fused head computes it) gives the
    loss and LoRA gradients of the model's own forward over the whole batch, with the Trainer's token count for
    gradient accumulation (num_items_in_batch) and without."""
    import torch
    from transformers import Trainer

    argv = ["--data", str(learnable_data), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf",
            "--batch-size", "4", "--compile" if compiled else "--no-compile"]
    trainer, _ = build_trainer(argv)
    trainer.model.train()

    def loss_and_grads(compute_loss, batch, n):
        trainer.model.zero_grad()
        loss = compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])

    for batch in itertools.islice(iter(trainer.get_train_dataloader()), 2):
        for n in (None, torch.tensor(37)):
            loss, grads = loss_and_grads(trainer.compute_loss, batch, n)
            own_loss, own_grads = loss_and_grads(functools.partial(Trainer.compute_loss, trainer), batch, n)
            assert loss == pytest.approx(own_loss, rel=1e-5) and own_grads.norm() > 0
            torch.testing.assert_close(grads, own_grads, rtol=1e-4, atol=1e-6)


def test_cpu_loss_runs_in_the_runs_mixed_precision(learnable_data, tmp_path):
    """In bf16 the CPU trainer's loss runs under accelerate's autocast, as the model's own (wrapped) forward would:
    the fp32 LoRA weights' matmuls run in bf16. Outside it they ran in fp32, the loop's slowest small matmuls."""
    import torch

    argv = ["--data", str(learnable_data), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf", "--no-compile"]
    trainer, _ = build_trainer(argv, precision="bf16")
    lora_a = next(m for name, m in trainer.model.named_modules() if name.endswith("q_proj.lora_A.default"))
    assert lora_a.weight.dtype == torch.float32  # peft keeps the adapter in fp32: the optimizer's master weights
    seen = []
    lora_a.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert seen and set(seen) == {torch.bfloat16}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_compiled_kernels_are_cached_beside_the_models(tmp_path, monkeypatch):
    """Inductor's folder, as torch resolves it once finetune.main has set the process up and transformers is imported
    (its import settles the folder), is under HOWTO_CACHE rather than the temp folder; a TORCHINDUCTOR_CACHE_DIR of
    the user's own wins."""
    from howto import runtime

    code = ("import finetune\ntry:\n    finetune.main(['--help'])\nexcept SystemExit:\n    pass\nimport transformers\n"
            "from torch._inductor.runtime.cache_dir_utils import cache_dir\nprint(cache_dir())")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "HOWTO_CACHE": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == str(tmp_path / "torch-compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    runtime.compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_compile_follows_the_flag_the_device_and_the_compiler(learnable_data, tmp_path, monkeypatch):
    import torch

    argv = ["--data", str(learnable_data), "--out", str(tmp_path / "run"), *TINY, "--engine", "hf"]
    assert finetune.compile_wanted(finetune.parse(argv))[0] is True
    assert finetune.compile_wanted(finetune.parse([*argv, "--no-compile"])) == (False, "off (--no-compile)")
    assert finetune.compile_wanted(finetune.parse([*argv[:-1], "unsloth"]))[0] is False
    for broken in ("no-such-compiler", "false"):  # not found; found, but fails as Inductor's check would see it
        monkeypatch.setenv("CXX", broken)
        on, why = finetune.compile_wanted(finetune.parse(argv))
        assert not on and "no working C++ compiler" in why
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert finetune.compile_wanted(finetune.parse(argv))[0] is False


# ---------------------------------------------------------------------------------------------------------------
# Several processes: accelerate on the hf engine
# ---------------------------------------------------------------------------------------------------------------

def test_accelerate_launches_two_processes_on_cpu(small_data, tmp_path):
    """Two gloo processes on the CPU. `accelerate launch --cpu` would run a single process (its simple launcher);
    `--multi_gpu` is the multi-process launcher, and with no GPU visible it uses gloo on the CPU."""
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune.py"),
         "--data", str(small_data), "--out", str(out), *TINY, "--engine", "hf", "--epochs", "1", "--lr", "1e-2",
         "--batch-size", "1"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = read_json(out / "run_info.json")
    assert info["world_size"] == 2
    assert info["global_step"] == 2  # 4 records / (1 per process x 2 processes)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
