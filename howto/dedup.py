"""Exact duplicates and near-duplicate groups of how-to records, on character shingles, without chaining.

Two records are near-duplicates (one group) when
- their prompts ask the same question: the Jaccard similarity of the prompts' character 5-gram sets, or of their
  content words', is at least the threshold, and where the content words differ, the words on one side are
  spelling or inflection variants of those on the other ("coprrect" / "correct", "seeing" / "see") or one side only
  adds words ("help me with ..."). "Cancel my order in the shop go app" and "... in the ride hub app" swap one name
  for another: not duplicates, however alike. Content words leave out function words, question framing ("how do
  i", "what are the steps to"), contractions spelt out ("im" is "i am") and numbers (order and invoice numbers are
  identifiers, not what a question is about); prompts with the same content words, up to variants, are one
  question whatever the Jaccard; or
- they give the same answer, step for step: a paraphrased question keeps its answer, while a question about
  another app or setting names it in the steps.
Character shingles see the typos, contractions and inflections that word sets cannot.

Groups form around centres (leader clustering): a record joins the most similar earlier centre it is a
near-duplicate of, or founds a group, so a group never chains through intermediates into other questions.

Split units then join the groups that hold near-copies of each other (prompts at 5-gram Jaccard >= NEAR_COPY,
whatever the words: a model trained on one has as good as seen the other) or the same answer, by scipy's connected
components, so that no test prompt is a near-copy of a training prompt. Every step is near linear in the records:
candidates come from word-deletion neighbourhoods, dictionaries and MinHash LSH, and are confirmed exactly.
"""
from __future__ import annotations

import difflib
import functools
import re
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

NEAR_COPY = 0.8
SHINGLE = 5
NUM_PERM = 128

# Words that say nothing about what a question is about: function words and question framing. Particles that change
# the task ("turn on" / "turn off", "log in" / "log out") and negations are content words.
STOPWORDS = frozenset(
    "a an the and or but to of at for from with by as about then than so if is are was were am be been being it its "
    "this that these those there here i me my mine you your yours we our they their them he she his her do does did "
    "doing done how what when where which who whom why can could would should will shall may might must please pls "
    "plz just also some any all get got have has had want wanna need needed know tell show explain steps step way "
    "ways guide help helping assist assistance trying try able possible like information info let lets thanks "
    "thank hi hello hey kindly".split()
)
# Contractions as users type them once punctuation is stripped, spelt out so that "dont" and "do not" agree.
CONTRACTIONS = {
    "im": "i am", "ive": "i have", "youre": "you are", "ur": "your", "u": "you", "dont": "do not",
    "doesnt": "does not", "didnt": "did not", "cant": "can not", "cannot": "can not", "wont": "will not",
    "isnt": "is not", "arent": "are not", "wasnt": "was not", "havent": "have not", "hasnt": "has not",
    "couldnt": "could not", "shouldnt": "should not", "wouldnt": "would not", "whats": "what is", "hows": "how is",
    "wheres": "where is", "theres": "there is", "thats": "that is",
}
_WORD = re.compile(r"[^\W_]+")
_SUFFIXES = ("ing", "ed", "es", "s")

_POLY = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_RNG = np.random.default_rng(20261201)
_A = _RNG.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint32) | np.uint32(1)  # odd: a x + b is a bijection
_B = _RNG.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint32)


class Item(Protocol):
    """What deduplicate needs of a pipeline record: the record, where it came from, and its split unit."""
    record: dict[str, Any]
    origin: str
    group: int


# ------------------------------------------------------------------------------------------ shingles, MinHash
# All texts at once in a few numpy passes: datasketch's MinHash calls Python once per shingle, and its MinHashLSH
# hashes every band's bytes on every call (0.3 ms a look-up here): minutes at 100,000 records, where this takes
# seconds.
def char_shingles(texts: Sequence[str], k: int = SHINGLE) -> list[np.ndarray]:
    """Per text, the sorted distinct 32-bit hashes of its lowercased character k-grams (a shorter text is padded)."""
    if not texts:
        return []
    joined = [" ".join(t.lower().split()).ljust(k, "\0") for t in texts]
    lengths = np.array([len(t) for t in joined], dtype=np.int64)
    codes = np.frombuffer("".join(joined).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = np.zeros(codes.size - k + 1, dtype=np.uint64)
    for offset in range(k):
        hashes = hashes * _POLY + codes[offset:offset + hashes.size]
    owner = np.repeat(np.arange(len(texts), dtype=np.uint64), lengths - k + 1)  # the k-grams inside one text
    ends = np.cumsum(lengths)
    inside = np.ones(hashes.size, dtype=bool)
    for j in range(1, k):
        inside[ends[:-1] - j] = False
    keys = _distinct((owner << np.uint64(32)) | ((hashes[inside] * _MIX) >> np.uint64(32)))
    counts = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=len(texts))
    return np.split((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), np.cumsum(counts)[:-1])


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique, by sorting: numpy 2's hash-based unique is slow on small arrays)."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if values.size else values


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    shared = np.intersect1d(a, b, assume_unique=True).size
    return shared / (a.size + b.size - shared)


