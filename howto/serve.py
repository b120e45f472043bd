"""The toolkit's local page, on Gradio: ask the base and the fine-tuned model the same question side by side, and rate
the evaluation's answers blind on the rubric's 1-5 scale.

Chat streams every system's answer as the tokens come (transformers' TextIteratorStreamer, which hands over whole
words; llama.cpp's streamed completion for a GGUF), starting from the evaluation's decoding settings, and shows each
answer parsed into steps by the parser the evaluation scores with. Rate shows the items of the run's blinded rating
sheet (howto.ratings) one at a time, the two answers as A and B in the sheet's random order per item, and writes a
rater's scores after every item to OUT/ratings/<rater>.csv: a filled sheet, which `evaluate.py --ratings` reads like
one filled by hand. The page never learns which system is A; the key stays on disk and is only checked to be the
sheet's own.
"""
from __future__ import annotations

import html
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from howto.chat import parse_steps, prompt_ids
from howto.generate import GGUFGenerator, HFGenerator, generate_ids
from howto.ratings import (CRITERIA, RUBRIC_ANCHORS, RUBRIC_NOTE, SCORE_COLUMNS, SCORES, RatingKey, RatingsError,
                           read_filled_sheet, write_filled_sheet)

Generator = HFGenerator | GGUFGenerator
RATINGS_DIR = "ratings"
RATER_KEY = "howto-steps-rater"  # where the browser keeps the rater's name, so a reload resumes


@dataclass
class ChatSystem:
    """One model on the chat tab, loaded once when the page starts."""
    name: str
    title: str  # what the column says: the model, adapter or file
    generator: Generator
    lock: threading.Lock = field(default_factory=threading.Lock)  # one answer at a time: llama.cpp is not reentrant


@dataclass
class Decoding:
    """The evaluation's decoding settings: the chat tab's starting values."""
    max_new_tokens: int
    temperature: float
    repeat_penalty: float
    gguf_context: int


# ---------------------------------------------------------------------------------------------------------------------
# Chat: streamed answers
# ---------------------------------------------------------------------------------------------------------------------

def stream_answer(generator: Generator, question: str, max_new_tokens: int, temperature: float) -> Iterator[str]:
    """The answer so far, after each new piece, asked in the canonical chat format with the evaluation's decoding."""
    text = ""
    if isinstance(generator, GGUFGenerator):
        for chunk in generator.completion(question, max_new_tokens, temperature, stream=True):
            text += chunk["choices"][0]["text"]
            yield text.strip()
        return
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            generate_ids(generator.lm, generator.tokenizer, [prompt_ids(generator.tokenizer, question)],
                         max_new_tokens, temperature, generator.repeat_penalty, streamer=streamer)
        except Exception as e:  # shown on the page in place of the answer; the streamer must still end
            failures.append(e)
            streamer.end()

    threading.Thread(target=run, daemon=True).start()
    for piece in streamer:
        text += piece
        yield text.strip()
    if failures:
        raise failures[0]


def stream_all(systems: list[ChatSystem], question: str, max_new_tokens: int,
               temperature: float) -> Iterator[dict[str, str]]:
    """Every system's answer so far, side by side: each system streams in a thread of its own, and a new snapshot
    comes whenever any of them has a new piece. A system that fails shows why in place of its answer."""
    updates: queue.Queue[tuple[str, str | None]] = queue.Queue()
    stop = threading.Event()  # the page went away (a reload, a closed tab): stop reading, free the model

    def run(system: ChatSystem) -> None:
        with system.lock:
            try:
                for text in stream_answer(system.generator, question, max_new_tokens, temperature):
                    if stop.is_set():
                        break
                    updates.put((system.name, text))
            except Exception as e:
                updates.put((system.name, f"[generation failed: {type(e).__name__}: {e}]"))
        updates.put((system.name, None))

    for system in systems:
        threading.Thread(target=run, args=(system,), daemon=True).start()
    answers = {s.name: "" for s in systems}
    running = len(systems)
    try:
        while running:
            name, text = updates.get()
            if text is None:
                running -= 1
                continue
            answers[name] = text
            yield dict(answers)
    finally:
        stop.set()
    yield dict(answers)


