"""Export parity: is the model that ships (a GGUF file, merged weights) as good as the adapter that was evaluated?

Each export answers the same test prompts as the adapter; per export, the paired difference (export minus
adapter) of BERTScore F1, step-order accuracy and the share of looping answers with a 95% bootstrap CI, the share of answers that are word for
word the same, and a verdict against a stated tolerance:

- worse: on some metric the export loses more than the tolerance and the CI lies on the losing side of zero (a real,
  large drop; for looping, a rise);
- better: on some metric it gains more than the tolerance with the CI on the winning side, and is worse on none;
- same: otherwise (differences within the tolerance, or not told apart from zero on these prompts);
- too few paired prompts: fewer than MIN_PAIRED prompts on every metric, too few to judge at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from howto.metrics import LOWER_IS_BETTER, TOO_FEW, paired_comparison, too_few_pairs

PARITY_METRICS = ("bertscore_f1", "order_accuracy", "looping")
DEFAULT_TOLERANCE = 0.02


def find_exports(run: Path) -> list[tuple[str, Path]]:
    """(system name, path) of what finetune.py exported into a run folder: its GGUF files, else its merged model.

    The merged folder is what the GGUF files are converted from; when GGUF files exist they are what ships, and
    scoring the merged weights as well would only repeat the adapter's generation.
    """
    if not run.is_dir():
        return []
    ggufs = sorted((run / "gguf").glob("*.gguf"))
    if ggufs:
        return [(export_name(p), p) for p in ggufs]
    merged = run / "merged"
    return [("merged", merged)] if (merged / "config.json").is_file() else []


def export_name(path: Path) -> str:
    """`gguf-q8_0` for gguf/model-q8_0.gguf, `merged` for a folder."""
    if path.suffix == ".gguf":
        return "gguf-" + path.stem.removeprefix("model-")
    return path.name


def verdict(comparisons: dict[str, dict[str, Any]], tolerance: float) -> str:
    """same / worse / better over the parity metrics with enough paired prompts, or too few paired prompts (see the
    module's docstring)."""
    comparisons = {m: c for m, c in comparisons.items() if not too_few_pairs(c)}
    if not comparisons:
        return TOO_FEW

    def beyond(metric: str, c: dict[str, Any], sign: int) -> bool:
        if c["delta"] is None:
            return False
        sign = -sign if metric in LOWER_IS_BETTER else sign
        bound = c["ci_high"] if sign < 0 else c["ci_low"]
        return sign * c["delta"] > tolerance and sign * bound > 0

    if any(beyond(m, c, -1) for m, c in comparisons.items()):
        return "worse"
    if any(beyond(m, c, +1) for m, c in comparisons.items()):
        return "better"
    return "same"


def export_parity(reference: dict[str, dict[str, Any]], export: dict[str, dict[str, Any]], tolerance: float,
                  n_resamples: int, seed: int) -> dict[str, Any]:
    """An export's rows against the reference's (both keyed by prompt, scored): differences, identical share,
    verdict."""
    common = [k for k in reference if k in export]
    comparisons = {m: paired_comparison([reference[k][m] for k in common], [export[k][m] for k in common],
                                        n_resamples=n_resamples, seed=seed) for m in PARITY_METRICS}
    identical = sum(reference[k]["output"].strip() == export[k]["output"].strip() for k in common)
    return {"n_paired": len(common), "identical": identical,
            "identical_share": identical / len(common) if common else None,
            **comparisons, "verdict": verdict(comparisons, tolerance)}
