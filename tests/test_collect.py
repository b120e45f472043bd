"""Rule-based and LLM extraction of how-to records from raw sources, on pages written to be full of traps."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from chat_server import chat_server
from howto.collect import collect_file, collect_inputs, collected_section, heading_question, source_kind
from howto.llm import ChatClient

ROOT = Path(__file__).resolve().parents[1]

HELP_PAGE = """<!DOCTYPE html>
<html><head><title>Help - ShopNow</title><script>var steps = ["1. not a step"];</script></head>
<body>
<header><nav><ol><li><a href="/">Home</a></li><li><a href="/orders">Orders</a></li></ol></nav></header>
<div class="sidebar-menu"><h3>Popular</h3><ol><li>Track a parcel</li><li>Refunds</li></ol></div>
<main>
  <h1>Orders</h1>
  <h2 id="cancel">Cancel an order</h2>
  <p>You can cancel until the order ships.</p>
  <ol>
    <li>Open the app and sign in.</li>
    <li>Go to <strong>Account &gt; Orders</strong>.</li>
    <li>Tap the order.
      <ul><li>Shipped orders cannot be cancelled.</li><li>Grey badge: shipped.</li></ul>
      <p>Note: cancelled orders stay in the list.</p>
    </li>
    <li>Tap <b>Cancel order</b>, then <em>Confirm</em>.</li>
  </ol>
  <p>The refund takes 5 days.</p>
  <p><strong>How do I reset my password?</strong></p>
  <ol><li>On the sign-in screen, tap <a href="#">Forgot password?</a></li><li>Enter your email.</li>
      <li>Follow the link in the email.</li></ol>
  <h2>Return an item</h2>
  <p>Step 1: Open <b>Account &gt; Orders</b>.</p>
  <p>Step 2: Tap <b>Return</b>.</p>
  <p>Step 3: Print the label.</p>
  <p>Returns are free.</p>
  <h2>Features</h2>
  <ul><li>Free delivery</li><li>Easy returns</li><li>24/7 support</li></ul>
  <h2>Fees</h2>
  <table><tr><td>1. Standard</td><td>3 EUR</td></tr><tr><td>2. Express</td><td>9 EUR</td></tr></table>
  <h2>Can I pay cash?</h2>
  <p>No, we take cards and PayLite only. Payment is taken when the order ships, never before.</p>
  <h2>How we pick your parcel</h2>
  <ol><li>The warehouse receives your order.</li><li>A packer scans each item.</li><li>The courier collects it.</li></ol>
</main>
<footer><ol><li><a href="/privacy">Privacy</a></li><li><a href="/terms">Terms</a></li></ol></footer>
</body></html>
"""

MANUAL = """---
title: PayLite manual
---

{{< details >}}
- Tier: Free
{{< /details >}}

1. Unzip the archive.
1. Run the installer.

## Freeze a card

{{< alert type="note" >}}
Frozen cards can be unfrozen at any time.
{{< /alert >}}

To freeze your card:

1. Tap **Cards** ({{< icon name="card" >}}).
1. **On your phone**:
   1. Open *Settings*.
   1. Tap `Security`.
1. Select the card.

   For business cards:

   ```shell
   paylite freeze --business
   ```

   - Frozen cards show a blue border.
1. Tap **Freeze**.

### For a business account

1. Open **Business > Cards**.
1. Tap **Freeze all**.

## Account types

- Personal:
  1. Free.
  1. One card.

| Plan | Cards |
|---|---|
| Free | 1 |

## Send money

- As a personal user:

  1. Tap **Transfers**.
  1. Tap **New**.
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def by_prompt(records: list[dict]) -> dict[str, list[str]]:
    return {r["prompt"]: r["response"] for r in records}


