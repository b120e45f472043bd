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
    assert {t.get("name") for t in config.iter() if t.get("name")} == {"source", "prompt", "steps", "decision"}
    tasks = json.loads((review_dir / "tasks.json").read_text())
    assert len(tasks) == 10  # 9 from the sample sources, 1 from the chat with personal data
    for task in tasks:
        data, prefill = task["data"], {r["from_name"]: r["value"] for r in task["predictions"][0]["result"]}
        assert prefill["prompt"]["text"] == [data["prompt"]] and prefill["decision"]["choices"] == ["accept"]
        assert prefill["steps"]["text"] == ["\n".join(data["steps"])]
        assert data["source"] and data["extraction"] == "rules"
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
    return [{"from_name": "prompt", "to_name": "source", "type": "textarea",
             "value": {"text": [prompt or task["data"]["prompt"]]}},
            {"from_name": "steps", "to_name": "source", "type": "textarea",
             "value": {"text": ["\n".join(steps or task["data"]["steps"])]}},
            {"from_name": "decision", "to_name": "source", "type": "choices", "value": {"choices": [decision]}}]


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
