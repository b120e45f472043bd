"""Collect how-to records from raw sources: help-centre HTML, Markdown manuals, PDF and text files, support chats.

    records, report = collect_file(Path("help/cancel.html"))

A procedure is a question or heading followed by ordered steps: an ordered list, `Step N:` paragraphs, or an agent
reply with numbered lines. Everything else (navigation, footers, bulleted feature lists, tables, code, prose answers,
chats without steps) never becomes a record, and the report says what was skipped and why. Markdown, text and PDF
go through a real Markdown parser and HTML through BeautifulSoup, so that every format meets the same block walker.
Each record carries `source` (file#anchor, page or conversation) and `extraction` ("rules" or "llm"); nothing here
validates or redacts: prepare_data.py puts collected records through the same stages as any other input.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from bs4 import BeautifulSoup, NavigableString, Tag
from markdown_it import MarkdownIt
from pypdf import PdfReader
from pypdf.errors import PdfReadError

from howto.augment import parse_answer
from howto.llm import ChatClient, LLMError
from howto.pii import redact
from howto.review import first_object, read_review, review_kind
from howto.runio import RunError, load_yaml, markdown_code, markdown_text

DOCUMENT_SUFFIXES = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf",
                     ".txt": "text"}
CUSTOMER_ROLES = {"customer", "user", "client", "visitor", "human"}
AGENT_ROLES = {"agent", "assistant", "support", "operator", "staff", "bot"}

# Words that start an instruction. A numbered list is a procedure only when most of its items instruct, so that
# "Members can be: 1. Direct members 2. ..." or "When you push: 1. GitLab extracts ..." are not taken for steps.
VERBS = frozenset("""
accept access activate add adjust allow answer apply approve archive assign attach authenticate backup be block book
bookmark browse build buy call cancel change charge check cherry-pick choose cite claim clear click close collapse
commit complete configure confirm connect contact continue convert copy create crop customize deactivate define
delete deny deploy deposit describe dial disable disconnect dismiss do don downgrade download drag drop duplicate
edit email embed empty enable end enroll ensure enter erase exclude expand export extend fill filter find finish fix
flag follow format forward freeze generate get give go grant group hang hide hit hold hover import include input
insert install invite join keep kick launch leave let limit link locate lock log look make manage mark mention merge
migrate move mute name navigate note open opt order pair paste pause pay pick pin place play plug point post press
preview print promote provide publish pull purchase push put read reboot record recover redeem refresh refund
regenerate register reinstall reload remind remove rename renew reopen reorder repeat replace reply report request
reschedule reset resolve respond restart restore resume retry return review revoke rewind rotate run save scan
schedule scroll search see select sell send set setup share show shut sign skip slide snooze sort specify split star
start stop stream submit subscribe swap swipe switch sync tag tap test tick toggle top track transfer translate trim
try turn type unassign unblock uncheck unfollow unfreeze uninstall unlink unlock unmute unpin unsubscribe unzip
update upgrade upload use verify view visit vote wait withdraw write zoom
""".split())
_LEADING_CLAUSE = re.compile(r"^(?:optional(?:ly)?[.:]?\s+|then\s+|(?:on|in|from|under|at|next to|beside|below|above|"
                             r"within|inside|if|when|once|after|before|for|to|with|using|via|now|finally|first|"
                             r"next)\b[^,:]*[,:]\s*)", re.IGNORECASE)
_STEP_PARAGRAPH = re.compile(r"^\s*step\s*(\d+)\s*[:.)\-\u2013\u2014]\s*", re.IGNORECASE)
_NUMBERED_LINE = re.compile(r"^\s*(?:step\s*)?(\d+)\s*[.):]\s+", re.IGNORECASE)
_TO_LEAD_IN = re.compile(r"(?:^|[.!?]\s+)to ([^,:]+?)(?:,[^:]*)?:\s*$", re.IGNORECASE | re.DOTALL)
# "To disable them:" needs its heading; "To resolve this issue:" under a problem heading names the problem.
_POINTING = re.compile(r"\b(?:this|that|these|those|them|it)\b", re.IGNORECASE)
_PROBLEM = re.compile(r"\b(?:cannot|can't|not|fails?|error|unable|doesn't|won't)\b", re.IGNORECASE)
_SHORTCODE = re.compile(r"\{\{[<%].*?[%>]\}\}", re.DOTALL)
_FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)\r?\n---\r?\n", re.DOTALL)
_NAV_HINT = re.compile(r"(?:^|[-_\s])(?:nav|navbar|navigation|menu|breadcrumbs?|sidebar|toc|footer|cookies?|banner|"
                       r"pagination|related|share|social|skip-link)(?:$|[-_\s])", re.IGNORECASE)
_NOTE = re.compile(r"^(?:note|tip|warning|important|caution)\b\s*:", re.IGNORECASE)
_BLOCK_TAGS = ["p", "div", "section", "article", "main", "ol", "ul", "table", "pre", "h1", "h2", "h3", "h4", "h5",
               "h6", "dl", "details", "blockquote", "figure"]
_DROPPED_TAGS = ["nav", "aside", "footer", "script", "style", "noscript", "form", "template", "svg", "iframe", "button",
                 "select", "head"]
CONTENT_NAMES = {"para": "prose", "list": "bulleted list", "table": "table", "pre": "code", "figure": "figure",
                 "blockquote": "quote"}
_PREPOSITIONS = {"for", "in", "from", "on", "with", "using", "via", "by", "as", "through", "without"}
LLM_SYSTEM = ("You turn help-centre text and support chats into how-to records: a question and the ordered steps that "
              "answer it. Answer with JSON only.")
LLM_PROMPT = """Here is {what}:

