"""Collect how-to records from raw sources: help-centre HTML, Markdown manuals, PDF and text files, support chats.

    records, report = collect_file(Path("help/cancel.html"))

A procedure is a question or heading followed by ordered steps: an ordered list, `Step N:` paragraphs, or an agent
reply with numbered lines. Everything else (navigation, footers, bulleted feature lists, tables, code, prose answers,
chats without steps) never becomes a record, and the report says what was skipped and why. Markdown, text and PDF
go through a real Markdown parser and HTML through BeautifulSoup, so that every format meets the same block walker.
Each record carries `source` (file#anchor, page or conversation), `extraction` ("rules" or "llm"), `category` (the
--category flag, else the product's name, else the file's folder) and `passage`: the text it came from as the page
shows it (the section from its heading down to the end of the steps, or the chat), at most PASSAGE_CHARS long, for
reviewers to check the record against. Questions are what a user would ask (see make_procedure, heading_question and
ask): the lead-in's question or "To ...:" phrase, else the heading, with the platform of the tab or heading the steps
sit under and the product ("How do I edit a message in the Zulip mobile app?"), and no two records share a question
unless they share their steps (one_question_each, and collect_inputs across files). Nothing here validates or
redacts: prepare_data.py puts collected records through the same stages as any other input.
"""
from __future__ import annotations

import csv
import html as html_lib
import io
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from bs4 import BeautifulSoup, NavigableString, Tag
from markdown_it import MarkdownIt
from pypdf import PdfReader
from pypdf.errors import PdfReadError

from howto.augment import parse_answer
from howto.llm import ChatClient, LLMError
from howto.pii import redact
from howto.records import json_value
from howto.review import first_object, read_review, review_kind
from howto.runio import RunError, load_yaml, markdown_code, markdown_text

DOCUMENT_SUFFIXES = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf",
                     ".txt": "text"}
SOURCE_KINDS = {*DOCUMENT_SUFFIXES.values(), "chat"}
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
_TAB_SHORTCODE = re.compile(r"\{\{[<%]\s*tab\s+title=\"([^\"]*)\"[^}]*[%>]\}\}")
_TAB_END = re.compile(r"\{\{[<%]\s*/tab\s*[%>]\}\}")
_TITLE_SEPARATOR = re.compile(r"\s+[|\-\u2013\u2014\u00b7\u2022]\s+")
_DOC_WORDS = re.compile(r"\s*\b(?:(?:user|online|official|developer|product|customer)\s+)?(?:help\s*cent(?:re|er)|help|"
                        r"support(?:\s+cent(?:re|er))?|docs|documentation|manual|guide|handbook|knowledge\s*base|"
                        r"faqs?|wiki)\s*$", re.IGNORECASE)
_FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)\r?\n---\r?\n", re.DOTALL)
_NAV_HINT = re.compile(r"(?:^|[-_\s])(?:nav|navbar|navigation|menu|breadcrumbs?|sidebar|toc|footer|cookies?|banner|"
                       r"pagination|related|share|social|skip-link)(?:$|[-_\s])", re.IGNORECASE)
_NOTE = re.compile(r"^(?:note|tip|warning|important|caution)\b\s*:", re.IGNORECASE)
_BLOCK_TAGS = ["p", "div", "section", "article", "main", "ol", "ul", "table", "pre", "h1", "h2", "h3", "h4", "h5",
               "h6", "dl", "details", "blockquote", "figure"]
_NOT_OWN = {"ol", "ul", "pre", "table", "figure", "blockquote", "img"}  # in a step, not part of its text
_DROPPED_TAGS = ["nav", "aside", "footer", "script", "style", "noscript", "form", "template", "svg", "iframe", "button",
                 "select", "head"]
CONTENT_NAMES = {"para": "prose", "list": "bulleted list", "table": "table", "pre": "code", "figure": "figure",
                 "blockquote": "quote"}
_YOU_CAN = re.compile(r"\byou can (?:also )?([a-z][^.!?:;]*)", re.IGNORECASE)
_VERSION = re.compile(r"^(?:v(?:ersion)?\s*\d[\w.]*|\d+(?:\.\d+|\.x)+|(?:version|release)\s+\S+)"
                      r"(?:\s+(?:and|or)\s+(?:later|earlier|newer|older|above|below))?$", re.IGNORECASE)
_SUBJECTS = {"you", "i", "we", "it", "they", "there", "my", "your", "someone", "nothing"}
_PARTICIPLES = {"lost", "stolen", "forgotten", "broken", "missing", "damaged", "wrong", "failed", "blocked", "locked",
                "hacked", "declined", "expired", "delayed", "frozen", "deleted", "disabled", "suspended"}
# Tab and heading labels that name where the steps are done: an app (in the question as "in the ... app") or an
# operating system ("on macOS").
PLATFORMS = {"desktop": "desktop", "mobile": "mobile", "web": "web", "browser": "web", "website": "web",
             "ios": "iOS", "iphone": "iOS", "ipad": "iOS", "ipados": "iOS", "android": "Android",
             "windows": "Windows", "macos": "macOS", "mac": "macOS", "osx": "macOS", "linux": "Linux",
             "chromeos": "ChromeOS"}
