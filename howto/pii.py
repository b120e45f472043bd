"""Replace sensitive information in training text by typed placeholders such as [EMAIL] or [CARD].

Structured kinds are found by patterns and confirmed by their checksums where they have one (Luhn for cards,
mod-97 for IBANs), so that order numbers and other digit runs stay as they are. A local mobile number written as one
bare run of digits ("081234567890") is confirmed by libphonenumber's numbering plans (the `phonenumbers` package)
for MOBILE_REGIONS, and kept when a reference word such as "order" or "invoice" comes just before it. Links are
replaced whole when they carry credentials, a token, a one-time code or an email address (plain or URL-encoded,
"?email=name%40example.com"). Person names need a language model: they are replaced only where Presidio and a spaCy
English model are installed; they are never downloaded.
"""
from __future__ import annotations

import functools
import importlib.util
import ipaddress
import re
from collections import Counter
from typing import Callable
from urllib.parse import parse_qsl, unquote_plus

import phonenumbers

PLACEHOLDERS = ("[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[IP]", "[URL]", "[ADDRESS]", "[NAME]")
PLACEHOLDER_RE = re.compile("|".join(map(re.escape, PLACEHOLDERS)))

# Text without a digit, '@' or ':' cannot hold any structured kind: skipping it keeps redaction fast.
_MAYBE_PII = re.compile(r"[\d@:]|www\.")

# --- emails ---------------------------------------------------------------------------------------------------
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

# --- URLs carrying credentials or secrets -------------------------------------------------------------------
_URL = re.compile(r"\b(?:[a-z][a-z0-9+.-]*://|www\.)[^\s<>\"']+", re.IGNORECASE)
_SECRET_PART = re.compile(r"token|secret|passw|apikey|api_key|signature|session|credential|jwt|otp|nonce|verif",
                          re.IGNORECASE)
_SECRET_WORDS = {"key", "sig", "auth", "pwd", "pass", "sid", "pw", "email", "mail", "phone", "mobile", "msisdn", "tel"}
# Codes and PINs are secrets when their value looks like one (a digit, or eight characters); a language, country
# or promotion code is not.
_CODE_WORDS = {"code", "pin", "passcode", "ticket", "hash", "magic"}
_NOT_SECRET_CODE = re.compile(r"lang|locale|country|region|currency|promo|coupon|voucher|discount|zip|postal|"
                              r"color|colour|size|product|sku|item|status|error|response_type", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"[\w~.+/=-]*\d[\w~.+/=-]*|[\w~.+/=-]{8,}")


def _secret_url(candidate: str, before: str = "") -> str | None:
    url = candidate.rstrip(".,;:!?)]}")
    authority = re.split(r"[/?#]", url.split("://", 1)[-1], maxsplit=1)[0]
    if "@" in authority:  # user:pass@host or user@host
        return url
    rest = url[len(url.split("://", 1)[0]) + 3:] if "://" in url else url
    if _EMAIL.search(unquote_plus(rest[len(authority):])):  # an email address in the path or query, even encoded
        return url
    query = "&".join(re.split(r"[?#]", url)[1:])
    for name, value in parse_qsl(query, keep_blank_values=True):
        words = set(re.split(r"[^a-z0-9]+", name.lower()))
        if _SECRET_PART.search(name) or _SECRET_WORDS & words and value:
            return url
        if _CODE_WORDS & words and not _NOT_SECRET_CODE.search(name) and _SECRET_VALUE.fullmatch(value):
            return url
    return None


# --- IBANs: country code, check digits, then the national account number, spaces every 4 characters allowed -
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
# IBAN length per country, from the SWIFT IBAN registry.
_IBAN_LENGTH = {
    code: int(length) for code, length in (item.split(":") for item in (
        "AD:24 AE:23 AL:28 AT:20 AZ:28 BA:20 BE:16 BG:22 BH:22 BI:27 BR:29 BY:28 CH:21 CR:22 CY:28 CZ:24 DE:22 "
        "DJ:27 DK:18 DO:28 EE:20 EG:29 ES:24 FI:18 FK:18 FO:18 FR:27 GB:22 GE:22 GI:23 GL:18 GR:27 GT:28 HR:21 "
        "HU:28 IE:22 IL:23 IQ:23 IS:26 IT:27 JO:30 KW:30 KZ:20 LB:28 LC:32 LI:21 LT:20 LU:20 LV:21 LY:25 MC:27 "
        "MD:24 ME:22 MK:19 MN:20 MR:27 MT:31 MU:30 NI:28 NL:18 NO:15 OM:23 PK:24 PL:28 PS:29 PT:25 QA:29 RO:24 "
        "RS:22 RU:33 SA:24 SC:31 SD:18 SE:24 SI:19 SK:24 SM:27 SO:23 ST:25 SV:28 TL:23 TN:24 TR:26 UA:29 VA:22 "
        "VG:24 XK:20 YE:30").split())
}