{text}

List every procedure in it that a user follows step by step. For each, write the user's question ("How do I ...?")
and the steps in order, using the words of the text and keeping UI labels exactly as written. Leave out anything
that is not a procedure (descriptions, feature lists, greetings). If there is none, answer {{"records": []}}.
Answer as JSON: {{"records": [{{"prompt": "How do I ...?", "response": ["step", "step", ...]}}]}}"""


@dataclass
class Block:
    """One piece of a page's main content in reading order: a heading, a paragraph, a list, or something else."""
    kind: str  # "heading", "para", "list" or "other" (tables, code, figures: never steps)
    text: str = ""
    level: int = 0
    anchor: str = ""
    items: list[str] = field(default_factory=list)
    ordered: bool = False


@dataclass
class FileReport:
    """What one raw file gave: procedures found, and everything passed over with the reason."""
    file: str
    kind: str
    found: int = 0
    skipped: list[str] = field(default_factory=list)
    llm_requests: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "procedures": self.found, "skipped": self.skipped,
                "llm_requests": self.llm_requests}


# ------------------------------------------------------------------------------------------- what a file is
def source_kind(path: Path) -> str | None:
    """"html", "markdown", "pdf", "text" or "chat" for a raw source; None for a file of records (or a review export,
    which howto.review reads). A .txt or .json/.jsonl/.csv file is a chat when it looks like one."""
    suffix = path.suffix.lower()
    kind = DOCUMENT_SUFFIXES.get(suffix)
    if kind == "text":
        return "chat" if _transcript_turns(path.read_text(encoding="utf-8-sig")) else "text"
    if kind:
        return kind
    if suffix in (".json", ".jsonl"):
        return "chat" if "messages" in first_object(path) else None
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = {c.strip().lower() for c in next(csv.reader(f), [])}
        return "chat" if _column(header, ROLE_COLUMNS) and _column(header, TEXT_COLUMNS) and "prompt" not in header \
            else None
    return None


# ------------------------------------------------------------------------------------------------- collection
@dataclass
class Collection:
    """Raw records from raw sources and review exports, in file order, with what the report says about them."""
    records: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)  # (file, line or task, record)
    files: set[str] = field(default_factory=set)
    report: dict[str, Any] = field(default_factory=lambda: {"files": [], "review": {}})

    def of(self, path: Path) -> list[tuple[int, dict[str, Any]]]:
        """(line or task number, raw record) of the records collected from one file."""
        return [(line, record) for file, line, record in self.records if file == str(path)]


