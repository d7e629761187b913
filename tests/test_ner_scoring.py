"""Tests for entity-level (conlleval) and token-level NER scoring."""

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.ner.scoring import (
    entity_report,
    extract_chunks,
    format_entity_report,
    format_token_report,
    split_tag,
    token_report,
)


def counts(row):
    return row["correct"], row["predicted"], row["support"]


# Tags and chunks


def test_split_tag_hyphenated_type():
    assert split_tag("B-geo-loc") == ("B", "geo-loc")
    assert split_tag("I-x-") == ("I", "x-")
    assert split_tag("O") == ("O", "")


@pytest.mark.parametrize("tag", ["B-", "I-", "X", "E-PER", "S-PER", "B_PER", "", "o", None])
def test_split_tag_invalid(tag):
    with pytest.raises(ValueError, match="invalid tag"):
        split_tag(tag)


def test_chunks_inside_after_outside_starts_chunk():
    assert extract_chunks(["O", "I-PER", "I-PER", "O"]) == [("PER", 1, 3)]
    assert extract_chunks(["I-PER"]) == [("PER", 0, 1)]


def test_chunks_type_change_inside_run():
    assert extract_chunks(["B-PER", "I-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 2), ("LOC", 2, 4)]
    assert extract_chunks(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]


def test_chunks_begin_after_begin_same_type():
    assert extract_chunks(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 1, 3)]


def test_chunks_at_sentence_end():
    assert extract_chunks(["O", "B-LOC", "I-LOC"]) == [("LOC", 1, 3)]


def test_chunks_hyphenated_type():
    assert extract_chunks(["B-geo-loc", "I-geo-loc", "I-geo"]) == [("geo-loc", 0, 2), ("geo", 2, 3)]


def test_chunks_empty_and_outside():
    assert extract_chunks([]) == []
    assert extract_chunks(["O", "O"]) == []


# Entity report with known counts


def test_entity_exact_match_required():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC", "O", "B-PER"]]
    report = entity_report(gold, pred)
    # PER is cut short and ORG gets the wrong type: only LOC is correct.
    assert counts(report["micro"]) == (1, 3, 3)
    assert counts(report["per_type"]["PER"]) == (0, 2, 1)
    assert counts(report["per_type"]["LOC"]) == (1, 1, 1)
    assert counts(report["per_type"]["ORG"]) == (0, 0, 1)
    assert report["micro"]["precision"] == pytest.approx(1 / 3)
    assert report["micro"]["recall"] == pytest.approx(1 / 3)
    assert report["micro"]["f1"] == pytest.approx(1 / 3)
    assert report["per_type"]["ORG"]["precision"] == 0.0
    assert report["tokens"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)


def test_entity_inside_after_outside_matches_begin():
    # conlleval reads "O I-PER" as a chunk, so it matches "O B-PER".
    report = entity_report([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]])
    assert counts(report["micro"]) == (1, 1, 1)
    assert report["accuracy"] == pytest.approx(2 / 3)


def test_entity_type_change_splits_chunk():
    gold = [["B-PER", "I-PER", "I-LOC"]]
    pred = [["B-PER", "I-PER", "B-LOC"]]
    report = entity_report(gold, pred)
    assert counts(report["micro"]) == (2, 2, 2)
    assert report["micro"]["f1"] == 1.0


def test_entity_begin_after_begin_same_type():
    gold = [["B-PER", "B-PER"]]
    pred = [["B-PER", "I-PER"]]
    report = entity_report(gold, pred)
    assert counts(report["per_type"]["PER"]) == (0, 1, 2)


def test_entity_chunk_at_sentence_end():
    report = entity_report([["O", "B-LOC", "I-LOC"]], [["O", "B-LOC", "I-LOC"]])
    assert counts(report["micro"]) == (1, 1, 1)


def test_entity_chunks_do_not_cross_sentences():
    gold = [["O", "B-PER"], ["I-PER", "O"]]
    pred = [["O", "B-PER"], ["B-PER", "O"]]
    report = entity_report(gold, pred)
    # Joined into one sequence, gold would be one chunk and pred two.
    assert counts(report["micro"]) == (2, 2, 2)


