"""What a training run's history says: the loss curves for metrics.json, the evaluation table printed at the end,
and loss.png. All of it is read from the Trainer's own `state.log_history`, which also survives a resume."""
from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from howto.runio import figure_png, pyplot


def loss_curves(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """The training and validation losses by step, as metrics.json keeps them."""
    train = [{"step": h["step"], "epoch": h.get("epoch"), "loss": h["loss"]} for h in log_history if "loss" in h]
    val = [{"step": h["step"], "epoch": h.get("epoch"), "loss": h["eval_loss"]} for h in log_history
           if "eval_loss" in h]
    return {"train": train, "val": val}


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
    if curves["train"]:
        ax.plot([p["step"] for p in curves["train"]], [p["loss"] for p in curves["train"]], label="train")
    if curves["val"]:
        ax.plot([p["step"] for p in curves["val"]], [p["loss"] for p in curves["val"]], "o-", label="validation")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--", label=f"best (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig, dpi=120)
