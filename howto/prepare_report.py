"""prepare_data.py's report for people: distributions.png, report.md (the facts of stats.json) and the console
summary. Presentation only: every number is computed in prepare_data.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from howto.collect import collected_section
from howto.runio import figure_png, markdown_code, markdown_table, markdown_text, pyplot

MAX_LISTED = 200  # entries per list in stats.json and report.md; counts are always complete


def plot_distributions(records: list[dict[str, Any]], lengths: list[int], stats: dict[str, Any]) -> bytes:
    """Records per category, steps per record, prompt length and token length, for a look at the data."""
    plt = pyplot()
    balance = stats["balance"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    names = list(balance["categories"])[::-1]
    counts = [balance["categories"][n] for n in names]
    axes[0, 0].barh(names, counts, color=["tab:red" if n in balance["thin"] else "tab:blue" for n in names])
    axes[0, 0].axvline(balance["thin_threshold"], color="tab:red", linestyle="--", label="thin threshold")
    axes[0, 0].set(title="Records per category (red: thin)", xlabel="records")
    axes[0, 0].legend()
    for ax, values, title, unit, color in (
        (axes[0, 1], [len(r["response"]) for r in records], "Steps per record", "steps", "tab:green"),
        (axes[1, 0], [len(r["prompt"].split()) for r in records], "Prompt length", "words", "tab:purple"),
    ):
        ax.hist(values, bins=range(min(values, default=0), max(values, default=0) + 2), align="left", rwidth=0.8,
                color=color)
        ax.set(title=title, xlabel=unit, ylabel="records")
    limit = stats["tokens"]["max_seq_length"]
    axes[1, 1].hist(lengths, bins=40, color="tab:orange")
    if max(lengths, default=0) * 2 >= limit:  # the limit line only where it would not squash the histogram
        axes[1, 1].axvline(limit, color="tab:red", linestyle="--", label="max seq length")
        axes[1, 1].legend()
    axes[1, 1].set(title=f"Tokenized conversation length ({stats['tokens']['model']}, limit {limit})",
                   xlabel="tokens", ylabel="records")
    fig.tight_layout()
    return figure_png(fig, dpi=100)


def render_report(stats: dict[str, Any]) -> str:
    """report.md: the same facts as stats.json, for a person. Everything taken from the data (file names, prompts,
    categories, messages quoting records) goes through markdown_text or markdown_code, so HTML in it is shown, not
    rendered."""
    t = markdown_text
    v, pii, dedup, bal, tok = stats["validation"], stats["pii"], stats["dedup"], stats["balance"], stats["tokens"]
    lines = ["# Data preparation report", "", "## Inputs", ""]
    lines += [f"- {markdown_code(f['file'])}: {f['records']} records" for f in stats["inputs"]]
    lines += collected_section(stats.get("collected"))
    lines += ["", "## Validation", "", f"- records read: {v['records_read']}, valid: {v['valid']}, "
              f"skipped: {v['skipped_count']}"]
    if v["unknown_fields"]:
        lines.append("- unknown fields, ignored: " + ", ".join(f"{markdown_code(k)} ({n})"
                                                               for k, n in v["unknown_fields"].items()))
    lines += [f"- skipped: {t(e)}".replace("\n", " ") for e in v["skipped"]]
    lines += ["", "## Sensitive information", "",
              f"- placeholders inserted: {pii['total']} in {pii['records_with_pii']} records"]
    lines += [f"- `[{kind}]`: {n}" for kind, n in pii["replaced"].items()]
    lines.append(f"- person names: {'Presidio' if pii['name_detection'] else 'not detected (Presidio not installed)'}")
    n = stats["normalisation"]
    lines += ["", "## Normalisation", "", f"- lowercase: {n['lowercase']}, punctuation stripped: "
              f"{n['strip_punctuation']}, whitespace collapsed, placeholders kept"]
    lines += [f"- dropped: {t(d)}" for d in n["dropped"]] + [f"- {t(d)}" for d in n["steps_removed"]]
    lines += ["", "## Duplicates", "", f"- exact duplicates removed: {dedup['exact_duplicates_removed']}"]
    lines += [f"  - {t(d['removed'])} (same as {t(d['kept'])})" for d in dedup["exact_duplicates"]]
    lines.append(f"- near-duplicate groups (Jaccard >= {dedup['near_duplicate_threshold']}): "
                 f"{dedup['near_duplicate_groups']} groups, {dedup['records_in_near_duplicate_groups']} records, "
                 "each group kept whole in one split")
    lines.append(f"- groups joined to another in the split by a near-copy prompt (Jaccard >= "
                 f"{dedup['near_copy_threshold']}) or the same answer: {dedup['groups_joined_by_near_copies']}; "
                 f"largest split unit: {dedup['largest_split_unit']} records")
    for group in dedup["groups"]:
        lines.append("  - " + " | ".join(f"\"{t(m['prompt'])}\" ({t(m['origin'])})" for m in group))
    lines += ["", "## Balance and diversity", "",
              markdown_table(["category", "records", "thin"],
                             [[c, k, "yes" if c in bal["thin"] else ""] for c, k in bal["categories"].items()]),
              "", f"- thin threshold: {bal['thin_threshold']} records; thin: {t(', '.join(bal['thin']) or 'none')}",
              f"- distinct-1 of prompts: {bal['distinct_1']}, distinct-2: {bal['distinct_2']}",
              f"- steps per record: {fmt_dist(bal['steps_per_record'])}",
              f"- prompt words: {fmt_dist(bal['prompt_words'])}",
              f"- words per step: {fmt_dist(bal['step_words'])}"]
    if stats["augmentation"]:
        a = stats["augmentation"]
        lines += ["", "## Augmentation", "", f"- requests: {a['requests']} ({a['http_attempts']} HTTP attempts), "
                  f"malformed answers: {a['malformed_answers']}",
                  f"- records returned: {a['returned']}, valid: {a['valid']}, added after deduplication: "
                  f"{a['added']}, placeholders inserted: {sum(a['pii_replaced'].values())}"]
        lines += [f"- {markdown_code(c)}: wanted {k['wanted']}, new {k['new']}, paraphrases {k['paraphrases']}"
                  for c, k in a["per_category"].items()]
        lines += [f"- rejected: {t(e)}".replace("\n", " ") for e in a["rejected"][:MAX_LISTED]]
    lines += ["", "## Tokens", "", f"- tokenizer: {markdown_code(tok['model'])}, canonical chat format",
              f"- length: max {tok['max']}, p95 {tok['p95']}, mean {tok['mean']}",
              f"- over {tok['max_seq_length']} tokens: {tok['over_limit']} ({tok['overlong_action']})"]
    lines += [f"  - {t(o['origin'])}: {o['tokens']} tokens, {o['action']}" for o in tok["overlong"]]
    lines += ["", "## Records dropped", ""] + [f"- {reason}: {k}" for reason, k in stats["dropped"].items()]
    lines += ["", "## Split", "", f"seed {stats['settings']['seed']}, fractions {stats['settings']['split']}, "
              "stratified by category", "",
              markdown_table(["split", "records", "categories"],
                             [[name, s["records"], ", ".join(f"{c} {k}" for c, k in s["categories"].items())]
                              for name, s in stats["splits"].items()])]
    lines += ["", "![distributions](distributions.png)", ""]
    return "\n".join(lines)


def fmt_dist(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if k != "histogram")


def print_summary(stats: dict[str, Any], timings: dict[str, float], out: Path) -> None:
    table = Table(title=f"prepare_data -> {out} (details in report.md)")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    v, dedup, tok = stats["validation"], stats["dedup"], stats["tokens"]
    rows = [
        ("load", f"{v['records_read']} records from {len(stats['inputs'])} files"),
        ("validate", f"{v['valid']} valid, {v['skipped_count']} skipped"),
        ("redact", f"{stats['pii']['total']} placeholders "
                   + " ".join(f"{k}={n}" for k, n in stats["pii"]["replaced"].items())),
        ("normalise", f"{stats['normalisation']['dropped_count']} dropped, "
                      f"{stats['normalisation']['steps_removed_count']} steps removed"),
        ("deduplicate", f"{dedup['exact_duplicates_removed']} exact removed, {dedup['near_duplicate_groups']} "
                        f"near-dup groups ({dedup['records_in_near_duplicate_groups']} records)"),
        ("balance", f"{len(stats['balance']['categories'])} categories, thin: "
                    f"{', '.join(stats['balance']['thin']) or 'none'}"),
    ]
    if stats["augmentation"]:
        rows.append(("augment", f"{stats['augmentation']['added']} records added"))
    rows += [
        ("tokenize", f"max {tok['max']}, p95 {tok['p95']}, {tok['over_limit']} over {tok['max_seq_length']} "
                     f"({tok['overlong_action']})"),
        ("split", " / ".join(f"{name} {s['records']}" for name, s in stats["splits"].items())),
    ]
    for stage, result in rows:
        table.add_row(stage, result, f"{timings.get(stage, 0):.2f}")
    Console().print(table)