SYSTEMS = {"Windows", "macOS", "Linux", "ChromeOS"}
PASSAGE_CHARS = 2000  # the most of a page's text that a record keeps as its passage
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
    kind: str  # "heading", "para", "list", "other" (tables, code, figures: never steps), "variant" (a tab or a
    # labelled bullet opens: its label in `text`) or "end" (it closes)
    text: str = ""
    level: int = 0
    anchor: str = ""
    items: list[str] = field(default_factory=list)
    ordered: bool = False
    shown: str = ""  # the text as the page shows it, for the passage a reviewer checks the record against


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


def collect_inputs(files: list[Path], client: ChatClient | None = None, max_llm_requests: int = 0,
                   product: str = "", category: str = "") -> Collection:
    """Records from the raw sources and review exports among `files`; other files are records, left to the
    record reader. With a `client`, what the rules cannot parse goes to the LLM within `max_llm_requests`.
    `product` and `category` name the product and the category of every collected record (see collect_file).

    One question per procedure holds across files and chats too: a question already asked, with the same steps or
    others, is kept once and the report says so."""
    collection = Collection()
    review_counts: dict[str, int] = {}
    for path in files:
        try:
            collect_one(path, collection, review_counts, client, max_llm_requests, product, category)
        except UnicodeDecodeError as e:
            raise RunError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
        except (ValueError, KeyError, PdfReadError) as e:  # a chat export without messages, a broken PDF
            raise RunError(f"{path}: cannot be read as a raw source: {e}") from None
    collection.report["review"] = review_counts
    asked: dict[str, tuple[str, dict[str, Any]]] = {}
    entries = {entry["file"]: entry for entry in collection.report["files"]}
    kept = []
    for file, where, record in collection.records:
        first = asked.get(question_key(record["prompt"])) if entries[file]["kind"] in SOURCE_KINDS else None
        if first:
            same = first[1]["response"] == record["response"]
            entries[file]["skipped"].append(
                f"{record.get('source') or file}: " + ("same question and steps as " if same else
                                                       "another set of steps for a question asked by ")
                + f"{first[1].get('source') or first[0]}, kept once" + ("" if same else ": review both"))
            entries[file]["procedures"] -= record.get("extraction") == "rules"
            continue
        asked.setdefault(question_key(record["prompt"]), (file, record))
        kept.append((file, where, record))
    collection.records = kept
    return collection


def collect_one(path: Path, collection: Collection, review_counts: dict[str, int], client: ChatClient | None,
                max_llm_requests: int, product: str = "", category: str = "") -> None:
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
        records, report = collect_file(path, client, max_llm_requests - used, product, category)
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


def collect_file(path: Path, client: ChatClient | None = None, max_llm_requests: int = 0, product: str = "",
                 category: str = "") -> tuple[list[dict[str, Any]], FileReport]:
    """Raw records {prompt, response, category, source, extraction, passage} of one raw file, and what was found
    and skipped.

    Questions name the product (`product`, else the one the page names) and the platform of their tab; no two
    share a question unless they share their steps (see one_question_each). The category is `category`, else the
    product's name, else the name of the file's folder. With a `client`, text the rules found no procedure in (a
    section of prose, a chat without numbered steps) is sent, redacted, to the LLM, up to `max_llm_requests`
    requests.
    """
    kind = source_kind(path)
    report = FileReport(str(path), kind or "records")
    folder = category_name(path.resolve().parent.name)
    if kind == "chat":
        label = category or category_name(product) or folder
        records = []
        for cid, turns in read_chats(path):
            source, text = f"{path}#conversation={cid}", _chat_text(turns)
            found = chat_procedures(turns)
            if isinstance(found, str):
                report.skipped.append(f"{source}: {found}")
                records += _ask_llm(client, "a support chat", text, source, report, max_llm_requests, label)
            for prompt, steps in [] if isinstance(found, str) else found:
                records.append({"prompt": prompt, "response": steps, "category": label, "source": source,
                                "extraction": "rules", "passage": passage([text])})
        report.found = sum(r["extraction"] == "rules" for r in records)
        return records, report
    pages = read_document(path, kind)
    if kind == "pdf" and not any(page.blocks for page in pages):
        report.skipped.append(f"{path}: no text layer (an image-only or scanned PDF): run OCR on it first")
        return [], report
    records, procedures, sources = [], [], {}
    named = product or next((page.product for page in pages if page.product), "")
    label = category or category_name(named) or folder
    for number, page in enumerate(pages, 1):
        where = f"{path}#page={number}" if kind == "pdf" else str(path)
        found, skipped, leftovers = document_procedures(page.blocks, page.title, text_mode=kind in ("text", "pdf"))
        for procedure in found:
            sources[id(procedure)] = where if kind == "pdf" else \
                f"{where}#{procedure.anchor}" if procedure.anchor else where
        procedures += found
        report.skipped += [f"{where}: {s}" for s in skipped]
        for anchor, text in leftovers:
            source = where if kind == "pdf" else f"{where}#{anchor}" if anchor else where
            records += _ask_llm(client, "a section of a help page", text, source, report, max_llm_requests, label)
    asked, clashes = one_question_each(procedures, named)
    report.skipped += [f"{path}: {s}" for s in clashes]
    records = [{"prompt": question, "response": p.steps, "category": label, "source": sources[id(p)],
                "extraction": "rules", "passage": p.passage} for question, p in asked] + records
    report.found = len(asked)
    if not records and not report.skipped:
        report.skipped.append(f"{path}: no procedure (no ordered steps under a heading or question)")
    return records, report


