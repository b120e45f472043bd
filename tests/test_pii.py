"""Recall and false positives of PII redaction, measured on a few hundred generated PII strings and clean sentences.

The values are random but valid (Luhn-valid cards, mod-97-valid IBANs), built here with their own checksum code
so that the test does not trust the module it checks. `python tests/test_pii.py` prints the figures.
"""
from __future__ import annotations

import json
import random
import re
import string
from collections import Counter

import pytest

from howto.pii import (PLACEHOLDER_RE, PLACEHOLDERS, luhn_valid, name_detection_available, redact,
                       redact_record)

STRUCTURED = ("EMAIL", "CARD", "IBAN", "IP", "URL", "PHONE")


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _luhn_check_digit(payload: str) -> str:
    for d in string.digits:
        digits = [int(c) for c in payload + d][::-1]
        if sum(x if i % 2 == 0 else sum(divmod(2 * x, 10)) for i, x in enumerate(digits)) % 10 == 0:
            return d
    raise AssertionError("unreachable")


def _group(number: str, sizes: list[int], sep: str) -> str:
    parts, i = [], 0
    for size in sizes:
        parts.append(number[i : i + size])
        i += size
    return sep.join(p for p in parts + [number[i:]] if p)


def make_card(rng: random.Random) -> str:
    prefix, length, groups = rng.choice([
        ("4", 16, [4, 4, 4, 4]), ("4", 13, [4, 4, 5]), ("4", 19, [4, 4, 4, 4, 3]),
        (str(rng.randint(51, 55)), 16, [4, 4, 4, 4]), (str(rng.randint(2221, 2720)), 16, [4, 4, 4, 4]),
        (rng.choice(["34", "37"]), 15, [4, 6, 5]), (rng.choice(["6011", "65"]), 16, [4, 4, 4, 4]),
        ("36", 14, [4, 6, 4]), ("35", 16, [4, 4, 4, 4]), ("62", 19, [4, 4, 4, 4, 3]),
    ])
    payload = prefix + _digits(rng, length - len(prefix) - 1)
    number = payload + _luhn_check_digit(payload)
    return rng.choice([number, _group(number, groups, " "), _group(number, groups, "-")])


# BBAN shapes: n = digits, a = capital letters, c = capital letters or digits.
IBAN_SHAPES = {"DE": "18n", "GB": "4a14n", "FR": "10n11c2n", "NL": "4a10n", "ES": "20n", "IT": "1a10n12c",
               "BE": "12n", "CH": "5n12c", "NO": "11n", "PL": "24n", "AT": "16n", "IE": "4a14n"}


def _mod97(text: str) -> int:
    return int("".join(str(int(c, 36)) for c in text)) % 97


def _iban_check(country: str, bban: str) -> str:
    return f"{98 - _mod97(bban + country + '00'):02d}"


