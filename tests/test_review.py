"""Review of collected records: prepare_data.py --review writes Label Studio files and a sheet with no sensitive text,
and what people send back (a Label Studio export, an edited sheet) comes in with its provenance, rejects dropped."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

import prepare_data

ROOT = Path(__file__).resolve().parents[1]
LABEL_STUDIO = "label-studio==1.23.2"
LABEL_STUDIO_VENV = ROOT / ".venv-labelstudio"  # its own environment: it pins Django and friends of its own
CHROMIUM = Path("/usr/bin/chromium")  # Debian's, driven by Playwright (test.sh installs it when it is missing)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CHAT_WITH_PII = {"id": "t-9", "messages": [
    {"role": "customer", "text": "How do I add jane.doe@example.com as a second login to my MailBox account?"},
    {"role": "agent", "text": "1. Open Settings > Logins.\n2. Tap Add login and type jane.doe@example.com.\n"
                              "3. Confirm with the code we text to +44 20 7946 0123."}]}


def raw_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pages"
    shutil.copytree(ROOT / "data" / "raw", folder)
    (folder / "pii_chat.json").write_text(json.dumps(CHAT_WITH_PII), encoding="utf-8")
    return folder


def outputs(out: Path) -> list[dict]:
    return [json.loads(line) for name in prepare_data.SPLITS for line in (out / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def review_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("review")
    review = tmp / "review"
    assert prepare_data.main([str(raw_folder(tmp)), "--out", str(tmp / "unused"), "--review", str(review)]) == 0
    return review


def test_review_files_hold_every_record_redacted(review_dir):
    files = {p.name for p in review_dir.iterdir()}
    assert files == {"labeling_config.xml", "tasks.json", "review.jsonl", "review.csv"}
    config = ET.fromstring((review_dir / "labeling_config.xml").read_text())
    assert {t.get("name") for t in config.iter() if t.get("name")} == {"passage", "prompt", "steps", "decision"}
    assert not [t for t in config.iter() if t.get("value") == "$source" and t.tag != "Header"]  # a label, not a URL
    tasks = json.loads((review_dir / "tasks.json").read_text())
    assert len(tasks) == 10  # 9 from the sample sources, 1 from the chat with personal data
    for task in tasks:
        data, prefill = task["data"], {r["from_name"]: r["value"] for r in task["predictions"][0]["result"]}
        assert prefill["prompt"]["text"] == [data["prompt"]] and prefill["decision"]["choices"] == ["accept"]
        assert prefill["steps"]["text"] == ["\n".join(data["steps"])]
        assert data["source"] and data["extraction"] == "rules" and data["category"] != "uncategorized"
        assert all(step in data["passage"] for step in data["steps"][:1]) or "conversation" in data["source"]
    for name in files:
        text = (review_dir / name).read_text()
        assert "jane.doe@example.com" not in text and "7946" not in text
    assert "[EMAIL]" in (review_dir / "review.jsonl").read_text()
    assert not (review_dir.parent / "unused").exists()  # --review stops before anything else is written


def test_edited_sheets_come_back_with_provenance_and_rejects_dropped(review_dir, tmp_path):
    rows = [json.loads(line) for line in (review_dir / "review.jsonl").read_text().splitlines()]
    rows[0]["decision"] = "reject"
    rows[1]["prompt"] = "How can I send money to a friend?"
    rows[2]["response"] = rows[2]["response"][::-1]
    (tmp_path / "review.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert prepare_data.main([str(tmp_path / "review.jsonl"), "--out", str(out), "--keep-case", "--keep-punctuation"]) == 0
    records = {r["prompt"]: r for r in outputs(out)}
    assert len(records) == len(rows) - 1 and rows[0]["prompt"] not in records
    assert records["How can I send money to a friend?"]["source"] == rows[1]["source"]
    assert records[rows[2]["prompt"]]["response"] == rows[2]["response"]
    assert {r["extraction"] for r in records.values()} == {"rules, accepted in review"}
    report = (out / "report.md").read_text()
    assert "review: accepted 9, edited 0, rejected 1, not reviewed 0" in report and "rejected in review" in report

    with open(review_dir / "review.csv", newline="") as f:
        table = list(csv.DictReader(f))
    table[3]["decision"] = "reject"
    table[4]["steps"] = "\n".join(reversed(table[4]["steps"].splitlines()))
    with open(tmp_path / "review.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    out = tmp_path / "out-csv"
    assert prepare_data.main([str(tmp_path / "review.csv"), "--out", str(out), "--keep-case", "--keep-punctuation"]) == 0
    records = {r["prompt"]: r for r in outputs(out)}
    assert len(records) == len(table) - 1 and table[3]["prompt"] not in records
    assert records[table[4]["prompt"]]["response"] == table[4]["steps"].splitlines()


def annotate(task: dict, decision: str, prompt: str | None = None, steps: list[str] | None = None) -> list[dict]:
    """An annotation's result as Label Studio stores it for the generated config."""
    return [{"from_name": "prompt", "to_name": "passage", "type": "textarea",
             "value": {"text": [prompt or task["data"]["prompt"]]}},
            {"from_name": "steps", "to_name": "passage", "type": "textarea",
             "value": {"text": ["\n".join(steps or task["data"]["steps"])]}},
            {"from_name": "decision", "to_name": "passage", "type": "choices", "value": {"choices": [decision]}}]


