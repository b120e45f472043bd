"""Near-duplicate groups on character shingles: typos, contractions and inflections are caught, named things are
told apart, templated data does not chain, and near-copies never straddle the split."""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

import prepare_data
from howto.dedup import content_words, deduplicate, names_differ, variants

SYLLABLES = ("ka", "lo", "mi", "ter", "shu", "ven", "dra", "po", "lix", "zen", "qua", "rin", "bel", "tor", "fa", "gor")


def unique_steps(rng: random.Random, n: int = 3) -> list[str]:
    """Steps made of made-up words, so that no two records share an answer."""
    word = lambda: "".join(rng.choice(SYLLABLES) for _ in range(4))  # noqa: E731
    return [f"Open {word()}.", f"Tap '{word()} {word()}'.", f"Confirm {word()}."][:n]


def items_of(prompts: list[str], seed: int = 0, categories: list[str] | None = None) -> list[prepare_data.Item]:
    rng = random.Random(seed)
    records = [{"prompt": p, "response": unique_steps(rng), "category": (categories or ["c"] * len(prompts))[i]}
               for i, p in enumerate(prompts)]
    items, _ = prepare_data.normalize_items([prepare_data.Item(r, f"rec {i}") for i, r in enumerate(records)], True,
                                            True)
    return items


def grouped(report: dict) -> list[set[str]]:
    return [{m["prompt"] for m in g} for g in report["groups"]]


VARIANTS = [  # (one prompt, its typo / contraction / inflection variant)
    ("I'm trying to check the available payment methods", "i am trying to check the available payment methods"),
    ("How do I update coprrect details on my account?", "How do I update correct details on my account?"),
    ("Why am I seeing an error when I pay by card?", "Why do I see an error when I pay by card?"),
    ("acnceling order 00123842", "canceling order 00123842"),
    ("I don't know how to download my invoice", "i do not know how to download my invoices"),
    ("hw can i cancel purchase 113542617735902", "how can I cancel purchase 113542617735902?"),
    ("what are the steps to reset my password", "How do I reset my password please"),
]


@pytest.mark.parametrize("a, b", VARIANTS)
def test_typo_contraction_and_inflection_variants_are_one_group(a, b):
    others = ["How do I export my contacts to a spreadsheet?", "Where can I change the delivery address?"]
    items, report = deduplicate(items_of([a, others[0], b, others[1]]), threshold=0.6)
    assert grouped(report) == [{prepare_data.normalize_text(a), prepare_data.normalize_text(b)}]
    assert items[0].group == items[2].group != items[1].group


def test_words_that_are_variants_and_words_that_are_not():
    assert variants("seeing", "see") and variants("coprrect", "correct") and variants("cancelling", "canceling")
    assert not variants("free", "freemium") and not variants("shop", "shoe") and not variants("closing", "using")
    assert content_words("im trying to turn on dark mode") == content_words("i am trying to turn on dark mode")
    assert content_words("cancel order 123") == content_words("how can i cancel order 456") == ("cancel", "order")


@pytest.mark.parametrize("a, b", [
    ("how do i cancel my order in the shop go app", "how do i cancel my order in the ride hub app"),
    ("how do i back up my profile photo in the bank hub app", "how do i back up my profile photo in the photo hub app"),
    ("how do i turn on dark mode in the shop go app", "how do i turn off dark mode in the shop go app"),
    ("how do i upgrade to a gold account", "how do i upgrade to a platinum account"),
])
def test_prompts_that_name_different_things_are_not_duplicates(a, b):
    assert names_differ(content_words(a), content_words(b))
    _, report = deduplicate(items_of([a, b]), threshold=0.3)
    assert report["near_duplicate_groups"] == 0


def test_a_paraphrase_with_the_same_answer_is_one_group():
    steps = ["Open 'My trips'.", "Select the cancelled flight.", "Tap 'Request refund'.", "Choose the card."]
    records = [{"prompt": "How do I get a refund for a cancelled flight?", "response": steps, "category": "travel"},
               {"prompt": "How do I get my money back for a canceled flight?", "response": steps, "category": "travel"}]
    items, _ = prepare_data.normalize_items([prepare_data.Item(r, str(i)) for i, r in enumerate(records)], True, True)
    _, report = deduplicate(items, threshold=0.6)
    assert report["near_duplicate_groups"] == 1 and report["records_in_near_duplicate_groups"] == 2


