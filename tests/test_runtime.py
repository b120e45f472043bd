"""Importing the toolkit changes nothing in the process; the scripts set the process up themselves, first thing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(f"howto.{p.stem}" for p in (ROOT / "howto").glob("*.py") if p.stem != "__init__")
SCRIPTS = ("prepare_data", "finetune", "evaluate")

# In a fresh process: the environment and every logger's level before and after importing the modules given.
SNAPSHOT = """
import importlib, json, logging, os, sys
from howto import runtime

def levels():
    return {name: logging.getLogger(name).level for name in ("", *runtime.QUIET_LOGGERS, "transformers")}

env, before = dict(os.environ), levels()
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"env": {k: [env.get(k), os.environ.get(k)] for k in set(env) | set(os.environ)
                          if env.get(k) != os.environ.get(k)},
                  "levels": {k: [before[k], v] for k, v in levels().items() if before[k] != v}}))
"""


def changes_on_import(*modules: str) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "TORCHINDUCTOR_CACHE_DIR", "TRANSFORMERS_VERBOSITY",
                        "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT, *modules], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_howto_module_changes_no_environment_variable_and_no_logger():
    assert changes_on_import(*MODULES) == {"env": {}, "levels": {}}


def test_importing_the_scripts_changes_nothing_either():
    assert changes_on_import(*SCRIPTS) == {"env": {}, "levels": {}}


def test_setup_sets_the_runtime_and_leaves_the_users_choices(monkeypatch, tmp_path):
    from howto import runtime

    for name in ("OMP_WAIT_POLICY", "TORCHINDUCTOR_CACHE_DIR", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOWTO_CACHE", str(tmp_path))
    runtime.setup()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    runtime.setup()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
