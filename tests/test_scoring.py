"""Scoring of VQA answers (spec §5.5): hand-computed cases for the official
Med-MoE / LLaVA-Med rules and for our aggregate summary."""

from __future__ import annotations

import dataclasses

import pytest

from medmoe_edge.scoring import (
    OpenScores,
    ScoreRow,
    closed_correct,
    closed_strict,
    normalize_answer_type,
    normalize_word,
    open_scores,
    summarize,
)


# --------------------------------------------------------------------------- normalize_word


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # number words -> digits; trailing period (not before a digit) removed
        ("There are TWO lesions.", "there are 2 lesions"),
        ("None", "0"),
        ("zero one two three four five six seven eight nine ten", "0 1 2 3 4 5 6 7 8 9 10"),
        ("eleven", "eleven"),  # only none/zero..ten are mapped
        # articles removed (after lower-casing)
        ("The left lung", "left lung"),
        ("A mass in an organ", "mass in organ"),
        ("the", ""),
        # punctuation not touching a space becomes a space ...
        ("an x-ray", "x ray"),
        ("(CT)", "ct"),
        ("t1/t2", "t1 t2"),
        # ... punctuation next to a space anywhere is deleted everywhere
        ("left - right", "left right"),
        ("yes, there is", "yes there is"),
        ("what?!", "what"),
        # a digit-comma-digit anywhere switches every punctuation mark to deletion
        ("1,000 x-ray cells", "1000 xray cells"),
        # periods before digits stay; others go
        ("3.5 cm.", "3.5 cm"),
        ("about .5 mm", "about .5 mm"),
        # characters outside the punctuation list are kept
        ("T2: 50%", "t2: 50%"),
        # contractions get their apostrophe back
        ("dont know", "don't know"),
        ("It isnt", "it isn't"),
        # quirks of the original table: capital keys never match, one entry is reversed
        ("Im", "im"),
        ("somebody'd", "somebodyd"),
        # whitespace collapsed
        ("  left \t lung \n", "left lung"),
        ("", ""),
    ],
)
def test_normalize_word(text: str, expected: str) -> None:
    assert normalize_word(text) == expected


def test_normalize_word_period_quirk_deletes_at_most_32() -> None:
    # The original passes re.UNICODE (== 32) as Pattern.sub's *count* argument.
    assert normalize_word("." * 40 + "x") == "." * 8 + "x"


# --------------------------------------------------------------------------- open questions


def _approx(s: OpenScores, recall: float, precision: float, f1: float, ems: float) -> None:
    assert s.recall == pytest.approx(recall)
    assert s.precision == pytest.approx(precision)
    assert s.f1 == pytest.approx(f1)
    assert s.exact_match == pytest.approx(ems)


def test_open_identical_after_normalisation() -> None:
    # cand {left, lung}, ref {left, lung}: tp=2, fp=0, fn=0 -> P=R=F1=1; EMS = 2 shared types / 2 tokens
    _approx(open_scores("The left lung.", "left lung"), 1, 1, 1, 1)
    # "Two Nodules." and "2 nodules" both normalise to "2 nodules"
    _approx(open_scores("Two Nodules.", "2 nodules"), 1, 1, 1, 1)


def test_open_partial_overlap() -> None:
    # cand {left, lung, lesion}, ref {right, lung, lesion}
    # tp = lung + lesion = 2, fp = left = 1, fn = right = 1
    # P = 2/3, R = 2/3, F1 = 2/3; EMS = 2 shared types / 3 cand tokens = 2/3
    _approx(open_scores("left lung lesion", "right lung lesion"), 2 / 3, 2 / 3, 2 / 3, 2 / 3)


def test_open_longer_sentence() -> None:
    # cand "mass in left upper lobe" (5 tokens), ref "left upper lobe mass lesion" (5)
    # tp = mass+left+upper+lobe = 4, fp = in = 1, fn = lesion = 1 -> P = R = F1 = 4/5; EMS = 4/5
    _approx(open_scores("A mass in the left upper lobe", "left upper lobe mass lesion"), 0.8, 0.8, 0.8, 0.8)


def test_open_repeated_candidate_word_inflates_recall() -> None:
    # cand {lung: 3}, ref {lung: 1, nodule: 1}
    # tp = candidate count of lung = 3, fp = 0, fn = nodule = 1
    # R = 3/4, P = 3/3 = 1, F1 = 2*1*0.75/1.75 = 6/7; EMS = 1 shared type / 3 tokens = 1/3
    _approx(open_scores("lung lung lung", "lung nodule"), 3 / 4, 1, 6 / 7, 1 / 3)


def test_open_repeated_reference_word() -> None:
    # cand {lung: 1}, ref {lung: 2, nodule: 1}
    # tp = 1 (candidate count), fp = 0, fn = nodule = 1 (the 2nd "lung" is not counted)
    # R = 1/2, P = 1, F1 = 2/3; EMS = 1/1 = 1
    _approx(open_scores("lung", "lung lung nodule"), 1 / 2, 1, 2 / 3, 1)


def test_open_no_overlap_and_empties() -> None:
    # tp = 0 -> all zero; EMS = 0 shared / 1 token = 0
    _approx(open_scores("heart", "lung"), 0, 0, 0, 0)
    # empty candidate: all zero, EMS 0 (no candidate tokens)
    _approx(open_scores("", "lung"), 0, 0, 0, 0)
    # empty reference: all zero; EMS = 0 shared / 1 token = 0
    _approx(open_scores("lung", ""), 0, 0, 0, 0)
    # both empty after normalisation (articles and punctuation only)
    _approx(open_scores("the ...", "a"), 0, 0, 0, 0)
    _approx(open_scores("", ""), 0, 0, 0, 0)