def review_plan(tasks: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Accept one, edit one, reorder one, reject one; the others stay unreviewed."""
    return [(tasks[0], annotate(tasks[0], "accept")),
            (tasks[1], annotate(tasks[1], "accept", prompt="How do I send money to a friend in PayLite?",
                                steps=tasks[1]["data"]["steps"][:-1] + ["Tap Send and confirm with your PIN."])),
            (tasks[2], annotate(tasks[2], "accept", steps=tasks[2]["data"]["steps"][::-1])),
            (tasks[3], annotate(tasks[3], "reject"))]


def check_reviewed(out: Path, tasks: list[dict]) -> None:
    records = {r["prompt"]: r for r in outputs(out)}
    assert set(records) == {tasks[0]["data"]["prompt"], "How do I send money to a friend in PayLite?",
                            tasks[2]["data"]["prompt"]}
    assert records[tasks[0]["data"]["prompt"]]["response"] == tasks[0]["data"]["steps"]
    assert records[tasks[0]["data"]["prompt"]]["extraction"] == "rules, accepted in review"
    edited = records["How do I send money to a friend in PayLite?"]
    assert edited["response"][-1] == "Tap Send and confirm with your PIN."
    assert edited["source"] == tasks[1]["data"]["source"] and edited["extraction"] == "rules, edited in review"
    assert records[tasks[2]["data"]["prompt"]]["response"] == tasks[2]["data"]["steps"][::-1]
    report = (out / "report.md").read_text()
    assert f"review: accepted 1, edited 2, rejected 1, not reviewed {len(tasks) - 4}" in report


def test_label_studio_export_is_read_like_label_studio_writes_it(review_dir, tmp_path):
    tasks = json.loads((review_dir / "tasks.json").read_text())
    export = []
    for k, task in enumerate(tasks, 1):
        annotations = [{"id": k, "result": result, "was_cancelled": False, "updated_at": "2026-12-01T10:00:00Z"}
                       for t, result in review_plan(tasks) if t is task]
        export.append({"id": k, "data": task["data"], "annotations": annotations, "predictions": []})
    (tmp_path / "export.json").write_text(json.dumps(export))
    out = tmp_path / "out"
    assert prepare_data.main([str(tmp_path / "export.json"), "--out", str(out), "--keep-case", "--keep-punctuation"]) == 0
    check_reviewed(out, tasks)


# ------------------------------------------------------------------------------------------ real Label Studio
def label_studio() -> Path:
    """The label-studio command of its own cached virtual environment, installed on first use."""
    command = LABEL_STUDIO_VENV / "bin" / "label-studio"
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LABEL_STUDIO_VENV)], check=True)
        subprocess.run([str(LABEL_STUDIO_VENV / "bin" / "python"), "-m", "pip", "install", "-q", LABEL_STUDIO],
                       check=True)
    return command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shows_passage_and_steps(url: str, project: int, task: dict) -> None:
    """The labeling page of the task, in a real browser, shows its source as a label, every line of its passage and
    its steps, and no dump of the task in their place."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/user/login/")
            page.fill("input[name=email]", "reviewer@example.com")
            page.fill("input[name=password]", "review-pass")
            page.click("button[type=submit]")
            page.wait_for_url(lambda address: "/user/login" not in address, timeout=60_000)
            page.goto(f"{url}/projects/{project}/data?task={task['id']}")
            page.get_by_text("Passage of the page", exact=True).wait_for(timeout=120_000)
            labeling = page.locator(".lsf-main-view").first  # the labeling panel, not the task table beside it
            labeling.get_by_text(task["data"]["steps"][-1]).first.wait_for(timeout=60_000)
            shown, passage = labeling.inner_text(), labeling.locator(".lsf-richtext").first.inner_text()
            editable = "\n".join(area.inner_text() for area in labeling.locator(".lsf-text-area").all())
        finally:
            browser.close()
    lines = [line.strip() for line in task["data"]["passage"].splitlines() if line.strip()]
    assert len(lines) > 3 and [line.strip() for line in passage.splitlines() if line.strip()] == lines, passage
    assert all(step in editable for step in task["data"]["steps"]) and task["data"]["prompt"] in editable
    assert task["data"]["source"] in shown and '"predictions"' not in shown  # a label, not the task's JSON