def steps_html(text: str) -> str:
    """An answer parsed into steps, as the evaluation scores it: a numbered list, its text escaped."""
    steps = parse_steps(text)
    if not steps:
        return "<p><em>no steps found</em></p>"
    items = "".join(f"<li>{html.escape(step)}</li>" for step in steps)
    return f"<p>{len(steps)} step{'s' if len(steps) != 1 else ''}:</p><ol>{items}</ol>"


# ---------------------------------------------------------------------------------------------------------------------
# Rate: a blinded sheet, one file per rater
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class RatingDesk:
    """The sheet the page rates (rows as in rating_sheet.csv, answers as A and B), its key, and where each rater's
    file goes."""
    key: RatingKey
    rows: list[dict[str, str]]
    folder: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def file_of(self, rater: str) -> Path:
        """OUT/ratings/<rater>.csv, the name made safe for a file name."""
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_-]+', '_', rater).strip('_') or 'rater'}.csv"

    def load(self, rater: str) -> dict[str, dict[str, int]]:
        """What the rater has scored so far, by item and score column; a file of another sheet or another rater is
        refused (RatingsError), never overwritten."""
        path = self.file_of(rater)
        if not path.exists():
            return {}
        scores: dict[str, dict[str, int]] = {}
        for name, item_id, row in read_filled_sheet(path, self.key):
            if name != rater:
                raise RatingsError(f"{path} holds the ratings of {name!r}, not {rater!r}: type that name to go on "
                                   "with them, or another name")
            given = {column: score for column, score in row.items() if score is not None}
            if given:
                scores[item_id] = given
        return scores

    def save(self, rater: str, item_id: str, given: dict[str, int]) -> dict[str, dict[str, int]]:
        """The rater's file with this item's scores replaced, written whole and atomically; all their scores."""
        with self.lock:  # one rater in two browser tabs: each save reads the other's
            scores = self.load(rater)
            scores[item_id] = given
            self.folder.mkdir(parents=True, exist_ok=True)
            write_filled_sheet(self.file_of(rater), self.rows, scores, rater)
        return scores


def is_rated(scores: dict[str, dict[str, int]], item_id: str) -> bool:
    return len(scores.get(item_id, {})) == len(SCORE_COLUMNS)


def rubric_markdown() -> str:
    """The rubric's anchors, the same text the LLM judge and the sheet use."""
    parts = [RUBRIC_NOTE]
    for criterion, anchors in RUBRIC_ANCHORS.items():
        parts.append(f"**{criterion.capitalize()}**: {anchors['question']}\n\n"
                     + "\n".join(f"- **{s}**: {anchors[s]}" for s in sorted(SCORES, reverse=True)))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------

CSS = ".answer textarea { font-family: ui-monospace, monospace; } #chat-status, #rate-message { min-height: 1.5em; }"


def build_page(systems: list[ChatSystem], decoding: Decoding, chat_notices: list[str], desk: RatingDesk | None,
               rate_notice: str, report_hint: str) -> gr.Blocks:
    """Both tabs. `chat_notices` and `rate_notice` say on the page what is missing (no adapter, no sheet) and why."""
    with gr.Blocks(title="howto-steps: try and rate", analytics_enabled=False) as page:
        gr.Markdown("## howto-steps: try the fine-tuned model, rate its answers")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", render_children=True):
                chat_tab(systems, decoding, chat_notices)
            with gr.Tab("Rate", id="rate", render_children=True):
                rate_tab(desk, rate_notice, report_hint)
    return page


