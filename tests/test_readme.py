"""The README as a newcomer follows it: its commands exist, its flags are the scripts' real flags, and every flag and
every config key the scripts accept is where the README says it is."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from functools import cache
from typing import Any
from pathlib import Path

import pytest
import yaml

from howto.runio import parse_args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCRIPTS = ("prepare_data", "finetune", "evaluate")
# The least each script needs to parse, so that its parser can be built the way the script builds it.
MINIMAL_ARGV = {
    "prepare_data": ["data/howto_steps.jsonl", "--out", "OUT"],
    "finetune": ["--data", "DATA", "--out", "OUT"],
    "evaluate": ["--out", "OUT"],
}
# Flags the README's prose mentions in backticks that are not the scripts' own: argparse's --help, setup.sh's --dev,
# pip's --no-deps.
OTHER_TOOLS_FLAGS = {"--help", "--dev", "--no-deps"}
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*")


@cache
def script_parser(script: str) -> argparse.ArgumentParser:
    """The script's own parser after howto.runio.parse_args has added --config, exactly as the script runs it."""
    module = importlib.import_module(script)
    parser = module.build_parser()
    parse_args(parser, MINIMAL_ARGV[script], section=script, siblings=module.sibling_parsers)
    return parser


def flags_of(script: str) -> set[str]:
    return {s for action in script_parser(script)._actions for s in action.option_strings
            if s.startswith("--") and s != "--help"}


def dests_of(script: str) -> set[str]:
    return {a.dest for a in script_parser(script)._actions} - {"help", "config"}


def section(text: str, heading: str) -> str:
    """The body under a Markdown heading, up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    match = re.search(rf"^{re.escape(heading)}[ \t]*$", text, re.MULTILINE)
    assert match, f"README has no heading {heading!r}"
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, match.end())
    return text[match.end(): end.start() if end else len(text)]


def code_blocks(text: str, languages: tuple[str, ...] | None = None) -> list[str]:
    """Fenced blocks' bodies, all of them or those fenced with one of `languages`."""
    return [body for language, body in FENCE.findall(text) if languages is None or language.strip() in languages]


def command_lines(block: str) -> list[list[str]]:
    """Shell commands of a code block as token lists: continuations joined, comments dropped, split at && | ;."""
    joined = re.sub(r"\\\n", " ", block)
    commands = []
    for line in joined.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue  # not shell (JSON, text output)
        current: list[str] = []
        for token in tokens:
            if token in SHELL_OPERATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def flags_after(tokens: list[str], start: int) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens[start + 1:] if FLAG.fullmatch(t.split("=", 1)[0])]


def script_calls(text: str) -> list[tuple[str, list[str], str]]:
    """(script path, flags after it, the command) for every `X.py ...` call in the README's code blocks."""
    calls = []
    for block in code_blocks(text, ("bash", "sh", "shell")):
        for tokens in command_lines(block):
            for i, token in enumerate(tokens):
                if token.endswith(".py"):
                    calls.append((token, flags_after(tokens, i), " ".join(tokens)))
                    break
    return calls


def inline_code(text: str) -> list[str]:
    """Backticked spans outside fenced blocks (a span may wrap over a line break)."""
    return re.findall(r"`([^`]+)`", FENCE.sub("", text))


def test_quickstart_block_runs_files_that_exist():
    block = code_blocks(section(README, "## Quickstart"))[0]
    commands = command_lines(block)
    assert [c[:2] for c in commands] == [["bash", "run.sh"], ["bash", "test.sh"]]
    for tokens in commands:
        program = tokens[1] if tokens[0] == "bash" else tokens[0]
        path = ROOT / program
        assert path.is_file(), f"Quickstart runs {program}, which does not exist"
        assert tokens[0] == "bash" or path.stat().st_mode & 0o111, f"{program} is run directly but not executable"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^bash test\.sh\b", ci, re.MULTILINE), ".ci/run must call the README's test command"


def test_quickstart_quotes_what_run_sh_prints():
    run_sh = (ROOT / "run.sh").read_text(encoding="utf-8")
    quoted = code_blocks(section(README, "## Quickstart"))[1].strip()
    assert quoted.startswith("No CUDA GPU found") and quoted in run_sh


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_each_script_is_documented_in_its_section(script):
    body = section(README, f"### {script}.py")
    mentioned = set(FLAG.findall(body))
    missing = flags_of(script) - mentioned
    assert not missing, f"README's {script}.py section does not document {sorted(missing)}"
    for action in script_parser(script)._actions:
        if not action.option_strings:  # a positional argument: its metavar heads a table row
            assert f"| `{action.metavar or action.dest.upper()}" in body, f"{script}.py: {action.metavar} undocumented"


