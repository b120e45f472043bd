"""The README and the manual in docs/ as a newcomer follows them: the commands exist, every flag named is a real flag of
the script it follows, the flag reference is what the parsers say, the links lead somewhere, and every config key
the profiles set is a flag of the scripts it applies to."""
from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from howto.runio import parse_args
from tools import flag_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
SCRIPTS = ("prepare_data", "finetune", "evaluate")
# The least each script needs to parse, so that its parser can be built the way the script builds it.
MINIMAL_ARGV = {
    "prepare_data": ["data/howto_steps.jsonl", "--out", "OUT"],
    "finetune": ["--data", "DATA", "--out", "OUT"],
    "evaluate": ["--out", "OUT"],
}
# Flags the prose mentions in backticks that are not the scripts' own: argparse's --help, setup.sh's --dev, pip's
# --no-deps, the flag reference's --check.
OTHER_TOOLS_FLAGS = {"--help", "--dev", "--no-deps", "--check"}
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")


@cache
def flags_of(script: str) -> frozenset[str]:
    """The script's long flags, as its --help (with --config, as the script runs it) lists them."""
    return frozenset(FLAG.findall(flag_reference.help_text(script))) - {"--help"}


@cache
def dests_of(script: str) -> frozenset[str]:
    """Every setting the script's parser has, as the script parses its arguments."""
    module = importlib.import_module(script)
    args = parse_args(module.build_parser(), MINIMAL_ARGV[script], section=script, siblings=module.sibling_parsers)
    return frozenset(vars(args)) - {"config"}


def section(text: str, heading: str) -> str:
    """The body under a Markdown heading, up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    match = re.search(rf"^{re.escape(heading)}[ \t]*$", text, re.MULTILINE)
    assert match, f"no heading {heading!r}"
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
    """(script path, flags after it, the command) for every `X.py ...` or `python -m X ...` call in shell blocks; a
    module is given as its file's path."""
    calls = []
    for block in code_blocks(text, ("bash", "sh", "shell")):
        for tokens in command_lines(block):
            for i, token in enumerate(tokens):
                if token.endswith(".py"):
                    calls.append((token, flags_after(tokens, i), " ".join(tokens)))
                    break
                if token == "-m" and i + 1 < len(tokens) and tokens[i + 1].split(".")[0] in ("bench", "tools"):
                    path = tokens[i + 1].replace(".", "/") + ".py"
                    calls.append((path, flags_after(tokens, i + 1), " ".join(tokens)))
                    break
    return calls