def make_iban(rng: random.Random, valid: bool = True) -> str:
    country = rng.choice(sorted(IBAN_SHAPES))
    bban = ""
    for count, kind in ((int(n), k) for n, k in re.findall(r"(\d+)([nac])", IBAN_SHAPES[country])):
        alphabet = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}[kind]
        bban += "".join(rng.choice(alphabet) for _ in range(count))
    check = _iban_check(country, bban)
    while not valid and _mod97(bban + country + check) == 1:
        check = _digits(rng, 2)
    iban = country + check + bban
    return rng.choice([iban, " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))])


def make_phone(rng: random.Random) -> str:
    d = lambda n: _digits(rng, n)  # noqa: E731
    return rng.choice([
        f"(555) 01{d(1)}-{d(4)}", f"555-01{d(1)}-{d(4)}", f"555.01{d(1)}.{d(4)}", f"555 01{d(1)} {d(4)}",
        f"+1 (202) 555-01{d(2)}", f"+1 202-555-01{d(2)}", f"+1-202-555-01{d(2)}", f"1-800-555-01{d(2)}",
        f"+1 202 555 01{d(2)}", f"+1202555{d(4)}", f"+44 20 7946 0{d(3)}", f"+44 (0)20 7946 0{d(3)}",
        f"020 7946 0{d(3)}", f"07700 900{d(3)}", f"+44 7700 900{d(3)}", f"+62 812-{d(4)}-{d(4)}",
        f"0812 {d(4)} {d(4)}", f"0812-{d(4)}-{d(4)}", f"+62 21 5555 {d(4)}", f"+49 30 {d(8)}",
        f"+49 151 {d(8)}", f"030 {d(8)}", f"+49151{d(8)}", f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"01 {d(2)} {d(2)} {d(2)} {d(2)}", f"06 {d(2)} {d(2)} {d(2)} {d(2)}", f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"+91 98{d(3)} {d(5)}", f"00 44 20 7946 0{d(3)}", f"+81 3-{d(4)}-{d(4)}", f"03-{d(4)}-{d(4)}",
        f"+61 2 {d(4)} {d(4)}",
        f"(02) {d(4)} {d(4)}", f"0412 {d(3)} {d(3)}", f"+31 6 {d(8)}",
    ] + [make_local_mobile(rng)] * 12)  # as likely as the 35 formats above together


# Local mobile numbers as people write them at home, without the country code, in prefixes that libphonenumber's
# numbering plans list as mobile: Indonesia first (the specification's home), then other countries.
ID_MOBILE_PREFIXES = ("0811", "0812", "0813", "0821", "0822", "0852", "0853", "0857", "0858", "0877", "0878",
                      "0895", "0896", "0897", "0898", "0899", "0881", "0882", "0838", "0831", "0859")


def make_local_mobile(rng: random.Random, bare: bool | None = None) -> str:
    d = lambda n: _digits(rng, n)  # noqa: E731
    number = rng.choice([
        rng.choice(ID_MOBILE_PREFIXES) + d(rng.choice([6, 7, 8, 9])),  # Indonesia: 10 to 13 digits
        "07" + rng.choice("45789") + d(8),  # United Kingdom
        rng.choice(["98", "97", "99", "94", "70", "81"]) + d(8),  # India: ten digits, no trunk 0
        "01" + rng.choice(["51", "52", "57", "60", "62", "70", "71", "72", "73", "75", "76", "77", "78", "79"]) + d(8),
        "06" + rng.choice("12345678") + d(7),  # France
        "04" + rng.choice(["00", "12", "23", "38"]) + d(6),  # Australia
        "01" + rng.choice("29") + d(7),  # Malaysia
        "09" + rng.choice(["17", "18", "19", "27", "45", "55", "66", "77", "95", "98"]) + d(7),  # Philippines
        "08" + d(8),  # Thailand
        "06" + rng.choice("12345") + d(7),  # Netherlands
        rng.choice(["202", "415", "312", "617", "646"]) + rng.choice("23456789") + d(6),  # United States
    ])
    if bare if bare is not None else rng.random() < 0.6:
        return number
    if number.startswith("0"):  # grouped after the trunk prefix and operator code, 4-4-rest or 4-3-rest
        return rng.choice([" ", "-"]).join([number[:4], number[4:8], number[8:]] if len(number) > 10
                                           else [number[:4], number[4:7], number[7:]])
    if len(number) == 10 and number[0] in "6789" and rng.random() < 0.5:
        return f"{number[:5]} {number[5:]}"  # India: 98765 43210
    return rng.choice([f"({number[:3]}) {number[3:6]}-{number[6:]}", f"{number[:3]}-{number[3:6]}-{number[6:]}"])


def make_email(rng: random.Random) -> str:
    first = rng.choice(["maria", "john", "priya", "wei", "olu", "anna-lena", "j", "Sam"])
    last = rng.choice(["lopez", "smith", "natarajan", "chen", "adeyemi", "oneil", "K"])
    local = rng.choice([f"{first}.{last}", f"{first}{rng.randint(1, 999)}", f"{first}_{last}", f"{first}+news",
                        f"{last}.{first}{rng.randint(70, 99)}"])
    domain = rng.choice(["example.com", "mail.example.org", "example.co.uk", "corp.example.net", "EXAMPLE.COM"])
    return f"{local}@{domain}"


def make_ip(rng: random.Random) -> str:
    if rng.random() < 0.65:
        first = rng.choice([10, 172, 192, 203, 198, 8, rng.randint(1, 255)])
        return ".".join(str(x) for x in [first] + [rng.randint(0, 255) for _ in range(3)])
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    return rng.choice([":".join(groups), "2001:db8::" + ":".join(groups[:2]), "fe80::" + groups[0],
                       "::1", "2001:db8:85a3::8a2e:370:7334", "::ffff:192.0.2." + str(rng.randint(1, 254))])


def make_secret_url(rng: random.Random) -> str:
    token = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(8, 24)))
    host = rng.choice(["files.example.com", "meet.example.com", "api.example.org", "192.168.0.50", "example.net:8443"])
    return rng.choice([
        f"https://jdoe:{token}@{host}/reports/q3.xlsx", f"ftp://admin:{token}@{host}/",
        f"rtsp://admin:{token}@{host}/s1",
        f"https://{host}/j/884102?token={token}", f"https://{host}/reset?user=7&reset_token={token}",
        f"https://{host}/v1/data?api_key={token}", f"https://{host}/file.pdf?X-Amz-Signature={token}&X-Amz-Expires=300",
        f"https://{host}/cb#access_token={token}", f"http://{host}/login?sessionid={token}",
        f"https://{host}/share?password={token}", f"https://{host}/dl?sig={token}", f"www.example.com/a?key={token}",
        f"https://{host}/hook?auth={token}",
        f"https://{host}/verify?code={_digits(rng, 6)}&email={make_email(rng).replace('@', '%40')}",
        f"https://{host}/login?otp={_digits(rng, 6)}", f"https://{host}/activate?pin={_digits(rng, 4)}",
        f"https://{host}/auth/callback?code={token}&state=xyz", f"https://{host}/magic?login_code={token}",
        f"https://{host}/unsubscribe?mail={make_email(rng).replace('@', '%40').replace('+', '%2B')}",
        f"https://{host}/reset/{make_email(rng).replace('@', '%40')}", f"https://{host}/invite?nonce={token}",
        f"https://{host}/share?e={make_email(rng)}", f"https://{host}/call?phone=0812{_digits(rng, 8)}",
    ])