def test_near_copies_that_name_different_things_share_a_split_but_not_a_group():
    items, report = deduplicate(items_of(["closing freemium account", "edit pro account", "using freemium account"]),
                                threshold=0.6)
    assert report["near_duplicate_groups"] == 0
    assert report["groups_joined_by_near_copies"] == 1
    assert items[0].group == items[2].group != items[1].group


APPS = [f"{a} {b}" for a, b in zip(("Shop", "Ride", "Food", "Pay", "Photo", "Music", "Chat", "Bank", "Trip", "Home",
                                    "Mail", "News", "Map", "Pet", "Book", "Film"),
                                   itertools.cycle(("Go", "Hub", "Now", "Plus")))]
VERBS = ("turn on", "turn off", "change", "reset", "hide", "share")
SETTINGS = ("dark mode", "notifications", "my password", "location sharing", "autoplay")
OPENERS = ("How do I", "How can I", "I'm trying to", "What are the steps to", "Help me")


def templated_records(seed: int = 0) -> list[dict]:
    """Every question of one pattern (16 apps, 6 verbs, 5 settings) asked three ways, a typo in some."""
    rng = random.Random(seed)
    records = []
    for (a, app), verb, setting in itertools.product(enumerate(APPS), VERBS, SETTINGS):
        for opener in rng.sample(OPENERS, 3):
            prompt = f"{opener} {verb} {setting} in the {app} app?"
            if rng.random() < 0.2:
                prompt = prompt.replace("in the", "in teh")
            records.append({"prompt": prompt, "response": [f"Open {app}.", "Go to 'Settings'.",
                            f"Tap '{setting.capitalize()}'.", f"Tap '{verb.capitalize()}' and confirm."],
                            "category": f"cat{a % 4}", "source": f"{app}|{verb}|{setting}"})
    return records


def test_templated_data_does_not_chain_and_splits_in_its_fractions():
    items, _ = prepare_data.normalize_items([prepare_data.Item(r, str(i)) for i, r in enumerate(templated_records())],
                                            True, True)
    items, report = deduplicate(items, threshold=0.6, max_listed=10_000)
    questions = len(APPS) * len(VERBS) * len(SETTINGS)
    source = {item.origin: item.record["source"] for item in items}
    assert all(len({source[m["origin"]] for m in g}) == 1 for g in report["groups"]), "a group mixes questions"
    assert report["near_duplicate_groups"] == questions  # each question's three wordings, nothing more
    assert report["largest_split_unit"] <= 3 * len(VERBS)
    splits = prepare_data.split_records(items, (0.8, 0.1, 0.1), seed=0)
    for name, fraction in zip(prepare_data.SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(splits[name]) / len(items) - fraction) <= 0.01
    where = {item.origin: name for name, part in splits.items() for item in part}
    assert all(len({where[m["origin"]] for m in g}) == 1 for g in report["groups"])


def test_prepare_data_keeps_variants_in_one_split(tmp_path):
    rng = random.Random(1)
    prompts = [p for pair in VARIANTS for p in pair]
    filler = [f"How do I {''.join(rng.choice(SYLLABLES) for _ in range(4))} the "
              f"{''.join(rng.choice(SYLLABLES) for _ in range(4))} list?" for _ in range(40)]
    records = [{"prompt": p, "response": unique_steps(rng), "category": "account"} for p in prompts + filler]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert prepare_data.main([str(data), "--out", str(tmp_path / "out")]) == 0
    split_of = {json.loads(line)["prompt"]: name for name in prepare_data.SPLITS
                for line in (tmp_path / "out" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()}
    for a, b in VARIANTS:
        assert split_of[prepare_data.normalize_text(a)] == split_of[prepare_data.normalize_text(b)]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dedup"]["near_duplicate_groups"] == len(VARIANTS)
    assert Counter(len(g) for g in stats["dedup"]["groups"]) == {2: len(VARIANTS)}