@pytest.mark.parametrize("script", SCRIPTS)
def test_flag_tables_name_only_real_flags(script):
    body = section(README, f"### {script}.py")
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert len(rows) >= len(flags_of(script)) // 2, f"{script}.py: no flag table"
    unknown = {f for row in rows for f in FLAG.findall(row.split("|")[1])} - flags_of(script)
    assert not unknown, f"{script}.py's table documents flags its parser does not have: {sorted(unknown)}"
    # A flag in the description column (like `--max-seq-length` in --overlong's row) is this script's too.
    named = {f for row in rows for f in FLAG.findall("|".join(row.split("|")[2:]))}
    assert named <= flags_of(script), f"{script}.py's table refers to {sorted(named - flags_of(script))}"


def test_every_script_call_in_code_blocks_uses_real_flags():
    calls = script_calls(README)
    called = {Path(path).stem for path, _, _ in calls}
    assert set(SCRIPTS) <= called, "the README shows a command line for each of the three scripts"
    other_scripts: dict[str, set[str]] = {}
    for path, flags, command in calls:
        assert (ROOT / path).is_file(), f"README runs {path}, which does not exist: {command}"
        stem = Path(path).stem
        if stem in SCRIPTS:
            unknown = set(flags) - flags_of(stem)
            assert not unknown, f"{path} has no {sorted(unknown)}: {command}"
        elif flags:
            other_scripts.setdefault(path, set()).update(flags)
    for path, flags in other_scripts.items():  # bench scripts build their parser inside main(): ask them
        module = path.removesuffix(".py").replace("/", ".")
        helptext = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
        assert helptext.returncode == 0, f"{path} --help failed:\n{helptext.stderr[-2000:]}"
        unknown = {f for f in flags if f not in FLAG.findall(helptext.stdout)}
        assert not unknown, f"{path} has no {sorted(unknown)}"


def test_flags_in_prose_belong_to_the_script_they_follow_or_to_some_script():
    every_flag = set().union(*(flags_of(s) for s in SCRIPTS))
    for span in inline_code(README):
        tokens = span.split()
        named = next((i for i, t in enumerate(tokens) if Path(t).stem in SCRIPTS and t.endswith(".py")), None)
        if named is not None:
            script = Path(tokens[named]).stem
            unknown = set(flags_after(tokens, named)) - flags_of(script)
            assert not unknown, f"`{span}`: {script}.py has no {sorted(unknown)}"
        elif span.startswith("--"):  # a bare flag (spans that start with another program hold its flags)
            unknown = set(FLAG.findall(span)) - every_flag - OTHER_TOOLS_FLAGS
            assert not unknown, f"`{span}`: no script has {sorted(unknown)}"


def test_layout_lists_files_that_exist():
    block = code_blocks(section(README, "## Layout"))[0]
    for line in block.splitlines():
        if not line.strip():
            continue
        names = line.split()[0].rstrip(",")
        folder = "howto/" if line.startswith("  ") else ""
        for name in [names, *re.findall(r"^\s*\S+,\s*(\S+)", line)]:
            assert (ROOT / folder / name.rstrip(",")).exists(), f"Layout lists {folder}{name}, which does not exist"


# ---------------------------------------------------------------------------------------------------------- configs

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_are_the_documented_ones():
    assert {c.name for c in CONFIGS} == {"cpu.yaml", "t4.yaml", "rtx24.yaml", "a100_80.yaml"}
    table = section(README, "## Configs")
    for config in CONFIGS:
        assert f"`configs/{config.name}`" in table, f"README's Configs table lacks {config.name}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_keys_are_flags_of_the_scripts_they_apply_to(config):
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    every_dest = set().union(*(dests_of(s) for s in SCRIPTS))
    for key, value in settings.items():
        if isinstance(value, dict):
            assert key in SCRIPTS, f"{config.name}: section {key!r} names no script"
            unknown = {str(k).replace("-", "_") for k in value} - dests_of(key)
            assert not unknown, f"{config.name}: {key}.py has no flag for {sorted(unknown)}"
        else:
            assert str(key).replace("-", "_") in every_dest, f"{config.name}: no script has a flag for {key!r}"
    assert settings.get("finetune", {}).keys() >= {"sweep_lr", "sweep_epochs", "sweep_batch_size"}, \
        f"{config.name}: every profile sets the sweep ranges"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("script", SCRIPTS)
