"""Score named-entity predictions at the entity level and the token level.

Entity scores follow conlleval, the CoNLL-2000 shared task's evaluation
script, on IOB2 tags. A predicted chunk counts as correct only when its start,
end and type all match a gold chunk. Chunks never cross sentences: each
sentence is scored alone and the counts are summed.

Token scores treat every tag as a class and follow the definitions of
scikit-learn's ``classification_report``.

Every score in the returned dicts is a fraction in [0, 1], as seqeval and
scikit-learn return them. ``format_entity_report`` prints percentages, as
conlleval does, and ``format_token_report`` prints fractions, as
scikit-learn does. A score whose denominator is 0 is 0.
"""

from collections import Counter


def split_tag(tag):
    """Split an IOB2 tag into its prefix and type: ``B-geo-loc`` gives ``("B", "geo-loc")``.

    ``O`` gives ``("O", "")``. Raises ValueError for any other tag that is
    not ``B-TYPE`` or ``I-TYPE`` with a non-empty TYPE.
    """
    if tag == "O":
        return "O", ""
    if isinstance(tag, str) and tag[:2] in ("B-", "I-") and len(tag) > 2:
        return tag[0], tag[2:]
    raise ValueError(f"invalid tag {tag!r}; expected O, B-TYPE or I-TYPE")


def extract_chunks(tags):
    """Return the chunks of one sentence as ``(type, start, end)`` tuples, ``end`` exclusive.

    The rules are conlleval's. A chunk starts at B, at I after O, and at I
    whose type differs from the previous tag's. It ends before B, before O
    and before a change of type. So ``O I-X`` is a chunk, and ``B-X I-Y``
    is two chunks. Raises ValueError for an invalid tag.
    """
    chunks = []
    start = None  # start of the open chunk, None when the previous tag was O
    previous_type = ""
    for position, tag in enumerate(tags):
        prefix, type_ = split_tag(tag)
        if start is not None and (prefix != "I" or type_ != previous_type):
            chunks.append((previous_type, start, position))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start = position
        previous_type = type_
    if start is not None:
        chunks.append((previous_type, start, len(tags)))
    return chunks


def entity_report(gold, pred):
    """Score predicted entity chunks against gold ones, per type and averaged.

    ``gold`` and ``pred`` contain one tag sequence per sentence. Returns a dict:

    - ``per_type``: for each type found in gold or pred, sorted, a dict with
      ``precision``, ``recall``, ``f1``, ``support`` (gold chunks),
      ``predicted`` (predicted chunks) and ``correct``.
    - ``micro``: the same keys over all chunks.
    - ``macro`` and ``weighted``: ``precision``, ``recall``, ``f1`` and
      ``support``, the unweighted mean over types and the mean weighted by
      support, as in seqeval's ``classification_report``.
    - ``tokens`` and ``accuracy``: the token count and the fraction of tokens
      whose predicted tag equals the gold tag, as conlleval reports them.

    Raises ValueError naming the sentence when the two do not have the same
    number of sentences and tags, or when a tag is invalid.
    """
    _check_same_shape(gold, pred)
    _check_iob2_tags(gold, pred)

    support, predicted, correct = Counter(), Counter(), Counter()
    for gold_tags, pred_tags in zip(gold, pred):
        gold_chunks = set(extract_chunks(gold_tags))
        pred_chunks = set(extract_chunks(pred_tags))
        support.update(type_ for type_, _, _ in gold_chunks)
        predicted.update(type_ for type_, _, _ in pred_chunks)
        correct.update(type_ for type_, _, _ in gold_chunks & pred_chunks)

    per_type = {}
    for type_ in sorted(support.keys() | predicted.keys()):
        per_type[type_] = _scores(correct[type_], predicted[type_], support[type_])
    tokens, correct_tokens = _count_correct_tokens(gold, pred)
    return {
        "per_type": per_type,
        "micro": _scores(sum(correct.values()), sum(predicted.values()), sum(support.values())),
        "macro": _macro_average(per_type.values()),
        "weighted": _weighted_average(per_type.values()),
        "tokens": tokens,
        "accuracy": correct_tokens / tokens if tokens else 0.0,
    }