def collect_inputs(files: list[Path], client: ChatClient | None = None, max_llm_requests: int = 0) -> Collection:
    """Records from the raw sources and review exports among `files`; other files are records, left to the
    record reader. With a `client`, what the rules cannot parse goes to the LLM within `max_llm_requests`."""
    collection = Collection()
    review_counts: dict[str, int] = {}
    for path in files:
        try:
            collect_one(path, collection, review_counts, client, max_llm_requests)
        except UnicodeDecodeError as e:
            raise RunError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
        except (ValueError, KeyError, PdfReadError) as e:  # a chat export without messages, a broken PDF
            raise RunError(f"{path}: cannot be read as a raw source: {e}") from None
    collection.report["review"] = review_counts
    return collection


def collect_one(path: Path, collection: Collection, review_counts: dict[str, int], client: ChatClient | None,
                max_llm_requests: int) -> None:
    """Add one file's records to the collection, when it is a raw source or a review export."""
    reviewed = review_kind(path)
    if reviewed:
        kept, counts, dropped = read_review(path, reviewed)
        for key, n in counts.items():
            review_counts[key] = review_counts.get(key, 0) + n
        entry = {"file": str(path), "kind": f"review ({reviewed})", "procedures": len(kept), "skipped": dropped,
                 "llm_requests": 0}
        found = [(str(path), where, record) for where, record in kept]
    elif source_kind(path):
        used = sum(f["llm_requests"] for f in collection.report["files"])
        records, report = collect_file(path, client, max_llm_requests - used)
        entry, found = report.as_dict(), [(str(path), 0, record) for record in records]
    else:
        return
    collection.files.add(str(path))
    collection.records += found
    collection.report["files"].append(entry)

def collected_section(report: dict[str, Any] | None) -> list[str]:
    """The "Collected" section of report.md: per file, procedures found and what was skipped, with the reason."""
    if not report or not report["files"]:
        return []
    lines = ["", "## Collected", "", "| file | kind | procedures | skipped | LLM requests |", "|---|---|---|---|---|"]
    for f in report["files"]:
        name = markdown_code(f["file"]).replace("|", "\\|")  # a `|` splits a table cell even in a code span
        lines.append(f"| {name} | {f['kind']} | {f['procedures']} | {len(f['skipped'])} | {f['llm_requests']} |")
    if report["review"]:
        lines += ["", "- review: " + ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in report["review"].items())]
    skipped = [s for f in report["files"] for s in f["skipped"]]
    lines += ["", *(f"- skipped: {markdown_text(s)}" for s in skipped[:200])] if skipped else []
    return lines


def collect_file(path: Path, client: ChatClient | None = None,
                 max_llm_requests: int = 0) -> tuple[list[dict[str, Any]], FileReport]:
    """Raw records {prompt, response, source, extraction} of one raw file, and what was found and skipped.

    With a `client`, text the rules found no procedure in (a section of prose, a chat without numbered steps) is
    sent, redacted, to the LLM, up to `max_llm_requests` requests.
    """
    kind = source_kind(path)
    report = FileReport(str(path), kind or "records")
    if kind == "chat":
        units = [(f"{path}#conversation={cid}", "a support chat", _chat_text(turns), chat_procedure(turns))
                 for cid, turns in read_chats(path)]
        records = []
        for source, what, text, found in units:
            if isinstance(found, str):
                report.skipped.append(f"{source}: {found}")
                records += _ask_llm(client, what, text, source, report, max_llm_requests)
            else:
                records.append({**found, "source": source, "extraction": "rules"})
        report.found = sum(r["extraction"] == "rules" for r in records)
        return records, report
    pages = read_document(path, kind)
    records = []
    for page, (blocks, title) in enumerate(pages, 1):
        where = f"{path}#page={page}" if kind == "pdf" else str(path)
        found, skipped, leftovers = document_procedures(blocks, title, text_mode=kind in ("text", "pdf"))
        for prompt, steps, anchor in found:
            source = where if kind == "pdf" else f"{where}#{anchor}" if anchor else where
            records.append({"prompt": prompt, "response": steps, "source": source, "extraction": "rules"})
        report.skipped += [f"{where}: {s}" for s in skipped]
        for anchor, text in leftovers:
            source = where if kind == "pdf" else f"{where}#{anchor}" if anchor else where
            records += _ask_llm(client, "a section of a help page", text, source, report, max_llm_requests)
    report.found = sum(r["extraction"] == "rules" for r in records)
    if not records and not report.skipped:
        report.skipped.append(f"{path}: no procedure (no ordered steps under a heading or question)")
    return records, report