def iban_valid(iban: str) -> bool:
    """Registry length and the ISO 7064 mod-97 check (rearranged number mod 97 == 1)."""
    iban = iban.replace(" ", "")
    if _IBAN_LENGTH.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def _iban(candidate: str, before: str = "") -> str | None:
    # The pattern may run on into a following capitalised word or number group: try the longest valid prefix.
    ends = [m.start() for m in re.finditer(" ", candidate)] + [len(candidate)]
    return next((candidate[:end] for end in reversed(ends) if iban_valid(candidate[:end])), None)


# A reference number names itself just before the digits: "order 0812345678901", "invoice no. 4829103746".
_REFERENCE = re.compile(
    r"\b(?:order|invoice|inv|tracking|track|shipment|parcel|package|awb|reference|ref|booking|ticket|transaction|"
    r"txn|receipt|confirmation|account|acct|customer|member|membership|policy|case|claim|serial|imei|sku|isbn|"
    r"purchase|contract|reservation|pnr|voucher|id)\b[\s#:.-]*(?:(?:number|no|nr|num|id|code|is|was|with|the|"
    r"labell?ed|of|has)\b[\s#:.-]*){0,4}$", re.IGNORECASE)

# --- payment cards: 13 to 19 digits, spaces or dashes between groups, Luhn-checked; no card number starts with 0 ----
# A card number is not preceded by another digit group or the start of an IBAN ("DE89 3704 ..." that failed its
# check), and may be followed by its expiry date ("4111 1111 1111 1111 12/27"): a group before '/' is not part of it.
_CARD = re.compile(r"(?<![\w+.-])(?<!\d[ -])(?<![A-Z]{2}\d{2}\ )[1-9](?:[ -]?\d){12,18}(?![\w/])")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, d in enumerate(int(c) for c in reversed(digits)):
        total += d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
    return total % 10 == 0


def _is_card(text: str) -> bool:
    groups = re.split(r"[ -]", text)  # one run of digits, or groups of 3 to 6 digits as cards are printed
    digits = "".join(groups)
    return 13 <= len(digits) <= 19 and (len(groups) == 1 or min(map(len, groups)) >= 3) and luhn_valid(digits)


def _card(candidate: str, before: str = "") -> str | None:
    if candidate.isdigit() and _REFERENCE.search(before):  # "purchase 113542617735902" passes Luhn by chance
        return None
    # A card followed by another number ("4111 1111 1111 1111 2 times"): the last group is not part of the card
    # when it is written with another separator or is shorter than any card group.
    match = re.fullmatch(r"(.*\d)([ -])(\d+)", candidate)
    if match and (match[2] not in match[1] or len(match[3]) <= 2) and _is_card(match[1]):
        return match[1]
    return candidate if _is_card(candidate) else None


# --- IP addresses -----------------------------------------------------------------------------------------------
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?<!version )(?<!build )(?<!firmware ){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)",
                   re.IGNORECASE)
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?"
                   r"(?![\w:]|\.\d)")


def _ipv6(candidate: str, before: str = "") -> str | None:
    if not any(c.isdigit() for c in candidate):  # "a::b" in code is valid IPv6 but is not an address
        return None
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:  # times such as 10:30:15 and MAC addresses are not IPv6
        return None
    return candidate