def category_name(text: str) -> str:
    """A category as the data writes them: "ShopNow" -> "shopnow", "Help pages" -> "help_pages"."""
    return re.sub(r"[^\w]+", "_", text.lower()).strip("_")


def _ask_llm(client: ChatClient | None, what: str, text: str, source: str, report: FileReport,
             max_requests: int, category: str) -> list[dict[str, Any]]:
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
    return [{**r, "category": category, "source": source, "extraction": "llm", "passage": passage([text])}
            for r in received]


# --------------------------------------------------------------------------------------------------- documents
@dataclass
class Page:
    """One page's blocks, its title and the product or site it documents ("" when the page does not say)."""
    blocks: list[Block]
    title: str
    product: str = ""


def read_document(path: Path, kind: str) -> list[Page]:
    """The pages of a document: one, except for a PDF (one per page, for provenance)."""
    if kind == "pdf":
        reader = PdfReader(path)
        product = product_name(str((reader.metadata or {}).get("/Title") or ""), titled=False)
        return [Page(markdown_blocks(plain_paragraphs(page.extract_text() or ""))[0], path.stem, product)
                for page in reader.pages]
    text = path.read_text(encoding="utf-8-sig")
    if kind == "html":
        return [html_page(text)]
    page = markdown_page(plain_paragraphs(text) if kind == "text" else text)
    page.title = page.title or (path.stem if kind == "text" else "")
    return [page]


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
    """Markdown (or plain text) as blocks, with the title of its front matter (see markdown_page)."""
    page = markdown_page(text)
    return page.blocks, page.title


def markdown_page(text: str) -> Page:
    """Markdown (or plain text, which CommonMark reads as paragraphs and `1.` lists) as a page: blocks, the title of
    its front matter and the product it names. Hugo/Jekyll shortcodes such as {{< alert >}} are markup, not text,
    and go; a {{< tab title="..." >}} becomes a tab panel, so that its steps keep their tab."""
    title, product = "", ""
    front = _FRONT_MATTER.match(text)
    if front:
        try:
            meta = load_yaml(front.group(1))  # a page's aliases are refused like a config's
        except yaml.YAMLError:
            meta = None
        if isinstance(meta, dict):
            title = str(meta.get("title") or "")
            named = next((meta[k] for k in ("product", "site_name", "site", "app") if meta.get(k)), "")
            product = product_name(str(named), titled=False) if named else product_name(title, titled=True)
        text = text[front.end():]
    text = _TAB_SHORTCODE.sub(lambda m: f'\n\n<div data-tab-label="{html_lib.escape(m.group(1))}">\n\n', text)
    text = _TAB_END.sub("\n\n</div>\n\n", text)
    text = _SHORTCODE.sub(lambda m: "\n\n" if "\n" in m.group() else "", text)
    text = re.sub(r"^[ \t]*\{\{[<%].*$", "", text, flags=re.MULTILINE)
    html = MarkdownIt("commonmark").enable("table").render(text)
    body = BeautifulSoup(html, "lxml").body or BeautifulSoup("", "lxml")
    label_tab_panels(body)
    return Page(walk(body), title, product)


def html_page(html: str) -> Page:
    """The main content of an HTML page as blocks (navigation, banners, sidebars and footers left out), its title
    (the <title>, or else the first <h1>) and the site's name (og:site_name, application-name, or the <title>'s
    site part, as in "Orders - ShopNow Help Centre")."""
    soup = BeautifulSoup(html, "lxml")
    title_tag = soup.find("title") or soup.find("h1")
    title = clean(title_tag.get_text()) if title_tag else ""
    site = next((m.get("content") for m in soup.find_all("meta") if m.get("content") and
                 (m.get("property") or m.get("name") or "").lower() in ("og:site_name", "application-name")), "")
    product = product_name(str(site), titled=False) if site else \
        product_name(clean(soup.title.get_text()) if soup.title else "", titled=True)
    label_tab_panels(soup)  # before the tab bars go: they are often styled as navigation
    root = soup.find("main") or soup.find(attrs={"role": "main"}) or \
        max(soup.find_all("article"), key=lambda a: len(a.get_text()), default=None) or soup.body or soup
    dropped = set(_DROPPED_TAGS + (["header"] if root.name in ("body", "[document]") else []))
    stack = [root]  # every tag once, and nothing under a tag that goes
    while stack:
        for tag in [c for c in stack.pop().children if isinstance(c, Tag)]:
            role = str(tag.get("role", "")).lower()
            hints = " ".join([*tag.get("class", []), str(tag.get("id", ""))])
            if tag.name in dropped or (tag.get("data-tab-label") is None and (
                    role in ("navigation", "banner", "contentinfo", "complementary", "search", "tablist", "tab")
                    or _NAV_HINT.search(hints))):
                tag.decompose()
            else:
                stack.append(tag)
    return Page(walk(root), title, product)