def test_entity_empty_predictions():
    gold = [["B-PER", "O"], ["B-LOC", "I-LOC"]]
    pred = [["O", "O"], ["O", "O"]]
    report = entity_report(gold, pred)
    assert counts(report["micro"]) == (0, 0, 2)
    assert report["micro"]["precision"] == 0.0
    assert report["micro"]["recall"] == 0.0
    assert report["micro"]["f1"] == 0.0
    assert report["macro"]["f1"] == 0.0
    assert report["accuracy"] == pytest.approx(1 / 4)


def test_entity_all_outside_gold():
    gold = [["O", "O", "O"]]
    pred = [["B-PER", "O", "I-LOC"]]
    report = entity_report(gold, pred)
    assert counts(report["micro"]) == (0, 2, 0)
    assert report["micro"]["precision"] == 0.0
    assert report["micro"]["recall"] == 0.0
    assert report["per_type"]["PER"]["support"] == 0
    assert report["weighted"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_entity_no_chunks_anywhere():
    report = entity_report([["O"], []], [["O"], []])
    assert report["per_type"] == {}
    assert counts(report["micro"]) == (0, 0, 0)
    assert report["macro"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["accuracy"] == 1.0


def test_entity_averages():
    gold = [["B-A", "O", "B-B", "B-B", "B-B"]]
    pred = [["B-A", "O", "B-B", "O", "O"]]
    report = entity_report(gold, pred)
    # A: P 1, R 1, F1 1 over 1 chunk. B: P 1, R 1/3, F1 1/2 over 3 chunks.
    assert report["macro"]["precision"] == pytest.approx(1.0)
    assert report["macro"]["recall"] == pytest.approx((1 + 1 / 3) / 2)
    assert report["macro"]["f1"] == pytest.approx(0.75)
    assert report["weighted"]["recall"] == pytest.approx((1 + 3 * (1 / 3)) / 4)
    assert report["weighted"]["f1"] == pytest.approx((1 + 3 * 0.5) / 4)
    assert report["weighted"]["support"] == 4


def test_entity_sentence_length_mismatch():
    with pytest.raises(ValueError, match="sentence 1: gold has 2 tags but pred has 1"):
        entity_report([["O"], ["O", "O"]], [["O"], ["O"]])


def test_entity_sentence_count_mismatch():
    with pytest.raises(ValueError, match="gold has 2 sentences but pred has 1"):
        entity_report([["O"], ["O"]], [["O"]])


def test_entity_invalid_tag_named():
    with pytest.raises(ValueError, match="pred sentence 1, token 0: invalid tag 'E-PER'"):
        entity_report([["O"], ["O"]], [["O"], ["E-PER"]])


def test_entity_flat_sequence_rejected():
    with pytest.raises(TypeError, match="one list of tags per sentence"):
        entity_report(["O", "B-PER"], ["O", "B-PER"])


# Token report with known counts


def test_token_report_counts():
    gold = [["B-PER", "I-PER", "O"], ["O"]]
    pred = [["B-PER", "O", "O"], ["B-LOC"]]
    report = token_report(gold, pred)
    assert list(report["per_tag"]) == ["B-LOC", "B-PER", "I-PER", "O"]
    assert counts(report["per_tag"]["O"]) == (1, 2, 2)
    assert counts(report["per_tag"]["I-PER"]) == (0, 0, 1)
    assert counts(report["per_tag"]["B-LOC"]) == (0, 1, 0)
    assert report["accuracy"] == pytest.approx(0.5)
    assert report["micro"]["f1"] == pytest.approx(0.5)
    assert report["macro"]["recall"] == pytest.approx((0 + 1 + 0 + 0.5) / 4)
    assert report["weighted"]["recall"] == pytest.approx((1 + 0 + 2 * 0.5) / 4)


def test_token_report_length_mismatch():
    with pytest.raises(ValueError, match="sentence 0: gold has 1 tags but pred has 2"):
        token_report([["O"]], [["O", "O"]])


def test_token_report_empty():
    report = token_report([], [])
    assert report["tokens"] == 0
    assert report["accuracy"] == 0.0
    assert report["per_tag"] == {}


# Formatting


def test_format_entity_report_conlleval_layout():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-geo-loc"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-PER"]]
    text = format_entity_report(entity_report(gold, pred))
    assert text == (
        "processed 6 tokens with 3 phrases; found: 3 phrases; correct: 2.\n"
        "accuracy:  83.33%; precision:  66.67%; recall:  66.67%; FB1:  66.67\n"
        "              LOC: precision: 100.00%; recall: 100.00%; FB1: 100.00  1\n"
        "              PER: precision:  50.00%; recall: 100.00%; FB1:  66.67  2\n"
        "          geo-loc: precision:   0.00%; recall:   0.00%; FB1:   0.00  0\n"
    )


