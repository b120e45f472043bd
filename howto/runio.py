"""Run bookkeeping shared by the three scripts: how a run fails, atomic writes, YAML configs, figures and tables,
and what every run records."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import yaml

TRACKED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo",
    "xformers", "bert-score", "mistral-common", "llama-cpp-python", "gguf", "rich", "scipy",
    "numpy", "sentencepiece", "phonenumbers",
)


class RunError(Exception):
    """A run that cannot go on (bad input, a setting that cannot work). An ordinary exception, so that a notebook's
    `except Exception` catches it; at a script's edge run_script turns it into `error: MESSAGE` on stderr and exit
    code 1, never a traceback. str() is the message. Usage errors stay argparse's (exit code 2)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def run_script(main: Callable[[list[str]], Any]) -> NoReturn:
    """A script's edge: main() on the command line's arguments, exit code 0 or the int it returns; a RunError becomes
    one line, `error: MESSAGE`, and exit code 1."""
    try:
        result = main(sys.argv[1:])
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


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


# What starts raw HTML in CommonMark: a tag, a closing tag, a comment, a declaration or a processing instruction
# (and an autolink). A `<` before anything else ("p <0.001", "a < b") is plain text already.
_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")


def markdown_text(text: Any) -> str:
    """Text from data (prompts, outputs, names) for Markdown outside code: `<script>` or `<img onerror=...>` in it
    shows as written in a Markdown viewer instead of being rendered as HTML."""
    return _HTML_START.sub("&lt;", str(text))


def markdown_code(text: Any) -> str:
    """Text as an inline code span, fenced by more backticks than it holds, so a backtick in it cannot end the
    span early and let the rest be read as Markdown or HTML."""
    text = str(text).replace("\n", " ")
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_fence(text: str, info: str = "text") -> str:
    """A fenced code block longer than any backtick run inside it, so the text cannot close it early."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence}{info}\n{text}\n{fence}"


def markdown_table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """A GitHub Markdown table; `|` and line breaks inside cells are escaped so that a cell never breaks a row, and
    HTML in a cell shows as written (markdown_text)."""
    def cells(row: Iterable[Any]) -> str:
        return "| " + " | ".join(markdown_text(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"

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


def check_finite(obj: Any, path: str | Path, where: str = "") -> None:
    """Refuse NaN and infinity before they reach a JSON file: Python's json writes them as bare `NaN`/`Infinity`,
    which is not JSON, and every other reader rejects the file. A value that is legitimately undefined is written as
    null by its caller; one that gets here is a mistake, named with its key."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise RunError(f"{path}: not written: {where or 'the value'} is {obj}, which JSON cannot hold "
                       "(a bug: please report it)")
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_finite(value, path, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            check_finite(value, path, f"{where}[{index}]")


def json_line(obj: Any, path: str | Path) -> str:
    """One JSONL line of `obj`, for a file at `path` (check_finite)."""
    check_finite(obj, path)
    return json.dumps(obj, ensure_ascii=False) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    check_finite(obj, path)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json_line(r, path) for r in rows))


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


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The `--config FILE` flag every script has; parse_args adds it, and so does the flag reference."""
    parser.add_argument("--config", help="YAML file of settings for the whole run; flags given override it")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, section: str | None = None,
               siblings: Callable[[], Iterable[argparse.ArgumentParser]] | None = None) -> argparse.Namespace:
    """Parse flags with an optional `--config run.yaml` whose keys set the defaults; flags given win.

    Keys are flag names with dashes or underscores (`learning_rate` or `learning-rate`). One file can serve a whole
    run: top-level keys (`model`, `seed`...) apply to every script that has such a flag, and a mapping named after a
    script (`prepare_data:`, `finetune:`, `evaluate:`) applies to that script alone and wins. A config value goes
    through the same conversion and checks as the flag on the command line (types, choices, `"no"` for a switch),
    and a key that names no flag of any script is an error, so a typo never goes unnoticed. `siblings` gives the
    other scripts' parsers (the script passes them: this module never imports the scripts).
    """
    add_config_argument(parser)
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    pre, _ = config_only.parse_known_args(argv)
    if pre.config:
        defaults = config_defaults(parser, Path(pre.config), section, siblings)
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a required flag is satisfied by the config
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv)


SCRIPTS = ("prepare_data", "finetune", "evaluate")
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` repeats the node it names, so a few lines of aliases of aliases
    (a "billion laughs") stand for billions of values, which hang whatever walks or prints them. A settings file
    never needs one; an alias is refused where it stands."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML alias *{event.anchor} is not accepted here (aliases can stand for billions of "
                            "values); write the value out", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """YAML as plain data (no Python objects, no aliases): every YAML file or front matter the toolkit reads."""
    return yaml.load(text, Loader=_NoAliasLoader)


def yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """A YAML error in one line: `file:line:column: problem`."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return f"{path}: {e}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: {e.problem}"


def config_defaults(parser: argparse.ArgumentParser, path: Path, section: str | None,
                    siblings: Callable[[], Iterable[argparse.ArgumentParser]] | None = None) -> dict[str, Any]:
    """The settings of a YAML config that apply to this parser's script, converted and checked as flags are."""
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        parser.error(f"--config {path}: {e}")
    except yaml.YAMLError as e:
        parser.error(f"--config {yaml_error(path, e)}")
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
        elif dest != "config" and dest not in sibling_settings(siblings):
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


def sibling_settings(siblings: Callable[[], Iterable[argparse.ArgumentParser]] | None) -> set[str]:
    """The other scripts' settings: a top-level key any of them has is meant for that one."""
    return {a.dest for parser in (siblings() if siblings else ()) for a in parser._actions}


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