# --- phone numbers ------------------------------------------------------------------------------------------------
_PHONE = re.compile(
    r"""(?<![\w+#./-])(?<!\d\ )(?<!\d-)(?:
        \+\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]?\d{1,5})(?:[ .-]?\d{2,5}){0,5}    # +44 20 7946 0958, +1 (555) 013-2447
      | (?:1[ .-])?(?:\(\d{3}\)\ ?|\d{3}[ .-])\d{3}[ .-]\d{4}                # (555) 013-2447, 555-013-2447
      | (?:0\d{1,4}|\(0\d{1,4}\))(?:[ -]?\d{2,5}){1,4}                       # 0812 3456 7890, 081234567890
      | [6-9]\d{4}[ -]\d{5}                                                # 98765 43210 (India)
      | [1-9]\d{9,12}                                                      # 9876543210, 2025550147
    )(?![\w]|[.,:/-]\d)""",
    re.VERBOSE,
)
# Where a bare run of digits may be a local mobile number: Indonesia (the specification's home format, 08...) and
# its neighbours, the largest English-speaking markets and the largest EU ones. Bare runs of 10 to 13 digits only:
# shorter ones are too often codes and amounts.
# (Italy is left out: any ten digits starting with 3 are an Italian mobile number there, too many order numbers.)
MOBILE_REGIONS = ("ID", "MY", "PH", "TH", "VN", "IN", "US", "GB", "AU", "DE", "FR", "NL")
_MOBILE_TYPES = {phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE}
_TRUNK_OPTIONAL = {"IN"}  # Indians write mobile numbers as ten bare digits, without the trunk 0


def local_mobile(digits: str) -> bool:
    """A valid mobile number of one of MOBILE_REGIONS, written as that region writes it at home: with the trunk
    prefix where it has one ("081234567890", not "81234567890"), bare ten digits in India."""
    for region in MOBILE_REGIONS:
        try:
            number = phonenumbers.parse(digits, region)
        except phonenumbers.NumberParseException:
            continue
        if not phonenumbers.is_valid_number(number) or phonenumbers.number_type(number) not in _MOBILE_TYPES:
            continue
        written = re.sub(r"\D", "", phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL))
        if digits == written or region in _TRUNK_OPTIONAL and digits == phonenumbers.national_significant_number(
                number):
            return True
    return False


def _phone(candidate: str, before: str = "") -> str | None:
    digits = re.sub(r"\D", "", candidate)
    if candidate.isdigit():  # one bare run: a mobile number by the numbering plans, unless it names itself a reference
        return candidate if 10 <= len(digits) <= 13 and local_mobile(digits) and not _REFERENCE.search(before) \
            else None
    if candidate.startswith(("+", "00")):  # international, with + or the 00 exit code
        return candidate if 8 <= len(digits) - candidate.startswith("00") * 2 <= 15 else None
    if candidate.lstrip("(").startswith("0"):  # a trunk-prefixed national number written in groups
        return candidate if 9 <= len(digits) <= 13 else None
    if re.fullmatch(r"\d{5}[ -]\d{5}", candidate):
        return candidate if local_mobile(digits) else None
    return candidate


# --- street addresses: house number, capitalised street name, street type (or Jalan/Jl. first) -------------------
# An abbreviation's dot belongs to the address unless it also ends the sentence ("... Oak St. Then ...").
_STREET_TYPES = (r"(?:Street|Avenue|Road|Boulevard|Lane|Drive|Way|Parkway|Place|Court|Terrace|Circle|Square|Highway|"
                 r"Close|Crescent|Row|Alley|Trail|Plaza)\b"
                 r"|(?:St|Ave|Rd|Blvd|Ln|Dr|Pkwy|Pl|Ct|Sq|Hwy)\b(?:\.(?!\s+[A-Z]|\s*$))?")
_UNIT = r"(?:\.?,?\ (?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl)\.?\ ?\#?\w{1,5}|\ \#\d{1,5})?"
_ADDRESS = re.compile(
    rf"""(?<![\w#.,-])\d{{1,5}}[A-Za-z]?(?:-\d{{1,5}})?\ (?:[A-Z][\w'-]*\.?\ ){{1,4}}(?:{_STREET_TYPES}){_UNIT}
       | \b(?:Jalan|Jln\.?|Jl\.)\ (?:[A-Z][\w'-]*\.?\ ){{1,4}}(?:No\.?\ ?)?\d{{1,5}}[A-Za-z]?\b""",
    re.VERBOSE,
)
# Capitalised product and plan names that end in a street-type word ("2 Google Drive accounts") are not addresses.
_NOT_STREET = re.compile(r"\b(?:Google|One|Hard|Flash|USB|Test|Network|Cloud|Amazon|Day|Step|Easy|Best|Fast|Quick)"
                         r"\s+(?:Drive|Way|Place|Lane|Row)\b")


