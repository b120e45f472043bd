"""The page of `evaluate.py --serve` (howto/serve.py): streamed answers, the blinded rating desk, the notices that
replace tracebacks, and the whole page in a real browser (Playwright driving Debian's chromium) on the tiny model."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import evaluate
from howto.generate import GGUFGenerator, HFGenerator, generate_batch
from howto.models import load_for_generation, load_tokenizer, smollm2_gguf
from howto.runio import RunError
from howto.ratings import SCORE_COLUMNS, RatingsError, read_key, read_ratings, read_sheet_rows, write_rating_sheet
from howto.serve import ChatSystem, Decoding, RatingDesk, build_page, stream_all, stream_answer

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTIONS = [("How do I turn on dark mode on my phone?", ["Open Settings.", "Tap 'Display'.", "Turn on 'Dark mode'."]),
             ("How do I freeze my debit card in PayLite?", ["Open PayLite.", "Tap 'Cards'.", "Tap 'Freeze card'."]),
             ("How do I mute a group chat in ChatterBox?", ["Open the group chat.", "Tap 'Mute'."]),
             ("How do I reset my password in ShopNow?", ["Open ShopNow.", "Tap 'Forgot password'.", "Check email."])]


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """A run folder as finetune.py leaves it, on the tiny model: a LoRA adapter with random (non-zero) weights, so
    the fine-tuned column really differs from the base one, and run_info.json naming its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("run")
    get_peft_model(model, config).save_pretrained(folder)
    (folder / "run_info.json").write_text(json.dumps({"base_model": "tiny"}))
    return folder


def write_predictions(out: Path) -> None:
    """OUT as evaluate.py leaves it: each system's predictions.jsonl (the answers the rate tab shows)."""
    for name, answer in (("base", lambda steps: steps[:1]), ("finetuned", lambda steps: steps)):
        (out / name).mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": q, "response": steps, "category": "phone_settings",
                 "output": "\n".join(f"{i}. {s}" for i, s in enumerate(answer(steps), 1))} for q, steps in QUESTIONS]
        (out / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def examples() -> list[dict]:
    return [{"prompt": q, "reference": steps, "outputs": {"base": steps[:1], "finetuned": steps}}
            for q, steps in QUESTIONS]


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------

def test_streamed_answers_grow_and_end_as_the_evaluations_answers(tiny_run):
    systems = []
    for name, adapter in (("base", None), ("finetuned", str(tiny_run))):
        lm, tokenizer = load_for_generation("tiny", adapter=adapter)
        systems.append(ChatSystem(name, name, HFGenerator(lm, tokenizer, 12)))
    question = QUESTIONS[0][0]
    snapshots = list(stream_all(systems, question, 12, 0.0))
    for system in systems:
        texts = [s[system.name] for s in snapshots]
        expected = generate_batch(system.generator.lm, system.generator.tokenizer, [question], 12)[0][0]
        assert texts[-1] == expected  # the page shows what the evaluation scores, with the same decoding
        growing = [t for i, t in enumerate(texts) if t and (i == 0 or t != texts[i - 1])]
        assert len(growing) >= 2 and all(b.startswith(a) for a, b in zip(growing, growing[1:]))  # piece by piece
    assert snapshots[-1]["base"] != snapshots[-1]["finetuned"]


def test_gguf_streams_its_answer_piece_by_piece_and_ends_as_evaluated(smollm2_model):
    generator = GGUFGenerator(str(smollm2_gguf()), load_tokenizer(smollm2_model), 512, 48, 0.0, 0, False)
    question = QUESTIONS[1][0]
    texts = list(stream_answer(generator, question, 48, 0.0))
    assert texts[-1] == generator([question])[0][0]  # what the evaluation scores, with the same decoding
    assert len(set(texts)) > 10 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # piece by piece


# ---------------------------------------------------------------------------------------------------------------------
# The rating desk and the notices
# ---------------------------------------------------------------------------------------------------------------------

def make_desk(out: Path) -> RatingDesk:
    write_rating_sheet(examples(), out, seed=0)
    return RatingDesk(read_key(out / "rating_key.json"), read_sheet_rows(out / "rating_sheet.csv"), out / "ratings")


def test_rating_desk_saves_a_sheet_that_reads_back_and_refuses_a_file_of_another_sheet(tmp_path):
    desk = make_desk(tmp_path / "out")
    desk.save("Ana B", "item-001", dict.fromkeys(SCORE_COLUMNS, 4))
    scores = desk.save("Ana B", "item-002", {"A_correctness": 2})
    assert desk.file_of("Ana B") == tmp_path / "out" / "ratings" / "Ana_B.csv"
    assert scores == {"item-001": dict.fromkeys(SCORE_COLUMNS, 4), "item-002": {"A_correctness": 2}}
    assert desk.load("Ana B") == scores
    result = read_ratings([desk.file_of("Ana B")], tmp_path / "out" / "rating_key.json")
    assert result["raters"] == ["Ana B"] and result["missing"] == 4 * 6 - 7

    with pytest.raises(RatingsError, match=r"Ana_B\.csv holds the ratings of 'Ana B', not 'Ana_B'"):
        desk.load("Ana_B")
    other = make_desk(tmp_path / "other")  # the same answers, another sheet: another id
    shutil.copy(other.file_of("x").parent.parent / "rating_sheet.csv", desk.file_of("zoe"))
    before = desk.file_of("zoe").read_text()
    with pytest.raises(RatingsError, match=r"zoe\.csv: line 2: this row is from sheet"):
        desk.save("zoe", "item-001", {"A_clarity": 5})
    assert desk.file_of("zoe").read_text() == before  # refused, never overwritten


def test_a_run_without_an_adapter_and_an_out_without_answers_are_said_on_the_page(tmp_path, tiny_model):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({"base_model": "tiny"}))
    args = evaluate.build_parser().parse_args(["--finetuned", str(run), "--out", str(tmp_path / "eval"), "--serve"])
    systems, notices = evaluate.chat_systems(args)
    assert [(s.name, s.model, s.adapter) for s in systems] == [("base", "tiny", None)]
    assert "No fine-tuned model to chat with" in notices[0] and "adapter_config.json" in notices[0]
    desk, rate_notice = evaluate.rating_desk(args, tmp_path / "eval")
    assert desk is None and "Nothing to rate" in rate_notice

    lm, tokenizer = load_for_generation("tiny")
    page = build_page([ChatSystem("base", "base", HFGenerator(lm, tokenizer, 8))], Decoding(8, 0.0, 1.1, 2048), notices,
                      desk, rate_notice, "")
    shown = json.dumps(page.get_config_file())
    assert "No fine-tuned model to chat with" in shown and "Nothing to rate" in shown

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "rating_key.json").write_text(json.dumps({"item-001": {"A": "x", "B": "y"}}))
    assert "a rating key without a sheet id" in evaluate.rating_desk(args, tmp_path / "eval")[1]