def _ask_llm(client: ChatClient | None, what: str, text: str, source: str, report: FileReport,
             max_requests: int) -> list[dict[str, Any]]:
    """Records the LLM reads out of text the rules could not parse; the text is redacted before it leaves."""
    if client is None or not text.strip():
        return []
    if report.llm_requests >= max_requests:
        report.skipped.append(f"{source}: not sent to the LLM (--extract-llm-max-requests reached)")
        return []
    report.llm_requests += 1
    prompt = LLM_PROMPT.format(what=what, text=redact(text)[0])
    try:
        answer = client.chat([{"role": "system", "content": LLM_SYSTEM}, {"role": "user", "content": prompt}],
                             temperature=0.0, max_tokens=2048)
    except LLMError as e:
        raise LLMError(f"LLM extraction of {source} stopped: {e}") from e
    received = parse_answer(answer)
    if received is None:
        report.skipped.append(f"{source}: the LLM's answer was not the JSON asked for")
        return []
    if not received:
        report.skipped.append(f"{source}: the LLM found no procedure either")
    return [{**r, "source": source, "extraction": "llm"} for r in received]


# --------------------------------------------------------------------------------------------------- documents
def read_document(path: Path, kind: str) -> list[tuple[list[Block], str]]:
    """The blocks and title of each page: one page, except for a PDF (one per page, for provenance)."""
    if kind == "pdf":
        title = path.stem
        return [(markdown_blocks(plain_paragraphs(page.extract_text() or ""))[0], title)
                for page in PdfReader(path).pages]
    text = path.read_text(encoding="utf-8-sig")
    if kind == "html":
        return [html_blocks(text)]
    blocks, title = markdown_blocks(plain_paragraphs(text) if kind == "text" else text)
    return [(blocks, title or (path.stem if kind == "text" else ""))]


def plain_paragraphs(text: str) -> str:
    """Plain text made ready for the Markdown parser: after a numbered step that ends a sentence, a line that starts
    a new one ("Sensors pair within a minute.") is a remark after the list, not a wrapped step."""
    lines, in_list = [], False
    for line in text.splitlines():
        if _NUMBERED_LINE.match(line):
            in_list = True
        elif in_list and line.strip()[:1].isupper() and not line[:1].isspace() and lines[-1].rstrip()[-1:] in ".!?":
            lines.append("")
            in_list = False
        lines.append(line)
    return "\n".join(lines)


def markdown_blocks(text: str) -> tuple[list[Block], str]:
    """Markdown (or plain text, which CommonMark reads as paragraphs and `1.` lists) as blocks, with the title of
    its front matter. Hugo/Jekyll shortcodes such as {{< alert >}} are markup, not text, and go."""
    title = ""
    front = _FRONT_MATTER.match(text)
    if front:
        try:
            meta = load_yaml(front.group(1))  # a page's aliases are refused like a config's
        except yaml.YAMLError:
            meta = None
        title = str(meta.get("title", "")) if isinstance(meta, dict) else ""
        text = text[front.end():]
    text = _SHORTCODE.sub(lambda m: "\n\n" if "\n" in m.group() else "", text)
    text = re.sub(r"^[ \t]*\{\{[<%].*$", "", text, flags=re.MULTILINE)
    html = MarkdownIt("commonmark").enable("table").render(text)
    return walk(BeautifulSoup(html, "lxml").body or BeautifulSoup("", "lxml")), title