def _address(candidate: str, before: str = "") -> str | None:
    return None if _NOT_STREET.search(candidate) else candidate


# Order matters: secret URLs hold emails and IPs, IBANs hold card-length digit runs, cards hold phone-like groups,
# IPv6 may end in an IPv4 address.
# Each rule's check takes the candidate and the text just before it.
_RULES: list[tuple[str, re.Pattern[str], Callable[[str, str], str | None]]] = [
    ("URL", _URL, _secret_url),
    ("EMAIL", _EMAIL, lambda s, before: s),
    ("IBAN", _IBAN, _iban),
    ("CARD", _CARD, _card),
    ("IP", _IPV6, _ipv6),
    ("IP", _IPV4, lambda s, before: s),
    ("PHONE", _PHONE, _phone),
    ("ADDRESS", _ADDRESS, _address),
]


def _apply(text: str, kind: str, pattern: re.Pattern[str], extract: Callable[[str, str], str | None],
           counts: Counter) -> str:
    def replace(match: re.Match[str]) -> str:
        found = extract(match.group(), text[max(0, match.start() - 40):match.start()])
        if found is None:
            return match.group()
        counts[kind] += 1
        return f"[{kind}]" + match.group()[len(found):]

    return pattern.sub(replace, text)


@functools.cache
def name_detection_available() -> bool:
    """True when Presidio and a spaCy English model are installed (nothing is downloaded)."""
    return importlib.util.find_spec("presidio_analyzer") is not None and _spacy_model() is not None


def _spacy_model() -> str | None:
    if importlib.util.find_spec("spacy") is None:
        return None
    models = ("en_core_web_lg", "en_core_web_trf", "en_core_web_md", "en_core_web_sm")
    return next((m for m in models if importlib.util.find_spec(m) is not None), None)


@functools.cache
def _name_analyzer():
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": _spacy_model()}]}
    return AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=config).create_engine(),
                          supported_languages=["en"])


def _redact_names(text: str, counts: Counter) -> str:
    protected = [m.span() for m in PLACEHOLDER_RE.finditer(text)]
    spans: list[list[int]] = []
    for result in sorted(_name_analyzer().analyze(text=text, entities=["PERSON"], language="en"),
                         key=lambda r: r.start):
        if any(result.start < p_end and p_start < result.end for p_start, p_end in protected):
            continue
        if spans and result.start <= spans[-1][1]:  # overlapping findings become one name
            spans[-1][1] = max(spans[-1][1], result.end)
        else:
            spans.append([result.start, result.end])
    for start, end in reversed(spans):
        text = text[:start] + "[NAME]" + text[end:]
    counts["NAME"] += len(spans)
    return text


def redact(text: str) -> tuple[str, Counter]:
    """The text with sensitive spans replaced by typed placeholders, and how many of each kind were replaced."""
    counts: Counter = Counter()
    if _MAYBE_PII.search(text):
        for kind, pattern, extract in _RULES:
            text = _apply(text, kind, pattern, extract, counts)
    if name_detection_available():
        text = _redact_names(text, counts)
    return text, counts


def redact_record(record: dict) -> tuple[dict, Counter]:
    """A copy of the record with its prompt, every step and its passage (the page text it was collected from)
    redacted; other fields are kept as they are."""
    counts: Counter = Counter()
    out = dict(record)
    if isinstance(record.get("prompt"), str):
        out["prompt"], found = redact(record["prompt"])
        if found:  # most texts have nothing to count, and adding an empty Counter costs as much as a full one
            counts += found
    if isinstance(record.get("passage"), str):  # shown to reviewers, never trained on: redacted, not counted
        out["passage"] = redact(record["passage"])[0]
    if isinstance(record.get("response"), list):
        out["response"] = []
        for step in record["response"]:
            if isinstance(step, str):
                step, found = redact(step)
                if found:
                    counts += found
            out["response"].append(step)
    return out, counts