def test_the_runs_gguf_gets_a_column_beside_base_and_adapter(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "gguf").mkdir()
    (run / "gguf" / "model-q4_1.gguf").symlink_to(smollm2_gguf())
    args = evaluate.build_parser().parse_args(["--finetuned", str(run), "--out", str(tmp_path / "eval"), "--serve"])
    systems, notices = evaluate.chat_systems(args)
    assert notices == []
    assert [(s.name, s.adapter, s.gguf) for s in systems] == [
        ("base", None, None), ("finetuned", str(run), None), ("gguf-q4_1", None, str(run / "gguf" / "model-q4_1.gguf"))]
    assert evaluate.system_title(systems[2]) == f"gguf-q4_1: {run / 'gguf' / 'model-q4_1.gguf'}"


def test_the_page_rates_the_sheet_that_is_out_and_replaces_it_only_when_forced(tmp_path):
    out = tmp_path / "eval"
    write_predictions(out)
    write_rating_sheet(examples(), out, seed=3)  # handed out earlier with --rating-sheet --seed 3
    out_key = read_key(out / "rating_key.json")
    argv = ["--finetuned", str(tmp_path), "--out", str(out), "--serve"]
    desk, notice = evaluate.rating_desk(evaluate.build_parser().parse_args(argv), out)
    assert notice == "" and desk.key == out_key and len(desk.rows) == 4
    desk.save("ana", "item-001", dict.fromkeys(SCORE_COLUMNS, 4))

    (out / "finetuned" / "predictions.jsonl").write_text((out / "base" / "predictions.jsonl").read_text())
    forced, _ = evaluate.rating_desk(evaluate.build_parser().parse_args([*argv, "--force-new-sheet"]), out)
    assert forced.key.sheet_id != out_key.sheet_id  # the answers changed: a new sheet, a new id
    with pytest.raises(RatingsError, match="this row is from sheet"):
        forced.load("ana")  # what ana rated belongs to the old sheet: refused on the page, never overwritten


def test_serve_needs_finetuned_and_a_real_port(tmp_path):
    with pytest.raises(RunError, match="--serve needs --finetuned"):
        evaluate.main(["--out", str(tmp_path), "--serve"])
    with pytest.raises(RunError, match="--port 70000"):
        evaluate.main(["--finetuned", str(tmp_path), "--out", str(tmp_path), "--serve", "--port", "70000"])