def html_blocks(html: str) -> tuple[list[Block], str]:
    """The main content of an HTML page as blocks (navigation, banners, sidebars and footers left out), and its
    title (the <title>, or else the first <h1>)."""
    soup = BeautifulSoup(html, "lxml")
    title_tag = soup.find("title") or soup.find("h1")
    title = clean(title_tag.get_text()) if title_tag else ""
    root = soup.find("main") or soup.find(attrs={"role": "main"}) or \
        max(soup.find_all("article"), key=lambda a: len(a.get_text()), default=None) or soup.body or soup
    dropped = _DROPPED_TAGS + (["header"] if root.name in ("body", "[document]") else [])
    for tag in root.find_all(dropped):
        tag.decompose()
    for tag in root.find_all(True):
        if tag.decomposed or tag.attrs is None:
            continue
        role = str(tag.get("role", "")).lower()
        hints = " ".join([*tag.get("class", []), str(tag.get("id", ""))])
        if role in ("navigation", "banner", "contentinfo", "complementary", "search") or _NAV_HINT.search(hints):
            tag.decompose()
    return walk(root), title


def walk(element: Tag) -> list[Block]:
    """Blocks in reading order. An ordered list is one block, its nested lists belonging to their items; the items
    of a bulleted list are walked too, since a numbered procedure may sit under a bullet."""
    for br in element.find_all("br"):
        br.replace_with("\n")
    blocks: list[Block] = []
    _walk(element, blocks)
    return blocks


def _walk(element: Tag, blocks: list[Block]) -> None:
    loose: list[str] = []

    def flush() -> None:
        text = "".join(loose).strip()
        if text:
            blocks.append(Block("para", text))
        loose.clear()

    for child in element.children:
        if isinstance(child, NavigableString):
            if type(child) is NavigableString:  # not a comment, doctype or CDATA
                loose.append(str(child))
            continue
        if not isinstance(child, Tag):
            continue
        name = child.name
        if name not in _BLOCK_TAGS and name not in ("li", "dt", "dd", "summary") and not child.find(_BLOCK_TAGS):
            loose.append(child.get_text())
            continue
        flush()
        if re.fullmatch(r"h[1-6]", name):
            text = clean(child.get_text())
            anchor = child.get("id") or next((a.get("id") or a.get("name") for a in child.find_all("a")
                                              if a.get("id") or a.get("name")), None) or slug(text)
            blocks.append(Block("heading", text, level=int(name[1]), anchor=str(anchor)))
        elif name == "ol":
            items = child.find_all("li", recursive=False)
            links = all(li.a and clean(li.get_text()) == clean(li.a.get_text()) for li in items)
            blocks.append(Block("list", items=[step_text(li) for li in items], ordered=not links))  # links: a menu
        elif name == "ul":
            blocks.append(Block("list", items=[step_text(li) for li in child.find_all("li", recursive=False)]))
            for li in child.find_all("li", recursive=False):
                if li.find(["ol", "ul"]):
                    _walk(li, blocks)
        elif name in ("p", "summary", "dt"):
            text = child.get_text().strip()
            if text:
                blocks.append(Block("para", text))
        elif name in ("table", "pre", "figure", "blockquote"):
            blocks.append(Block("other", name))
        else:
            _walk(child, blocks)
    flush()


def step_text(li: Tag) -> str:
    """An item's own text: nested lists, code, tables, images, notes and the lines that introduce them belong to the
    step, not beside it, so they are left out; an item that only labels its nested list ("In GitLab:") takes the
    nested items in."""
    item = copy.copy(li)
    nested = [step_text(n) for sub in item.find_all(["ol", "ul"], recursive=False)
              for n in sub.find_all("li", recursive=False)]
    for tag in item.find_all(["ol", "ul", "pre", "table", "figure", "blockquote", "img"]):
        tag.decompose()
    for k, block in enumerate(item.find_all(["p", "div"])):
        text = block.get_text().strip()
        if _NOTE.match(text) or (k and text.endswith(":")):  # a note, or the lead-in of code that was left out
            block.decompose()
        else:
            block.append("\n")
    own = clean(item.get_text())
    if own.endswith(":") and nested:
        own = " ".join([own, *(n if n.endswith((".", "!", "?", ":")) else n + "." for n in nested if n)])
    return own