def test_html_main_content_only_with_labels_verbatim(tmp_path):
    records, report = collect_file(write(tmp_path / "help.html", HELP_PAGE))
    got = by_prompt(records)
    assert got == {
        "How do I cancel an order in ShopNow?": ["Open the app and sign in.", "Go to Account > Orders.",
                                                 "Tap the order.", "Tap Cancel order, then Confirm."],
        "How do I reset my password in ShopNow?": ["On the sign-in screen, tap Forgot password?",
                                                   "Enter your email.", "Follow the link in the email."],
        "How do I return an item in ShopNow?": ["Open Account > Orders.", "Tap Return.", "Print the label."],
    }
    # navigation, sidebar, footer, scripts, feature lists, tables and prose answers never become records
    text = json.dumps([[r["prompt"], r["response"]] for r in records])
    for trap in ("Home", "Track a parcel", "Privacy", "not a step", "Free delivery", "Standard", "cards and PayLite",
                 "Shipped orders", "refund", "Returns are free", "Note"):
        assert trap not in text
    assert records[0]["source"] == f"{tmp_path / 'help.html'}#cancel"
    assert records[2]["source"] == f"{tmp_path / 'help.html'}#return-an-item"
    assert {r["extraction"] for r in records} == {"rules"} and {r["category"] for r in records} == {"shopnow"}
    assert records[0]["passage"].startswith("Cancel an order\n\nYou can cancel until the order ships.\n\n1. Open")
    assert "Shipped orders cannot be cancelled" in records[0]["passage"]  # as the page shows it, sub-bullets too
    assert report.found == 3
    reasons = [s.split(": ", 1)[1] for s in report.skipped]
    assert "#features: no steps (bulleted list)" in reasons and "#fees: no steps (table)" in reasons
    assert "#can-i-pay-cash: no steps (prose)" in reasons
    assert any("describes rather than instructs" in s and "warehouse" in s for s in reasons)


def test_a_page_without_main_keeps_its_content_and_drops_link_lists(tmp_path):
    page = ("<html><body><div class='top'><ol><li><a href='/'>Home</a></li><li><a href='/help'>Help</a></li></ol>"
            "</div><div id='content'><h2>Pair headphones</h2><ol><li>Turn on <b>Bluetooth</b>.</li>"
            "<li>Hold the pairing button.</li><li>Tap <a href='#'>Headphones</a> in the list.</li></ol></div>"
            "<div><h4>Links</h4><ol><li><a href='/a'>Warranty</a></li><li><a href='/b'>Manuals</a></li></ol></div>"
            "</body></html>")
    records, report = collect_file(write(tmp_path / "page.html", page))
    assert by_prompt(records) == {"How do I pair headphones?": ["Turn on Bluetooth.", "Hold the pairing button.",
                                                                "Tap Headphones in the list."]}
    assert "page.html: #links: no steps (bulleted list)" in " ".join(report.skipped)


def test_markdown_front_matter_shortcodes_and_nested_steps(tmp_path):
    records, report = collect_file(write(tmp_path / "manual.md", MANUAL))
    got = by_prompt(records)
    assert got["How do I use PayLite manual?"] == ["Unzip the archive.", "Run the installer."]  # before any heading
    assert got["How do I freeze my card in PayLite?"] == [
        "Tap Cards.", "On your phone: Open Settings. Tap Security.", "Select the card.", "Tap Freeze."]
    assert got["How do I freeze a card for a business account in PayLite?"] == ["Open Business > Cards.",
                                                                                "Tap Freeze all."]
    assert got["How do I send money in PayLite?"] == ["Tap Transfers.", "Tap New."]  # a numbered list under a bullet
    assert len(records) == 4  # the bulleted "Account types" list and its numbered facts, and the table, are not
    assert records[1]["source"].endswith("manual.md#freeze-a-card")
    assert not any("{{" in s or "paylite freeze" in s or "blue border" in s for r in records for s in r["response"])


@pytest.mark.parametrize("heading, parent, question", [
    ("Cancel an order", "", "How do I cancel an order?"),
    ("How to export your data", "", "How do I export your data?"),
    ("Can I pay cash?", "", "Can I pay cash?"),
    ("For a group", "Create templates", "How do I create templates for a group?"),
    ("Clearing the cache", "", "How do I clear the cache?"),
    ("Troubleshooting", "", "How do I go about troubleshooting?"),
    ("SSH keys", "", "How do I use SSH keys?"),
    ("Unstar all messages", "", "How do I unstar all messages?"),
    ("Export of public data", "", "How do I export public data?"),
    ("You don't have the app installed", "", "What do I do if I don't have the app installed?"),
    ("Forgotten password", "", "What do I do about a forgotten password?"),
    ("Homebrew", "Install the app", "How do I install the app with Homebrew?"),
])
def test_headings_become_questions(heading, parent, question):
    assert heading_question(heading, parent) == question


