"""evaluate.py's report: plots, then one list of blocks rendered to Markdown and to a self-contained HTML page, and
the results rows that the report and the console share."""
from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np

from howto.chat import render_steps
from howto.generate import REPEAT_LAST_N
from howto.metrics import (
    LOOP_DISTINCT, LOOP_MIN_STEPS, LOWER_IS_BETTER, METRICS, MIN_PAIRED, TOO_FEW, prompt_key, too_few_pairs,
)
from howto.runio import figure_png, markdown_fence, markdown_table, markdown_text, pyplot

METRIC_LABELS = {
    "bertscore_p": "BERTScore precision", "bertscore_r": "BERTScore recall", "bertscore_f1": "BERTScore F1",
    "order_accuracy": "Step-order accuracy", "step_coverage": "Step coverage", "exact_order": "Exact order rate",
    "format_valid": "Format validity", "step_count_error": "Step-count error (|gen - ref|)",
    "looping": "Looping answers (share)", "repeated_steps": "Repeated steps (share)",
}
RESULTS_HEADER = ("Metric", "{baseline}", "{name}", "Δ ({name} − {baseline})", "95% CI", "p (Wilcoxon)", "n paired")
Block = tuple[Any, ...]
Rows = dict[str, dict[str, Any]]  # one system's rows (prediction and scores) keyed by prompt_key, in test order


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
    """The difference with an arrow when its CI excludes zero, pointing the way that is better; none over fewer than
    MIN_PAIRED prompts, which are too few to tell."""
    delta = comparison["delta"]
    if delta is None:
        return "n/a"
    text = f"{delta:+.3f}"
    if too_few_pairs(comparison):
        return f"{text} ({TOO_FEW})"
    if comparison["ci_low"] > 0 or comparison["ci_high"] < 0:
        better = (delta < 0) if metric in LOWER_IS_BETTER else (delta > 0)
        text += " ▲" if better else " ▼"
    return text


def fmt_ci(c: dict[str, Any], digits: int = 3) -> str:
    return f"[{fmt(c['ci_low'], digits)}, {fmt(c['ci_high'], digits)}]"


def results_header(baseline: str, name: str) -> list[str]:
    return [h.format(baseline=baseline, name=name) for h in RESULTS_HEADER]


def results_rows(metrics: dict[str, Any], name: str) -> list[list[str]]:
    """One row per metric: both means, the difference, its CI, p and the number of paired prompts."""
    baseline, comparison = metrics["baseline"], metrics["comparisons"][name]
    return [[METRIC_LABELS[m], fmt(metrics["systems"][baseline]["means"][m]), fmt(metrics["systems"][name]["means"][m]),
             fmt_delta(m, comparison[m]), fmt_ci(comparison[m]), fmt_p(comparison[m]["p_value"]),
             str(comparison[m]["n"])] for m in METRICS]


def parity_rows(parity: dict[str, Any]) -> list[list[str]]:
    return [[name, str(p["n_paired"]), f"{fmt(p['identical_share'], 2)} ({p['identical']})",
             *(f"{fmt(p[m]['delta'], 3)} {fmt_ci(p[m])}" for m in ("bertscore_f1", "order_accuracy", "looping")),
             p["verdict"]] for name, p in parity["exports"].items()]


PARITY_HEADER = ["Export", "n paired", "identical answers", "Δ BERTScore F1 [95% CI]",
                 "Δ step-order accuracy [95% CI]", "Δ looping answers [95% CI]", "verdict"]


def forgetting_rows(forgetting: dict[str, Any]) -> list[list[str]]:
    labels = {"loss": "Answer loss per token (lower is better)",
              "correct": "Correct short answer (higher is better)",
              "over_formatting": "Numbered list, not a how-to (lower is better)",
              "howto_list_rate": "Numbered list, how-to question"}
    return [[label, str(forgetting[k]["n"]), fmt(forgetting[k]["base"]), fmt(forgetting[k]["finetuned"]),
             fmt(forgetting[k]["delta"]) if forgetting[k]["delta"] is None else f"{forgetting[k]['delta']:+.3f}",
             fmt_ci(forgetting[k]), fmt_p(forgetting[k]["p_value"])] for k, label in labels.items() if k in forgetting]


FORGETTING_HEADER = ["Measure", "n", "base", "finetuned", "Δ (finetuned − base)", "95% CI", "p (Wilcoxon)"]


# ------------------------------------------------------------------------------------------------------------- plots