def product_name(text: str, titled: bool) -> str:
    """The product or site a page documents, from its site name ("ShopNow Help Centre" -> "ShopNow") or, when
    `titled`, from a title that names it: its site part after a separator ("Orders - ShopNow Help Centre"), or a
    title that is a manual's or a help site's own ("PayLite user manual")."""
    text = clean(text)
    if titled:
        parts = _TITLE_SEPARATOR.split(text)
        if len(parts) == 1 and not _DOC_WORDS.search(text):
            return ""
        text = parts[-1]
    while _DOC_WORDS.search(text):
        text = _DOC_WORDS.sub("", text).strip()
    words = text.split()
    gerund = bool(words) and len(words[0]) > 6 and words[0].lower().endswith("ing")
    if titled and words and (instructs(text) or gerund or not all(w[:1].isupper() or w[:1].isdigit() for w in words)):
        return ""  # "Step 1 - Install the app", "Orders - cancelling and returns", "Help | Troubleshooting": no name
    return text if 0 < len(words) <= 4 else ""


def label_tab_panels(root: Tag) -> None:
    """Mark each tab panel with its tab's label (data-tab-label): ARIA tab panels (labelled by their tab, or the
    tab in the same place of the tab bar beside them), <TabItem label="..."> and panels that share a data-tab-key
    with their tab."""
    keyed = {str(t["data-tab-key"]): clean(t.get_text()) for t in root.find_all(attrs={"data-tab-key": True})
             if t.name in ("li", "button", "a") and clean(t.get_text())}
    for panel in root.find_all(_is_tab_panel):
        label = panel.get("aria-label") or panel.get("label") or panel.get("title") or ""
        if not label and panel.get("aria-labelledby"):
            tab = root.find(id=str(panel["aria-labelledby"]).split()[0])
            label = tab.get_text() if tab else ""
        if not label and panel.get("data-tab-key"):
            label = keyed.get(str(panel["data-tab-key"]), str(panel["data-tab-key"]))
        if not label:
            label = _nth_tab(panel)
        panel["data-tab-label"] = clean(str(label))


def _is_tab_panel(tag: Tag) -> bool:
    return str(tag.get("role", "")).lower() == "tabpanel" or (tag.name == "tabitem" and tag.get("label") is not None) \
        or (tag.get("data-tab-key") is not None and tag.name in ("div", "section"))


def _nth_tab(panel: Tag) -> str:
    """The label of the tab in the panel's place, from the nearest tab bar among the panel's ancestors."""
    panels = [p for p in panel.parent.find_all(recursive=False) if _is_tab_panel(p)] if panel.parent else [panel]
    for ancestor in list(panel.parents)[:3]:
        bar = ancestor.find(attrs={"role": "tablist"})
        if bar:
            tabs = bar.find_all(attrs={"role": "tab"})
            k = panels.index(panel)
            return tabs[k].get_text() if k < len(tabs) else ""
    return ""


def walk(element: Tag) -> list[Block]:
    """Blocks in reading order. An ordered list is one block, its nested lists belonging to their items; the items
    of a bulleted list are walked too, since a numbered procedure may sit under a bullet ("As an administrator:",
    which then labels the procedure as a tab does). A tab panel is walked between a "variant" block that holds its
    label and an "end" block.

    The walk keeps its own stack rather than recursing, and every tag is looked at a bounded number of times, so
    that a page of thousands of nested elements is read in linear time.
    """
    for br in element.find_all("br"):
        br.replace_with("\n")
    holds_block, holds_list = _holding(element)
    texts = ItemTexts()
    blocks: list[Block] = []
    loose: list[str] = []

    def flush() -> None:
        text = "".join(loose).strip()
        if text:
            blocks.append(Block("para", text, shown=_shown(text)))
        loose.clear()

    stack: list[tuple[Iterator[Any], Block | None]] = [(iter(element.children), None)]
    while stack:
        child = next(stack[-1][0], None)
        if child is None:
            flush()
            closing = stack.pop()[1]
            if closing:
                blocks.append(closing)
            continue
        if isinstance(child, NavigableString):
            if type(child) is NavigableString:  # not a comment, doctype or CDATA
                loose.append(str(child))
            continue
        if not isinstance(child, Tag):
            continue
        name, label = child.name, child.get("data-tab-label")
        if label is None and name not in _BLOCK_TAGS and name not in ("li", "dt", "dd", "summary") and \
                id(child) not in holds_block:
            loose.append(child.get_text())
            continue
        flush()
        if label is not None:
            blocks.append(Block("variant", str(label), shown=str(label)))
            stack.append((iter(child.children), Block("end")))
        elif re.fullmatch(r"h[1-6]", name):
            text = clean(child.get_text())
            anchor = child.get("id") or next((a.get("id") or a.get("name") for a in child.find_all("a")
                                              if a.get("id") or a.get("name")), None) or slug(text)
            blocks.append(Block("heading", text, level=int(name[1]), anchor=str(anchor), shown=text))
        elif name == "ol":
            items = child.find_all("li", recursive=False)
            links = all(li.a and clean(li.get_text()) == clean(li.a.get_text()) for li in items)
            blocks.append(Block("list", items=[texts.step(li) for li in items], ordered=not links,  # links: a menu
                                shown=texts.shown(child)))
        elif name == "ul":
            items = child.find_all("li", recursive=False)
            blocks.append(Block("list", items=[texts.step(li) for li in items], shown=texts.shown(child)))
            stack.append((iter([li for li in items if id(li) in holds_list]), None))
        elif name == "li" and texts.own(child).endswith(":") and len(texts.own(child).split()) <= 12:
            blocks.append(Block("variant", texts.own(child).rstrip(":").strip(), shown=""))
            stack.append((iter(child.children), Block("end")))
        elif name in ("p", "summary", "dt"):
            text = child.get_text().strip()
            if text:
                blocks.append(Block("para", text, shown=_shown(text)))
        elif name in ("table", "pre", "figure", "blockquote"):
            blocks.append(Block("other", name, shown=child.get_text("\n" if name == "pre" else " ").strip()))
        else:
            stack.append((iter(child.children), None))
    return blocks