def clean(text: str) -> str:
    """One line of plain text: markup gone, labels kept verbatim, whitespace collapsed."""
    text = re.sub(r"\s+", " ", _SHORTCODE.sub("", text))
    text = re.sub(r"\s*\(\s*\)", "", text)
    return re.sub(r"\s+([.,:;!?])", r"\1", text).strip()


def slug(text: str) -> str:
    return re.sub(r"[^\w]+", "-", text.lower()).strip("-")


# -------------------------------------------------------------------------------------------------- procedures
def document_procedures(blocks: list[Block], title: str, text_mode: bool = False
                        ) -> tuple[list[tuple[str, list[str], str]], list[str], list[tuple[str, str]]]:
    """(prompt, steps, anchor) of each procedure, the candidates passed over with the reason, and the prose of each
    section that held no procedure (anchor, text), for the LLM to read when asked to."""
    found, skipped = [], []
    headings: list[Block] = []  # the open headings, outermost first
    prose: dict[str, list[str]] = {}
    content: dict[str, set[str]] = {}  # what each section holds, to say why it gave no record
    has_procedure: set[str] = set()
    i = 0
    while i < len(blocks):
        block = blocks[i]
        anchor = headings[-1].anchor if headings else ""
        steps, end = candidate_steps(blocks, i)
        if block.kind == "heading":
            headings = [h for h in headings if h.level < block.level] + [block]
        elif steps is None:
            section = headings[-1].anchor if headings else ""
            content.setdefault(section, set()).add(CONTENT_NAMES.get(block.text if block.kind == "other" else
                                                                     block.kind, "other content"))
            if block.kind == "para":
                prose.setdefault(section, []).append(clean(block.text))
        if steps is None:
            i += 1
            continue
        lead_in = blocks[i - 1].text if i and blocks[i - 1].kind == "para" else ""
        where = f"#{anchor}" if anchor else "top of the page"
        prompt = make_prompt(lead_in, headings, title, text_mode)
        if len(steps) < 2:
            skipped.append(f"{where}: a list of one step is not a procedure")
        elif sum(map(instructs, steps)) * 2 < len(steps):
            skipped.append(f"{where}: numbered list that describes rather than instructs "
                           f"(\"{steps[0][:60]}\", ...)")
        elif prompt is None:
            skipped.append(f"{where}: steps with no heading or question before them")
        else:
            found.append((first_person(prompt), steps, anchor))
        has_procedure.add(anchor)  # a section with steps, kept or skipped, is accounted for
        i = end
    skipped += [f"{f'#{a}' if a else 'top of the page'}: no steps ({', '.join(sorted(kinds))})"
                for a, kinds in content.items() if a not in has_procedure]
    leftovers = [(a, "\n\n".join(p)) for a, p in prose.items() if a not in has_procedure and len(" ".join(p)) > 80]
    return found, skipped, leftovers


def candidate_steps(blocks: list[Block], i: int) -> tuple[list[str] | None, int]:
    """The steps starting at block i and the index after them: an ordered list, a run of `Step N:` paragraphs, or
    a paragraph of numbered lines; (None, i) when no steps start there."""
    block = blocks[i]
    if block.kind == "list" and block.ordered:
        return [s for s in block.items if s], i + 1
    if block.kind != "para":
        return None, i
    steps, j = [], i
    while j < len(blocks) and blocks[j].kind == "para":
        match = _STEP_PARAGRAPH.match(blocks[j].text)
        if not match or int(match.group(1)) != len(steps) + 1:
            break
        steps.append(clean(blocks[j].text[match.end():]))
        j += 1
    if steps:
        return steps, j
    lines = numbered_lines(block.text)
    return (lines, i + 1) if lines else (None, i)