def make_address(rng: random.Random) -> str:
    name = " ".join(rng.sample(["Baker", "Evergreen", "Amphitheatre", "Grimmauld", "Oak", "Maple", "North",
                                "Old Mill", "Saint James", "Kingsley"], rng.randint(1, 2)))
    kind = rng.choice(["Street", "St", "St.", "Avenue", "Ave", "Road", "Rd", "Boulevard", "Lane", "Drive", "Way",
                       "Parkway", "Place", "Court", "Terrace", "Close", "Crescent"])
    unit = rng.choice(["", "", ", Apt 4B", " Suite 210", ", Unit 7", ", Flat 3"])
    number = rng.choice([str(rng.randint(1, 9999)), f"{rng.randint(1, 400)}B",
                         f"{rng.randint(10, 99)}-{rng.randint(1, 9)}"])
    if rng.random() < 0.12:
        street = rng.choice(["Sudirman", "Thamrin", "Gatot Subroto"])
        return f"{rng.choice(['Jalan', 'Jl.'])} {street} No. {rng.randint(1, 300)}"
    return f"{number} {name} {kind}{unit}"


MAKERS = {"EMAIL": make_email, "CARD": make_card, "IBAN": make_iban, "IP": make_ip, "URL": make_secret_url,
          "PHONE": make_phone, "ADDRESS": make_address}

TEMPLATES = [
    "How do I update my details to {x} in the app?", "Enter {x} and tap 'Next'.", "My details are: {x}.",
    "Type {x} in the field, then wait 30 seconds.", "Is ({x}) correct? Tap 'Step 2 of 3' if so.",
    "Copy \"{x}\" into the form.", "Pay with {x} 12/27 and CVV 123.", "Use {x} 2 times, not 3.",
    "Replace the old value with {x}, then tap 'Save'.",
    "{x} is what the support page shows; select it and press 'Continue'.", "Use {x} for the 2 accounts, not 3.",
]


def planted_cases(seed: int = 0, per_kind: int = 100) -> list[tuple[str, str, str]]:
    """(kind, sentence with the PII, sentence with the expected placeholder) for each kind."""
    rng = random.Random(seed)
    cases = []
    for kind, make in MAKERS.items():
        for _ in range(per_kind):
            template, value = rng.choice(TEMPLATES), make(rng)
            cases.append((kind, template.format(x=value), template.format(x=f"[{kind}]")))
    return cases