def _holding(root: Tag) -> tuple[set[int], set[int]]:
    """The ids of the tags under `root` that hold a block tag, and of those that hold a list, found in one pass from
    the innermost tags out (a tag comes after all of its descendants in reversed document order)."""
    block_tags = set(_BLOCK_TAGS)
    holds_block: set[int] = set()
    holds_list: set[int] = set()
    for tag in reversed(root.find_all(True)):
        if tag.name in block_tags or id(tag) in holds_block:
            holds_block.add(id(tag.parent))
        if tag.name in ("ol", "ul") or id(tag) in holds_list:
            holds_list.add(id(tag.parent))
    return holds_block, holds_list


def _shown(text: str) -> str:
    """A paragraph as the page shows it: its lines, each with its spaces collapsed."""
    return "\n".join(line for line in (re.sub(r"\s+", " ", part).strip() for part in text.splitlines()) if line)


class ItemTexts:
    """Each list item's own text and its text as a step, worked out once per item and without recursion, so that
    deeply nested lists cost linear time.

    A step is the item's own text: nested lists, code, tables, images, notes and the lines that introduce them
    belong to the step, not beside it, so they are left out; an item that only labels its nested list ("In
    GitLab:") takes the nested items in."""

    def __init__(self) -> None:
        self.owns: dict[int, str] = {}
        self.steps: dict[int, str] = {}
        self.shown_items: set[int] = set()

    def own(self, li: Tag) -> str:
        if id(li) not in self.owns:
            self.owns[id(li)] = _own_text(li)
        return self.owns[id(li)]

    def shown(self, listing: Tag) -> str:
        """A list as the page shows it: an item a line, numbered or bulleted, nested lists indented under their
        item, code and notes kept. A list nested in one already shown is left out (its lines are there)."""
        items = listing.find_all("li", recursive=False)
        if any(id(li) in self.shown_items for li in items):
            return ""
        lines: list[str] = []
        stack = [(li, 0, k) for k, li in reversed(list(enumerate(items, 1)))]
        while stack:
            li, depth, number = stack.pop()
            self.shown_items.add(id(li))
            marker = f"{number}." if li.parent is not None and li.parent.name == "ol" else "-"
            lines.append(f"{'   ' * depth}{marker} {_own_text(li, skip=('ol', 'ul'), notes=True)}")
            for sub in reversed(li.find_all(["ol", "ul"], recursive=False)):
                stack += [(n, depth + 1, k) for k, n in reversed(list(enumerate(sub.find_all("li", recursive=False),
                                                                               1)))]
        return "\n".join(lines)

    def step(self, li: Tag) -> str:
        if id(li) not in self.steps:
            for item in reversed([li, *li.find_all("li")]):  # the innermost items first
                if id(item) in self.steps:
                    continue
                own = self.own(item)
                nested = [self.steps[id(n)] for sub in item.find_all(["ol", "ul"], recursive=False)
                          for n in sub.find_all("li", recursive=False)] if own.endswith(":") else []
                if nested:
                    own = " ".join([own, *(n if n.endswith((".", "!", "?", ":")) else n + "." for n in nested if n)])
                self.steps[id(item)] = own
        return self.steps[id(li)]


def _own_text(item: Tag, skip: Iterable[str] = _NOT_OWN, notes: bool = False) -> str:
    """An item's text without its nested lists, code, tables, figures, quotes and images (the `skip` tags), without
    its notes and without the lead-in lines of what was left out (a later paragraph ending in ":"), unless `notes`."""
    skip = set(skip)
    parts: list[str] = []
    paragraphs = 0
    stack: list[tuple[Iterator[Any], int, int]] = [(iter(item.children), -1, -1)]  # children, start, paragraph no.
    while stack:
        node = next(stack[-1][0], None)
        if node is None:
            _, start, k = stack.pop()
            if start >= 0:
                text = "".join(parts[start:]).strip()
                if not notes and (_NOTE.match(text) or (k and text.endswith(":"))):
                    del parts[start:]
                else:
                    parts.append("\n")
            continue
        if isinstance(node, NavigableString):
            if type(node) is NavigableString:
                parts.append(str(node))
        elif isinstance(node, Tag) and node.name not in skip:
            if node.name in ("p", "div"):
                stack.append((iter(node.children), len(parts), paragraphs))
                paragraphs += 1
            else:
                stack.append((iter(node.children), -1, -1))
    return clean("".join(parts))


def clean(text: str) -> str:
    """One line of plain text: markup gone, labels kept verbatim, whitespace collapsed."""
    text = re.sub(r"\s+", " ", _SHORTCODE.sub("", text))
    text = re.sub(r"\s*\(\s*\)", "", text)
    return re.sub(r"\s+([.,:;!?])", r"\1", text).strip()


