"""Read and write named-entity data in the CoNLL format.

Each line contains one token and its tag, separated by a tab or by spaces. The
token is the first field and the tag the last, so CoNLL-2003 files with POS
and chunk columns between them read as well. A blank or whitespace-only line
ends a sentence. Tags follow the IOB2 scheme: ``O``, ``B-TYPE`` or ``I-TYPE``,
where TYPE is everything after the first hyphen (``B-geo-loc`` has the type
``geo-loc``).
"""

import os
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from refimpl.errors import FormatError, RefimplError

DOCSTART = "-DOCSTART-"
UTF8_BOM = b"\xef\xbb\xbf"

_FIELD_SEPARATOR = re.compile(r"[ \t]+")
_BLANK = " \t"
_FORBIDDEN_IN_FIELD = " \t\r\n"  # a written field with these would not read back


@dataclass
class Sentence:
    """One sentence: its tokens, their gold tags and where it starts in its file."""

    words: list[str]
    tags: list[str]
    line: int = 0  # 1-based line of the first token, or 0 when not read from a file


def is_valid_tag(tag):
    """Return whether ``tag`` is ``O``, or ``B-TYPE`` / ``I-TYPE`` with a non-empty TYPE."""
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)


def read_conll(path):
    """Read a CoNLL file into a list of sentences.

    ``-DOCSTART-`` lines are skipped and end a sentence. Several blank lines in
    a row give no empty sentences, and the last sentence needs no trailing
    blank line. CRLF line endings and a UTF-8 byte order mark are accepted.

    Raises RefimplError when the file cannot be opened, and FormatError naming
    the line for invalid UTF-8, a line with fewer than two fields or an
    invalid tag.
    """
    sentences = []
    words, tags, first_line = [], [], 0

    def end_sentence():
        nonlocal words, tags
        if words:
            sentences.append(Sentence(words, tags, first_line))
            words, tags = [], []

    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise RefimplError(f"{path}: file not found") from None
    except OSError as error:
        raise RefimplError(f"{path}: failed to open the file: {error.strerror}") from None

    with file:
        # Binary lines split at b"\n" only, so line numbers match what an
        # editor shows. str.splitlines would also split at \v, \f and U+2028.
        for number, raw in enumerate(file, start=1):
            if number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            line = _decode_line(path, number, raw.rstrip(b"\r\n"))

            if not line.strip(_BLANK):
                end_sentence()
                continue
            fields = _FIELD_SEPARATOR.split(line.strip(_BLANK))
            if fields[0] == DOCSTART:
                end_sentence()
                continue
            if len(fields) < 2:
                raise FormatError(path, f'line {number}: expected "TOKEN TAG" separated by '
                                        f"a tab or spaces, got {line!r}")
            tag = fields[-1]
            if not is_valid_tag(tag):
                raise FormatError(path, f"line {number}: invalid tag {tag!r} in {line!r}; "
                                        "expected O, B-TYPE or I-TYPE")
            if not words:
                first_line = number
            words.append(fields[0])
            tags.append(tag)

    end_sentence()
    return sentences


def _decode_line(path, number, raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = raw[error.start:error.end].hex(" ")
        raise FormatError(path, f"line {number}: invalid UTF-8 (bytes {bad} at byte "
                                f"{error.start + 1} of the line); convert the file to UTF-8") from None


def write_conll(path, sentences, predicted=None):
    """Write sentences as CoNLL: token, gold tag and, if given, predicted tag per line.

    Columns are separated by a tab and sentences by an empty line.
    ``predicted`` contains one tag sequence per sentence. The file is written to
    a temporary file in the same folder and renamed into place, so readers
    never see a half-written file.

    Raises ValueError, before anything is written, for input that would not
    read back the same: ``predicted`` of the wrong length, an empty sentence,
    an invalid tag, or a token or tag that is empty or contains a space, tab
    or line break.
    """
    sentences = list(sentences)
    if predicted is not None:
        predicted = [list(tags) for tags in predicted]
        if len(predicted) != len(sentences):
            raise ValueError(f"predicted has {len(predicted)} tag sequences but there are "
                             f"{len(sentences)} sentences")

    lines = []
    for index, sentence in enumerate(sentences):
        columns = [sentence.words, sentence.tags]
        if predicted is not None:
            columns.append(predicted[index])
        lengths = [len(column) for column in columns]
        if len(set(lengths)) != 1:
            raise ValueError(f"sentence {index}: the columns (words, gold tags, predicted tags) "
                             f"have different lengths {lengths}")
        if lengths[0] == 0:
            raise ValueError(f"sentence {index} is empty")
        for tags in columns[1:]:
            _check_tags(index, tags)
        for row in zip(*columns):
            for field in row:
                if not field or any(char in _FORBIDDEN_IN_FIELD for char in field):
                    raise ValueError(f"sentence {index}: field {field!r} is empty or "
                                     "contains a space, tab or line break")
            lines.append("\t".join(row) + "\n")
        lines.append("\n")

    _write_atomically(Path(path), "".join(lines))


def _check_tags(index, tags):
    for tag in tags:
        if not is_valid_tag(tag):
            raise ValueError(f"sentence {index}: invalid tag {tag!r}; expected O, B-TYPE or I-TYPE")


def _write_atomically(path, text):
    # open(..., "x") creates the file with the usual umask permissions, which
    # tempfile.mkstemp would narrow to 0600.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8", newline="\n") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def entity_types(sentences):
    """Return the sorted entity types (``person`` for ``B-person``) used in the gold tags."""
    return sorted({tag[2:] for sentence in sentences for tag in sentence.tags if tag != "O"})


def label_list(sentences):
    """Return the tag set for a tagger: ``O`` first, then sorted B- and I- tags of every type.

    Both B- and I- tags are listed for each type present, even when the data
    contains only one of them.
    """
    types = entity_types(sentences)
    return ["O"] + sorted(f"{prefix}-{name}" for name in types for prefix in ("B", "I"))


def load_wnut16_train():
    """Read the WNUT-16 training set (2,394 tweets), fetching it into the cache on first use."""
    from refimpl.registry import resolve_dataset

    return read_conll(resolve_dataset("wnut16-train") / "ner.txt")


def split_train_dev(sentences, dev_fraction=0.1, seed=0):
    """Split sentences into ``(train, dev)`` lists, the same way for the same seed.

    ``random.Random(seed)`` draws one ``random()`` key per sentence, and the
    ``round(len(sentences) * dev_fraction)`` sentences with the smallest keys,
    clamped to 1 .. len - 1, go to dev. Both lists keep the input order. The
    random module's documentation (Notes on Reproducibility) guarantees the
    ``random()`` sequence for a seed across Python versions, but not
    ``shuffle`` or ``sample``, so the split does not use them.
    """
    sentences = list(sentences)
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    if len(sentences) < 2:
        raise ValueError(f"need at least 2 sentences to split, got {len(sentences)}")

    rng = random.Random(seed)
    keys = [rng.random() for _ in sentences]
    dev_size = min(max(round(len(sentences) * dev_fraction), 1), len(sentences) - 1)
    by_key = sorted(range(len(sentences)), key=keys.__getitem__)
    dev_indices = set(by_key[:dev_size])

    train = [sentence for i, sentence in enumerate(sentences) if i not in dev_indices]
    dev = [sentence for i, sentence in enumerate(sentences) if i in dev_indices]
    return train, dev