CLEAN_TEMPLATES = [
    "Wait {n} seconds, then tap 'Retry'.", "Tap 'Step {a} of {b}' to continue.", "Set the temperature to {t} degrees.",
    "Enter the {k}-digit code we sent you.", "Update the app to version {v}.", "Find Order #{order} in 'Your orders'.",
    "Set the alarm for {hh}:{mm}.", "Choose {year} from the 'Year' list.", "Add {a} items to the basket.",
    "Set brightness to {p}%.", "Pay ${a}.{mm} at checkout.", "Open Google Drive and select {a} files.",
    "Select {a} Google Drive folders and tap 'Share'.", "Use port {port} with SSL/TLS.",
    "Set the date to {year}-{mo}-{day}.", "Enter the date as {day}/{mo}/{year}.", "Choose the {gb} GB plan.",
    "Check that iOS {v2} or later is installed.", "Enter {steps} as your daily step goal.",
    "Turn on the 5 GHz band and pick channel {ch}.", "Set the timer to {hh}:{mm}:{ss}.",
    "Your seat is {a}C and boarding starts at gate {b}.", "Flight BA {order} leaves at {hh}:{mm}.",
    "Set the resolution to 1920x1080 at {hz} Hz.", "Open https://support.example.com/articles/{order} for help.",
    "Visit www.example.com/help?page={a}&lang=en.", "Scan the QR code and wait {a} minutes.",
    "Enter tracking number 1Z999AA1{order}.", "Enter invoice number INV-{order}-{year}.",
    "Deliveries arrive between {hh}:00 and {b}:00, in {a} to {n} minutes.", "Press 1, then 2, then # to confirm.",
    "Dial *#06# to see the IMEI.", "Charge to {p}% and then unplug.", "It takes {a}-{b} business days.",
    "Install firmware {fw} from the 'Updates' page.", "Install build {fw} and restart.",
    "Install Version {fw} of the driver.",
    "Book {a} One Way tickets in the 'Trips' tab.", "Choose 'Room {room}' on floor {a}.",
    "Enter the voucher code SAVE{n} at checkout.", "Move the slider from 0 to {n}.",
    "Transfer €{steps}.{mm} on {day}.{mo}.{year}.",
    "Press and hold for {n} seconds until the light blinks {a} times.",
    "Print pages {a}-{n} of {order}.", "Set the volume to {p} and the bass to -{a}.",
    "In {year}, the app moved 'Settings' to the top right.", "Rotate the dial {a} times clockwise.",
    "Select '{a} Day Delivery' and tap 'Buy now'.", "Enter {a} as the number of guests and {b} as the number of rooms.",
    "Keep [EMAIL] and {{{{Order Number}}}} as they are.", "Reply to [PHONE] within {a} days.",
    "Upgrade to {gb} TB of cloud storage for ${a}.99 a month.", "Set the thermostat to {t}°C from {hh}:00 to {b}:30.",
    "Check the MAC address 00:1A:2B:3C:4D:5E on the label.", "Use std::vector or a::b in the snippet.",
    "Pick the {a} Day Way plan.", "Update Windows to build 10.0.19045.{room}.", "Scan ISBN 978-0-306-40615-7.",
    "The shop is at 51.5074, -0.1278 on the map.", "The desk is 120 x {n} x 75 cm.", "Open from 9:00 to 17:00.",
    "The match ended {a}-{b}.", "Call 112 or 999 in an emergency.", "The log shows {year}-{mo}-{day}T{hh}:{mm}:{ss}Z.",
    "Walk 1,234,567 steps.", "Press Ctrl+Alt+Del, then +{a}.", "Check kernel 5.15.0-91-generic in 'About'.",
    # 10 to 16 digits that name themselves reference numbers, some shaped like mobile numbers
    "Your order number is {long}.", "Enter order {mobile_like} in the 'Orders' search box.",
    "Invoice no. {mobile_like} is attached to the email.", "Type the tracking number {long} and tap 'Track'.",
    "Find the order with the number {long}.", "Cancel purchase {long} from 'My purchases'.",
    "Quote reference {mobile_like} when you call.", "Your booking ID is {mobile_like}.",
    "Look for the transaction {long} in the statement.", "Enter your customer number {long}.",
    "The IMEI is {long}.", "Scan the parcel with AWB {long}.",
    # digits that no mobile numbering plan allows, and links whose codes are no secrets
    "Enter {unix} as the start time.", "Set the serial to 0{room}00{room}.",
    "Open https://help.example.com/search?q=reset+password&lang=en&country_code=ID for more.",
    "Use https://shop.example.com/cart?promo_code=SAVE{n}&page=2 at checkout.",
    "Watch https://video.example.com/watch?v=dQw4w9WgXcQ&t={n}s for a demo.",
    "Open https://news.example.com/?utm_source=newsletter&utm_campaign=spring_{year} to read more.",
]


