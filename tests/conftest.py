"""Shared fixtures: the tiny test model and the real tokenizers, built once per machine and cached."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from howto.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def mistral_tokenizer(tiny_model):
    from howto.models import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    from howto.models import resolve_model

    return resolve_model("smollm2")