def test_format_entity_report_without_tokens():
    assert format_entity_report(entity_report([], [])) == (
        "processed 0 tokens with 0 phrases; found: 0 phrases; correct: 0.\n")


@pytest.mark.parametrize("digits", [2, 4])
def test_format_token_report_matches_sklearn(digits):
    metrics = pytest.importorskip("sklearn.metrics")
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-geo-loc", "I-geo-loc"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"], ["B-PER", "B-geo-loc", "O"]]
    expected = metrics.classification_report(
        [t for s in gold for t in s], [t for s in pred for t in s], digits=digits, zero_division=0)
    assert format_token_report(token_report(gold, pred), digits=digits) == expected


# Generated tag sequences against conlleval, seqeval and scikit-learn

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-geo-loc", "I-geo-loc"]


@st.composite
def gold_and_pred(draw):
    """Sentences of random IOB2 tags, and predictions that copy most gold tags.

    Copying keeps many predicted chunks right, so correct chunks, boundary
    errors and type errors all occur often.
    """
    type_count = draw(st.integers(2, 3))
    tags = TAGS[:1 + 2 * type_count]
    sentence = st.lists(st.sampled_from(tags), max_size=8)
    gold = draw(st.lists(sentence, min_size=1, max_size=6))
    pred = []
    for gold_tags in gold:
        copied = draw(st.lists(st.booleans(), min_size=len(gold_tags), max_size=len(gold_tags)))
        pred.append([tag if keep else draw(st.sampled_from(tags)) for tag, keep in zip(gold_tags, copied)])
    return gold, pred


def conlleval_counts(gold, pred):
    """Count chunks with the state machine of conlleval (Perl, version 2004-01-26), line by line.

    Returns ``(totals, correct_tags, tokens)``, where ``totals`` maps
    "correct", "guessed" and "gold" to chunk counts per type. Sentence
    boundaries are fed as conlleval feeds an empty line, with both tags O.
    """

    def split(tag):
        prefix, _, type_ = tag.partition("-")
        return prefix, type_

    def ends(prev, tag, prev_type, type_):
        return (prev in "BI" and tag in "BO") or (prev != "O" and prev_type != type_)

    def starts(prev, tag, prev_type, type_):
        return tag == "B" or (prev == "O" and tag == "I") or (tag != "O" and prev_type != type_)

    totals = {"correct": {}, "guessed": {}, "gold": {}}
    correct_tags = tokens = 0
    in_correct = False
    last_gold, last_gold_type, last_guess, last_guess_type = "O", "", "O", ""
    lines = []
    for gold_tags, pred_tags in zip(gold, pred):
        lines.extend((g, p, False) for g, p in zip(gold_tags, pred_tags))
        lines.append(("O", "O", True))
    for gold_tag, pred_tag, boundary in lines:
        gold_prefix, gold_type = split(gold_tag)
        guess_prefix, guess_type = split(pred_tag)
        gold_ends = ends(last_gold, gold_prefix, last_gold_type, gold_type)
        guess_ends = ends(last_guess, guess_prefix, last_guess_type, guess_type)
        if in_correct:
            if gold_ends and guess_ends and last_guess_type == last_gold_type:
                in_correct = False
                totals["correct"][last_gold_type] = totals["correct"].get(last_gold_type, 0) + 1
            elif gold_ends != guess_ends or guess_type != gold_type:
                in_correct = False
        gold_starts = starts(last_gold, gold_prefix, last_gold_type, gold_type)
        guess_starts = starts(last_guess, guess_prefix, last_guess_type, guess_type)
        if gold_starts and guess_starts and guess_type == gold_type:
            in_correct = True
        if gold_starts:
            totals["gold"][gold_type] = totals["gold"].get(gold_type, 0) + 1
        if guess_starts:
            totals["guessed"][guess_type] = totals["guessed"].get(guess_type, 0) + 1
        if not boundary:
            tokens += 1
            correct_tags += gold_tag == pred_tag
        last_gold, last_gold_type, last_guess, last_guess_type = (
            gold_prefix, gold_type, guess_prefix, guess_type)
    # The last line is always a boundary, where every open chunk has ended.
    assert not in_correct
    return totals, correct_tags, tokens


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(gold_and_pred())
def test_entity_report_matches_conlleval(data):
    gold, pred = data
    report = entity_report(gold, pred)
    totals, correct_tags, tokens = conlleval_counts(gold, pred)

    types = sorted(totals["gold"].keys() | totals["guessed"].keys())
    assert list(report["per_type"]) == types
    for type_ in types:
        expected = (totals["correct"].get(type_, 0), totals["guessed"].get(type_, 0),
                    totals["gold"].get(type_, 0))
        assert counts(report["per_type"][type_]) == expected, type_
    assert report["tokens"] == tokens
    assert report["accuracy"] == pytest.approx(correct_tags / tokens if tokens else 0.0)