def inline_code(text: str) -> list[str]:
    """Backticked spans outside fenced blocks (a span may wrap over a line break)."""
    return re.findall(r"`([^`]+)`", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# ------------------------------------------------------------------------------------------------------ the front page

def test_readme_is_a_front_page():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: the manual belongs in docs/"
    assert "has never run on a GPU" in README, "the README says plainly that the GPU path has not been run"
    linked = set(LINK.findall(section(README, "## The manual")))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"the README's list of links misses {sorted(pages - linked)}"


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


@pytest.mark.parametrize("page", sorted(DOCS))
def test_links_lead_to_files_and_headings_that_exist(page):
    for target in LINK.findall(DOCS[page]):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        path = (ROOT / page).parent / file if file else ROOT / page
        assert path.exists(), f"{page} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, f"{page} links to {target}: no such heading"


# ------------------------------------------------------------------------------------------------------ the flags

def test_flag_reference_is_generated_from_the_parsers():
    current = flag_reference.REFERENCE.read_text(encoding="utf-8")
    assert current == flag_reference.reference(), \
        f"docs/reference.md is stale: run {flag_reference.COMMAND} from the repository's root"


def test_flag_reference_does_not_depend_on_where_the_clone_lies(monkeypatch):
    """CI clones into a longer folder than ours: a bundled file's default must not wrap its help line elsewhere."""
    from howto import forgetting
    deep = Path("/" + "a-much-longer-folder-than-this-one/" * 3).resolve()
    monkeypatch.setattr(flag_reference, "ROOT", deep)
    monkeypatch.setattr(forgetting, "BUNDLED", deep / "data" / "forgetting.jsonl")
    assert flag_reference.REFERENCE.read_text(encoding="utf-8") == flag_reference.reference()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_each_script_is_in_the_reference(script):
    body = section(DOCS["docs/reference.md"], f"## {script}.py")
    missing = flags_of(script) - set(FLAG.findall(body))
    assert not missing, f"docs/reference.md's {script}.py section does not document {sorted(missing)}"


@pytest.mark.parametrize("page", sorted(DOCS))
def test_every_script_call_in_code_blocks_uses_real_flags(page):
    other_scripts: dict[str, set[str]] = {}
    for path, flags, command in script_calls(DOCS[page]):
        assert (ROOT / path).is_file(), f"{page} runs {path}, which does not exist: {command}"
        stem = Path(path).stem
        if stem in SCRIPTS:
            unknown = set(flags) - flags_of(stem)
            assert not unknown, f"{page}: {path} has no {sorted(unknown)}: {command}"
        elif flags:
            other_scripts.setdefault(path, set()).update(flags)
    for path, flags in other_scripts.items():  # the benches and tools: ask their --help, run as modules
        module = path.removesuffix(".py").replace("/", ".")
        helptext = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
        assert helptext.returncode == 0, f"{module} --help failed:\n{helptext.stderr[-2000:]}"
        unknown = {f for f in flags if f not in FLAG.findall(helptext.stdout)}
        assert not unknown, f"{page}: {path} has no {sorted(unknown)}"


def test_the_manual_shows_a_command_line_for_each_script():
    called = {Path(path).stem for text in DOCS.values() for path, _, _ in script_calls(text)}
    assert set(SCRIPTS) <= called, "the docs show a command line for each of the three scripts"


@pytest.mark.parametrize("page", sorted(DOCS))
def test_flags_in_prose_belong_to_the_script_they_follow_or_to_some_script(page):
    every_flag = set().union(*(flags_of(s) for s in SCRIPTS))
    for span in inline_code(DOCS[page]):
        tokens = span.split()
        named = next((i for i, t in enumerate(tokens) if Path(t).stem in SCRIPTS and t.endswith(".py")), None)
        if named is not None:
            script = Path(tokens[named]).stem
            unknown = set(flags_after(tokens, named)) - flags_of(script)
            assert not unknown, f"{page}: `{span}`: {script}.py has no {sorted(unknown)}"
        elif span.startswith("--"):  # a bare flag (spans that start with another program hold its flags)
            unknown = set(FLAG.findall(span)) - every_flag - OTHER_TOOLS_FLAGS
            assert not unknown, f"{page}: `{span}`: no script has {sorted(unknown)}"


def test_layout_lists_files_that_exist():
    block = code_blocks(section(DOCS["docs/development.md"], "## Layout"))[0]
    for line in block.splitlines():
        if not line.strip():
            continue
        names = line.split()[0].rstrip(",")
        folder = "howto/" if line.startswith("  ") else ""
        for name in [names, *re.findall(r"^\s*\S+,\s*(\S+)", line)]:
            assert (ROOT / folder / name.rstrip(",")).exists(), f"Layout lists {folder}{name}, which does not exist"
    listed = {line.split()[0] for line in block.splitlines() if line.startswith("  ")}
    modules = {p.name for p in (ROOT / "howto").glob("*.py")} - {"__init__.py"}
    assert modules <= listed, f"Layout does not list howto/{sorted(modules - listed)}"


# ---------------------------------------------------------------------------------------------------------- configs

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_are_the_documented_ones():
    assert {c.name for c in CONFIGS} == {"cpu.yaml", "t4.yaml", "rtx24.yaml", "a100_80.yaml"}
    table = section(DOCS["docs/training.md"], "## Configs")
    for config in CONFIGS:
        assert f"`configs/{config.name}`" in table, f"docs/training.md's Configs table lacks {config.name}"


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
        module.check_args(parser, args)
        assert args.sweep_lr and args.sweep_epochs and args.sweep_batch_size


def test_t4_profile_is_finetune_defaults_written_out():
    """docs/training.md and configs/t4.yaml both say the T4 profile is what finetune.py does without flags."""
    settings = yaml.safe_load((ROOT / "configs" / "t4.yaml").read_text(encoding="utf-8"))
    parser = importlib.import_module("finetune").build_parser()
    training = {k: v for k, v in settings["finetune"].items() if not k.startswith("sweep_")}
    training["max_seq_length"] = settings["max_seq_length"]
    for dest, value in training.items():
        assert parser.get_default(dest) == value, f"t4.yaml {dest}={value!r}, finetune.py's default is " \
                                                  f"{parser.get_default(dest)!r}"