def test_config_loads_into_each_script_with_its_values(config, script):
    """The real loading path, values and types included: a value the parser or finetune's checks reject fails."""
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    module = importlib.import_module(script)
    parser = module.build_parser()
    args = parse_args(parser, [*MINIMAL_ARGV[script], "--config", str(config)], section=script,
                      siblings=module.sibling_parsers)
    expected = {k: v for k, v in settings.items() if not isinstance(v, dict)}
    expected = {k.replace("-", "_"): v for k, v in expected.items() if k.replace("-", "_") in dests_of(script)}
    expected.update({k.replace("-", "_"): v for k, v in settings.get(script, {}).items()})
    for dest, value in expected.items():
        assert getattr(args, dest) == value, f"{config.name} -> {script}.py: {dest} is {getattr(args, dest)!r}"
    if script == "finetune":
        module = importlib.import_module("finetune")
        module.check_args(parser, args)
        assert args.sweep_lr and args.sweep_epochs and args.sweep_batch_size


def test_t4_profile_is_finetune_defaults_written_out():
    """README and configs/t4.yaml both say the T4 profile is what finetune.py does without flags."""
    settings = yaml.safe_load((ROOT / "configs" / "t4.yaml").read_text(encoding="utf-8"))
    parser = importlib.import_module("finetune").build_parser()
    training = {k: v for k, v in settings["finetune"].items() if not k.startswith("sweep_")}
    training["max_seq_length"] = settings["max_seq_length"]
    for dest, value in training.items():
        assert parser.get_default(dest) == value, f"t4.yaml {dest}={value!r}, finetune.py's default is " \
                                                  f"{parser.get_default(dest)!r}"


def readme_value(cell: str) -> Any:
    """A default as the README writes it, in the parser's terms: off/on as booleans, numbers as numbers, a
    comma-separated list as a list; anything else (prose such as 'the GPU found') as the text itself."""
    cell = cell.strip().strip("`")
    if cell in ("off", "on"):
        return cell == "on"
    parts = cell.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return parts if len(parts) > 1 and " " not in cell else cell
    return values if len(parts) > 1 else values[0]


def parser_value(default: Any) -> Any:
    """The parser's default in the same terms as readme_value."""
    if isinstance(default, bool) or default is None:
        return default
    if isinstance(default, (int, float)):
        return float(default)
    if isinstance(default, (list, tuple)) and not default:
        return "none"
    if isinstance(default, (list, tuple)):
        return [float(v) if isinstance(v, (int, float)) else str(v) for v in default]
    default = str(default)
    return readme_value(default.removeprefix(f"{ROOT}/"))  # a bundled file's path, as the README writes it


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_defaults_are_the_parsers_defaults(script):
    """A flag table's default column says what the parser does: a number, a switch or a literal written there is
    the parser's own default. Prose defaults (`$OPENAI_MODEL`, 'from the run') stand for a None default resolved at
    run time, and 'required' for a required flag."""
    actions = {s: a for a in script_parser(script)._actions for s in a.option_strings}
    rows = [line.split("|") for line in section(README, f"### {script}.py").splitlines() if line.startswith("| `--")]
    checked = 0
    for row in rows:
        cell = row[2].strip()
        for flag in FLAG.findall(row[1]):
            action = actions[flag]
            if flag.startswith("--no-") and isinstance(action, argparse.BooleanOptionalAction):
                continue  # the row's first flag speaks for the pair
            default, documented = parser_value(action.default), readme_value(cell)
            if cell == "required":
                assert action.required or action.default is None, \
                    f"{script}.py {flag}: README says required, the parser has a default"  # None: checked later
            elif isinstance(default, (bool, float, list)) or isinstance(documented, (bool, float, list)):
                assert documented == default, f"{script}.py {flag}: README's default {cell!r}, parser's " \
                                              f"{action.default!r}"
                checked += 1
            elif default is not None and " " not in cell and not cell.startswith(("`$", "$")):
                assert documented == default, f"{script}.py {flag}: README's default {cell!r}, parser's " \
                                              f"{action.default!r}"
                checked += 1
    assert checked >= len(rows) // 2, f"{script}.py: too few literal defaults checked ({checked} of {len(rows)})"
