"""Run bookkeeping shared by the three scripts: atomic writes, YAML configs, and what every run records."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

TRACKED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo",
    "xformers", "bert-score", "mistral-common", "llama-cpp-python", "gguf", "rich", "datasketch",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(target: str | Path, build: Callable[[Path], Any], replace: bool = False) -> Path:
    """Build a folder beside `target` and rename it into place, so an interrupted build never sits under its name.

    Without `replace`, an existing target is kept as it is (a cache built once; when two processes build it at the
    same time, the first rename wins). With `replace`, a finished build swaps out the old folder (an export).
    """
    target = Path(target)
    if target.exists() and not replace:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # readable like any other folder, not mkdtemp's private 0700
    old = target.parent / f"{tmp.name}-old"
    try:
        build(tmp)
        if replace and target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same cache first
            if replace or not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write through a temporary file and rename it, so an interrupted run never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl_lines(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, value) of each record of a JSONL file, so later errors can name the line too; a broken line
    is reported with file, line and column, never skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    return rows


def hash_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the files' names and bytes, in sorted order: the identity of a run's data."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def gpu_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"gpu": None}
    if not torch.cuda.is_available():
        return {"gpu": None}
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported()}


def write_run_info(out_dir: str | Path, config: dict[str, Any], data_files: Iterable[str | Path],
                   extra: dict[str, Any] | None = None) -> None:
    """Record the resolved config, library versions, hardware and the data's hash next to a run's outputs."""
    out_dir = Path(out_dir)
    files = [Path(p) for p in data_files]
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=True, allow_unicode=True))
    write_json(out_dir / "run_info.json", {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "data_files": [str(p) for p in files],
        "data_sha256": hash_files(files) if files else None,
        "versions": library_versions(),
        **gpu_info(),
        **(extra or {}),
    })


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None,
               section: str | None = None) -> argparse.Namespace:
    """Parse flags with an optional `--config run.yaml` whose keys set the defaults; flags given win.

    Keys are flag names with dashes or underscores (`learning_rate` or `learning-rate`). One file can serve a whole
    run: top-level keys (`model`, `seed`...) apply to every script that has such a flag, and a mapping named after a
    script (`prepare_data:`, `finetune:`, `evaluate:`) applies to that script alone and wins. A key in a script's
    own mapping that names none of its flags is an error, so a typo there never goes unnoticed.
    """
    parser.add_argument("--config", help="YAML file of settings for the whole run; flags given override it")
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    pre, _ = config_only.parse_known_args(argv)
    if pre.config:
        try:
            loaded = yaml.safe_load(Path(pre.config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"--config {pre.config}: {e}")
        if not isinstance(loaded, dict):
            parser.error(f"--config {pre.config}: expected a mapping of setting: value")
        known = {a.dest for a in parser._actions} - {"help", "config"}
        shared = {str(k).replace("-", "_"): v for k, v in loaded.items() if not isinstance(v, dict)}
        scoped = loaded.get(section) if section else None
        defaults = {k: v for k, v in shared.items() if k in known}
        for key, value in (scoped if isinstance(scoped, dict) else {}).items():
            dest = str(key).replace("-", "_")
            if dest not in known:
                parser.error(f"--config {pre.config}: unknown setting {key!r} under {section}:")
            defaults[dest] = value
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a required flag is satisfied by the config
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv)
