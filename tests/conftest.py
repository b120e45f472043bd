"""Shared fixtures: the tiny test model and the real tokenizers, built once per machine and cached. The repository's
root is on the import path through pytest.ini (`pythonpath = .`), for the three scripts."""
from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """The process set up as the scripts set theirs up (howto.runtime.setup: OpenMP's wait policy before torch loads,
    torch.compile's cache beside the models, quiet libraries), since the tests call the scripts' functions in this
    process; and no test waits on the Hugging Face hub."""
    from howto import runtime

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime.setup()


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
