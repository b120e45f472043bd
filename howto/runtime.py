"""The process's runtime, set up once by each script at the start of main(): OpenMP's wait policy, torch.compile's
cache folder, and the libraries' log levels. Nothing here runs on import, so that importing the toolkit (a notebook,
a test) changes no environment variable and no logger; the scripts call setup() before anything imports torch or
transformers, which is when these settings are read."""
from __future__ import annotations

import logging
import os

from howto.models import cache_dir

# Notices that are not the toolkit's: torch's _pytree deprecation note when torchao registers its enums (imported by
# peft and TRL), mistral-common's choice between two tokenizer files, bitsandbytes' optional CPU kernels package,
# transformers' note that it ignores SmolLM2's clean_up_tokenization_spaces (a setting for WordPiece, not BPE),
# torch's note, when torch.compile builds its CPU kernels, that no CUDA runtime is found.
QUIET_LOGGERS = ("torch.utils._pytree", "mistral_common", "bitsandbytes", "transformers.tokenization_utils_tokenizers",
                 "torch.utils.cpp_extension")


def setup() -> None:
    """Everything a script needs of the process before its work starts; call it first in main()."""
    passive_threads()
    compile_cache()
    quiet_libraries()


def quiet_libraries() -> None:
    """What the user reads is the toolkit's own lines: the loggers above and transformers' own (its generation and
    deprecation notices) are kept to errors, set before the libraries import, which keeps their level; datasets'
    progress bars (TRL's preprocessing maps) are off. The environment's own TRANSFORMERS_VERBOSITY wins."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def passive_threads() -> None:
    """OpenMP threads that sleep while they wait for each other (OMP_WAIT_POLICY=PASSIVE) unless the environment
    chooses: with OpenMP's default they spin first, and beside one busy process training fell to a sixth of the
    passive policy's speed in bench/train_bench.py (10 tokens/s against 60; 106 against 174 on 2026-12-02). Alone,
    spinning made more tokens/s in the bench's short runs (43-50% MFU against 35-38%), but over whole epochs it was
    not reliably ahead (260 and 179 tokens/s against passive's 228-248), so passive it stays. OpenMP reads the
    variable when torch loads, so this must run before anything imports torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def compile_cache() -> None:
    """torch.compile's kernels (Inductor's cache) beside the toolkit's models, not in the temp folder that a reboot
    empties, unless the environment chooses (TORCHINDUCTOR_CACHE_DIR): a machine builds them once. Inductor settles
    its folder (and writes it to this variable) when something first imports it, as importing transformers does, so
    this must run before that."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torch-compile"))