@pytest.mark.slow
def test_label_studio_round_trip(review_dir, tmp_path):
    command, port, token = label_studio(), free_port(), "howto-review-test-token"
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "label-studio.log", "w")
    server = subprocess.Popen(
        [str(command), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(tmp_path / "ls-data"), "--username", "reviewer@example.com", "--password", "review-pass",
         "--user-token", token, "--enable-legacy-api-token"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path / "ls-data")})
    try:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=60)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "label-studio.log").read_text()[-3000:]
            try:
                if api.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Label Studio did not come up in 300 s"
            time.sleep(2)
        project = api.post("/api/projects", json={
            "title": "how-to review", "label_config": (review_dir / "labeling_config.xml").read_text()})
        assert project.status_code == 201, project.text
        pid = project.json()["id"]
        imported = api.post(f"/api/projects/{pid}/import", content=(review_dir / "tasks.json").read_bytes(),
                            headers={"Content-Type": "application/json"})
        assert imported.status_code == 201, imported.text
        listed = api.get("/api/tasks", params={"project": pid, "page_size": 100}).json()
        tasks = sorted(listed["tasks"] if isinstance(listed, dict) else listed, key=lambda t: t["id"])
        assert [t["data"]["prompt"] for t in tasks] == \
            [t["data"]["prompt"] for t in json.loads((review_dir / "tasks.json").read_text())]
        shows_passage_and_steps(url, pid, tasks[0])
        for task, result in review_plan(tasks):
            made = api.post(f"/api/tasks/{task['id']}/annotations/", json={"result": result, "project": pid})
            assert made.status_code == 201, made.text
        export = api.get(f"/api/projects/{pid}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
        assert export.status_code == 200, export.text
        (tmp_path / "export.json").write_bytes(export.content)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), str(tmp_path / "export.json"), "--out",
                           str(out), "--keep-case", "--keep-punctuation"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    check_reviewed(out, tasks)


# ------------------------------------------------------------------------------------------ bad review inputs
def export_of(review_dir: Path, change) -> list:
    """An export of the written tasks, every one accepted, with `change` applied to it."""
    tasks = json.loads((review_dir / "tasks.json").read_text())
    export = [{"id": k, "data": t["data"], "annotations": [{"id": k, "result": annotate(t, "accept"),
                                                            "was_cancelled": False}]}
              for k, t in enumerate(tasks, 1)]
    return change(export)


def set_at(value, path, new):
    target = value
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return value