def slug(text: str) -> str:
    return re.sub(r"[^\w]+", "-", text.lower()).strip("-")


# -------------------------------------------------------------------------------------------------- procedures
@dataclass
class Procedure:
    """Steps found on a page, with what their question is made of: the question that the lead-in, the heading or
    the title asks, the labels of the tabs, bullets or headings they sit under, and the passage they came from."""
    question: str
    steps: list[str]
    anchor: str
    passage: str
    platforms: list[str] = field(default_factory=list)  # labels that name a platform: always in the question
    labels: list[str] = field(default_factory=list)  # other labels: in the question when needed to tell apart
    versions: list[str] = field(default_factory=list)  # version headings: always in the question
    alternative: str = ""  # the question of a "You can also ..." lead-in, to tell two procedures apart


def document_procedures(blocks: list[Block], title: str, text_mode: bool = False
                        ) -> tuple[list[Procedure], list[str], list[tuple[str, str]]]:
    """Each procedure, the candidates passed over with the reason, and the prose of each section that held no
    procedure (anchor, text), for the LLM to read when asked to."""
    found, skipped = [], []
    headings: list[Block] = []  # the open headings, outermost first
    variants: list[str] = []  # the labels of the open tabs and labelled bullets, outermost first
    section_start = 0  # the block where the current section starts, for the passage
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
            section_start = i
        elif block.kind == "variant":
            variants.append(block.text)
        elif block.kind == "end":
            variants = variants[:-1]
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
        procedure = make_procedure(lead_in, headings, variants, title, text_mode)
        if len(steps) < 2:
            skipped.append(f"{where}: a list of one step is not a procedure")
        elif sum(map(instructs, steps)) * 2 < len(steps):
            skipped.append(f"{where}: numbered list that describes rather than instructs "
                           f"(\"{steps[0][:60]}\", ...)")
        elif procedure is None:
            skipped.append(f"{where}: steps with no heading or question before them")
        else:
            procedure.steps, procedure.anchor = steps, anchor
            procedure.passage = passage([b.shown for b in blocks[section_start:end]])
            found.append(procedure)
        has_procedure.add(anchor)  # a section with steps, kept or skipped, is accounted for
        i = end
    skipped += [f"{f'#{a}' if a else 'top of the page'}: no steps ({', '.join(sorted(kinds))})"
                for a, kinds in content.items() if a not in has_procedure]
    leftovers = [(a, "\n\n".join(p)) for a, p in prose.items() if a not in has_procedure and len(" ".join(p)) > 80]
    return found, skipped, leftovers


def passage(parts: list[str]) -> str:
    """The text a record came from, as the page shows it, at most PASSAGE_CHARS long: the section's heading and
    what follows it down to the end of the steps; when that is too long, the blocks nearest the steps are kept."""
    parts = [p for p in parts if p]
    head, rest = parts[:1], parts[1:]
    while rest and len("\n\n".join(head + ["…"] + rest)) > PASSAGE_CHARS and len(rest) > 1:
        rest = rest[1:]
    text = "\n\n".join(head + (["…"] if len(rest) < len(parts) - 1 else []) + rest)
    return text if len(text) <= PASSAGE_CHARS else text[:PASSAGE_CHARS - 1].rstrip() + "…"


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
    return bool(word and is_verb(word.group())) or step.rstrip().endswith(":")


def is_verb(word: str) -> bool:
    """A verb of action, also with un- or re- before it ("unstar", "reconnect") or a hyphenated tail."""
    word = word.lower()
    return any(w in VERBS or (w[:2] in ("un", "re") and w[2:] in VERBS) for w in (word, word.split("-")[0]))


# ------------------------------------------------------------------------------------------------------ questions
def make_procedure(lead_in: str, headings: list[Block], variants: list[str], title: str,
                   text_mode: bool) -> Procedure | None:
    """What the question of the steps is made of: a question just before them, else the "To X:" lead-in, else the
    heading (or a title-like line, in plain text), else the page title; None when there is none of these. The open
    tabs and labelled bullets, and a heading that only names a platform or a version, qualify the question."""
    procedure = Procedure("", [], "", "", platforms=[v for v in variants if is_platform(v)],
                          labels=[v for v in variants if not is_platform(v)])
    you_can = _YOU_CAN.search(clean(lead_in))
    if you_can and is_verb(you_can.group(1).split()[0]):
        procedure.alternative = first_person(f"How do I {you_can.group(1)}?")
    last = clean(lead_in.strip().splitlines()[-1]) if lead_in.strip() else ""
    to = _TO_LEAD_IN.search(clean(lead_in))
    to = to if to and to.group(1).lower() not in ("do this", "do so", "do that", "continue") else None
    if last.endswith("?"):
        procedure.question = re.sub(r"^(?:q|question)\s*[:.]\s*", "", last, flags=re.IGNORECASE)
    elif to and not (headings and _POINTING.search(to.group(1))):
        procedure.question = f"How do I {to.group(1)}?"
    elif to and (_PROBLEM.search(headings[-1].text) or not instructs(headings[-1].text)):  # "To resolve this issue:"
        procedure.question = f"How do I {to.group(1).split()[0]} \"{headings[-1].text}\"?"
    elif text_mode and last and len(last.split()) <= 12 and last[-1] not in ".:;,!":
        procedure.question = heading_question(last, "")
    elif headings:
        names = [h.text for h in headings]
        # headings that only name a platform or a version ("Mobile", "Version 2") qualify the one above them, or
        # the page's title
        while names and (is_platform(names[-1]) or _VERSION.match(names[-1])) and (len(names) > 1 or title):
            label = names.pop()
            (procedure.platforms if is_platform(label) else procedure.versions).insert(0, label)
        topic = names[-1] if names else title
        procedure.question = heading_question(topic, names[-2] if len(names) > 1 else title if names else "")
    elif title:
        procedure.question = heading_question(title, "")
    else:
        return None
    procedure.question = first_person(procedure.question)
    return procedure