def test_plain_text_and_pdf_pages(tmp_path):
    text = "Reset the router\n1. Unplug the router.\n2. Wait ten seconds.\n3. Plug it back in.\n\nThat is all.\n"
    records, _ = collect_file(write(tmp_path / "faq.txt", text))
    assert by_prompt(records) == {"How do I reset the router?": ["Unplug the router.", "Wait ten seconds.",
                                                                 "Plug it back in."]}
    pdf = write_pdf(tmp_path / "manual.pdf", [["Welcome to the SmartHub manual."],
                                              ["Pair a sensor", "1. Hold the sensor button for 5 seconds.",
                                               "2. Open the SmartHub app and tap Add device.", "3. Tap Confirm.",
                                               "Sensors pair within a minute."]])
    records, report = collect_file(pdf)
    assert by_prompt(records) == {"How do I pair a sensor?": ["Hold the sensor button for 5 seconds.",
                                                              "Open the SmartHub app and tap Add device.",
                                                              "Tap Confirm."]}
    assert records[0]["source"] == f"{pdf}#page=2" and report.kind == "pdf"


CHATS = [
    {"id": "c1", "messages": [
        {"role": "customer", "text": "Hi! How do I change my delivery address? Thanks"},
        {"role": "agent", "text": "Sure:\n1. Go to Account > Addresses.\n2. Tap Edit.\n3. Save the new address.\n"
                                  "Anything else I can do?"}]},
    {"id": "c2", "messages": [
        {"role": "user", "content": "Do you ship to Norway?"},
        {"role": "assistant", "content": "Yes, we ship to Norway in 3 to 5 days, and the fee is 9 EUR."}]},
    {"id": "c3", "messages": [
        {"role": "agent", "text": "Hello, how can I help?"},
        {"role": "customer", "text": "how can I turn off notifications?"},
        {"role": "agent", "text": "1) Open Settings.\n2) Tap Notifications.\n3) Switch off Push."}]},
]


def test_chat_exports_in_every_format(tmp_path):
    jsonl = write(tmp_path / "chats.jsonl", "".join(json.dumps(c) + "\n" for c in CHATS))
    records, report = collect_file(jsonl)
    assert by_prompt(records) == {
        "How do I change my delivery address?": ["Go to Account > Addresses.", "Tap Edit.", "Save the new address."],
        "How can I turn off notifications?": ["Open Settings.", "Tap Notifications.", "Switch off Push."]}
    assert [r["source"] for r in records] == [f"{jsonl}#conversation=c1", f"{jsonl}#conversation=c3"]
    assert report.skipped == [f"{jsonl}#conversation=c2: no agent reply with numbered steps (a prose answer)"]

    assert by_prompt(collect_file(write(tmp_path / "one.json", json.dumps(CHATS[0])))[0]) == by_prompt(records[:1])
    rows = "conversation_id,role,text\n" + "".join(
        f'{c["id"]},{m["role"]},"{m.get("text", m.get("content"))}"\n' for c in CHATS for m in c["messages"])
    assert by_prompt(collect_file(write(tmp_path / "chats.csv", rows))[0]) == by_prompt(records)
    transcript = ("Customer: Hi, how do I change my delivery address?\nAgent: Sure:\n1. Go to Account > Addresses.\n"
                  "2. Tap Edit.\n3. Save the new address.\n---\nCustomer: Do you ship to Norway?\nAgent: Yes.\n")
    txt = write(tmp_path / "transcript.txt", transcript)
    assert source_kind(txt) == "chat"
    records, report = collect_file(txt)
    assert by_prompt(records) == by_prompt(records[:1]) and len(records) == 1 and len(report.skipped) == 1


def test_records_files_are_left_to_the_record_reader(tmp_path):
    records = write(tmp_path / "records.jsonl", json.dumps({"prompt": "How?", "response": ["a", "b"]}) + "\n")
    sheet = write(tmp_path / "records.csv", "prompt,steps\nHow?,\"a\nb\"\n")
    assert source_kind(records) is None and source_kind(sheet) is None
    collection = collect_inputs([records, sheet, write(tmp_path / "help.html", HELP_PAGE)])
    assert collection.files == {str(tmp_path / "help.html")} and len(collection.of(tmp_path / "help.html")) == 3
    section = "\n".join(collected_section(collection.report))
    assert "## Collected" in section and "| html | 3 | 4 | 0 |" in section and "warehouse" in section


