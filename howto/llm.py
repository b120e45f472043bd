"""A small client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, llama.cpp server, Ollama...).

Used to augment thin categories (prepare_data.py) and to rate outputs (evaluate.py). The API key is read from the
environment and never printed or written anywhere.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


class LLMError(RuntimeError):
    """The endpoint could not give an answer after the allowed retries."""


@dataclass
class ChatClient:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    requests_made: int = 0

    @classmethod
    def from_settings(cls, base_url: str | None, model: str | None, key_env: str = "OPENAI_API_KEY",
                      **kwargs: Any) -> "ChatClient":
        """Flags first, then the environment (OPENAI_BASE_URL, OPENAI_MODEL, and the key from `key_env`)."""
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        model = model or os.environ.get("OPENAI_MODEL")
        if not base_url or not model:
            raise LLMError("an LLM endpoint needs a base URL and a model (flags, or OPENAI_BASE_URL and OPENAI_MODEL)")
        return cls(base_url=base_url.rstrip("/"), model=model, api_key=os.environ.get(key_env), **kwargs)

    def chat(self, messages: list[dict[str, str]], temperature: float = 0.7, max_tokens: int = 1024,
             json_mode: bool = False) -> str:
        """One chat completion; retries with exponential backoff on connection errors, 429 and 5xx."""
        url = f"{self.base_url}/chat/completions"  # base URLs include the version, as in OpenAI's SDK: .../v1
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                "max_tokens": max_tokens}
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 4))
            self.requests_made += 1
            try:
                response = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
            except httpx.HTTPError as e:
                last_error = f"cannot reach {url}: {type(e).__name__}: {e}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last_error = f"{url} answered HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise LLMError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                last_error = f"{url} answered something that is not a chat completion: {response.text[:200]}"
        raise LLMError(f"{last_error} (after {self.max_retries + 1} attempts)")