# ---------------------------------------------------------------------------------------------------------------------
# The page in a real browser
# ---------------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"evaluate.py --serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the page did not come up within {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def served(tiny_run, tmp_path):
    """`evaluate.py --serve` as a user starts it, on the tiny model, with OUT holding the evaluation's answers and a
    ratings file left from another sheet (zoe's)."""
    out = tmp_path / "eval"
    write_predictions(out)
    stale = make_desk(tmp_path / "earlier")
    stale.save("zoe", "item-001", dict.fromkeys(SCORE_COLUMNS, 3))
    (out / "ratings").mkdir()
    shutil.copy(stale.file_of("zoe"), out / "ratings" / "zoe.csv")
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as f:
        server = subprocess.Popen([sys.executable, "evaluate.py", "--finetuned", str(tiny_run), "--out", str(out),
                                   "--serve", "--port", str(port), "--max-new-tokens", "8"],
                                  cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", server, log)
        yield f"http://127.0.0.1:{port}/", out
    finally:
        server.terminate()
        server.wait(timeout=30)


def check(box, score: int) -> None:
    box.locator("label").filter(has_text=str(score)).click()


@pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                    reason="needs Debian's chromium (test.sh installs it; in CI its absence fails the test)")
def test_the_page_in_a_browser_chat_rate_reload_resume_and_report(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, out = served
    shots = Path(os.environ.get("HOWTO_SCREENSHOTS", tmp_path))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)

        page.locator("#ask").click()
        expect(page.locator("#chat-status")).to_contain_text("Type a question first.")
        page.locator("#question textarea").fill(QUESTIONS[0][0])
        page.locator("#ask").click()
        expect(page.locator("#chat-status")).to_contain_text("Done.", timeout=60_000)
        base = page.locator("#answer-base textarea").input_value()
        tuned = page.locator("#answer-finetuned textarea").input_value()
        assert base and tuned and base != tuned
        expect(page.locator("#steps-base")).to_contain_text("step")
        page.screenshot(path=str(shots / "chat.png"), full_page=True)

        page.get_by_role("tab", name="Rate").click()
        page.locator("#rater textarea").fill("zoe")
        page.locator("#start").click()
        expect(page.locator("#rate-message")).to_contain_text("this row is from sheet")
        page.locator("#rater textarea").fill("ana")
        page.locator("#start").click()
        expect(page.locator("#progress")).to_contain_text("0 of 4 items rated by ana")
        shown = []
        for n, score in enumerate((5, 3, 4), 1):
            shown.append(page.locator("#item").inner_text())
            for column in SCORE_COLUMNS:
                check(page.locator(f"#{column}"), score if column.startswith("A") else 2)
            page.locator("#save").click()
            expect(page.locator("#progress")).to_contain_text(f"{n} of 4 items rated by ana")
        assert len(set(shown)) == 3
        page.screenshot(path=str(shots / "rate.png"), full_page=True)

        page.reload()
        page.get_by_role("tab", name="Rate").click()
        expect(page.locator("#progress")).to_contain_text("3 of 4 items rated by ana")  # resumed after the reload
        assert page.locator("#rater textarea").input_value() == "ana"
        assert page.locator("#item").inner_text() not in shown  # at the item not yet rated
        browser.close()

    saved = out / "ratings" / "ana.csv"
    with open(saved, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["rater"] for r in rows] == ["ana"] * 4 and sum(bool(r["A_clarity"]) for r in rows) == 3
    key = read_key(out / "rating_key.json")
    second = RatingDesk(key, read_sheet_rows(out / "rating_sheet.csv"), out / "ratings")
    for row in rows:  # a second rater who agrees with ana, through the page's own desk
        if row["A_clarity"]:
            second.save("ben", row["item_id"], {c: int(row[c]) for c in SCORE_COLUMNS})
    metrics = evaluate.main(["--predictions", f"base={out / 'base' / 'predictions.jsonl'}",
                             f"finetuned={out / 'finetuned' / 'predictions.jsonl'}", "--out", str(out),
                             "--bertscore-model", "minilm", "--bootstrap", "100", "--no-forgetting",
                             "--ratings", str(saved), str(second.file_of("ben"))])
    human = metrics["ratings"]["human"]
    assert human["raters"] == ["ana", "ben"] and human["missing"] == 2 * 6 and human["n"]["base"]["clarity"] == 3
    assert human["agreement"]["correctness"]["krippendorff_alpha"] == pytest.approx(1.0)
    answered = [row["item_id"] for row in rows if row["A_clarity"]]
    a_scores = {"base": [], "finetuned": []}
    for row in rows:
        if row["A_clarity"]:
            a_scores[key.items[row["item_id"]]["A"]].append(int(row["A_clarity"]))
            a_scores[key.items[row["item_id"]]["B"]].append(int(row["B_clarity"]))
    assert len(answered) == 3
    for system in ("base", "finetuned"):
        assert human["means"][system]["clarity"] == pytest.approx(sum(a_scores[system]) / 3)  # unblinded right
    report = (out / "report.md").read_text()
    assert "## Ratings (1-5)" in report and "Raters: ana, ben" in report and "Krippendorff" in report