def test_llm_reads_what_the_rules_cannot_and_sees_no_sensitive_text(tmp_path):
    prose = ("<main><h2>Update your billing email</h2><p>Open the billing page from the account menu and change "
             "the address there (for example from jane.doe@example.com), then save it; a confirmation follows."
             "</p></main>")
    answers = iter([json.dumps({"records": [{"prompt": "How do I update my billing email?",
                                             "response": ["Open the billing page.", "Change the address.",
                                                          "Save it."]}]}), "not json"])
    with chat_server(lambda body: next(answers)) as (url, received):
        client = ChatClient(url, "test-model", max_retries=0)
        records, report = collect_file(write(tmp_path / "prose.html", prose), client, max_llm_requests=5)
        assert records == [{"prompt": "How do I update my billing email?",
                            "response": ["Open the billing page.", "Change the address.", "Save it."],
                            "category": tmp_path.name.lower(), "extraction": "llm",
                            "source": f"{tmp_path / 'prose.html'}#update-your-billing-email",
                            "passage": records[0]["passage"]}]
        assert records[0]["passage"].startswith("Open the billing page from the account menu")
        sent = received[0]["body"]["messages"][1]["content"]
        assert "billing page" in sent and "jane.doe@example.com" not in sent and "[EMAIL]" in sent
        chats = write(tmp_path / "chats.jsonl", json.dumps(CHATS[1]) + "\n")
        records, report = collect_file(chats, client, max_llm_requests=5)
        assert records == [] and any("not the JSON asked for" in s for s in report.skipped)
        records, report = collect_file(chats, client, max_llm_requests=0)
        assert len(received) == 2 and any("max-requests reached" in s for s in report.skipped)


def write_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A real PDF with a text layer (Helvetica, one line per text row), as a PDF manual's page would have."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        shown = " T* ".join("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj"
                            for line in lines)
        stream = f"BT /F1 11 Tf 14 TL 72 720 Td {shown} ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


def test_sample_raw_sources_give_records(tmp_path):
    collection = collect_inputs(sorted((ROOT / "data" / "raw").iterdir()))
    prompts = [r["prompt"] for _, _, r in collection.records]
    assert "How do I cancel an order in ShopNow?" in prompts and "How do I freeze a lost card in PayLite?" in prompts
    assert len(collection.report["files"]) == 3 and all(f["procedures"] >= 2 for f in collection.report["files"])


def test_prepare_data_extracts_with_the_llm_through_its_flags(tmp_path, monkeypatch):
    import prepare_data

    pages = tmp_path / "pages"
    pages.mkdir()
    write(pages / "prose.md", "## Change the language\n\nOpen the app menu, pick Language and choose yours; the app "
                              "restarts in that language straight away.\n")
    write(pages / "help.html", HELP_PAGE)
    answer = json.dumps({"records": [{"prompt": "How do I change the language?",
                                      "response": ["Open the app menu.", "Pick Language.", "Choose yours."]}]})
    monkeypatch.setenv("EXTRACT_KEY", "sk-test-not-logged")
    with chat_server(lambda body: answer if "Language" in body["messages"][1]["content"] else '{"records": []}'
                     ) as (url, received):
        out = tmp_path / "out"
        assert prepare_data.main([str(pages), "--out", str(out), "--keep-case", "--keep-punctuation", "--extract-llm",
                        "--augment-url", url, "--augment-model", "m", "--augment-key-env", "EXTRACT_KEY",
                        "--extract-llm-max-requests", "10"]) == 0
    assert 2 <= len(received) < 10 and received[0]["authorization"] == "Bearer sk-test-not-logged"
    records = [json.loads(line) for name in prepare_data.SPLITS
               for line in (out / f"{name}.jsonl").read_text().splitlines()]
    llm = [r for r in records if r["extraction"] == "llm"]
    assert [r["source"] for r in llm] == [f"{pages / 'prose.md'}#change-the-language"]
    assert len(records) == 4 and {r["extraction"] for r in records} == {"llm", "rules"}
    stats = json.loads((out / "stats.json").read_text())
    assert sum(f["llm_requests"] for f in stats["collected"]["files"]) == len(received)
    assert any("the LLM found no procedure either" in s for f in stats["collected"]["files"] for s in f["skipped"])
    assert "sk-test" not in (out / "report.md").read_text() + (out / "config.yaml").read_text()


