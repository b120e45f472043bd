"""Run bookkeeping shared by the three scripts: how a run fails, atomic writes, YAML configs, figures and tables,
and what every run records."""
from __future__ import annotations

import argparse
import hashlib
import io
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
    "xformers", "bert-score", "mistral-common", "llama-cpp-python", "gguf", "rich", "scipy",
    "numpy", "sentencepiece", "phonenumbers",
)


class RunError(SystemExit):
    """A run that cannot go on (bad input, a setting that cannot work): `error: MESSAGE` on stderr, exit code 1.

    A SystemExit, so a script needs no handler of its own and no traceback is printed; str() is the message
    without the prefix. Usage errors stay argparse's (exit code 2).
    """

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Fail before any slow work when an output folder cannot be written: a file, or a folder without write access."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{flag} {out}: is a file, not a folder")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir():
        raise RunError(f"{flag} {out}: {parent} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".write-check-", dir=parent)).rmdir()
    except OSError as e:
        raise RunError(f"{flag} {out}: cannot write in {parent} ({e.strerror})") from None
    return out


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: figures go to files, never to a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 100, tight: bool = False) -> bytes:
    """A figure as PNG bytes, and the figure closed. No `Software` tag, so the same figure gives the same bytes."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None}, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buffer.getvalue()


def markdown_table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """A GitHub Markdown table; `|` and line breaks inside cells are escaped so that a cell never breaks a row."""
    def cells(row: Iterable[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"

    header = list(header)
    return "\n".join([cells(header), "|" + "---|" * len(header), *map(cells, rows)])


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
    """The GPU a run had: name, memory, compute capability, and bf16 as howto.models decides it (in hardware, not
    emulated)."""
    try:
        import torch
    except ImportError:
        return {"gpu": None}
    if not torch.cuda.is_available():
        return {"gpu": None}
    from howto.models import gpu_has_bf16  # here: howto.models imports this module

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}", "bf16_supported": gpu_has_bf16()}


def write_run_info(out_dir: str | Path, config: dict[str, Any], data_files: Iterable[str | Path],
                   extra: dict[str, Any] | None = None, gpu: bool = True) -> None:
    """Record the resolved config, library versions, hardware and the data's hash next to a run's outputs.

    `gpu=False` for a run that uses no GPU: asking torch would import it (seconds) to record nothing of use.
    """
    out_dir = Path(out_dir)
    files = [Path(p) for p in data_files]
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=True, allow_unicode=True))
    write_json(out_dir / "run_info.json", {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "data_files": [str(p) for p in files],
        "data_sha256": hash_files(files) if files else None,
        "versions": library_versions(),
        **(gpu_info() if gpu else {}),
        **(extra or {}),
    })


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None,
               section: str | None = None) -> argparse.Namespace:
    """Parse flags with an optional `--config run.yaml` whose keys set the defaults; flags given win.

    Keys are flag names with dashes or underscores (`learning_rate` or `learning-rate`). One file can serve a whole
    run: top-level keys (`model`, `seed`...) apply to every script that has such a flag, and a mapping named after a
    script (`prepare_data:`, `finetune:`, `evaluate:`) applies to that script alone and wins. A config value goes
    through the same conversion and checks as the flag on the command line (types, choices, `"no"` for a switch),
    and a key that names no flag of any script is an error, so a typo never goes unnoticed.
    """
    parser.add_argument("--config", help="YAML file of settings for the whole run; flags given override it")
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    pre, _ = config_only.parse_known_args(argv)
    if pre.config:
        defaults = config_defaults(parser, Path(pre.config), section)
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a required flag is satisfied by the config
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv)


SCRIPTS = ("prepare_data", "finetune", "evaluate")
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def config_defaults(parser: argparse.ArgumentParser, path: Path, section: str | None) -> dict[str, Any]:
    """The settings of a YAML config that apply to this parser's script, converted and checked as flags are."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--config {path}: {e}")
    if not isinstance(loaded, dict):
        parser.error(f"--config {path}: expected a mapping of setting: value")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    settings = {}
    for key, value in loaded.items():
        if key in SCRIPTS:
            if not isinstance(value, dict | None):
                parser.error(f"--config {path}: {key}: expected a mapping of setting: value")
            continue
        dest = str(key).replace("-", "_")
        if dest in actions:
            settings[dest] = value
        elif dest != "config" and dest not in other_scripts_settings(section):
            parser.error(f"--config {path}: unknown setting {key!r} (no script has such a flag)")
    for key, value in (loaded.get(section) or {}).items() if section else ():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            parser.error(f"--config {path}: unknown setting {key!r} under {section}:")
        settings[dest] = value
    try:
        return {dest: convert(parser, actions[dest], value) for dest, value in settings.items()}
    except (argparse.ArgumentError, ValueError) as e:
        parser.error(f"--config {path}: {e}")


def other_scripts_settings(section: str | None) -> set[str]:
    """Settings of the scripts other than `section`: a top-level key any of them has is meant for that one."""
    import importlib

    names: set[str] = set()
    for script in SCRIPTS:
        if script != section:
            names |= {a.dest for a in importlib.import_module(script).build_parser()._actions}
    return names


def convert(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """A config value as the flag's own parsing would give it; a YAML list stands for a comma-separated value."""
    if value is None:
        return None
    flag = action.option_strings[0] if action.option_strings else action.dest
    if action.nargs == 0:  # a switch: YAML true/false, or the words YAML 1.1 reads as such
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise ValueError(f"{flag}: expected true or false, got {value!r}")
        return word in TRUE_WORDS
    if action.nargs in (None, "?"):
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        return parser._get_values(action, [text])
    return parser._get_values(action, [str(v) for v in (value if isinstance(value, list) else [value])])
