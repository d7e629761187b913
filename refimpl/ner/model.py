"""A BERT token classifier for named entities: weights, word-piece alignment, windows and tagging.

Word-piece alignment follows transformers' token-classification recipe: the
first word piece of each word carries the word's label and the other pieces
get -100, which the loss ignores. A word that the tokenizer turns into no
piece at all (a zero-width space, a control character) becomes one [UNK]
piece, so no word and no label is lost. A sentence longer than a window is
split at word boundaries into several windows, so evaluation scores every
gold word.
"""

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refimpl.embed import load_tokenizer
from refimpl.errors import RefimplError
from refimpl.models.bert import BertConfig, BertModel
from refimpl.ops import Ops
from refimpl.safetensors import SafetensorsFile, save
from refimpl.store import DEFAULT_CHUNK_ROWS, WeightStore
from refimpl.train.backward_ops import IGNORE_INDEX
from refimpl.train.bert_backward import parameter_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MIN_WINDOW = 3  # [CLS], one word piece, [SEP]


# ---- weights ---------------------------------------------------------------------------


def read_model_config(model_dir):
    """Return (config.json as a dict, BertConfig) of a model folder."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise RefimplError(f"{path}: not found; a model folder needs config.json")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise RefimplError(f"{path}: invalid JSON: {error}") from None
    return values, BertConfig.from_dict(values)


def model_labels(config_values):
    """Return the label list of a BertForTokenClassification config (its id2label), or None for other models."""
    architectures = config_values.get("architectures") or []
    id2label = config_values.get("id2label")
    if "BertForTokenClassification" not in architectures or not id2label:
        return None
    return [id2label[str(i)] for i in range(len(id2label))]


def initial_weights(model_dir, config, labels, seed=0, initializer_range=0.02):
    """Name -> float32 array of every trainable parameter, named as BertForTokenClassification names them.

    Encoder weights come from the folder's model.safetensors, with ``bert.``
    added where the file has no prefix (the pooler is not used). The
    classifier comes from the file when it has one of the right shape, else
    it is drawn from N(0, initializer_range^2) with ``seed`` and the bias is 0.
    """
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise RefimplError(f"{path}: not found; a model folder needs model.safetensors")
    shapes = parameter_shapes(config, len(labels))
    weights = {}
    with SafetensorsFile(path) as file:
        for name, shape in shapes.items():
            for stored in (name, name.removeprefix("bert.")):
                if stored in file.tensors and tuple(file.tensors[stored].shape) == shape:
                    weights[name] = np.array(file.array(stored), dtype=np.float32)
                    break
    missing = [name for name in shapes if name not in weights and not name.startswith("classifier.")]
    if missing:
        raise RefimplError(f"{path}: missing or misshapen weights {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if "classifier.weight" not in weights or "classifier.bias" not in weights:
        rng = np.random.default_rng(seed)
        weights["classifier.weight"] = (rng.standard_normal(shapes["classifier.weight"])
                                        * initializer_range).astype(np.float32)
        weights["classifier.bias"] = np.zeros(shapes["classifier.bias"], dtype=np.float32)
    return weights


def save_model_folder(folder, source_dir, config_values, labels, tensors):
    """Write a BertForTokenClassification folder that refimpl and transformers both load.

    The folder is written under a temporary name and then renamed into place.
    An existing folder of the same name is moved aside first and deleted after.
    """
    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.mkdir(parents=True)
    values = dict(config_values)
    values.update({
        "architectures": ["BertForTokenClassification"],
        "model_type": "bert",
        "num_labels": len(labels),
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "torch_dtype": "float32",
    })
    (temporary / "config.json").write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    save(temporary / "model.safetensors", {name: np.asarray(array, dtype=np.float32)
                                           for name, array in tensors.items()})
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, temporary / name)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(folder, old)
    os.replace(temporary, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


# ---- word pieces and windows -----------------------------------------------------------


def load_word_piece_tokenizer(model_dir):
    """Load the folder's tokenizer.json with truncation and padding off; return it and its [CLS], [SEP], [UNK] ids."""
    tokenizer = load_tokenizer(model_dir)
    special = {}
    for token in ("[CLS]", "[SEP]", "[UNK]"):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RefimplError(f"{Path(model_dir) / 'tokenizer.json'}: the vocabulary has no {token} token; a BERT word-piece "
                               "tokenizer is needed")
        special[token] = token_id
    return tokenizer, special


@dataclass
class Window:
    """Consecutive words of one sentence as one model input: [CLS] pieces... [SEP]."""

    sentence: int  # index of the sentence
    first_word: int  # index of the window's first word in the sentence
    input_ids: list[int]
    word_starts: list[int]  # position of each word's first piece in input_ids
    labels: list[int]  # per position: the label id at first pieces, -100 elsewhere