def chat_tab(systems: list[ChatSystem], decoding: Decoding, notices: list[str]) -> None:
    for notice in notices:
        gr.Markdown(f"⚠️ {notice}", elem_classes="notice")
    question = gr.Textbox(label="Question", placeholder="How do I turn on dark mode on my phone?", lines=2,
                          elem_id="question")
    with gr.Row():
        max_new_tokens = gr.Slider(1, max(2048, decoding.max_new_tokens), value=decoding.max_new_tokens, step=1,
                                   label="max new tokens", elem_id="max-new-tokens")
        temperature = gr.Slider(0.0, 2.0, value=decoding.temperature, step=0.05, label="temperature (0 = greedy)",
                                elem_id="temperature")
    gr.Markdown(f"The evaluation's settings: at most {decoding.max_new_tokens} new tokens, temperature "
                f"{decoding.temperature:g} ({'greedy' if decoding.temperature == 0 else 'sampled'}), repeat penalty "
                f"{decoding.repeat_penalty:g}, the canonical chat format with its system prompt (`evaluate.py "
                "--max-new-tokens`, `--temperature`, `--repeat-penalty`).")
    ask = gr.Button("Ask", variant="primary", elem_id="ask")
    status = gr.Markdown(elem_id="chat-status")
    answers, parsed = [], []
    with gr.Row(equal_height=False):
        for system in systems:
            with gr.Column():
                answers.append(gr.Textbox(label=system.title, lines=10, interactive=False,
                                          elem_id=f"answer-{system.name}", elem_classes="answer"))
                parsed.append(gr.HTML(elem_id=f"steps-{system.name}"))

    def on_ask(text: str | None, tokens: float, temp: float) -> Iterator[list[Any]]:
        text = (text or "").strip()
        if not text:
            yield ["Type a question first.", *[""] * len(systems), *[""] * len(systems)]
            return
        tokens = int(tokens)
        contexts = [s for s in systems if isinstance(s.generator, GGUFGenerator)]
        if contexts and tokens >= decoding.gguf_context:
            yield [f"max new tokens {tokens} does not fit the GGUF's context of {decoding.gguf_context} tokens "
                   "(`--gguf-context`): choose fewer.", *[""] * len(systems), *[""] * len(systems)]
            return
        latest: dict[str, str] = {}
        for latest in stream_all(systems, text, tokens, float(temp)):
            yield ["Answering…", *latest.values(), *[""] * len(systems)]
        yield ["Done.", *latest.values(), *(steps_html(a) for a in latest.values())]

    # One question at a time for the whole page, however it is sent: llama.cpp's model is not safe to share between
    # threads, and two questions at once would halve each one's speed.
    for event in (ask.click, question.submit):
        event(on_ask, [question, max_new_tokens, temperature], [status, *answers, *parsed], concurrency_id="chat")