def token_report(gold, pred):
    """Score predicted tags token by token, with every tag as a class.

    ``gold`` and ``pred`` contain one tag sequence per sentence, and tags may be
    any strings. Returns a dict:

    - ``per_tag``: for each tag found in gold or pred, sorted, a dict with
      ``precision``, ``recall``, ``f1``, ``support`` (gold tokens with the
      tag), ``predicted`` and ``correct``.
    - ``micro``, ``macro`` and ``weighted``: averages as scikit-learn's
      ``classification_report`` defines them. Because every token has exactly
      one gold and one predicted tag, micro precision, recall and F1 all
      equal the accuracy.
    - ``tokens`` and ``accuracy``.

    Raises ValueError naming the sentence when the two do not have the same
    number of sentences and tags.
    """
    _check_same_shape(gold, pred)
    support, predicted, correct = Counter(), Counter(), Counter()
    for gold_tags, pred_tags in zip(gold, pred):
        support.update(gold_tags)
        predicted.update(pred_tags)
        correct.update(g for g, p in zip(gold_tags, pred_tags) if g == p)

    per_tag = {}
    for tag in sorted(support.keys() | predicted.keys()):
        per_tag[tag] = _scores(correct[tag], predicted[tag], support[tag])
    tokens, correct_tokens = _count_correct_tokens(gold, pred)
    return {
        "per_tag": per_tag,
        "micro": _scores(correct_tokens, tokens, tokens),
        "macro": _macro_average(per_tag.values()),
        "weighted": _weighted_average(per_tag.values()),
        "tokens": tokens,
        "accuracy": correct_tokens / tokens if tokens else 0.0,
    }


def _check_same_shape(gold, pred):
    for side, sequences in (("gold", gold), ("pred", pred)):
        for index, tags in enumerate(sequences):
            if isinstance(tags, str):
                raise TypeError(f"{side} sentence {index} is the string {tags!r}; "
                                "expected one list of tags per sentence")
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {index}: gold has {len(gold_tags)} tags "
                             f"but pred has {len(pred_tags)}")


def _check_iob2_tags(gold, pred):
    for side, sequences in (("gold", gold), ("pred", pred)):
        for index, tags in enumerate(sequences):
            for position, tag in enumerate(tags):
                try:
                    split_tag(tag)
                except ValueError as error:
                    raise ValueError(f"{side} sentence {index}, token {position}: {error}") from None


def _count_correct_tokens(gold, pred):
    tokens = sum(len(tags) for tags in gold)
    correct = sum(g == p for gold_tags, pred_tags in zip(gold, pred)
                  for g, p in zip(gold_tags, pred_tags))
    return tokens, correct


def _scores(correct, predicted, support):
    # F1 from the counts equals 2PR / (P + R) and is 0 when P + R is 0.
    return {
        "precision": correct / predicted if predicted else 0.0,
        "recall": correct / support if support else 0.0,
        "f1": 2 * correct / (predicted + support) if correct else 0.0,
        "support": support,
        "predicted": predicted,
        "correct": correct,
    }


def _macro_average(rows):
    rows = list(rows)
    average = {"support": sum(row["support"] for row in rows)}
    for key in ("precision", "recall", "f1"):
        average[key] = sum(row[key] for row in rows) / len(rows) if rows else 0.0
    return average


def _weighted_average(rows):
    rows = list(rows)
    total = sum(row["support"] for row in rows)
    average = {"support": total}
    for key in ("precision", "recall", "f1"):
        average[key] = sum(row[key] * row["support"] for row in rows) / total if total else 0.0
    return average


def format_entity_report(report):
    """Format an ``entity_report`` as conlleval prints it, with percentages.

    As in conlleval, the number at the end of each type's line is the count
    of predicted chunks of that type, not the support, and the accuracy line
    is left out when there are no tokens.
    """
    micro = report["micro"]
    lines = [f"processed {report['tokens']} tokens with {micro['support']} phrases; "
             f"found: {micro['predicted']} phrases; correct: {micro['correct']}."]
    if report["tokens"]:
        lines.append(f"accuracy: {100 * report['accuracy']:6.2f}%; "
                     f"precision: {100 * micro['precision']:6.2f}%; "
                     f"recall: {100 * micro['recall']:6.2f}%; "
                     f"FB1: {100 * micro['f1']:6.2f}")
    for type_, row in report["per_type"].items():
        lines.append(f"{type_:>17}: precision: {100 * row['precision']:6.2f}%; "
                     f"recall: {100 * row['recall']:6.2f}%; "
                     f"FB1: {100 * row['f1']:6.2f}  {row['predicted']}")
    return "\n".join(lines) + "\n"


def format_token_report(report, digits=2):
    """Format a ``token_report`` as scikit-learn's ``classification_report`` prints it.

    The micro average is printed as the ``accuracy`` row, which is what
    scikit-learn does when the report covers every tag.
    """
    names = list(report["per_tag"])
    width = max([len(name) for name in names] + [len("weighted avg"), digits])
    headers = ("precision", "recall", "f1-score", "support")

    def row(name, scores):
        numbers = "".join(f" {scores[key]:>9.{digits}f}" for key in ("precision", "recall", "f1"))
        return f"{name:>{width}} {numbers} {scores['support']:>9}\n"

    text = f"{'':>{width}} " + "".join(f" {header:>9}" for header in headers) + "\n\n"
    for name in names:
        text += row(name, report["per_tag"][name])
    text += "\n"
    blank_columns = f" {'':>9}" * 2
    text += (f"{'accuracy':>{width}} {blank_columns} {report['accuracy']:>9.{digits}f}"
             f" {report['tokens']:>9}\n")
    text += row("macro avg", report["macro"])
    text += row("weighted avg", report["weighted"])
    return text