def test_unreadable_raw_sources_are_one_line_errors(tmp_path):
    from howto.runio import RunError

    latin1 = tmp_path / "page.html"
    latin1.write_bytes("<main><h2>Réglages</h2></main>".encode("latin-1"))
    broken_pdf = write(tmp_path / "manual.pdf", "not a pdf")
    chats = write(tmp_path / "chats.jsonl", json.dumps(CHATS[0]) + "\n" + json.dumps({"id": "c9"}) + "\n")
    for path, message in ((latin1, "not UTF-8 text"), (broken_pdf, "cannot be read as a raw source"),
                          (chats, "conversation 2 has no 'messages' list")):
        with pytest.raises(RunError, match=message) as error:
            collect_inputs([path])
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


TABBED_PAGE = """<html><head><title>Messages | Zulip help center</title></head><body><main>
<h2 id="edit">Edit a message</h2>
<div class="tabs"><ul class="nav" role="tablist"><li role="tab" id="tab-1">Desktop</li><li role="tab" id="tab-2">Mobile
</li></ul>
<div role="tabpanel" aria-labelledby="tab-1"><p>To edit a message:</p><ol><li>Hover over a message.</li>
<li>Click <b>Edit</b>.</li></ol></div>
<div role="tabpanel" aria-labelledby="tab-2"><p>To edit a message:</p><ol><li>Long-press a message.</li>
<li>Tap <b>Edit message</b>.</li></ol></div></div>
<h2>Star a message</h2>
<div class="tabs-container"><ul role="tablist"><li role="tab">Web</li><li role="tab">Android</li></ul>
<div><div role="tabpanel"><ol><li>Hover over the message.</li><li>Click the star.</li></ol></div>
<div role="tabpanel" hidden><ol><li>Long-press the message.</li><li>Tap Star.</li></ol></div></div></div>
<h2>Install the app</h2>
<h3>Homebrew</h3><ol><li>Open a terminal.</li><li>Run brew install zulip.</li></ol>
<h3>macOS</h3><ol><li>Download the disk image.</li><li>Drag the app to Applications.</li></ol>
</main></body></html>"""

TABBED_MARKDOWN = """---
title: Service accounts
---

## View service accounts

{{< tabs >}}

{{< tab title="Desktop" >}}

1. Open **Settings**.
1. Select **Service accounts**.

{{< /tab >}}

{{< tab title="Mobile app" >}}

1. Tap **Menu > Settings**.
1. Tap **Service accounts**.

{{< /tab >}}

{{< /tabs >}}
"""


def test_tab_variants_get_their_platform_in_the_question(tmp_path):
    records, report = collect_file(write(tmp_path / "messages.html", TABBED_PAGE))
    got = by_prompt(records)
    assert got == {
        "How do I edit a message in the Zulip desktop app?": ["Hover over a message.", "Click Edit."],
        "How do I edit a message in the Zulip mobile app?": ["Long-press a message.", "Tap Edit message."],
        "How do I star a message in the Zulip web app?": ["Hover over the message.", "Click the star."],
        "How do I star a message in the Zulip Android app?": ["Long-press the message.", "Tap Star."],
        "How do I install the app with Homebrew in Zulip?": ["Open a terminal.", "Run brew install zulip."],
        "How do I install the app in Zulip on macOS?": ["Download the disk image.", "Drag the app to Applications."],
    }
    assert not any(q.startswith("How do I use ") for q in got) and {r["category"] for r in records} == {"zulip"}
    assert "Desktop" not in records[1]["passage"].split("\n\n")[0]  # the tab bar is no paragraph of the passage
    records, _ = collect_file(write(tmp_path / "accounts.md", TABBED_MARKDOWN), product="ExampleHub")
    assert by_prompt(records) == {
        "How do I view service accounts in the ExampleHub desktop app?": ["Open Settings.",
                                                                          "Select Service accounts."],
        "How do I view service accounts in the ExampleHub mobile app?": ["Tap Menu > Settings.",
                                                                         "Tap Service accounts."]}


