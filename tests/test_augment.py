"""Augmentation against a real chat-completions server on loopback (stdlib http.server in a thread)."""
from __future__ import annotations

import json
import re
import socket
import time

import pytest

from chat_server import chat_server
from howto.augment import augment, parse_answer
from howto.llm import ChatClient, LLMError

KEY = "sk-test-Zq8v1secret"

RECORDS = [
    {"prompt": f"How do I log a {activity} workout in FitTrack?", "category": "health_fitness",
     "response": ["Open FitTrack.", f"Tap 'Add {activity}'.", "Enter the duration.", "Tap 'Save'."]}
    for activity in ("running", "cycling", "swimming")
] + [
    {"prompt": f"How do I change my seat on flight {n} in FlyNow?", "category": "travel",
     "response": ["Open FlyNow.", "Tap 'Trips'.", "Choose the flight.", "Tap 'Seat' and pick a seat."]}
    for n in ("one", "two", "three", "four")
]


class ScriptedLLM:
    """Writes the records asked for, numbered by request; `script` holds (status, content) answers to give first."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[dict] = []
        self.script: list[tuple[int, str]] = []

    def __call__(self, body: dict) -> tuple[int, str]:
        if self.script:
            return self.script.pop(0)
        user = body["messages"][-1]["content"]
        n = int(re.search(r"Write (\d+)", user).group(1))
        if "paraphrases" in user:
            records = [{"prompt": f"Paraphrase {len(self.requests)}.{i}", "response": ["made up"]} for i in range(n)]
        else:
            records = [{"prompt": f"New question {len(self.requests)}.{i}?", "response": ["Step a.", "Step b."]}
                       for i in range(n)]
        return 200, json.dumps({"records": records})


@pytest.fixture
def server():
    llm = ScriptedLLM()
    with chat_server(llm) as (llm.url, llm.requests):
        yield llm


@pytest.fixture
def client(server, monkeypatch) -> ChatClient:
    monkeypatch.setenv("HOWTO_TEST_KEY", KEY)
    return ChatClient.from_settings(server.url, "test-model", key_env="HOWTO_TEST_KEY", backoff=0.01, max_retries=2,
                                    timeout=5)


def test_thin_category_gets_new_records_and_paraphrases(server, client):
    new, report = augment(RECORDS, {"health_fitness": 8}, client, max_records=100, max_requests=10, seed=3)
    assert len(new) == 8
    assert all(r["category"] == "health_fitness" and r["source"] == "augmented" for r in new)
    originals = {r["prompt"]: r["response"] for r in RECORDS if r["category"] == "health_fitness"}
    paraphrases = [r for r in new if "paraphrase_of" in r]
    fresh = [r for r in new if "paraphrase_of" not in r]
    assert paraphrases and fresh
    assert all(r["prompt"].startswith("Paraphrase") and r["response"] == originals[r["paraphrase_of"]]
               for r in paraphrases)
    assert all(r["prompt"].startswith("New question") and r["response"] == ["Step a.", "Step b."] for r in fresh)
    assert report["per_category"] == {"health_fitness": {"wanted": 8, "new": len(fresh),
                                                         "paraphrases": len(paraphrases)}}
    assert report["requests"] == len(server.requests) == report["http_attempts"]
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["authorization"] == f"Bearer {KEY}"
        assert request["body"]["model"] == "test-model"
        shown = request["body"]["messages"][-1]["content"]
        assert "FitTrack" in shown and "FlyNow" not in shown  # only real examples of the thin category
    assert KEY not in json.dumps(report) and KEY not in repr(client)


def test_same_seed_sends_the_same_requests(server, client):
    augment(RECORDS, {"health_fitness": 6, "travel": 4}, client, max_records=100, max_requests=10, seed=5)
    first = [r["body"] for r in server.requests]
    server.requests.clear()
    augment(RECORDS, {"health_fitness": 6, "travel": 4}, client, max_records=100, max_requests=10, seed=5)
    assert [r["body"] for r in server.requests] == first


def test_request_budget_is_respected(server, client):
    new, report = augment(RECORDS, {"health_fitness": 50, "travel": 50}, client, max_records=1000, max_requests=3)
    assert len(server.requests) == report["requests"] == 3
    assert 0 < len(new) <= 15


def test_record_budget_is_respected(server, client):
    new, report = augment(RECORDS, {"health_fitness": 50, "travel": 50}, client, max_records=7, max_requests=100)
    assert len(new) == report["records_kept"] == 7
    assert len(server.requests) == 2  # 5 asked, then the 2 that are left


def test_extra_records_in_an_answer_are_not_kept(server, client):
    extra = [{"prompt": f"Extra {i}?", "response": ["a", "b"]} for i in range(9)]
    server.script = [(200, json.dumps({"records": extra}))]
    new, report = augment(RECORDS, {"travel": 4}, client, max_records=3, max_requests=10)
    assert [r["prompt"] for r in new] == ["Extra 0?", "Extra 1?", "Extra 2?"]
    assert report["records_received"] == 9 and report["records_kept"] == 3 and len(server.requests) == 1


def test_malformed_answer_is_counted_and_skipped(server, client):
    server.script = [(200, "Sure! Here are some records: {not json"), (200, json.dumps({"records": "none"}))]
    new, report = augment(RECORDS, {"health_fitness": 3}, client, max_records=100, max_requests=10)
    assert report["malformed_answers"] == 2
    assert len(new) == 3 and len(server.requests) == 3


def test_server_error_is_retried_with_backoff(server, client):
    server.script = [(500, "overloaded")]
    new, report = augment(RECORDS, {"travel": 2}, client, max_records=100, max_requests=1)
    assert len(new) == 2
    assert report["requests"] == 1 and report["http_attempts"] == len(server.requests) == 2


def test_unreachable_endpoint_fails_fast_with_the_url_and_without_the_key(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    monkeypatch.setenv("HOWTO_TEST_KEY", KEY)
    client = ChatClient.from_settings(f"http://127.0.0.1:{port}/v1", "test-model", key_env="HOWTO_TEST_KEY",
                                      backoff=0.01, max_retries=1, timeout=2)
    start = time.monotonic()
    with pytest.raises(LLMError) as error:
        augment(RECORDS, {"travel": 2}, client, max_records=10, max_requests=5)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in message and "travel" in message
    assert KEY not in message and KEY not in repr(error.value.__cause__)


def test_parse_answer_accepts_fences_and_rejects_other_shapes():
    records = [{"prompt": "How?", "response": ["a", "b"]}]
    assert parse_answer(json.dumps({"records": records})) == records
    assert parse_answer("Here you go:\n```json\n" + json.dumps({"records": records}) + "\n```") == records
    assert parse_answer("```\n" + json.dumps({"records": records}) + "\n```") == records
    for bad in ("", "not json", "[]", json.dumps({"records": ["a"]}), json.dumps({"items": records}), "```json\n{```"):
        assert parse_answer(bad) is None