def heading_question(heading: str, parent: str) -> str:
    """The question a heading asks, in the words a user would use:
    "Cancel an order" -> "How do I cancel an order?"; "Unstar all messages" -> "How do I unstar all messages?";
    "Export of public data" -> "How do I export public data?"; "Clearing the cache" -> "How do I clear the cache?";
    a question stays as it is; "For a group" under "Create comment templates" -> "How do I create comment templates
    for a group?"; "Homebrew" under "Install the app" -> "How do I install the app with Homebrew?"; "You don't have
    the app installed" -> "What do I do if I don't have the app installed?"; "Forgotten password" -> "What do I do
    about a forgotten password?"; any other noun -> "How do I use SSH keys?".
    """
    heading = heading.strip().rstrip(".:")
    if heading.endswith("?"):
        return heading
    how_to = re.match(r"how to\s+(.+)", heading, re.IGNORECASE)
    words = heading.split()
    first = words[0].lower() if words else ""
    parent_question = heading_question(parent, "") if parent else ""
    parent_does = parent_question.startswith("How do I ") and not parent_question.startswith("How do I use ")
    if how_to:
        return f"How do I {how_to.group(1)}?"
    if first in _PREPOSITIONS and parent_question:
        return f"{parent_question.rstrip('?')} {lower_first(heading)}?"
    if first in _SUBJECTS:  # a situation: "You don't have the app installed"
        return f"What do I do if {first_person_clause(lower_first(heading))}?"
    if is_verb(first) and len(words) > 1 and words[1].lower() == "of":  # "Export of public data"
        return f"How do I {first.lower()} {' '.join(words[2:])}?"
    if instructs(heading):
        return f"How do I {lower_first(heading)}?"
    if _PROBLEM.search(heading):  # "Deploy key cannot push to a protected branch"
        return f"What do I do if {first_person_clause(lower_first(heading))}?"
    verb = gerund_verb(first)
    if verb:
        return f"How do I {verb} {' '.join(words[1:])}".rstrip() + "?"
    if first in _PARTICIPLES:  # "Forgotten password", "Locked account"
        article = "" if words[-1].lower().endswith("s") else "an " if first[0] in "aeiou" else "a "
        return f"What do I do about {article}{lower_first(heading)}?"
    if first.endswith("ing"):
        return f"How do I go about {lower_first(heading)}?"
    if parent_does and len(words) <= 3:  # a method under a task: "Homebrew" under "Install the app"
        return f"{parent_question.rstrip('?')} with {heading}?"
    return f"How do I use {lower_first(heading)}?"


def gerund_verb(word: str) -> str:
    """The verb of a gerund ("clearing" -> "clear", "using" -> "use", "setting" -> "set"), or ""."""
    word = word.lower()
    if not word.endswith("ing") or len(word) < 5:
        return ""
    stem = word[:-3]
    for verb in (stem, stem + "e", stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else ""):
        if verb and is_verb(verb):
            return verb
    return ""


def first_person(question: str) -> str:
    """The reader's question in the reader's words: "How do I export your statements?" -> "... my statements?"."""
    return re.sub(r"\byour\b", "my", question) if question.startswith(("How do I ", "What do I ")) else question


def first_person_clause(text: str) -> str:
    """A clause addressed to the reader, in the reader's words: "you don't have your app" -> "I don't have my app"."""
    for you, me in (("you're", "I'm"), ("you've", "I've"), ("you", "I"), ("your", "my"), ("yours", "mine")):
        text = re.sub(rf"\b{re.escape(you)}\b", me, text, flags=re.IGNORECASE)
    return text


def lower_first(text: str) -> str:
    """Lowercase the first word unless it is a name or an acronym (GitLab, SSH, WebAuthn)."""
    word = text.split(" ", 1)[0]
    return text if any(c.isupper() for c in word[1:]) else text[:1].lower() + text[1:]


def platform_parts(label: str) -> tuple[list[str], list[str]]:
    """The apps and the operating systems a tab or heading label names, when it names nothing else:
    "Desktop/Web" -> (["desktop", "web"], []); "macOS" -> ([], ["macOS"]); "Homebrew" -> ([], [])."""
    words = [w for w in re.split(r"\s*(?:/|&|,|\+|\band\b|\bor\b)\s*|\s+", label.strip().lower()) if w]
    words = [w for w in words if w not in ("app", "apps", "application", "client", "version")]
    if not words or any(w not in PLATFORMS for w in words):
        return [], []
    apps = [PLATFORMS[w] for w in words if PLATFORMS[w] not in SYSTEMS]
    return list(dict.fromkeys(apps)), list(dict.fromkeys(PLATFORMS[w] for w in words if PLATFORMS[w] in SYSTEMS))