@PROPERTY_SETTINGS
@given(gold_and_pred())
def test_chunks_match_seqeval(data):
    sequence_labeling = pytest.importorskip("seqeval.metrics.sequence_labeling")
    for tags in data[0] + data[1]:
        expected = [(type_, start, end + 1) for type_, start, end in sequence_labeling.get_entities(tags)]
        assert extract_chunks(tags) == expected


@PROPERTY_SETTINGS
@given(gold_and_pred())
def test_entity_report_matches_seqeval(data):
    metrics = pytest.importorskip("seqeval.metrics")
    gold, pred = data
    report = entity_report(gold, pred)
    with warnings.catch_warnings():
        # seqeval warns when a score is 0/0, which it sets to 0 as this module does.
        warnings.simplefilter("ignore")
        micro = (metrics.precision_score(gold, pred), metrics.recall_score(gold, pred),
                 metrics.f1_score(gold, pred))
        accuracy = metrics.accuracy_score(gold, pred) if report["tokens"] else 0.0
        expected = metrics.classification_report(gold, pred, output_dict=True) if report["per_type"] else {}

    assert report["micro"]["precision"] == pytest.approx(micro[0])
    assert report["micro"]["recall"] == pytest.approx(micro[1])
    assert report["micro"]["f1"] == pytest.approx(micro[2])
    assert report["accuracy"] == pytest.approx(accuracy)

    if not expected:
        return
    rows = dict(report["per_type"])
    rows.update({"micro avg": report["micro"], "macro avg": report["macro"],
                 "weighted avg": report["weighted"]})
    assert set(expected) == set(rows)
    for name, row in expected.items():
        assert row["precision"] == pytest.approx(rows[name]["precision"]), name
        assert row["recall"] == pytest.approx(rows[name]["recall"]), name
        assert row["f1-score"] == pytest.approx(rows[name]["f1"]), name
        assert row["support"] == rows[name]["support"], name


@PROPERTY_SETTINGS
@given(gold_and_pred())
def test_token_report_matches_sklearn(data):
    metrics = pytest.importorskip("sklearn.metrics")
    gold, pred = data
    report = token_report(gold, pred)
    flat_gold = [tag for tags in gold for tag in tags]
    flat_pred = [tag for tags in pred for tag in tags]
    if not flat_gold:
        assert report["per_tag"] == {}
        return
    expected = metrics.classification_report(flat_gold, flat_pred, output_dict=True, zero_division=0)

    assert expected.pop("accuracy") == pytest.approx(report["accuracy"])
    assert report["micro"]["f1"] == pytest.approx(report["accuracy"])
    rows = dict(report["per_tag"])
    rows.update({"macro avg": report["macro"], "weighted avg": report["weighted"]})
    assert set(expected) == set(rows)
    for name, row in expected.items():
        assert row["precision"] == pytest.approx(rows[name]["precision"]), name
        assert row["recall"] == pytest.approx(rows[name]["recall"]), name
        assert row["f1-score"] == pytest.approx(rows[name]["f1"]), name
        assert row["support"] == rows[name]["support"], name
