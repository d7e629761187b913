"""Tests for the CoNLL reader and writer, the WNUT-16 loader and the train/dev split."""

import os
import random

import pytest

from refimpl.errors import FormatError, RefimplError
from refimpl.ner.conll import (
    Sentence,
    entity_types,
    label_list,
    load_wnut16_train,
    read_conll,
    split_train_dev,
    write_conll,
)


def write_bytes(tmp_path, data, name="data.txt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_text(tmp_path, text, name="data.txt"):
    return read_conll(write_bytes(tmp_path, text.encode("utf-8"), name))


def as_pairs(sentences):
    return [list(zip(sentence.words, sentence.tags)) for sentence in sentences]


TWO_SENTENCES = [
    [("John", "B-person"), ("lives", "O")],
    [("in", "O"), ("New", "B-geo-loc"), ("York", "I-geo-loc")],
]


# Separators and line formats


def test_read_tab_separated(tmp_path):
    sentences = read_text(tmp_path, "John\tB-person\nlives\tO\n\nin\tO\nNew\tB-geo-loc\nYork\tI-geo-loc\n")
    assert as_pairs(sentences) == TWO_SENTENCES


def test_read_space_separated(tmp_path):
    text = "John B-person\nlives    O\n\nin O\nNew  B-geo-loc\nYork I-geo-loc\n"
    assert as_pairs(read_text(tmp_path, text)) == TWO_SENTENCES


def test_read_mixed_separators_and_padding(tmp_path):
    text = "  John \t B-person \nlives\t\tO\t\n"
    assert as_pairs(read_text(tmp_path, text)) == [TWO_SENTENCES[0]]


def test_read_extra_columns_take_last_as_tag(tmp_path):
    text = "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
    sentences = read_text(tmp_path, text)
    assert sentences[0].words == ["EU", "rejects"]
    assert sentences[0].tags == ["B-ORG", "O"]


def test_read_lone_tab_separator(tmp_path):
    text = "John\tB-person\nlives\tO\n\t\nin\tO\nNew\tB-geo-loc\nYork\tI-geo-loc\n\t\n"
    assert as_pairs(read_text(tmp_path, text)) == TWO_SENTENCES


def test_read_whitespace_only_separator(tmp_path):
    text = "John\tB-person\nlives\tO\n   \t  \nin\tO\nNew\tB-geo-loc\nYork\tI-geo-loc\n"
    assert as_pairs(read_text(tmp_path, text)) == TWO_SENTENCES


def test_read_crlf_line_endings(tmp_path):
    data = b"John\tB-person\r\nlives\tO\r\n\r\nin\tO\r\nNew\tB-geo-loc\r\nYork\tI-geo-loc\r\n\r\n"
    sentences = read_conll(write_bytes(tmp_path, data))
    assert as_pairs(sentences) == TWO_SENTENCES
    assert sentences[1].line == 4


def test_read_utf8_bom(tmp_path):
    data = b"\xef\xbb\xbfJohn\tB-person\nlives\tO\n"
    sentences = read_conll(write_bytes(tmp_path, data))
    assert sentences[0].words == ["John", "lives"]


def test_read_non_ascii_tokens(tmp_path):
    sentences = read_text(tmp_path, "Zürich\tB-geo-loc\n\u00a0\tO\n🙂\tO\n")
    assert sentences[0].words == ["Zürich", "\u00a0", "🙂"]


def test_read_docstart_skipped(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nJohn B-person\n-DOCSTART-\nlives O\n\n-DOCSTART-\tO\nin O\n"
    sentences = read_text(tmp_path, text)
    assert [sentence.words for sentence in sentences] == [["John"], ["lives"], ["in"]]
    assert [sentence.line for sentence in sentences] == [3, 5, 8]


def test_read_missing_final_blank_line(tmp_path):
    sentences = read_text(tmp_path, "John\tB-person\n\nlives\tO")
    assert [sentence.words for sentence in sentences] == [["John"], ["lives"]]


def test_read_repeated_blank_lines(tmp_path):
    text = "\n\n\t\nJohn\tB-person\n\n\n \n\nlives\tO\n\n\n"
    sentences = read_text(tmp_path, text)
    assert [sentence.words for sentence in sentences] == [["John"], ["lives"]]
    assert [sentence.line for sentence in sentences] == [4, 9]


def test_read_empty_file(tmp_path):
    assert read_text(tmp_path, "") == []


def test_read_hyphenated_type(tmp_path):
    sentences = read_text(tmp_path, "New\tB-geo-loc\nYork\tI-geo-loc\nnow\tO\n")
    assert sentences[0].tags == ["B-geo-loc", "I-geo-loc", "O"]
    assert entity_types(sentences) == ["geo-loc"]


def test_read_first_word_line_numbers(tmp_path):
    text = "a\tO\nb\tO\n\nc\tO\n\n\nd\tO\ne\tO\n"
    assert [sentence.line for sentence in read_text(tmp_path, text)] == [1, 4, 7]


# Malformed input


@pytest.mark.parametrize("text, line", [
    ("foo\n", 1),
    ("a\tO\nb\tO\n\nfoo\n", 4),
    ("a O\n\t\n\n   foo   \n", 4),
    ("-DOCSTART- -X- O\n\na\tO\nfoo\t\n", 4),
])
def test_read_single_field_line_rejected(tmp_path, text, line):
    with pytest.raises(FormatError) as caught:
        read_text(tmp_path, text, name="broken.txt")
    message = str(caught.value)
    assert "broken.txt" in message
    assert f"line {line}:" in message
    assert 'expected "TOKEN TAG"' in message
    assert "foo" in message


def test_read_single_field_message_format(tmp_path):
    path = write_bytes(tmp_path, b"a\tO\nfoo\n")
    with pytest.raises(FormatError) as caught:
        read_conll(path)
    assert str(caught.value) == (f'{path}: line 2: expected "TOKEN TAG" separated by '
                                 "a tab or spaces, got 'foo'")


@pytest.mark.parametrize("tag", ["B-", "I-", "X", "PER", "E-PER", "S-PER", "b-PER", "B_PER", "BPER", "o"])
def test_read_invalid_tag_rejected(tmp_path, tag):
    with pytest.raises(FormatError) as caught:
        read_text(tmp_path, f"John\tB-person\n\nMary\t{tag}\n", name="tags.txt")
    message = str(caught.value)
    assert "tags.txt" in message
    assert "line 3:" in message
    assert repr(tag) in message
    assert f"'Mary\\t{tag}'" in message


def test_read_invalid_tag_line_counts_crlf_and_bom(tmp_path):
    data = b"\xef\xbb\xbfa\tO\r\n\r\nb\tO\r\nc\tB-\r\n"
    with pytest.raises(FormatError) as caught:
        read_conll(write_bytes(tmp_path, data, name="crlf.txt"))
    assert "crlf.txt: line 4:" in str(caught.value)


def test_read_invalid_utf8_names_line(tmp_path):
    data = b"a\tO\nb\tO\n\ncaf\xe9\tO\n"
    with pytest.raises(FormatError) as caught:
        read_conll(write_bytes(tmp_path, data, name="latin1.txt"))
    message = str(caught.value)
    assert "latin1.txt" in message
    assert "line 4:" in message
    assert "invalid UTF-8" in message
    assert "e9" in message


def test_read_missing_file(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(RefimplError) as caught:
        read_conll(path)
    assert not isinstance(caught.value, FormatError)
    assert str(caught.value) == f"{path}: file not found"


def test_read_directory_rejected(tmp_path):
    with pytest.raises(RefimplError) as caught:
        read_conll(tmp_path)
    assert str(tmp_path) in str(caught.value)


# Label list


def test_label_list_order():
    sentences = [
        Sentence(["a", "b"], ["B-person", "O"]),
        Sentence(["c", "d", "e"], ["B-geo-loc", "I-geo-loc", "I-company"]),
    ]
    assert label_list(sentences) == [
        "O", "B-company", "B-geo-loc", "B-person", "I-company", "I-geo-loc", "I-person",
    ]


def test_label_list_all_outside():
    assert label_list([Sentence(["a"], ["O"])]) == ["O"]


# WNUT-16


@pytest.fixture(scope="module")
def wnut16():
    return load_wnut16_train()


def test_wnut16_sentence_count(wnut16):
    assert len(wnut16) == 2394


def test_wnut16_entity_types(wnut16):
    types = entity_types(wnut16)
    assert types == ["company", "facility", "geo-loc", "movie", "musicartist",
                     "other", "person", "product", "sportsteam", "tvshow"]
    assert len(label_list(wnut16)) == 21


def test_wnut16_first_sentence(wnut16):
    first = wnut16[0]
    assert first.line == 1
    assert first.words[:3] == ["@paulwalk", "It", "'s"]
    assert first.words[14:17] == ["Empire", "State", "Building"]
    assert first.tags[14:17] == ["B-facility", "I-facility", "I-facility"]


def test_wnut16_token_count(wnut16):
    # 48,863 lines minus 2,394 separator lines
    assert sum(len(sentence.words) for sentence in wnut16) == 46469


# Train/dev split


def test_split_deterministic(wnut16):
    first_train, first_dev = split_train_dev(wnut16, dev_fraction=0.1, seed=3)
    second_train, second_dev = split_train_dev(wnut16, dev_fraction=0.1, seed=3)
    assert [s.line for s in first_train] == [s.line for s in second_train]
    assert [s.line for s in first_dev] == [s.line for s in second_dev]


def test_split_disjoint_and_complete(wnut16):
    train, dev = split_train_dev(wnut16, dev_fraction=0.1, seed=0)
    train_lines = {s.line for s in train}
    dev_lines = {s.line for s in dev}
    assert len(dev) == 239
    assert len(train) + len(dev) == len(wnut16)
    assert not train_lines & dev_lines
    assert train_lines | dev_lines == {s.line for s in wnut16}


def test_split_keeps_input_order(wnut16):
    train, dev = split_train_dev(wnut16, seed=0)
    assert [s.line for s in train] == sorted(s.line for s in train)
    assert [s.line for s in dev] == sorted(s.line for s in dev)


def test_split_seed_changes_dev(wnut16):
    _, dev_zero = split_train_dev(wnut16, seed=0)
    _, dev_one = split_train_dev(wnut16, seed=1)
    assert {s.line for s in dev_zero} != {s.line for s in dev_one}


def test_split_known_order():
    # Pins the documented method, so a change of algorithm shows up here.
    sentences = [Sentence([str(i)], ["O"], line=i) for i in range(10)]
    rng = random.Random(7)
    keys = [rng.random() for _ in range(10)]
    ranked = sorted(range(10), key=keys.__getitem__)
    _, dev = split_train_dev(sentences, dev_fraction=0.3, seed=7)
    assert [s.line for s in dev] == sorted(ranked[:3])


def test_split_small_inputs():
    sentences = [Sentence([str(i)], ["O"], line=i) for i in range(3)]
    train, dev = split_train_dev(sentences, dev_fraction=0.01)
    assert len(dev) == 1
    assert len(train) == 2
    train, dev = split_train_dev(sentences, dev_fraction=0.99)
    assert len(dev) == 2
    assert len(train) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_invalid_fraction(fraction):
    sentences = [Sentence([str(i)], ["O"]) for i in range(5)]
    with pytest.raises(ValueError, match="dev_fraction"):
        split_train_dev(sentences, dev_fraction=fraction)


def test_split_too_few_sentences():
    with pytest.raises(ValueError, match="at least 2"):
        split_train_dev([Sentence(["a"], ["O"])])


# Writing


def test_write_read_round_trip(tmp_path):
    sentences = [Sentence(["John", "lives"], ["B-person", "O"]),
                 Sentence(["in", "New", "York"], ["O", "B-geo-loc", "I-geo-loc"])]
    path = tmp_path / "out.txt"
    write_conll(path, sentences)
    assert path.read_text(encoding="utf-8") == (
        "John\tB-person\nlives\tO\n\nin\tO\nNew\tB-geo-loc\nYork\tI-geo-loc\n\n")
    again = read_conll(path)
    assert as_pairs(again) == as_pairs(sentences)
    assert [s.line for s in again] == [1, 4]


def test_write_with_predictions(tmp_path):
    sentences = [Sentence(["John", "lives"], ["B-person", "O"])]
    path = tmp_path / "pred.txt"
    write_conll(path, sentences, predicted=[["B-person", "B-other"]])
    assert path.read_text(encoding="utf-8") == "John\tB-person\tB-person\nlives\tO\tB-other\n\n"
    # The reader takes the last column, so the predictions read back as the tags.
    assert read_conll(path)[0].tags == ["B-person", "B-other"]


def test_write_wnut16_round_trip(tmp_path, wnut16):
    path = tmp_path / "wnut.txt"
    write_conll(path, wnut16)
    assert as_pairs(read_conll(path)) == as_pairs(wnut16)


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    write_conll(path, [Sentence(["a"], ["O"])])
    assert path.read_text() == "a\tO\n\n"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


@pytest.mark.parametrize("sentences, predicted, match", [
    ([Sentence(["a"], ["O"])], [["O"], ["O"]], "tag sequences"),
    ([Sentence(["a", "b"], ["O"])], None, "different lengths"),
    ([Sentence(["a"], ["O"])], [["O", "O"]], "different lengths"),
    ([Sentence([], [])], None, "empty"),
    ([Sentence(["New York"], ["B-geo-loc"])], None, "space, tab or line break"),
    ([Sentence([""], ["O"])], None, "empty or contains"),
    ([Sentence(["a"], ["X"])], None, "invalid tag"),
    ([Sentence(["a"], ["O"])], [["B-"]], "invalid tag"),
])
def test_write_invalid_input_keeps_old_file(tmp_path, sentences, predicted, match):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(ValueError, match=match):
        write_conll(path, sentences, predicted=predicted)
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