TWO_WAYS = """---
title: Subgroups
---

## Change who can create subgroups

To change who can create subgroups on a group:

- As a user with the Owner role on the group:
  1. Select **Settings > General**.
  1. Select **Save changes**.
- As an administrator:
  1. Select **Admin > Groups**.
  1. Select **Save changes**.

## Delete a subgroup

To delete a subgroup:

1. Open the subgroup.
1. Select **Delete**.

You can also delete the subgroup and all of its projects. These projects cannot be restored.

1. Open the subgroup.
1. Select **Delete with projects**.

## Delete a subgroup

1. Open the subgroup.
1. Select **Delete**.

## Leave a subgroup

1. Open the subgroup.
1. Select **Leave**.

## Leave a subgroup

1. Select **Groups**.
1. Select **Leave** beside the subgroup.
"""


def test_procedures_that_would_share_a_question_are_told_apart_or_kept_once(tmp_path):
    records, report = collect_file(write(tmp_path / "subgroups.md", TWO_WAYS))
    assert [r["prompt"] for r in records] == [
        "How do I change who can create subgroups as a user with the Owner role on the group?",
        "How do I change who can create subgroups as an administrator?",
        "How do I delete a subgroup?",
        "How do I delete the subgroup and all of its projects?",
        "How do I leave a subgroup?"]
    reasons = " ".join(report.skipped)
    assert "same question and steps as #delete-a-subgroup, kept once" in reasons  # a true duplicate
    assert "another set of steps for \"How do I leave a subgroup?\"" in reasons and "review both" in reasons
    (tmp_path / "more").mkdir()
    other = write(tmp_path / "more" / "subgroups.md", TWO_WAYS)
    collection = collect_inputs([tmp_path / "subgroups.md", other])
    questions = [r["prompt"] for _, _, r in collection.records]
    assert len(questions) == len(set(questions)) == 5  # the second file's procedures are the first file's
    assert collection.report["files"][1]["procedures"] == 0


def test_product_named_in_questions_from_the_page_or_the_flag(tmp_path):
    page = ("<html><head><title>Orders</title><meta property='og:site_name' content='Cartly Help Center'></head>"
            "<body><main><h2>Cancel an order</h2><ol><li>Open Orders.</li><li>Tap Cancel.</li></ol></main></body>"
            "</html>")
    records, _ = collect_file(write(tmp_path / "orders.html", page))
    assert [r["prompt"] for r in records] == ["How do I cancel an order in Cartly?"]
    records, _ = collect_file(write(tmp_path / "orders.html", page), product="ShopNow")
    assert [r["prompt"] for r in records] == ["How do I cancel an order in ShopNow?"]
    site = "<title>Orders</title><meta property='og:site_name' content='Cartly Help Center'>"
    for title in ("Step 2 - Install the app", "Orders - cancelling and returns", "Orders | Troubleshooting"):
        records, _ = collect_file(write(tmp_path / "orders.html", page.replace(site, f"<title>{title}</title>")))
        assert [r["prompt"] for r in records] == ["How do I cancel an order?"], title  # no name in these titles
    records, _ = collect_file(write(tmp_path / "orders.html", page.replace(
        site, "<title>Orders - ShopNow Help</title>")))
    assert [r["prompt"] for r in records] == ["How do I cancel an order in ShopNow?"]
    untitled = "## Cancel an order\n\n1. Open **Orders**.\n1. Tap **Cancel**.\n"
    records, _ = collect_file(write(tmp_path / "orders.md", untitled))
    assert [r["prompt"] for r in records] == ["How do I cancel an order?"]  # no name on the page, none made up
    asked = "## Cancel an order\n\n**How do I cancel my ShopNow order?**\n\n1. Open **Orders**.\n1. Tap **Cancel**.\n"
    records, _ = collect_file(write(tmp_path / "asked.md", asked), product="ShopNow")
    assert [r["prompt"] for r in records] == ["How do I cancel my ShopNow order?"]  # named once


def test_collected_records_carry_a_category(tmp_path):
    folder = tmp_path / "Help pages"
    folder.mkdir()
    page = write(folder / "orders.md", "## Cancel an order\n\n1. Open **Orders**.\n1. Tap **Cancel**.\n")
    chats = write(folder / "chats.jsonl", json.dumps(CHATS[0]) + "\n")
    assert {r["category"] for p in (page, chats) for r in collect_file(p)[0]} == {"help_pages"}
    assert {r["category"] for r in collect_file(page, product="ShopNow")[0]} == {"shopnow"}
    assert {r["category"] for p in (page, chats) for r in collect_file(p, category="shopping")[0]} == {"shopping"}