def clean_sentences(seed: int = 1, count: int = 400) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for i in range(count):
        values = dict(
            n=rng.randint(1, 120), a=rng.randint(1, 12), b=rng.randint(2, 24), t=rng.randint(16, 30),
            k=rng.choice([4, 6, 8]), v=f"{rng.randint(1, 20)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
            v2=f"{rng.randint(12, 18)}.{rng.randint(0, 6)}", order=_digits(rng, rng.randint(5, 8)),
            hh=f"{rng.randint(0, 23):02d}", mm=f"{rng.randint(0, 59):02d}", ss=f"{rng.randint(0, 59):02d}",
            year=rng.randint(1990, 2030), mo=f"{rng.randint(1, 12):02d}", day=f"{rng.randint(1, 28):02d}",
            p=rng.randint(0, 100), port=rng.choice([22, 80, 443, 587, 993, 8080]), gb=rng.choice([16, 64, 128, 2]),
            steps=f"{rng.randint(1, 20)},{rng.randint(0, 999):03d}", ch=rng.choice([36, 40, 149, 161]),
            hz=rng.choice([60, 120, 144]), room=rng.randint(100, 999),
            fw=".".join(str(rng.randint(0, 20)) for _ in range(4)),
            long=_digits(rng, rng.randint(10, 16)), mobile_like=make_local_mobile(rng, bare=True),
            unix=str(rng.randint(1_600_000_000, 1_999_999_999)),
        )
        sentences.append(CLEAN_TEMPLATES[i % len(CLEAN_TEMPLATES)].format(**values))
    return sentences


def pii_figures(seed: int = 0) -> dict:
    """Recall per kind on the planted cases (exact replacement of the planted span) and false positives."""
    hits, totals, misses = Counter(), Counter(), []
    for kind, text, expected in planted_cases(seed):
        totals[kind] += 1
        redacted, _ = redact(text)
        if redacted == expected:
            hits[kind] += 1
        else:
            misses.append((kind, text, redacted))
    clean = clean_sentences(seed + 1)
    false_positives = [(s, redact(s)[0]) for s in clean if redact(s)[0] != s]
    return {"recall": {k: hits[k] / totals[k] for k in totals}, "planted": dict(totals), "misses": misses,
            "clean_sentences": len(clean), "false_positives": false_positives}


@pytest.fixture(scope="module")
def figures() -> dict:
    result = pii_figures()
    recall = ", ".join(f"{k} {v:.1%} of {result['planted'][k]}" for k, v in result["recall"].items())
    print(f"\nPII recall per kind: {recall}")
    print(f"false positives: {len(result['false_positives'])} of {result['clean_sentences']} clean sentences")
    return result


def test_structured_kinds_have_full_recall(figures):
    assert not [m for m in figures["misses"] if m[0] in STRUCTURED]
    assert all(figures["recall"][kind] == 1.0 for kind in STRUCTURED)


def test_street_addresses_are_found(figures):
    assert figures["recall"]["ADDRESS"] >= 0.95, figures["misses"]


def test_no_false_positives_on_clean_how_to_sentences(figures):
    assert figures["clean_sentences"] >= 300
    assert figures["false_positives"] == []


def test_luhn_invalid_numbers_are_not_cards():
    rng = random.Random(7)
    for _ in range(200):
        card = make_card(rng)
        last = card[-1]
        broken = card[:-1] + str((int(last) + rng.randint(1, 9)) % 10)
        text = f"Enter {broken} as the reference."
        assert redact(text)[0] == text