def rate_tab(desk: RatingDesk | None, notice: str, report_hint: str) -> None:
    if desk is None:
        gr.Markdown(f"⚠️ {notice}", elem_id="rate-message")
        return
    n = len(desk.rows)
    gr.Markdown(f"{n} questions, each with a reference and two answers, A and B, in random order. Rate each answer "
                "from 1 (worst) to 5 (best) on correctness, completeness and clarity, each on its own; leave a score "
                "empty if you cannot judge it. Your scores are saved after every item, so you can stop and come "
                "back.")
    with gr.Accordion("Rubric", open=False):
        gr.Markdown(rubric_markdown())
    with gr.Row():
        rater = gr.Textbox(label="Your name", placeholder="it names your ratings file", scale=3, elem_id="rater")
        start = gr.Button("Start or resume", scale=1, elem_id="start")
    # The browser keeps the rater's name for this sheet (its id is the secret the stored name is encrypted with), so
    # a reload, or a restart of the page on the same sheet, goes on where the rater stopped.
    remembered = gr.BrowserState("", storage_key=RATER_KEY, secret=desk.key.sheet_id)
    position = gr.State(-1)
    progress = gr.Markdown(elem_id="progress")
    message = gr.Markdown(elem_id="rate-message")
    with gr.Column(visible=False) as card:
        title = gr.Markdown(elem_id="item")
        reference = gr.Textbox(label="Reference", interactive=False, lines=4, elem_id="reference")
        texts, radios = [], []
        with gr.Row(equal_height=False):
            for label in "AB":
                with gr.Column():
                    texts.append(gr.Textbox(label=f"Answer {label}", interactive=False, lines=8,
                                            elem_id=f"output-{label}", elem_classes="answer"))
                    for criterion in CRITERIA:
                        radios.append(gr.Radio([(str(s), s) for s in SCORES], label=criterion.capitalize(),
                                               info=RUBRIC_ANCHORS[criterion]["question"],
                                               elem_id=f"{label}_{criterion}"))
        with gr.Row():
            back = gr.Button("Previous", elem_id="previous")
            save = gr.Button("Save and next", variant="primary", elem_id="save")
    shown = [position, progress, message, card, title, reference, *texts, *radios]

    def view(name: str, scores: dict[str, dict[str, int]], index: int, note: str = "") -> list[Any]:
        done = sum(is_rated(scores, row["item_id"]) for row in desk.rows)
        if index >= n:
            return [n, f"**{done} of {n} items rated by {html.escape(name)}.**",
                    note or f"All items seen. {report_hint}",
                    gr.update(visible=False), "", "", "", "", *[None] * len(radios)]
        row = desk.rows[index]
        given = scores.get(row["item_id"], {})
        return [index, f"**{done} of {n} items rated by {html.escape(name)}** (this is item {index + 1})", note,
                gr.update(visible=True), f"### {html.escape(row['prompt'])}", row["reference"], row["output_A"],
                row["output_B"], *(given.get(column) for column in SCORE_COLUMNS)]

    def refuse(note: str) -> list[Any]:
        return [-1, "", note, gr.update(visible=False), "", "", "", "", *[None] * len(radios)]

    def first_unrated(scores: dict[str, dict[str, int]]) -> int:
        return next((i for i, row in enumerate(desk.rows) if not is_rated(scores, row["item_id"])), n)

    def on_start(name: str | None) -> list[Any]:
        name = (name or "").strip()
        if not name:
            return [*refuse("Type your name first: it names your ratings file and the rater in the report."),
                    gr.update()]
        try:
            scores = desk.load(name)
        except RatingsError as e:
            return [*refuse(f"⚠️ {e}"), gr.update()]
        return [*view(name, scores, first_unrated(scores)), name]

    def on_remembered(name: str, typed: str | None) -> list[Any]:
        """The browser restored a name after a reload: resume where that rater stopped. (When Start stored the name,
        the page shows that rater already.)"""
        if not name or name == (typed or "").strip():
            return [gr.update()] * (len(shown) + 1)
        return [name, *on_start(name)[:-1]]

    def on_save(name: str | None, index: int, *values: Any) -> list[Any]:
        name = (name or "").strip()
        if not name or index < 0 or index >= n:
            return refuse("Type your name and press Start or resume first.")
        given = {column: int(v) for column, v in zip(SCORE_COLUMNS, values) if v is not None}
        try:
            scores = desk.save(name, desk.rows[index]["item_id"], given)
        except RatingsError as e:
            return refuse(f"⚠️ {e}")
        note = "" if len(given) == len(SCORE_COLUMNS) else (
            f"Saved item {index + 1} with {len(given)} of {len(SCORE_COLUMNS)} scores; it counts as rated when all "
            "are given.")
        following = next((i for i in range(index + 1, n) if not is_rated(scores, desk.rows[i]["item_id"])),
                         first_unrated(scores))
        return view(name, scores, following, note)

    def on_back(name: str | None, index: int) -> list[Any]:
        name = (name or "").strip()
        if not name or index < 0:
            return refuse("Type your name and press Start or resume first.")
        try:
            scores = desk.load(name)
        except RatingsError as e:
            return refuse(f"⚠️ {e}")
        return view(name, scores, max(0, index - 1))

    start.click(on_start, [rater], [*shown, remembered])
    rater.submit(on_start, [rater], [*shown, remembered])
    save.click(on_save, [rater, position, *radios], shown)
    back.click(on_back, [rater, position], shown)
    remembered.change(on_remembered, [remembered, rater], [rater, *shown])


def launch(page: gr.Blocks, host: str, port: int, block: bool = True) -> None:
    """Serve the page on host:port (loopback unless asked otherwise); with `block`, until interrupted. Gradio's run
    history is off: it would keep every question and answer in the browser's storage."""
    page.queue().launch(server_name=host, server_port=port, inbrowser=False, show_error=False, css=CSS,
                        footer_links=["gradio"], run_history=False, prevent_thread_lock=not block)
