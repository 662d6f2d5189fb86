"""Scoring of Med-MoE VQA answers, reproducing the official evaluation (spec §5.5).

The official numbers come from Med-MoE's ``run_eval.py`` together with
``moellava/eval/eval_metrics/{evaluate_metrics,utils,glossary}.py`` (inherited
from LLaVA-Med, ``llava/eval/eval_metrics/``). This module re-implements that
scoring in plain Python, checked line by line against
``jiangsongtao/Med-MoE@148cbd6`` (``run_eval.py``, ``moellava/eval/eval_metrics/
glossary.py``, ``evaluate_metrics.py``, ``utils.py``), including its quirks:

* open questions (paper column "Open" = **recall**): :func:`open_scores`, which
  mirrors ``calculate_f1score`` and ``calculate_exactmatch`` (paper Eq. 7, "EMS");
* closed questions (paper column "Closed" = **accuracy**): :func:`closed_correct`,
  the lower-cased reference being a *substring* of the lower-cased prediction;
* :func:`closed_strict` is **ours**, not the paper's: a stricter closed metric
  for spotting answers that only pass the substring rule by accident.

The BLEU columns of ``run_eval.py`` (NLTK ``sentence_bleu``) are not reproduced
here: they need NLTK, and the paper's headline numbers do not use them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

__all__ = [
    "OpenScores",
    "ScoreRow",
    "closed_correct",
    "closed_strict",
    "normalize_answer_type",
    "normalize_word",
    "open_scores",
    "summarize",
]

# ---------------------------------------------------------------------------
# Text normalisation: our re-implementation of ``normalize_word`` from
# moellava/eval/eval_metrics/glossary.py (Med-MoE; identical to LLaVA-Med's
# llava/eval/eval_metrics/glossary.py, itself derived from the VQA evaluation
# script). The tables below carry the same entries as the original.
# ---------------------------------------------------------------------------

# Missing-apostrophe spellings -> spelling with apostrophe. The original table
# has a few oddities that we keep on purpose so scores match: keys with capitals
# ("Im", "Ive", "Id've", "I'dve") can never match because words are lower-cased
# first, and "somebody'd" is mapped the wrong way round (to "somebodyd").
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# Number words -> digits (only none/zero..ten, as in the original "manual_map").
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Punctuation handled one character at a time, in the original order. Note what
# is *not* here: "." (handled by _PERIOD below), "'", ":", "*", "#", "%", "&".
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!")

# The original pattern is "(?!<=\d)(\.)(?!\d)": its first group was meant as a
# look-behind but is written as a negative look-*ahead* for "<=" + digit, which
# can never match where the next character is ".", so it is a no-op. What is
# left: delete every "." that is not followed by a digit ("3.5" and ".5" keep
# theirs; "5." and "cm." lose it).
_PERIOD = re.compile(r"\.(?!\d)")
# The original calls ``period_strip.sub("", text, re.UNICODE)``: the third
# positional argument of Pattern.sub is *count*, so at most re.UNICODE == 32
# periods are deleted per call. Reproduced for exactness.
_PERIOD_MAX_DELETIONS = int(re.UNICODE)
# A comma between two digits ("1,000") anywhere in the text switches the
# punctuation rule from "replace by a space" to "delete" for every character.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def normalize_word(text: str) -> str:
    """Normalise an answer the way the official Med-MoE / LLaVA-Med scorer does.

    Steps (``glossary.normalize_word``, spec §5.5):

    1. For each punctuation character in ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``:
       if it occurs next to a space anywhere in the *input* (``"x, y"``) or the
       input contains a digit-comma-digit (``"1,000"``), delete it everywhere;
       otherwise replace it by a space (so ``"x-ray"`` becomes ``"x ray"``).
    2. Delete periods not followed by a digit (at most 32, a quirk of the original).
    3. Lower-case, split on whitespace, map ``none``/``zero``..``ten`` to digits,
       drop the articles ``a``/``an``/``the``.
    4. Restore apostrophes of common contractions (``dont`` -> ``don't``).
    5. Join with single spaces and delete any remaining comma.

    The result is idempotent for ordinary text but not guaranteed to be in
    general (the original is not either); the scorer applies it once.
    """
    original = text
    out = text
    # The "next to a space" test looks at the untouched input, not at the text
    # being rewritten, exactly as the original does.
    delete_all = _DIGIT_COMMA_DIGIT.search(original) is not None
    for p in _PUNCT:
        if delete_all or (p + " ") in original or (" " + p) in original:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_MAX_DELETIONS)

    words: list[str] = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)  # number words first, then articles
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def _tokens(text: str) -> Counter[str]:
    """Unigram counts of a normalised string (``utils.split_sentence(s, 1)``)."""
    return Counter(text.lower().strip().split())


# ---------------------------------------------------------------------------
# Open questions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenScores:
    """Token-overlap scores of one open answer, each in [0, 1].

    ``recall`` is what the paper reports as "Open"; ``exact_match`` is the
    paper's "EMS" (Eq. 7), which despite its name is a precision-like ratio.
    """

    recall: float
    precision: float
    f1: float
    exact_match: float


def open_scores(candidate: str, reference: str) -> OpenScores:
    """Score a predicted open answer against the reference answer.

    Both strings are lower-cased (``run_eval.py``) and normalised with
    :func:`normalize_word` (inside ``calculate_f1score``/``calculate_exactmatch``),
    then split on whitespace into unigram counts. Over the union of word *types*
    (spec §5.5):

    * tp = sum of **candidate** counts of words present in both,
    * fp = candidate counts of candidate-only words,
    * fn = reference counts of reference-only words,

    precision = tp/(tp+fp), recall = tp/(tp+fn), f1 their harmonic mean; all
    three are 0 if either side is empty after normalisation or tp = 0. Because
    tp counts candidate occurrences, repeating a correct word inflates recall:
    candidate ``"x x x"`` against reference ``"x y"`` gives tp=3, fn=1, recall 3/4
    (not 1/2), precision 1.

    ``exact_match`` (EMS, Eq. 7) = number of *distinct* reference words present
    in the candidate / number of candidate *tokens* (with repeats); 0 when the
    candidate is empty (and necessarily 0 when the reference is empty).
    """
    cand = _tokens(normalize_word(candidate.lower()))
    ref = _tokens(normalize_word(reference.lower()))

    # calculate_exactmatch
    total = sum(cand.values())
    shared_types = sum(1 for w in ref if w in cand)
    ems = shared_types / total if total else 0.0

    # calculate_f1score
    if not cand or not ref:
        return OpenScores(0.0, 0.0, 0.0, ems)
    tp = sum(n for w, n in cand.items() if w in ref)
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    if tp == 0:
        return OpenScores(0.0, 0.0, 0.0, ems)
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    return OpenScores(recall=recall, precision=precision, f1=f1, exact_match=ems)


# ---------------------------------------------------------------------------
# Closed questions
# ---------------------------------------------------------------------------


def closed_correct(prediction: str, reference: str) -> bool:
    """Official closed-question rule: the lower-cased reference is a substring of
    the lower-cased prediction (``run_eval.py`` L58-61, spec §5.5).

    No normalisation is applied. This is deliberately loose and kept as is
    because it is how the paper's "Closed" accuracy was computed: reference
    ``"no"`` is matched by ``"not"``, ``"normal"`` or ``"I do not know"``, and a
    prediction ``"yes and no"`` is right whatever the reference.
    """
    return reference.lower() in prediction.lower()


def closed_strict(prediction: str, reference: str) -> bool:
    """Our stricter closed metric (not in the paper): the two answers are equal
    after :func:`normalize_word` (so ``"Yes."`` == ``"yes"``, but ``"normal"`` !=
    ``"no"`` and ``"yes, there is"`` != ``"yes"``).

    Useful next to :func:`closed_correct` to see how many "correct" closed
    answers only pass the substring rule by accident.
    """
    return normalize_word(prediction.lower()) == normalize_word(reference.lower())


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------

_OPEN_TYPES = frozenset({"open"})
_CLOSED_TYPES = frozenset({"close", "closed"})


def normalize_answer_type(answer_type: str) -> str:
    """Map the official spellings (``open``/``OPEN``, ``close``/``CLOSED``, and
    ``closed``) to ``"open"`` or ``"closed"``; anything else is a ValueError."""
    key = answer_type.strip().lower() if isinstance(answer_type, str) else None
    if key in _OPEN_TYPES:
        return "open"
    if key in _CLOSED_TYPES:
        return "closed"
    raise ValueError(
        f"unknown answer_type {answer_type!r}: expected 'open'/'OPEN' or 'close'/'closed'/'CLOSED'"
    )


@dataclass
class ScoreRow:
    """One scored question: its imaging domain, answer type, and the two answers.

    ``answer_type`` may use any official spelling; it is normalised to
    ``"closed"``/``"open"`` on construction (unknown values raise ValueError).
    """

    domain: str
    answer_type: str
    prediction: str
    reference: str

    def __post_init__(self) -> None:
        self.answer_type = normalize_answer_type(self.answer_type)


OVERALL = "overall"


class _Acc:
    """Running sums for one group (a domain or overall)."""

    def __init__(self) -> None:
        self.n_closed = 0
        self.closed_hits = 0
        self.closed_strict_hits = 0
        self.n_open = 0
        self.recall = 0.0
        self.precision = 0.0
        self.f1 = 0.0
        self.ems = 0.0

    def add(self, row: ScoreRow) -> None:
        if row.answer_type == "closed":
            self.n_closed += 1
            self.closed_hits += closed_correct(row.prediction, row.reference)
            self.closed_strict_hits += closed_strict(row.prediction, row.reference)
        else:
            s = open_scores(row.prediction, row.reference)
            self.n_open += 1
            self.recall += s.recall
            self.precision += s.precision
            self.f1 += s.f1
            self.ems += s.exact_match

    def result(self) -> dict[str, float | int | None]:
        def pct(total: float, n: int) -> float | None:
            return 100.0 * total / n if n else None

        return {
            "closed_accuracy": pct(self.closed_hits, self.n_closed),
            "closed_strict": pct(self.closed_strict_hits, self.n_closed),
            "open_recall": pct(self.recall, self.n_open),
            "open_precision": pct(self.precision, self.n_open),
            "open_f1": pct(self.f1, self.n_open),
            "open_ems": pct(self.ems, self.n_open),
            "n_closed": self.n_closed,
            "n_open": self.n_open,
        }


def summarize(rows: list[ScoreRow]) -> dict[str, dict[str, float | int | None]]:
    """Aggregate scores per domain and over all rows.

    Returns ``{domain: metrics, ..., "overall": metrics}`` with domains in sorted
    order and ``"overall"`` last. ``metrics`` holds, in percent:

    * ``closed_accuracy`` - official substring rule (paper "Closed"),
    * ``closed_strict`` - our normalised exact match,
    * ``open_recall`` (paper "Open"), ``open_precision``, ``open_f1``,
      ``open_ems`` (paper Eq. 7) - means of the per-question scores, as
      ``run_eval.py`` averages them,

    plus the counts ``n_closed`` and ``n_open``. A metric whose group has no
    question of that type is ``None`` (``run_eval.py`` would print 0 for closed
    and divide by zero for open). "overall" pools every question (a micro
    average), which is what ``run_eval.py`` computes on one test set.
    """
    groups: dict[str, _Acc] = {}
    overall = _Acc()
    for row in rows:
        if row.domain == OVERALL:
            raise ValueError(f"domain name {OVERALL!r} is reserved for the pooled summary")
        # Re-check here too: ScoreRow is mutable, answer_type may have been reassigned.
        row_type = normalize_answer_type(row.answer_type)
        if row_type != row.answer_type:
            row = ScoreRow(row.domain, row_type, row.prediction, row.reference)
        groups.setdefault(row.domain, _Acc()).add(row)
        overall.add(row)
    out = {domain: groups[domain].result() for domain in sorted(groups)}
    out[OVERALL] = overall.result()
    return out