def test_open_scores_is_frozen() -> None:
    s = open_scores("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.recall = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- closed questions


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Yes", "yes", True),
        ("yes", "no", False),
        ("No.", "no", True),
        # substring quirks of the official rule, kept on purpose
        ("normal", "no", True),
        ("Not sure", "No", True),
        ("yes and no", "yes", True),
        ("yes and no", "no", True),
        ("no", "yes", False),
        ("anything", "", True),
    ],
)
def test_closed_correct_substring_rule(prediction: str, reference: str, expected: bool) -> None:
    assert closed_correct(prediction, reference) is expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("YES", "yes", True),
        ("No.", "no", True),
        ("normal", "no", False),
        ("Yes, there is", "yes", False),
        ("yes and no", "yes", False),
        ("The answer is yes", "yes", False),
        ("Two", "2", True),
    ],
)
def test_closed_strict(prediction: str, reference: str, expected: bool) -> None:
    assert closed_strict(prediction, reference) is expected


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("spelling", ["open", "OPEN", "Open", " open "])
def test_answer_type_open(spelling: str) -> None:
    assert normalize_answer_type(spelling) == "open"
    assert ScoreRow("CT", spelling, "x", "y").answer_type == "open"


@pytest.mark.parametrize("spelling", ["close", "closed", "CLOSED", "CLOSE"])
def test_answer_type_closed(spelling: str) -> None:
    assert normalize_answer_type(spelling) == "closed"
    assert ScoreRow("CT", spelling, "x", "y").answer_type == "closed"


@pytest.mark.parametrize("spelling", ["yes/no", "", "opened"])
def test_answer_type_unknown(spelling: str) -> None:
    with pytest.raises(ValueError, match="unknown answer_type") as exc:
        ScoreRow("CT", spelling, "x", "y")
    assert repr(spelling) in str(exc.value)


def test_summarize_two_domains() -> None:
    rows = [
        # MRI first: output must still be sorted
        ScoreRow("MRI", "open", "lung lung lung", "lung nodule"),  # R 3/4, P 1, F1 6/7, EMS 1/3
        ScoreRow("MRI", "OPEN", "", "brain"),  # all 0
        ScoreRow("MRI", "CLOSED", "No.", "no"),  # substring yes, strict yes
        ScoreRow("CT", "close", "yes", "yes"),  # substring yes, strict yes
        ScoreRow("CT", "closed", "normal", "no"),  # substring yes, strict no
        ScoreRow("CT", "CLOSED", "yes", "no"),  # substring no, strict no
        ScoreRow("CT", "open", "left lung lesion", "right lung lesion"),  # R = P = F1 = EMS = 2/3
    ]
    out = summarize(rows)
    assert list(out) == ["CT", "MRI", "overall"]

    ct = out["CT"]
    assert (ct["n_closed"], ct["n_open"]) == (3, 1)
    assert ct["closed_accuracy"] == pytest.approx(200 / 3)  # 2 of 3
    assert ct["closed_strict"] == pytest.approx(100 / 3)  # 1 of 3
    for key in ("open_recall", "open_precision", "open_f1", "open_ems"):
        assert ct[key] == pytest.approx(200 / 3)

    mri = out["MRI"]
    assert (mri["n_closed"], mri["n_open"]) == (1, 2)
    assert mri["closed_accuracy"] == pytest.approx(100.0)
    assert mri["closed_strict"] == pytest.approx(100.0)
    assert mri["open_recall"] == pytest.approx(37.5)  # (3/4 + 0) / 2
    assert mri["open_precision"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert mri["open_f1"] == pytest.approx(300 / 7)  # (6/7 + 0) / 2
    assert mri["open_ems"] == pytest.approx(50 / 3)  # (1/3 + 0) / 2

    ov = out["overall"]
    assert (ov["n_closed"], ov["n_open"]) == (4, 3)
    assert ov["closed_accuracy"] == pytest.approx(75.0)  # 3 of 4
    assert ov["closed_strict"] == pytest.approx(50.0)  # 2 of 4
    assert ov["open_recall"] == pytest.approx(100 * 17 / 36)  # (2/3 + 3/4 + 0) / 3
    assert ov["open_precision"] == pytest.approx(100 * 5 / 9)  # (2/3 + 1 + 0) / 3
    assert ov["open_f1"] == pytest.approx(100 * 32 / 63)  # (2/3 + 6/7 + 0) / 3
    assert ov["open_ems"] == pytest.approx(100 / 3)  # (2/3 + 1/3 + 0) / 3


def test_summarize_missing_type_is_none_and_empty_input() -> None:
    out = summarize([ScoreRow("PET", "closed", "yes", "yes")])
    assert out["PET"]["closed_accuracy"] == pytest.approx(100.0)
    assert out["PET"]["open_recall"] is None
    assert out["PET"]["n_open"] == 0
    empty = summarize([])
    assert list(empty) == ["overall"]
    assert empty["overall"]["closed_accuracy"] is None
    assert empty["overall"]["n_closed"] == 0


def test_summarize_rejects_reserved_domain_and_reassigned_type() -> None:
    with pytest.raises(ValueError, match="reserved"):
        summarize([ScoreRow("overall", "open", "x", "x")])
    row = ScoreRow("CT", "open", "x", "x")
    row.answer_type = "bogus"
    with pytest.raises(ValueError, match="'bogus'"):
        summarize([row])