def make_plots(tables: dict[str, Rows], metrics: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots: per-example score distributions, scores by category, order accuracy by number of steps."""
    plt = pyplot()

    def png(fig: Any) -> bytes:
        return figure_png(fig, dpi=110, tight=True)

    plots = {}
    shown = ("bertscore_f1", "order_accuracy", "step_coverage")
    fig, axes = plt.subplots(1, len(shown), figsize=(13, 3.6))
    for ax, metric in zip(axes, shown, strict=True):
        values = [[r[metric] for r in rows.values() if r[metric] is not None] for rows in tables.values()]
        ax.boxplot(values, tick_labels=list(tables), showmeans=True)
        for i, v in enumerate(values, 1):
            jitter = [i + 0.12 * ((j * 7919) % 11 - 5) / 5 for j in range(len(v))]
            ax.scatter(jitter, v, s=6, alpha=0.35)
        ax.set_title(METRIC_LABELS[metric])
    fig.suptitle("Per-example scores (box: quartiles, triangle: mean)")
    plots["distributions"] = png(fig)

    by_category = metrics["by_category"]
    categories = sorted({c for name in tables for c in by_category[name]})
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(categories) + 1.6), sharey=True)
    height = 0.8 / len(tables)
    for ax, metric in zip(axes, ("bertscore_f1", "order_accuracy"), strict=True):
        for k, name in enumerate(tables):
            means = [by_category[name].get(c, {}).get(metric) for c in categories]
            ax.barh([i + k * height for i in range(len(categories))],
                    [m if m is not None else float("nan") for m in means], height=height, label=name)
        ax.set_yticks([i + height * (len(tables) - 1) / 2 for i in range(len(categories))], categories)
        ax.set_title(f"{METRIC_LABELS[metric]} by category")
    axes[0].invert_yaxis()  # the axes share y: inverting one inverts both
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(tables), bbox_to_anchor=(0.5, 0))
    plots["by_category"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name in tables:
        by_n = metrics["by_n_ref_steps"][name]
        xs = [int(n) for n, v in by_n.items() if v["order_accuracy"] is not None]
        ax.plot(xs, [by_n[str(x)]["order_accuracy"] for x in xs], marker="o", label=name)
    ax.set_xlabel("number of reference steps")
    ax.set_ylabel("mean step-order accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.set_title("Step-order accuracy by number of reference steps")
    plots["order_by_steps"] = png(fig)
    return plots


# ------------------------------------------------------------------------------------------------------------ blocks

DEFINITIONS = [
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
    f"Repeated steps = the share of an answer's steps that repeat an earlier step word for word (case and "
    f"punctuation aside). A looping answer has at least {LOOP_MIN_STEPS} steps of which fewer than "
    f"{LOOP_DISTINCT:.0%} are distinct.",
]
PLOT_TITLES = {"distributions": "Per-example score distributions", "by_category": "Scores by category",
               "order_by_steps": "Order accuracy by number of reference steps"}


def build_report(metrics: dict[str, Any], tables: dict[str, Rows], plots: dict[str, bytes]) -> list[Block]:
    """The report as blocks, rendered to Markdown and HTML alike."""
    settings, names, baseline = metrics["settings"], list(tables), metrics["baseline"]
    blocks: list[Block] = [("h1", "Evaluation: " + " vs ".join(names))]
    paired = ", ".join(f"{n}: {k} of {metrics['n_examples']} paired" for n, k in metrics["n_paired"].items())
    blocks.append(("p", f"{metrics['n_examples']} test prompts{f' ({paired})' if paired else ''}. Baseline: "
                        f"{baseline}; every difference is a system minus the baseline, with a "
                        f"{settings['bootstrap']['confidence']:.0%} paired bootstrap interval "
                        f"({settings['bootstrap']['n_resamples']} resamples of prompts) and a two-sided Wilcoxon "
                        f"signed-rank p. {verdict_legend(metrics)}"))

    if metrics.get("verdicts"):
        blocks.append(("list", [f"{name} against {baseline}: {v}" for name, v in metrics["verdicts"].items()]))
    blocks.append(("h2", "Results"))
    for name in metrics["comparisons"]:
        blocks.append(("table", results_header(baseline, name), results_rows(metrics, name)))
    if not metrics["comparisons"]:
        blocks.append(("table", ["Metric", *names],
                       [[METRIC_LABELS[m], *(fmt(metrics["systems"][n]["means"][m]) for n in names)]
                        for m in METRICS]))
    blocks.append(("p", "Order accuracy is undefined where fewer than two steps align; those prompts are left out "
                        "of its mean and its paired test. Prompts with a defined order accuracy: " +
                        ", ".join(f"{n} {metrics['systems'][n]['n_defined']['order_accuracy']}" for n in names) + "."))

    if metrics.get("parity"):
        blocks += parity_blocks(metrics["parity"])
    if metrics.get("forgetting"):
        blocks += forgetting_blocks(metrics["forgetting"])

    gen = [[n, fmt(s["generation"]["tokens"]), fmt(s["generation"]["mean_tokens"], 1),
            fmt(s["generation"]["seconds"], 1), fmt(s["generation"]["tokens_per_second"], 1),
            fmt(s["generation"].get("useful_share"), 2)]
           for n, s in metrics["systems"].items() if s["generation"]]
    if gen:
        blocks += [("h2", "Generation"), ("table", ["System", "tokens", "tokens per answer", "seconds", "tokens/s",
                                                    "useful share of batch steps"], gen)]
    blocks += settings_blocks(settings)
    blocks += [("h2", "Definitions"), ("list", DEFINITIONS), ("h2", "Plots")]
    for name, data in plots.items():
        blocks += [("h3", PLOT_TITLES[name]), ("img", name, data)]

    blocks.append(("h2", "Scores by category"))
    by_category = metrics["by_category"]
    cats = sorted({c for n in names for c in by_category[n]})
    blocks.append(("table", ["Category", *(f"{n} F1 / order / n" for n in names)],
                   [[c, *(" / ".join([fmt(by_category[n].get(c, {}).get("bertscore_f1")),
                                      fmt(by_category[n].get(c, {}).get("order_accuracy")),
                                      str(by_category[n].get(c, {}).get("n", 0))]) for n in names)]
                    for c in cats]))

    for name, examples in metrics["differing_examples"].items():
        blocks.append(("h2", f"Where {name} and {baseline} differ most (BERTScore F1)"))
        for ex in examples:
            rows = {n: tables[n][prompt_key(ex["prompt"])] for n in (baseline, name)}
            blocks.append(("h3", ex["prompt"]))
            blocks.append(("p", f"Category {rows[baseline]['category']}. " + "; ".join(
                f"{n}: F1 {fmt(r['bertscore_f1'])}, order {fmt(r['order_accuracy'])}, "
                f"coverage {fmt(r['step_coverage'])}" for n, r in rows.items())))
            blocks.append(("steps", "Reference", rows[baseline]["response"]))
            for n, r in rows.items():
                blocks.append(("steps", n, r["steps"]) if r["format_valid"] else
                              ("pre", f"{n} (not parsed as steps)", r["output"] or "(empty)"))

    blocks += looping_blocks(metrics, tables)
    blocks.append(("h2", "Failures (outputs that do not parse into at least two steps)"))
    for name in names:
        failed = [r for r in tables[name].values() if not r["format_valid"]]
        shown = " (first 10 shown)." if len(failed) > 10 else "."
        blocks.append(("p", f"{name}: {len(failed)} of {len(tables[name])}{shown}"))
        for r in failed[:10]:
            blocks.append(("pre", r["prompt"], (r["output"] or "(empty)")[:600]))

    if metrics.get("ratings"):
        blocks += ratings_blocks(metrics["ratings"])
    return blocks


def looping_blocks(metrics: dict[str, Any], tables: dict[str, Rows]) -> list[Block]:
    """The section "Looping answers": how many per system, steps per answer against the reference's, and the worst
    answers as generated, since a loop is what a reader sees first."""
    rows = [[name, f"{sum(r['looping'] for r in table.values())} of {len(table)}",
             fmt(float(np.mean([r["n_gen_steps"] for r in table.values()])), 1),
             fmt(float(np.mean([r["n_ref_steps"] for r in table.values()])), 1)] for name, table in tables.items()]
    blocks: list[Block] = [("h2", "Looping answers"),
                           ("table", ["System", "looping answers", "steps per answer", "reference steps"], rows)]
    for name, examples in metrics.get("looping", {}).items():
        for ex in examples[:3]:
            blocks.append(("pre", f"{name}: {ex['prompt']} ({ex['n_gen_steps']} steps, reference "
                                  f"{ex['n_ref_steps']})", ex["output"][:800]))
    return blocks


def verdict_legend(metrics: dict[str, Any]) -> str:
    """What the arrows mean, where a difference rests on enough paired prompts to be judged at all."""
    too_few = f"Over fewer than {MIN_PAIRED} paired prompts no difference is judged: {TOO_FEW}."
    judged = any(not too_few_pairs(c) for comparison in metrics["comparisons"].values() for c in comparison.values())
    return f"▲/▼: the interval excludes zero, better/worse. {too_few}" if judged else too_few


def settings_blocks(settings: dict[str, Any]) -> list[Block]:
    bs, al = settings["bertscore"], settings["alignment"]
    items = [f"BERTScore: {bs['model']}, layer {bs['num_layers']}, "
             f"{'rescaled with baseline' if bs['rescale_with_baseline'] else 'not rescaled'}, idf off, steps joined "
             f"one a line on both sides (bert-score hash `{bs['hash']}`). Scores compare only under equal settings.",
             f"Step alignment: {al['model']} sentence embeddings (cosine), Hungarian matching, threshold "
             f"{al['threshold']}."]
    if settings.get("generation"):
        g = settings["generation"]
        decoding = "greedy" if g["temperature"] == 0 else f"sampling at temperature {g['temperature']}"
        penalty = g.get("repeat_penalty", 1.0)
        decoding += f", repeat penalty {penalty:g}" if penalty != 1.0 else ", no repeat penalty"
        items.append(f"Generation: {decoding} (transformers over the whole conversation, llama.cpp over the last "
                     f"{REPEAT_LAST_N} tokens), at most {g['max_new_tokens']} new tokens, batch size "
                     f"{g['batch_size']}, canonical chat format of howto.chat.")
        items += [f"System {s['name']}: " + ", ".join(f"{k} {v}" for k, v in s.items() if v and k != "name")
                  for s in g["systems"]]
    items.append(f"Data: {settings['data']}")
    return [("h2", "Settings"), ("list", items)]


def parity_blocks(parity: dict[str, Any]) -> list[Block]:
    """The section "Parity": each export against the adapter it was made from."""
    return [("h2", "Parity: the exported model against the adapter"),
            ("p", f"Each export answered the same prompts as {parity['reference']}; Δ is the export minus "
                  f"{parity['reference']} with a 95% paired bootstrap CI. Verdict against a tolerance of "
                  f"{parity['tolerance']}: worse when a metric drops by more than the tolerance and its CI lies "
                  "below zero, better when one gains as much with the CI above zero and none is worse, else same."),
            ("table", PARITY_HEADER, parity_rows(parity))]


def forgetting_blocks(forgetting: dict[str, Any]) -> list[Block]:
    """The section "Forgetting probe": general questions for the base and the fine-tuned model."""
    blocks: list[Block] = [("h2", "Forgetting probe: general questions outside the training domains"),
                           ("p", f"{forgetting['n_prompts']} questions from {forgetting['data']} in the model's own "
                                 "chat format without a system prompt. The loss of the reference answers rises "
                                 "when general ability is forgotten; a correct short answer is one that says what "
                                 "the question's record expects (\"Canberra\"); a numbered list for a question that "
                                 "is not a how-to is over-formatting (answers cut at "
                                 f"{forgetting['max_new_tokens']} tokens; paired 95% bootstrap CIs over the "
                                 "questions).")]
    mixed = forgetting.get("general_mixed")
    blocks.append(("p", f"Training mixed in {mixed['n']} general conversations ({mixed['source']}; --mix-general "
                        f"{mixed['fraction']})." if mixed else
                        "Training mixed in no general conversations (finetune.py --mix-general, the remedy for "
                        "over-formatting)."))
    if forgetting.get("skipped"):
        return blocks + [("p", f"Skipped: {forgetting['skipped']}")]
    blocks.append(("table", FORGETTING_HEADER, forgetting_rows(forgetting)))
    blocks.append(("table", ["Loss by kind of question", "n", "base", "finetuned", "Δ [95% CI]"],
                   [[k, str(c["n"]), fmt(c["base"]), fmt(c["finetuned"]), f"{fmt(c['delta'])} {fmt_ci(c)}"]
                    for k, c in forgetting["loss_by_kind"].items()]))
    wrong = forgetting.get("turned_wrong")
    if wrong:
        blocks.append(("h3", f"Answers that turned wrong ({len(wrong)}): right before fine-tuning, wrong after"))
        blocks.append(("table", ["question", "expected", "base", "finetuned"],
                       [[w["prompt"], " or ".join(w["expect"]), w["base"], w["finetuned"]] for w in wrong]))
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
            absent = result.get("absent_items")
            blocks.append(("p", f"Raters: {', '.join(result['raters'])}; {result['items']} items; "
                                f"{result['missing']} score cells empty or missing"
                                + (f" ({absent} items left off a rater's sheet)." if absent else ".")))
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
        blocks.append(("p", f"Blinded rating sheet for people: {sheet['csv']}; the key {sheet['key']} unblinds "
                            "the filled sheets (--ratings FILE...)."))
    return blocks


# --------------------------------------------------------------------------------------------------------- renderers

def render_markdown(blocks: list[Block], plot_dir: str) -> str:
    """The blocks as Markdown. Prompts, outputs and system names are data: HTML in them is shown as written
    (markdown_text), and an output in a code block cannot close it (markdown_fence)."""
    t = markdown_text
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + t(block[1]))
        elif kind == "p":
            out.append(t(block[1]))
        elif kind == "list":
            out.append("\n".join(f"- {t(item)}" for item in block[1]))
        elif kind == "table":
            out.append(markdown_table(block[1], block[2]))
        elif kind == "img":
            out.append(f"![{block[1]}]({plot_dir}/{block[1]}.png)")
        elif kind == "steps":
            out.append(f"**{t(block[1])}**\n\n" + (t(render_steps(block[2])) if block[2] else "(no steps)"))
        elif kind == "pre":
            out.append(f"**{t(block[1])}**\n\n" + markdown_fence(block[2]))
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