def test_iban_checksum_decides():
    rng = random.Random(11)
    for _ in range(200):
        valid, invalid = make_iban(rng), make_iban(rng, valid=False)
        assert redact(f"Send it to {valid} today.")[0] == "Send it to [IBAN] today."
        out, counts = redact(f"Send it to {invalid} today.")
        assert "IBAN" not in counts and invalid[:4] in out


def test_known_examples_and_counts():
    text = ("Pay 4111 1111 1111 1111 or IBAN GB82 WEST 1234 5698 7654 32, call +44 20 7946 0958 or (555) 013-2447, "
            "mail jane.doe@example.com, server 192.168.1.24, link https://jdoe:S3cret@files.example.com/q3.xlsx, "
            "deliver to 221B Baker Street. Version 2.3.1, 3 items, order #12345, wait 10:30.")
    out, counts = redact(text)
    assert out == ("Pay [CARD] or IBAN [IBAN], call [PHONE] or [PHONE], mail [EMAIL], server [IP], link [URL], "
                   "deliver to [ADDRESS]. Version 2.3.1, 3 items, order #12345, wait 10:30.")
    assert counts == Counter({"PHONE": 2, "CARD": 1, "IBAN": 1, "EMAIL": 1, "IP": 1, "URL": 1, "ADDRESS": 1})


def test_urls_without_secrets_stay():
    text = "Open https://files.example.com/reports/q3.xlsx?page=2 and www.example.com/help."
    assert redact(text)[0] == text


def test_placeholders_survive():
    text = "Send {{Order Number}} to [EMAIL], call [PHONE], card [CARD], IBAN [IBAN], see [URL] at [ADDRESS]."
    assert redact(text) == (text, Counter())
    assert PLACEHOLDER_RE.findall(text) == ["[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[URL]", "[ADDRESS]"]
    assert all(PLACEHOLDER_RE.fullmatch(p) for p in PLACEHOLDERS)


def test_redact_record_covers_prompt_and_steps_and_copies():
    record = {"prompt": "How do I add jane@example.com?", "response": ["Open Mail.", "Type jane@example.com.",
              "Call +1 202-555-0147."], "category": "email", "source": "handwritten"}
    out, counts = redact_record(record)
    assert out == {"prompt": "How do I add [EMAIL]?", "response": ["Open Mail.", "Type [EMAIL].", "Call [PHONE]."],
                   "category": "email", "source": "handwritten"}
    assert counts == Counter({"EMAIL": 2, "PHONE": 1})
    assert record["prompt"] == "How do I add jane@example.com?"


def test_local_mobile_numbers_bare_and_grouped():
    rng = random.Random(3)
    for bare in (True, False):
        for _ in range(300):
            number = make_local_mobile(rng, bare)
            for template in ("My number is {x}.", "Text {x} when you arrive", "{x}", "Saya di {x} ya"):
                assert redact(template.format(x=number))[0] == template.format(x="[PHONE]"), number


@pytest.mark.parametrize("number", ["081234567890", "0812345678901", "08521234567", "07911123456", "9876543210",
                                    "015112345678", "0612345678", "0412345678", "09171234567", "4155552671"])
def test_the_words_before_decide_between_a_phone_and_a_reference(number):
    for text in (f"Call me on {number}.", f"My WhatsApp: {number}", f"Ring {number} after 5 pm."):
        assert redact(text) == (text.replace(number, "[PHONE]"), Counter({"PHONE": 1}))
    for text in (f"Enter order {number} in the search box.", f"Invoice no. {number} is attached.",
                 f"Your booking ID is {number}.", f"Find the order with the number {number}.",
                 f"Tracking number: {number}", f"Quote reference #{number} when you call."):
        assert redact(text) == (text, Counter())


def test_digit_runs_that_no_mobile_plan_allows_stay():
    # without the trunk 0 an Indonesian, British or French number is not written at home; 15 digits are too many;
    # a ten-digit run starting with 1 is no US, Indian or other listed number
    for text in ("Enter 81234567890 as the code.", "Use 7911123456 once.", "Type 612345678 here.",
                 "Set the start to 1733011200.", "Pick 3707955617."):
        assert redact(text) == (text, Counter()), text