def is_platform(label: str) -> bool:
    return any(platform_parts(label))


def ask(procedure: Procedure, product: str, with_labels: bool = False) -> str:
    """The procedure's question with its platform, version, product (and, `with_labels`, its tab or bullet labels):
    "How do I edit a message?" on a Mobile tab of the Zulip help -> "How do I edit a message in the Zulip mobile
    app?"; "How do I cancel an order?" on ShopNow's help centre -> "How do I cancel an order in ShopNow?"."""
    body = procedure.question.rstrip().rstrip("?").rstrip()
    named = bool(product) and re.search(rf"\b{re.escape(product)}\b", body, re.IGNORECASE) is not None
    for label in procedure.labels if with_labels else []:
        first = label.split()[0].lower()
        body += f" {lower_first(label)}" if first in _PREPOSITIONS or first == "as" else f" with {label}"
    body += "".join(f" in {lower_first(v)}" for v in procedure.versions)
    apps = [a for p in procedure.platforms for a in platform_parts(p)[0]]
    systems = [s for p in procedure.platforms for s in platform_parts(p)[1]]
    if apps:
        body += f" in the {product + ' ' if product and not named else ''}{' or '.join(dict.fromkeys(apps))} app"
    elif product and not named:
        body += f" in {product}"
    if systems:
        body += f" on {' or '.join(dict.fromkeys(systems))}"
    return body + "?"


def one_question_each(procedures: list[Procedure], product: str) -> tuple[list[tuple[str, Procedure]], list[str]]:
    """(question, procedure) for each procedure, so that no two share a question unless they share their steps:
    two with the same question and different steps get their tab or bullet labels in it, else the question of
    their "You can also ..." lead-in; true duplicates (same question, same steps) are kept once. What is still
    ambiguous is kept once too, and the report says so for a reviewer to look at."""
    asked = [ask(p, product) for p in procedures]
    for attempt in ("labels", "alternative"):
        clashes = _clashing(asked, procedures)
        for k in clashes:
            p = procedures[k]
            if attempt == "labels" and p.labels:
                asked[k] = ask(p, product, with_labels=True)
            elif attempt == "alternative" and p.alternative:
                asked[k] = ask(replace(p, question=p.alternative, alternative=""), product, with_labels=True)
    kept: dict[str, int] = {}
    found, skipped = [], []
    for k, (question, p) in enumerate(zip(asked, procedures)):
        if question_key(question) in kept:
            first = procedures[kept[question_key(question)]]
            same = first.steps == p.steps
            skipped.append(f"#{p.anchor or 'top of the page'}: " + (
                f"same question and steps as #{first.anchor}, kept once" if same else
                f"another set of steps for \"{question}\" (kept those under #{first.anchor}): review both"))
            continue
        kept[question_key(question)] = k
        found.append((question, p))
    return found, skipped


def _clashing(asked: list[str], procedures: list[Procedure]) -> list[int]:
    """The procedures whose question another procedure with other steps asks too."""
    steps: dict[str, set[tuple[str, ...]]] = {}
    for question, p in zip(asked, procedures):
        steps.setdefault(question_key(question), set()).add(tuple(p.steps))
    return [k for k, question in enumerate(asked) if len(steps[question_key(question)]) > 1]


def question_key(question: str) -> str:
    """A question as normalisation leaves it (case and punctuation gone): two that differ only there are one."""
    return " ".join(re.findall(r"\w+", question.lower()))


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
    values = [(1, json_value(path, text, 1, "a conversation"))] if suffix == ".json" else \
        [(n, json_value(path, line, n, "a conversation"))
         for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if suffix == ".json" and isinstance(values[0][1], list):
        values = [(1, value) for value in values[0][1]]
    chats = []
    for k, (line, value) in enumerate(values, 1):
        messages = value.get("messages") if isinstance(value, dict) else None
        if not isinstance(messages, list):
            where = f"line {line}" if suffix == ".jsonl" else f"conversation {k}"
            raise RunError(f"{path}: {where}: conversation {k} has no 'messages' list")
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


def chat_procedures(turns: list[tuple[str, str]]) -> list[tuple[str, list[str]]] | str:
    """(question, steps) for each agent reply with numbered steps, with the customer's question before it (a
    conversation, or a CSV export with no conversation ids, may hold several), or the reason there is none."""
    question, found, reason = "", [], "no agent reply with numbered steps (a prose answer)"
    for role, text in turns:
        side = _side(role)
        if side == "customer":
            asked = [s.strip() for s in re.findall(r"[^.!?\n]*\?", text) if s.strip()]
            question = asked[-1] if asked else question
        elif side == "agent":
            blocks, _ = markdown_blocks(text)
            candidates = [numbered_lines(text)] + [candidate_steps(blocks, i)[0] for i in range(len(blocks))]
            steps = next((s for s in candidates if s and len(s) >= 2 and sum(map(instructs, s)) * 2 >= len(s)), None)
            if steps and not question:
                reason = "agent steps with no customer question before them"
            elif steps:
                found.append((clean(question[:1].upper() + question[1:]), steps))
                question = ""
    return found or reason