def numbered_lines(text: str) -> list[str]:
    """Steps written as lines "1. ...", "2) ...", "Step 3: ..." numbered from 1; lines before the first step and
    after the last one (a greeting, "Let me know if that helps!") are not steps, wrapped lines join their step."""
    steps: list[str] = []
    tail: list[str] = []
    for line in text.splitlines():
        match = _NUMBERED_LINE.match(line)
        if match and int(match.group(1)) == len(steps) + 1:
            steps.append(line[match.end():])
            tail = []
        elif steps and line.strip() and not tail and not line.startswith(("  ", "\t")) and steps[-1].rstrip()[-1:] \
                not in ".!?:" and line.strip()[:1].islower():
            steps[-1] += " " + line.strip()
        elif steps and line.strip():
            tail.append(line)
    return [clean(s) for s in steps] if len(steps) >= 2 else []


def instructs(step: str) -> bool:
    """Whether a step tells the reader to do something: it starts (after "On the left sidebar," and the like)
    with a verb of action, or it labels sub-steps ("In GitLab:")."""
    text = step.strip().strip("*_\"'").lower()
    for _ in range(2):
        text = _LEADING_CLAUSE.sub("", text, count=1)
    word = re.match(r"[a-z]+(?:-[a-z]+)?", text)
    return bool(word and (word.group() in VERBS or word.group().split("-")[0] in VERBS)) or step.rstrip().endswith(":")


def make_prompt(lead_in: str, headings: list[Block], title: str, text_mode: bool) -> str | None:
    """The question the steps answer: a question just before them, else the "To X:" lead-in, else the heading (or a
    title-like line, in plain text), else the page title; None when there is none of these."""
    last = clean(lead_in.strip().splitlines()[-1]) if lead_in.strip() else ""
    if last.endswith("?"):
        return re.sub(r"^(?:q|question)\s*[:.]\s*", "", last, flags=re.IGNORECASE)
    to = _TO_LEAD_IN.search(clean(lead_in))
    if to and to.group(1).lower() not in ("do this", "do so", "do that", "continue"):
        phrase = to.group(1)
        if not (headings and _POINTING.search(phrase)):
            return f"How do I {phrase}?"
        if _PROBLEM.search(headings[-1].text) or not instructs(headings[-1].text):  # "To resolve this issue:"
            return f"How do I {phrase.split()[0]} \"{headings[-1].text}\"?"
    if text_mode and last and len(last.split()) <= 12 and last[-1] not in ".:;,!":
        return heading_question(last, "")
    if headings:
        parent = heading_question(headings[-2].text, "") if len(headings) > 1 else None
        return heading_question(headings[-1].text, parent or "")
    return heading_question(title, "") if title else None


def heading_question(heading: str, parent: str) -> str:
    """"Cancel an order" -> "How do I cancel an order?"; a question stays as it is; "For a group" under "Create
    comment templates" -> "How do I create comment templates for a group?"."""
    heading = heading.strip().rstrip(".:")
    if heading.endswith("?"):
        return heading
    how_to = re.match(r"how to\s+(.+)", heading, re.IGNORECASE)
    words = heading.split()
    first = words[0].lower() if words else ""
    if how_to:
        phrase = how_to.group(1)
    elif first in _PREPOSITIONS and parent:
        return f"{parent.rstrip('?')} {lower_first(heading)}?"
    elif instructs(heading):
        phrase = lower_first(heading)
    elif first.endswith("ing"):
        phrase = f"go about {lower_first(heading)}"
    else:
        phrase = f"use {lower_first(heading)}"
    return f"How do I {phrase}?"


def first_person(question: str) -> str:
    """The reader's question in the reader's words: "How do I export your statements?" -> "... my statements?"."""
    return re.sub(r"\byour\b", "my", question) if question.startswith("How do I ") else question


