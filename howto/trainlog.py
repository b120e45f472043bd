"""What a training run's history says: the loss curves for metrics.json, the evaluation table printed at the end,
and loss.png. All of it is read from the Trainer's own `state.log_history`, which also survives a resume."""
from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from howto.runio import figure_png, pyplot


# A validation loss this many times the untrained model's has diverged, not overfitted: overfitting lifts the
# validation loss slowly from its low point, while a learning rate far too high sends it past the untrained model's
# within an epoch, towards the loss of a uniform guess (ln of the vocabulary, 10.4 for Mistral) or to NaN.
DIVERGED_FACTOR = 3.0


def finite_or_none(value: Any) -> float | None:
    """A loss as JSON can hold it: null where it was not a finite number (a diverged run's NaN or infinity)."""
    return float(value) if value is not None and math.isfinite(value) else None


def loss_curves(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float | None]]]:
    """The training and validation losses by step, as metrics.json keeps them (null: not a finite number)."""
    train = [{"step": h["step"], "epoch": h.get("epoch"), "loss": finite_or_none(h["loss"])} for h in log_history
             if "loss" in h]
    val = [{"step": h["step"], "epoch": h.get("epoch"), "loss": finite_or_none(h["eval_loss"])} for h in log_history
           if "eval_loss" in h]
    return {"train": train, "val": val}


def divergence(logs: dict[str, Any], log_history: list[dict[str, Any]]) -> str | None:
    """Why a training run has diverged, judged on one log entry: a training or validation loss that is not a finite
    number, or a validation loss above DIVERGED_FACTOR times the untrained model's (the step-0 evaluation in
    `log_history`); None while it has not."""
    step = logs.get("step", "?")
    for key, what in (("loss", "training loss"), ("eval_loss", "validation loss")):
        if key in logs and not math.isfinite(logs[key]):
            return f"the {what} became {logs[key]} at step {step}"
    start = next((h["eval_loss"] for h in log_history if h.get("step") == 0 and "eval_loss" in h), None)
    if "eval_loss" in logs and start is not None and logs["eval_loss"] > DIVERGED_FACTOR * start:
        return (f"the validation loss rose to {logs['eval_loss']:.4g} at step {step}, over {DIVERGED_FACTOR:g} times "
                f"the untrained model's {start:.4g}")
    return None


def loss_table(log_history: list[dict[str, Any]]) -> Table:
    """Each evaluation with the mean training loss logged since the one before, from the Trainer's own history."""
    table = Table(title="Evaluation on the validation split (* = new best)", title_justify="left")
    for column in ("epoch", "step", "train loss", "val loss", "best val loss"):
        table.add_column(column, justify="right")
    recent: list[float] = []
    best = math.inf
    for entry in log_history:
        if "loss" in entry:
            recent.append(float(entry["loss"]))
        if "eval_loss" not in entry:
            continue
        val = float(entry["eval_loss"])
        if entry["step"] == 0:  # the untrained model: a baseline, not a checkpoint that could be kept
            table.add_row("0.00", "0", "", f"{val:.4f}", "(before training)")
            continue
        best = min(best, val)
        train = f"{sum(recent) / len(recent):.4f}" if recent else "-"
        recent = []
        table.add_row(f"{entry.get('epoch') or 0.0:.2f}", str(entry["step"]), train, f"{val:.4f}",
                      f"{best:.4f}" + (" *" if val <= best else ""))
    return table


def loss_png(curves: dict[str, list[dict[str, float]]], best_step: int | None) -> bytes:
    """Training and validation loss against the step: where the two part ways, the model starts to overfit."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    def losses(points: list[dict[str, Any]]) -> list[float]:  # a gap where the loss was not finite
        return [math.nan if p["loss"] is None else p["loss"] for p in points]

    if curves["train"]:
        ax.plot([p["step"] for p in curves["train"]], losses(curves["train"]), label="train")
    if curves["val"]:
        ax.plot([p["step"] for p in curves["val"]], losses(curves["val"]), "o-", label="validation")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--", label=f"best (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig, dpi=120)
