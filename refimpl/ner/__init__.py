"""Named-entity recognition data: CoNLL reading and writing, and conlleval-style scoring."""

from refimpl.ner.conll import (
    Sentence,
    entity_types,
    label_list,
    load_wnut16_train,
    read_conll,
    split_train_dev,
    write_conll,
)
from refimpl.ner.scoring import (
    entity_report,
    extract_chunks,
    format_entity_report,
    format_token_report,
    token_report,
)

__all__ = [
    "Sentence",
    "entity_report",
    "entity_types",
    "extract_chunks",
    "format_entity_report",
    "format_token_report",
    "label_list",
    "load_wnut16_train",
    "read_conll",
    "split_train_dev",
    "token_report",
    "write_conll",
]