def lower_first(text: str) -> str:
    """Lowercase the first word unless it is a name or an acronym (GitLab, SSH, WebAuthn)."""
    word = text.split(" ", 1)[0]
    return text if any(c.isupper() for c in word[1:]) else text[:1].lower() + text[1:]


# ------------------------------------------------------------------------------------------------------- chats
ROLE_COLUMNS = ("role", "sender", "speaker", "author", "from")
TEXT_COLUMNS = ("text", "content", "message", "body")
ID_COLUMNS = ("conversation_id", "conversation", "chat_id", "ticket_id", "ticket", "id")


def _column(header: set[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in header), None)


def read_chats(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(conversation id, [(role, text), ...]) of a chat export: JSON/JSONL with a `messages` list, a CSV with a row
    per message, or a text transcript of `Customer:` / `Agent:` lines (conversations split at `---` lines)."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".txt":
        parts = re.split(r"^\s*(?:-{3,}|={3,})\s*$", text, flags=re.MULTILINE)
        return [(str(k), turns) for k, part in enumerate(parts, 1) if (turns := _transcript_turns(part))]
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        header = {k.strip().lower(): k for k in (rows[0].keys() if rows else [])}
        role, body = header[_column(set(header), ROLE_COLUMNS)], header[_column(set(header), TEXT_COLUMNS)]
        cid = header.get(_column(set(header), ID_COLUMNS) or "")
        chats: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            chats.setdefault(row[cid] if cid else "1", []).append((row[role] or "", row[body] or ""))
        return list(chats.items())
    values = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    values = values if isinstance(values, list) else [values]
    chats = []
    for k, value in enumerate(values, 1):
        messages = value.get("messages") if isinstance(value, dict) else None
        if not isinstance(messages, list):
            raise ValueError(f"{path}: conversation {k} has no 'messages' list")
        cid = str(next((value[key] for key in ID_COLUMNS if value.get(key) is not None), k))
        chats.append((cid, [(str(m.get("role", "")), str(m.get("text", m.get("content", "")) or ""))
                            for m in messages if isinstance(m, dict)]))
    return chats


def _transcript_turns(text: str) -> list[tuple[str, str]]:
    """`Customer: ...` / `Agent: ...` lines as turns (continuation lines join their turn); [] when the text has no
    turns of both sides."""
    roles = "|".join(sorted(CUSTOMER_ROLES | AGENT_ROLES))
    turns: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = re.match(rf"^\s*({roles})\s*:\s*(.*)$", line, re.IGNORECASE)
        if match:
            turns.append((match.group(1), match.group(2)))
        elif turns:
            turns[-1] = (turns[-1][0], turns[-1][1] + "\n" + line)
    sides = {_side(role) for role, _ in turns}
    return turns if sides >= {"customer", "agent"} else []


def _side(role: str) -> str | None:
    role = role.strip().lower()
    return "customer" if role in CUSTOMER_ROLES else "agent" if role in AGENT_ROLES else None


def _chat_text(turns: list[tuple[str, str]]) -> str:
    return "\n".join(f"{_side(role) or role}: {text}" for role, text in turns)


def chat_procedure(turns: list[tuple[str, str]]) -> dict[str, Any] | str:
    """{prompt, response} from the first agent reply with numbered steps and the customer's question before it, or
    the reason there is none."""
    question = ""
    for role, text in turns:
        side = _side(role)
        if side == "customer":
            asked = [s.strip() for s in re.findall(r"[^.!?\n]*\?", text) if s.strip()]
            question = asked[-1] if asked else question
        elif side == "agent":
            blocks, _ = markdown_blocks(text)
            candidates = [numbered_lines(text)] + [candidate_steps(blocks, i)[0] for i in range(len(blocks))]
            for steps in candidates:
                if steps and len(steps) >= 2 and sum(map(instructs, steps)) * 2 >= len(steps):
                    if not question:
                        return "agent steps with no customer question before them"
                    return {"prompt": clean(question[:1].upper() + question[1:]), "response": steps}
    return "no agent reply with numbered steps (a prose answer)"