def test_passage_is_bounded_and_redacted_in_review(tmp_path):
    import prepare_data

    prose = "".join(f"<p>Paragraph {k} about orders, written by jane.doe@example.com for the help centre.</p>"
                    for k in range(60))
    page = (f"<main><h2>Cancel an order</h2>{prose}<p>To cancel an order:</p><ol><li>Open Orders.</li>"
            "<li>Tap Cancel.</li></ol></main>")
    write(tmp_path / "orders.html", page)
    records, _ = collect_file(tmp_path / "orders.html")
    text = records[0]["passage"]
    assert len(text) <= 2000 and text.startswith("Cancel an order\n\n…")
    assert text.endswith("To cancel an order:\n\n1. Open Orders.\n2. Tap Cancel.")
    assert prepare_data.main([str(tmp_path / "orders.html"), "--out", str(tmp_path / "out"), "--review",
                    str(tmp_path / "review")]) == 0
    tasks = json.loads((tmp_path / "review" / "tasks.json").read_text())
    assert "jane.doe@example.com" not in tasks[0]["data"]["passage"] and "[EMAIL]" in tasks[0]["data"]["passage"]


def nested_page(kind: str, depth: int) -> str:
    if kind == "div":
        return "<main><h2>Reset the hub</h2>" + "<div>" * depth + \
            "<ol><li>Hold the button.</li><li>Wait for the light.</li></ol>" + "</div>" * depth + "</main>"
    inner = "<ol><li>Open the menu." * depth + "</li></ol>" * depth
    return f"<main><h2>Reset the hub</h2><ol><li>Hold the button.</li><li>Open the settings:{inner}</li></ol></main>"


@pytest.mark.parametrize("kind, depth", [("div", 1000), ("ol", 3000)])
def test_deeply_nested_pages_are_walked_without_recursion_in_linear_time(tmp_path, kind, depth):
    start = time.perf_counter()
    records, _ = collect_file(write(tmp_path / "deep.html", nested_page(kind, depth)))
    assert time.perf_counter() - start < 10
    assert records[0]["prompt"] == "How do I reset the hub?" and records[0]["response"][0] == "Hold the button."


def test_image_only_pdf_says_no_text_layer(tmp_path):
    pdf = write_pdf(tmp_path / "scan.pdf", [[], []])
    records, report = collect_file(pdf)
    assert records == [] and report.skipped == [f"{pdf}: no text layer (an image-only or scanned PDF): "
                                                "run OCR on it first"]


def test_csv_chat_without_conversation_ids_keeps_every_procedure(tmp_path):
    rows = "role,text\n" + "".join(f'{m["role"]},"{m.get("text", m.get("content"))}"\n'
                                   for c in CHATS for m in c["messages"])
    records, _ = collect_file(write(tmp_path / "chats.csv", rows))
    assert by_prompt(records) == by_prompt(collect_file(write(tmp_path / "chats.jsonl", "".join(
        json.dumps(c) + "\n" for c in CHATS)))[0])
    assert len(records) == 2


def test_broken_chat_jsonl_line_is_named_by_its_own_line(tmp_path):
    from howto.runio import RunError

    chats = write(tmp_path / "chats.jsonl", json.dumps(CHATS[0]) + "\n" + '{"id": "c2", "messages": [}\n')
    with pytest.raises(RunError, match=r"chats\.jsonl:2:\d+: malformed JSON at line 2, column \d+") as error:
        collect_inputs([chats])
    assert "\n" not in str(error.value)


def test_chats_asking_one_question_keep_one_answer(tmp_path):
    again = {"id": "c4", "messages": [
        {"role": "customer", "text": "how do I change my delivery address?"},
        {"role": "agent", "text": "1. Open Profile.\n2. Tap Addresses.\n3. Edit the address."}]}
    chats = write(tmp_path / "chats.jsonl", "".join(json.dumps(c) + "\n" for c in [CHATS[0], again, CHATS[0]]))
    collection = collect_inputs([chats])
    assert [r["response"] for _, _, r in collection.records] == [["Go to Account > Addresses.", "Tap Edit.",
                                                                  "Save the new address."]]
    skipped = collection.report["files"][0]["skipped"]
    assert any("#conversation=c4: another set of steps for a question asked by" in s for s in skipped)
    assert any("same question and steps as" in s for s in skipped)