def test_a_reference_number_that_passes_luhn_is_no_card():
    assert luhn_valid("113542617735902")
    for text in ("Cancel purchase 113542617735902 today.", "Find the order with the number 113542617735902."):
        assert redact(text) == (text, Counter())
    assert redact("Pay with 4111111111111111 today.")[0] == "Pay with [CARD] today."


@pytest.mark.parametrize("url", [
    "https://app.example.com/verify?code=482913&email=budi.santoso%40example.com",
    "https://example.com/login?otp=123456", "https://id.example.com/activate?pin=7391",
    "https://accounts.example.com/o/callback?code=4%2F0AbCdEf9XyZ&state=xyz", "https://example.com/m?login_code=AB12CD34",
    "https://example.com/unsubscribe?mail=john%2Bnews%40example.co.uk", "https://example.com/reset/ana%40example.org",
    "https://example.com/invite?nonce=Zk93jDk2", "www.example.com/confirm?verification=9f86d081884c7d65",
    "https://example.com/share?e=maria.lopez@example.com", "https://example.com/call?phone=081234567890",
])
def test_links_carrying_codes_tokens_or_emails_are_replaced_whole(url):
    assert redact(f"Open {url} on your phone.") == ("Open [URL] on your phone.", Counter({"URL": 1}))


@pytest.mark.parametrize("url", [
    "https://help.example.com/search?q=reset+password&lang=en&country_code=ID",
    "https://shop.example.com/cart?promo_code=SAVE10&page=2", "https://video.example.com/watch?v=dQw4w9WgXcQ&t=42s",
    "https://news.example.com/?utm_source=newsletter&utm_campaign=spring_2024", "https://example.com/help?code=en",
    "https://support.example.com/articles/360012345?lang=en",
])
def test_links_without_secrets_stay(url):
    assert redact(f"Open {url} on your phone.") == (f"Open {url} on your phone.", Counter())


def test_prepare_data_command_line_leaves_no_local_mobile_or_secret_link(tmp_path):
    import prepare_data

    rng = random.Random(5)
    planted = [make_local_mobile(rng) for _ in range(12)] + [
        "https://app.example.com/verify?code=482913&email=budi.santoso%40example.com",
        "https://example.com/login?otp=654321"]
    words = iter(["".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(4))
                  for _ in range(3 * len(planted))])
    records = [{"prompt": f"How do I {next(words)} {value} in {next(words)}?" if i % 2 else
                f"How do I {next(words)} the {next(words)} list?",
                "response": [f"Open {next(words)}.", f"Type {value} in the field.", "Tap 'Save'."],
                "category": "account"} for i, value in enumerate(planted)]
    records.append({"prompt": "How do I cancel order 0812345678901?", "response": ["Open 'Orders'.",
                    "Find order 0812345678901.", "Tap 'Cancel'."], "category": "account"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert prepare_data.main([str(data), "--out", str(tmp_path / "out")]) == 0
    written = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").glob("*.jsonl"))
    assert not [value for value in planted if value in written]
    assert "0812345678901" in written  # the order number survives
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    in_prompts = planted[1::2]  # odd records name the value in the prompt too
    assert stats["pii"]["replaced"] == {"PHONE": 12 + sum(v[0] != "h" for v in in_prompts),
                                        "URL": 2 + sum(v[0] == "h" for v in in_prompts)}


@pytest.mark.skipif(name_detection_available(), reason="Presidio is installed: names are detected")
def test_names_are_left_alone_without_presidio():
    text = "Ask Maria Lopez to accept the invite."
    assert redact(text) == (text, Counter())


@pytest.mark.skipif(not name_detection_available(), reason="needs presidio-analyzer and a spaCy English model")
def test_names_are_replaced_with_presidio():
    out, counts = redact("Ask Maria Lopez to send it to maria.lopez@example.com.")
    assert out == "Ask [NAME] to send it to [EMAIL]." and counts == Counter({"NAME": 1, "EMAIL": 1})


if __name__ == "__main__":
    result = pii_figures()
    for kind, recall in result["recall"].items():
        print(f"{kind:8s} recall {recall:7.1%}  ({result['planted'][kind]} planted)")
    print(f"false positives: {len(result['false_positives'])} of {result['clean_sentences']} clean sentences")
    for miss in result["misses"] + result["false_positives"]:
        print("  ", miss)