class WindowEncoder:
    """Turn word lists into windows of at most ``max_length`` word pieces, [CLS] and [SEP] included."""

    def __init__(self, model_dir, max_length=128):
        if max_length < MIN_WINDOW:
            raise RefimplError(f"--max-length {max_length} is invalid; use {MIN_WINDOW} or more")
        self.tokenizer, self.special = load_word_piece_tokenizer(model_dir)
        self.max_length = max_length

    def word_pieces(self, words):
        """Return the piece ids of each word. A word with no piece gets [UNK]."""
        if not words:
            return []
        encoding = self.tokenizer.encode(list(words), is_pretokenized=True, add_special_tokens=False)
        pieces = [[] for _ in words]
        for token_id, word in zip(encoding.ids, encoding.word_ids):
            if word is not None:
                pieces[word].append(token_id)
        return [ids if ids else [self.special["[UNK]"]] for ids in pieces]

    def encode(self, sentences_words, sentences_labels=None):
        """Return the windows of every sentence in order; labels are label ids per word, or None."""
        capacity = self.max_length - 2
        windows = []
        for index, words in enumerate(sentences_words):
            labels = sentences_labels[index] if sentences_labels is not None else [IGNORE_INDEX] * len(words)
            pieces = self.word_pieces(words)
            first = 0
            while first < len(words):
                ids = [self.special["[CLS]"]]
                starts, token_labels = [], [IGNORE_INDEX]
                word = first
                while word < len(words):
                    # NOTE: a word of more pieces than fit in a window keeps only its first
                    # pieces. Its label sits on the first piece, so it is still scored.
                    word_ids = pieces[word][:capacity]
                    if len(ids) - 1 + len(word_ids) > capacity:
                        break
                    starts.append(len(ids))
                    token_labels += [labels[word]] + [IGNORE_INDEX] * (len(word_ids) - 1)
                    ids += word_ids
                    word += 1
                ids.append(self.special["[SEP]"])
                token_labels.append(IGNORE_INDEX)
                windows.append(Window(index, first, ids, starts, token_labels))
                first = word
        return windows


def pad_windows(windows, pad_id=0):
    """Stack windows into input_ids, attention_mask and labels [B, T], padded to the longest."""
    T = max(len(w.input_ids) for w in windows)
    B = len(windows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    for b, window in enumerate(windows):
        n = len(window.input_ids)
        input_ids[b, :n] = window.input_ids
        attention_mask[b, :n] = 1
        labels[b, :n] = window.labels
    return input_ids, attention_mask, labels


# ---- tagging ---------------------------------------------------------------------------


class NerTagger:
    """A saved token-classification folder run on the chunked weight store for evaluation and prediction."""

    def __init__(self, model_dir, mode="reference", max_length=128, chunk_rows=DEFAULT_CHUNK_ROWS, budget_bytes=None,
                 schedule=None, prefetch=1):
        model_dir = Path(model_dir)
        values, self.config = read_model_config(model_dir)
        self.labels = model_labels(values)
        if self.labels is None:
            raise RefimplError(f"{model_dir}: not a token-classification model (config.json has no "
                               "id2label for BertForTokenClassification); train one with `refimpl ner train`")
        self.encoder = WindowEncoder(model_dir, min(max_length, self.config.max_position_embeddings))
        self.store = WeightStore(model_dir / "model.safetensors", chunk_rows=chunk_rows,
                                 budget_bytes=budget_bytes, schedule=schedule, prefetch=prefetch)
        if "classifier.weight" not in self.store.index:
            raise RefimplError(f"{model_dir}/model.safetensors: no classifier.weight; not a token classifier")
        self.ops = Ops(mode)
        self.model = BertModel(self.config, self.store, self.ops)

    def logits(self, input_ids, attention_mask):
        """[B, T] -> [B, T, L]: the encoder, then the classifier (no dropout at inference)."""
        hidden = self.model.forward(input_ids, attention_mask)
        B, T, C = hidden.shape
        return self.ops.linear(hidden.reshape(B * T, C), self.store, "classifier").reshape(B, T, -1)

    def predict(self, sentences_words, batch_size=32, progress=None):
        """Return a tag per word for each sentence."""
        return tag_words(self.logits, self.encoder, sentences_words, self.labels, self.config.pad_token_id,
                         batch_size, progress)


def tag_words(logits_fn, encoder, sentences_words, labels, pad_id=0, batch_size=32, progress=None):
    """Tag every word with the argmax of ``logits_fn(input_ids, attention_mask)`` at its first piece.

    Windows are batched by length to save padding work. The reference kernels
    give each row the same bits in any batch, so this does not change a tag.
    """
    windows = encoder.encode(sentences_words)
    predicted = [["O"] * len(words) for words in sentences_words]
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
    for first in range(0, len(order), batch_size):
        batch = [windows[i] for i in order[first: first + batch_size]]
        input_ids, attention_mask, _ = pad_windows(batch, pad_id)
        best = np.asarray(logits_fn(input_ids, attention_mask)).argmax(axis=-1)  # [B, T]
        for b, window in enumerate(batch):
            for offset, position in enumerate(window.word_starts):
                predicted[window.sentence][window.first_word + offset] = labels[best[b, position]]
        if progress is not None:
            progress(len(batch))
    return predicted