def signatures(shingles: Sequence[np.ndarray], chunk: int = 1 << 16) -> np.ndarray:
    """MinHash signatures, one row per shingle set: the least of a x + b (mod 2^32) over its shingles x, for
    NUM_PERM odd a and b drawn once (the shingle hashes are already mixed, as datasketch's affine32 scheme does)."""
    out = np.empty((NUM_PERM, len(shingles)), dtype=np.uint32)
    for start in range(0, len(shingles), chunk):
        part = shingles[start:start + chunk]
        flat = np.concatenate(part)
        offsets = np.concatenate([[0], np.cumsum([p.size for p in part])[:-1]])
        for perm in range(NUM_PERM):
            out[perm, start:start + len(part)] = np.minimum.reduceat(flat * _A[perm] + _B[perm], offsets)
    return np.ascontiguousarray(out.T)


def band_rows(threshold: float, recall: float) -> int:
    """LSH rows per band: the most that still make a pair at `threshold` a candidate with probability >= `recall`
    (in NUM_PERM // rows bands, a pair is a candidate when its signatures agree on every row of some band)."""
    return max(r for r in range(1, 17) if 1 - (1 - threshold ** r) ** (NUM_PERM // r) >= recall)


def band_keys(signatures: np.ndarray, rows: int) -> np.ndarray:
    """One 64-bit key per record and band, from the band's rows."""
    bands = NUM_PERM // rows
    weights = np.random.default_rng(0).integers(1, 1 << 63, size=rows, dtype=np.uint64) | np.uint64(1)
    return (signatures[:, :bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows) * weights).sum(axis=2)


def candidate_pairs(signatures: np.ndarray, threshold: float, recall: float) -> np.ndarray:
    """Every pair (i < j) of records that share a band: LSH over all records at once, in numpy."""
    keys = band_keys(signatures, band_rows(threshold, recall))
    found = []
    for band in keys.T:
        order = np.argsort(band, kind="stable")
        ordered = band[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        ends = np.repeat(np.append(starts[1:], len(ordered)), np.diff(np.append(starts, len(ordered))))
        later = ends - np.arange(len(ordered)) - 1  # members after each one in its bucket
        left = np.repeat(np.arange(len(ordered)), later)
        right = left + 1 + np.arange(left.size) - np.repeat(np.cumsum(later) - later, later)
        i, j = order[left], order[right]
        found.append(np.minimum(i, j) * len(ordered) + np.maximum(i, j))
    codes = _distinct(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return np.stack(np.divmod(codes, max(len(signatures), 1)), axis=1)


# ----------------------------------------------------------------------------------------------- content words
def content_words(prompt: str) -> tuple[str, ...]:
    """What a question is about, in order: its words with contractions spelt out, less stopwords and numbers."""
    words = " ".join(CONTRACTIONS.get(w, w) for w in _WORD.findall(prompt.lower())).split()
    return tuple(w for w in words if w not in STOPWORDS and not w.isdigit())


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            return word[:-1] if len(word) >= 4 and word[-1] == word[-2] else word
    return word


@functools.lru_cache(maxsize=1 << 18)
def variants(a: str, b: str) -> bool:
    """One word written two ways: the same stem ("seeing" / "see"), or a slip in a word of five letters or more
    ("coprrect" / "correct", "acnceling" / "canceling"); "free" / "freemium" and "shop" / "shoe" are not."""
    sa, sb = _stem(a), _stem(b)
    return sa == sb or (min(len(a), len(b)) >= 5 and max(difflib.SequenceMatcher(None, a, b).ratio(),
                                                         difflib.SequenceMatcher(None, sa, sb).ratio()) >= 0.85)


def _unmatched(words: Iterable[str], others: Sequence[str]) -> bool:
    return any(not any(variants(w, o) for o in others) for w in words)


def words_swapped(a: frozenset[str], b: frozenset[str]) -> bool:
    """True when each side has a content word the other lacks, no variant of any of the other's."""
    only_a, only_b = a - b, b - a
    return bool(only_a and only_b) and _swapped(only_a, only_b)


@functools.lru_cache(maxsize=1 << 18)  # templated data asks about the same few word swaps again and again
def _swapped(only_a: frozenset[str], only_b: frozenset[str]) -> bool:
    return _unmatched(only_a, list(only_b)) and _unmatched(only_b, list(only_a))


def names_differ(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when the prompts' content words differ by a replacement (not an addition) whose two sides are not
    variants of each other: "shop go" / "ride hub", "turn on" / "turn off", "bank hub" / "photo hub"."""
    if words_swapped(frozenset(a), frozenset(b)):
        return True
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "replace" and _unmatched(a[i1:i2], b[j1:j2]) and _unmatched(b[j1:j2], a[i1:i2]):
            return True
    return False


# ---------------------------------------------------------------------------------------------------- grouping
def question_key(prompt: str) -> tuple[str, ...]:
    """The content words that say what a prompt asks; all its words when it has none ("how do i do it")."""
    return content_words(prompt) or tuple(_WORD.findall(prompt.lower()))


def cluster(prompts: Sequence[str], prompt_shingles: Sequence[np.ndarray], answers: Sequence[tuple[str, ...]],
            threshold: float) -> list[int]:
    """Each distinct prompt's centre: itself when it founds a group, else the most similar earlier centre that it
    is a near-duplicate of, by either test:
    - the question: the 5-gram Jaccard of the two prompts, or of their content words alone, is >= threshold, and
      no name is swapped;
    - the answer: the same steps word for word ("how do i get a refund for a cancelled flight" / "... get my money
      back ...": a paraphrase keeps the answer; a question about another app would name it in the steps).
    Prompts with the same content words ask the same question, also when some are written differently ("am i
    seeing" / "do i see", "acnceling" / "canceling"): they share a group whatever the Jaccard.

    Question candidates are the centres one content word away (replaced, added or dropped), found through
    word-deletion neighbourhoods as SymSpell finds spellings one edit away: near linear, and a key that differs in
    more words is rarely a paraphrase by the rule (near-copies among those still share a split: split_units).
    """
    keys = [question_key(p) for p in prompts]
    key_shingles = char_shingles([" ".join(key) for key in keys])
    word_sets = [frozenset(key) for key in keys]
    buckets: dict[tuple[str, ...], list[int]] = {}
    first_with_key: dict[tuple[str, ...], int] = {}
    first_with_answer: dict[tuple[str, ...], int] = {}
    centre_of: list[int] = []

    for i, key in enumerate(keys):
        if key in first_with_key:
            centre_of.append(centre_of[first_with_key[key]])
            continue
        first_with_key[key] = i
        neighbourhood = [key] + ([key[:k] + key[k + 1:] for k in range(len(key))] if len(key) > 1 else [])
        best, best_score = i, threshold
        for c in sorted({c for bucket in neighbourhood for c in buckets.get(bucket, ())}):
            if words_swapped(word_sets[i], word_sets[c]):
                continue
            if len(key) == len(keys[c]) and all(x == y or variants(x, y) for x, y in zip(key, keys[c])):
                score = 1.0
            else:
                score = max(jaccard(key_shingles[i], key_shingles[c]), jaccard(prompt_shingles[i], prompt_shingles[c]))
            if score >= best_score and not names_differ(key, keys[c]):
                best, best_score = c, score
        same_answer = first_with_answer.setdefault(answers[i], i)
        if same_answer != i and answers[centre_of[same_answer]] == answers[i]:
            best = centre_of[same_answer]
        if best == i:
            for bucket in neighbourhood:
                buckets.setdefault(bucket, []).append(i)
        centre_of.append(best)
    return centre_of


def split_units(shingles: Sequence[np.ndarray], answers: Sequence[tuple[str, ...]], group_of: np.ndarray,
                threshold: float) -> np.ndarray:
    """A split unit per distinct prompt: its group, joined with each group that holds a near-copy of it or the same
    answer word for word.

    A near-copy may name another thing ("closing" / "using freemium account"), and a group's centre may have
    another answer than a member's; scipy's connected components over these links keep every such pair in one
    split. Near-copy candidates come from MinHash LSH over all prompts at once; the exact Jaccard of each likely
    pair is one row-wise product of sparse shingle matrices.
    """
    if not shingles:
        return np.zeros(0, dtype=np.int64)
    copy_level = max(threshold, NEAR_COPY)
    sigs = signatures(shingles)
    pairs = candidate_pairs(sigs, copy_level, recall=0.99)
    pairs = pairs[group_of[pairs[:, 0]] != group_of[pairs[:, 1]]]
    # A first look on half the permutations: 0.15 below the level is 3 standard errors of that estimate at 0.8.
    half = np.ascontiguousarray(sigs[:, :NUM_PERM // 2])
    likely = np.concatenate([part[(half[part[:, 0]] == half[part[:, 1]]).mean(axis=1) >= copy_level - 0.15]
                             for part in np.array_split(pairs, max(1, len(pairs) // 500_000))])
    sizes = np.array([s.size for s in shingles], dtype=np.int64)
    flat = np.concatenate(shingles)
    columns = np.searchsorted(_distinct(flat), flat)
    matrix = csr_matrix((np.ones(flat.size, dtype=np.int32), (np.repeat(np.arange(len(shingles)), sizes), columns)))
    shared = np.asarray(matrix[likely[:, 0]].multiply(matrix[likely[:, 1]]).sum(axis=1)).ravel()
    links = likely[shared >= copy_level * (sizes[likely[:, 0]] + sizes[likely[:, 1]] - shared)]
    _, first_in_group = np.unique(group_of, return_index=True)
    leader = np.zeros(group_of.max() + 1, dtype=np.int64)
    leader[group_of[first_in_group]] = first_in_group  # each group's first prompt stands for it
    first_with_answer: dict[tuple[str, ...], int] = {}
    same_answer = np.array([first_with_answer.setdefault(answer, i) for i, answer in enumerate(answers)],
                           dtype=np.int64)
    rows = np.concatenate([np.arange(len(shingles)), np.arange(len(shingles)), links[:, 0]])
    cols = np.concatenate([leader[group_of], same_answer, links[:, 1]])
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(len(shingles), len(shingles)))
    return connected_components(graph, directed=False)[1]


def deduplicate(items: list[Item], threshold: float, max_listed: int = 200) -> tuple[list[Item], dict[str, Any]]:
    """Drop exact duplicates (the first one stays) and group near-duplicates, setting each Item's `group` to its
    split unit. Near-duplicates are kept, since a paraphrase is useful training data, but always share a split."""
    kept: list[Item] = []
    first: dict[tuple, Item] = {}
    removed = []
    for item in items:
        key = (item.record["prompt"], tuple(item.record["response"]))
        if key in first:
            removed.append({"removed": item.origin, "kept": first[key].origin, "prompt": item.record["prompt"]})
        else:
            first[key] = item
            kept.append(item)

    distinct_prompts: dict[str, int] = {}
    prompt_of = np.array([distinct_prompts.setdefault(item.record["prompt"], len(distinct_prompts))
                          for item in kept], dtype=np.int64)
    answers: list[tuple[str, ...]] = [()] * len(distinct_prompts)
    for item, p in zip(reversed(kept), reversed(prompt_of.tolist())):
        answers[p] = tuple(item.record["response"])  # the first record's steps stand for its prompt
    prompt_shingles = char_shingles(list(distinct_prompts))
    group_of = np.asarray(cluster(list(distinct_prompts), prompt_shingles, answers, threshold), dtype=np.int64)
    units = split_units(prompt_shingles, answers, group_of, threshold)[prompt_of]
    members: dict[int, list[int]] = {}
    for i, (item, p) in enumerate(zip(kept, prompt_of.tolist())):
        item.group = int(units[i])
        members.setdefault(int(group_of[p]), []).append(i)
    groups = [m for m in members.values() if len(m) > 1]
    unit_sizes = np.bincount(units, minlength=1)
    report = {
        "exact_duplicates_removed": len(removed),
        "exact_duplicates": removed[:max_listed],
        "near_duplicate_threshold": threshold,
        "near_duplicate_groups": len(groups),
        "records_in_near_duplicate_groups": sum(len(g) for g in groups),
        "near_copy_threshold": max(threshold, NEAR_COPY),
        "groups_joined_by_near_copies": len(members) - int(np.count_nonzero(unit_sizes)),
        "largest_split_unit": int(unit_sizes.max()),
        "groups": [[{"origin": kept[i].origin, "prompt": kept[i].record["prompt"]} for i in g]
                   for g in groups[:max_listed]],
    }
    return kept, report