@pytest.mark.parametrize("change, message", [
    (lambda e: set_at(e, [1, "data"], ["How?", ["a", "b"]]), "task 2: field 'data': must be an object, got array"),
    (lambda e: set_at(e, [0, "annotations", 0, "result", 1], "steps"),
     "task 1: field 'annotations[0].result[1]': must be an object, got string"),
    (lambda e: set_at(e, [2, "annotations"], ["accept"]), "task 3: field 'annotations[0]': must be an object"),
    (lambda e: set_at(e, [2, "annotations"], [None]), "task 3: field 'annotations[0]': must be an object, got null"),
    (lambda e: set_at(e, [0, "data", "steps"], "Open it. Tap it."),
     "task 1: field 'data.steps': must be a list (a list of steps, one string each), got string"),
])
def test_malformed_label_studio_exports_are_one_line_errors(review_dir, tmp_path, capsys, change, message):
    (tmp_path / "export.json").write_text(json.dumps(export_of(review_dir, change)))
    assert prepare_data.main([str(tmp_path / "export.json"), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert f"{tmp_path / 'export.json'}: {message}" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_label_studio_export_shapes_that_are_read_correctly(review_dir, tmp_path):
    tasks = json.loads((review_dir / "tasks.json").read_text())
    one = export_of(review_dir, lambda e: e[0])  # a single task object, not a list
    (tmp_path / "one.json").write_text(json.dumps(one))
    out = tmp_path / "out-one"
    assert prepare_data.main([str(tmp_path / "one.json"), "--out", str(out), "--split", "1,0,0", "--keep-case",
                    "--keep-punctuation"]) == 0
    assert [r["prompt"] for r in outputs(out)] == [tasks[0]["data"]["prompt"]]

    def edited(export):
        task = export[1]
        later = annotate(task, "accept", prompt="How do I pay a friend?")
        later[0]["value"]["text"] = "How do I pay a friend?"  # a string where Label Studio writes a list
        task["annotations"] = [{"id": "b-7", "result": later, "updated_at": "2026-12-02T10:00:00Z"},
                               {"id": 3, "result": annotate(task, "reject"), "updated_at": "2026-12-01T10:00:00Z"}]
        export[2]["annotations"] = None
        return export
    (tmp_path / "mixed.json").write_text(json.dumps(export_of(review_dir, edited)))
    out = tmp_path / "out-mixed"
    assert prepare_data.main([str(tmp_path / "mixed.json"), "--out", str(out), "--keep-case", "--keep-punctuation"]) == 0
    records = {r["prompt"]: r for r in outputs(out)}
    assert records["How do I pay a friend?"]["response"] == tasks[1]["data"]["steps"]  # not split into letters
    assert tasks[2]["data"]["prompt"] not in records and len(records) == len(tasks) - 1
    assert {r["category"] for r in records.values()} == {t["data"]["category"] for t in tasks} - {""}


def test_review_sheet_lines_that_are_not_rows_are_one_line_errors(review_dir, tmp_path, capsys):
    lines = (review_dir / "review.jsonl").read_text().splitlines()
    for name, bad, message in (
            ("array.jsonl", "[1,2,3]", "line 3: field '(record)': must be an object, got array"),
            ("broken.jsonl", '{"id": 9, "decision": "accept",', "broken.jsonl:3:"),
            ("string.jsonl", json.dumps({**json.loads(lines[2]), "response": "Open it. Tap it."}),
             "line 3: field 'response': must be a list (a list of steps, one string each), got string")):
        (tmp_path / name).write_text("\n".join(lines[:2] + [bad] + lines[3:]) + "\n")
        assert prepare_data.main([str(tmp_path / name), "--out", str(tmp_path / "out")]) == 1
        error = capsys.readouterr().err
        assert message in error and str(tmp_path / name) in error and "Traceback" not in error, error
        assert "line 1 column" not in error and not (tmp_path / "out").exists()


def test_review_sheet_header_in_another_case_still_drops_rejected_rows(review_dir, tmp_path):
    with open(review_dir / "review.csv", newline="") as f:
        table = list(csv.DictReader(f))
    table[0]["decision"] = "Reject"
    with open(tmp_path / "review.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c.title() for c in table[0]])
        writer.writeheader()
        writer.writerows({k.title(): v for k, v in row.items()} for row in table)
    out = tmp_path / "out"
    assert prepare_data.main([str(tmp_path / "review.csv"), "--out", str(out), "--keep-case", "--keep-punctuation"]) == 0
    prompts = [r["prompt"] for r in outputs(out)]
    assert table[0]["prompt"] not in prompts and len(prompts) == len(table) - 1


def test_review_csv_cells_never_run_as_formulas_and_read_back_unchanged(tmp_path):
    from howto.review import write_review

    record = {"prompt": "+Plus members: how do I get a refund?", "category": "shopnow", "source": "help.html#x",
              "extraction": "rules", "passage": "-5% off",
              "response": ['=HYPERLINK("http://evil.example","Click")', "@SUM(1+1)", "'Quoted' label"]}
    write_review(tmp_path / "review", [record])
    with open(tmp_path / "review" / "review.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert all(not cell.startswith(("=", "+", "-", "@")) for cell in row.values())
    assert row["steps"].startswith("'=HYPERLINK(") and row["prompt"].startswith("'+Plus")
    out = tmp_path / "out"
    assert prepare_data.main([str(tmp_path / "review" / "review.csv"), "--out", str(out), "--split", "1,0,0", "--keep-case",
                    "--keep-punctuation"]) == 0
    [back] = outputs(out)
    assert back["prompt"] == record["prompt"] and back["response"] == record["response"]
