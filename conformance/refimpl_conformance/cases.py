"""The conformance cases: their definitions, the golden generator and the loader.

A golden bundle is one folder per case:

- ``case.json``: schema version, architecture, model config, the weights'
  source and sha256, the inputs (also as lists), the checks (which output, with
  which metric and tolerance table), and the generator's command and versions.
- ``inputs.safetensors``: int64 [B, T] arrays (``input_ids``, ``attention_mask``
  and ``token_type_ids`` or ``position_ids``).
- ``expected.safetensors``: float64 goldens named as the checks name them
  (``hidden_states.0`` ... ``hidden_states.L``, ``last_hidden_state`` or
  ``logits``; ``logits.topk_values`` and ``logits.topk_indices`` for real
  decoders; ``loss`` and ``gradients.<parameter>`` for gradient cases).
- ``config.json`` and ``model.safetensors`` for a random model. A real model's
  weights come from refimpl's registry at verify time and are checked against
  the stored sha256.

Goldens are computed by refimpl in reference mode in float64, with the whole
model resident, so they do not depend on the machine's BLAS or thread count.
"""

import fnmatch
import json
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl import safetensors
from refimpl.errors import RefimplError
from refimpl.ner.scoring import entity_report
from refimpl.ops import Ops
from refimpl.registry import resolve_model, sha256_file
from refimpl.store import WeightStore
from refimpl_conformance import architectures
from refimpl_conformance.compare import DEFAULT_TOLERANCES
from refimpl_conformance.protocol import SCHEMA_VERSION, CaseInfo

GENERATE_COMMAND = "refimpl-conformance generate --out golden"
FLOAT32_OVERFLOW = float(np.log(np.finfo(np.float32).max))  # exp() of a larger float32 score is inf


@dataclass(frozen=True)
class CaseSpec:
    """The definition of one case, from which ``generate`` writes its bundle."""

    name: str
    architecture: str
    description: str
    lengths: tuple  # tokens of each row; the batch size is len(lengths)
    padding: str = "right"  # "right" or "left"
    seed: int = 0
    config: dict = field(default_factory=dict)  # overrides of the random model's config
    weight_scales: tuple = ()  # (glob of weight names, factor) applied to the random weights
    registry_model: str | None = None  # a registry model name instead of random weights
    texts: tuple = ()  # for a registry BERT: sentences tokenized with its tokenizer
    select_channels: tuple | None = None  # store only channels [start, stop) of each hidden state
    logits_top_k: int | None = None  # store only the top-k logits of each position
    tolerance: dict | None = None  # a case-level tolerance table, with tolerance_reason
    tolerance_reason: str = ""
    min_attention_score: float | None = None  # generation fails unless some score exceeds this
    gradient_labels: int | None = None  # labels of a token-classification head: adds loss and gradient checks
    causal_lm_gradients: bool = False  # decoders: adds checks of the causal-LM loss and every parameter's gradient
    ner_labels: tuple = ()  # IOB2 tags of a token-classification head: adds exact checks of tags and entity scores
    ner_sentences: tuple = ()  # ((word, gold tag), ...) per sentence, for a case with ner_labels


CASES = [
    # ---- BERT, random weights: hidden 32, 4 heads, 2 layers, vocabulary 100 ----
    CaseSpec("bert-batch1", "bert", "one row of 9 tokens, no padding", (9,), seed=1),
    CaseSpec("bert-right-padding", "bert", "4 rows of 13, 7, 1 and 10 tokens, right-padded to 13",
             (13, 7, 1, 10), seed=2),
    CaseSpec("bert-fully-masked-row", "bert", "3 rows, the middle one all padding (mask all 0)",
             (6, 0, 4), seed=3),
    CaseSpec("bert-batch7", "bert", "7 rows of 19, 3, 11, 1, 17, 8 and 19 tokens, right-padded",
             (19, 3, 11, 1, 17, 8, 19), seed=4),
    CaseSpec("bert-seq-len-1", "bert", "3 rows of one token each", (1, 1, 1), seed=5),
    CaseSpec("bert-3-layers-3-heads", "bert", "hidden 48, 3 heads of 16, 3 layers; 2 rows of 23 and 5 tokens",
             (23, 5), seed=6,
             config={"hidden_size": 48, "num_attention_heads": 3, "num_hidden_layers": 3,
                     "intermediate_size": 96, "vocab_size": 300}),
    CaseSpec("bert-small-variance", "bert",
             "embeddings scaled by 0.003, so their variance (about 4e-7) is near a layer-norm epsilon of 1e-5; "
             "2 rows of 12 and 5 tokens",
             (12, 5), seed=7, weight_scales=(("embeddings.*_embeddings.weight", 0.003),)),
    CaseSpec("bert-large-scores", "bert",
             "query and key weights scaled by 6, so attention scores exceed 88.7, where exp() overflows "
             "float32; 2 rows of 16 and 9 tokens",
             (16, 9), seed=8, weight_scales=(("*.attention.self.query.weight", 6.0),
                                              ("*.attention.self.key.weight", 6.0)),
             min_attention_score=FLOAT32_OVERFLOW),
    CaseSpec("bert-token-classification-gradients", "bert",
             "BertForTokenClassification with 5 labels: hidden states, the mean cross-entropy over labelled "
             "tokens and the gradient of every parameter; 3 rows of 9, 5 and 1 tokens, some tokens unlabelled",
             (9, 5, 1), seed=9, gradient_labels=5),
    CaseSpec("bert-ner-tags", "bert",
             "BertForTokenClassification with the IOB2 tags O, B-PER, I-PER, B-LOC and I-LOC: hidden states, "
             "the predicted tag of every word (at its first word piece) and the conlleval entity scores "
             "against gold tags; 3 sentences of 7, 4 and 6 words, each word 1 to 3 random word pieces",
             (), seed=10, ner_labels=("O", "B-PER", "I-PER", "B-LOC", "I-LOC"),
             # The random model tags the word pieces, not the words, so the gold tags were chosen to
             # match some of its chunks and miss others.
             ner_sentences=((("Augusta", "B-PER"), ("Ada", "I-PER"), ("King", "I-PER"), ("London", "B-LOC"),
                             ("and", "O"), ("near", "O"), ("Surrey", "B-LOC")),
                            (("Ola", "B-PER"), ("visits", "O"), ("Oslo", "B-LOC"), ("Bergen", "B-LOC")),
                            (("Alan", "B-PER"), ("met", "O"), ("Grace", "B-PER"), ("Hopper", "I-PER"),
                             ("in", "O"), ("Boston", "B-LOC")))),
    # ---- BERT, real weights ----
    CaseSpec("minilm-real", "bert",
             "all-MiniLM-L6-v2 from the registry; 3 sentences, right-padded; channels 0-31 of every hidden state",
             (), registry_model="minilm", select_channels=(0, 32),
             texts=("The quick brown fox jumps over the lazy dog.",
                    "Grüße aus München!",
                    "A conformance suite compares every layer, not just the output.")),
    # ---- Llama, random weights: hidden 32, 4 query heads, 2 key-value heads, 2 layers ----
    CaseSpec("llama-right-padding", "llama", "4 rows of 11, 6, 1 and 0 tokens (the last all padding), right-padded",
             (11, 6, 1, 0), seed=11),
    CaseSpec("llama-left-padding", "llama", "3 rows of 11, 6 and 1 tokens, left-padded as for generation",
             (11, 6, 1), padding="left", seed=12),
    CaseSpec("llama-seq-len-1", "llama", "one row of one token", (1,), seed=13),
    CaseSpec("llama-batch7-tied", "llama",
             "tied embeddings, 4 key-value heads; 7 rows of 13, 2, 9, 1, 13, 5 and 7 tokens",
             (13, 2, 9, 1, 13, 5, 7), seed=14, config={"tie_word_embeddings": True, "num_key_value_heads": 4}),
    CaseSpec("llama-bias-mqa", "llama", "biases, one key-value head, rope_theta 500; 2 rows of 17 and 10 tokens",
             (17, 10), seed=15,
             config={"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1, "rope_theta": 500.0}),
    CaseSpec("llama-causal-lm-gradients", "llama",
             "LlamaForCausalLM with tied embeddings and 4 query heads over 2 key-value heads: hidden states, "
             "logits, the causal-LM loss and the gradient of every parameter; 3 rows of 9, 5 and 2 tokens, "
             "right-padded, every fourth token unlabelled",
             (9, 5, 2), seed=16, config={"tie_word_embeddings": True}, causal_lm_gradients=True),
    # ---- Llama, real weights ----
    CaseSpec("smollm2-real", "llama",
             "SmolLM2-135M-Instruct from the registry; one prompt of 10 tokens; channels 0-31 of every hidden "
             "state and the top 10 logits of every position",
             (), registry_model="smollm2-135m-instruct", select_channels=(0, 32), logits_top_k=10,
             texts=("The capital of France is Paris, and the capital",),
             tolerance={"float64": DEFAULT_TOLERANCES["float64"], "float32": {"rtol": 1e-4, "atol": 1e-3}},
             tolerance_reason="the residual stream reaches about 1900 at the first position, so float32 rounds "
                              "elements near 0.5 by up to 1.4e-4 after 30 layers (refimpl-reference-f32 on "
                              "hidden_states.30, 0.9 of the default atol of 1e-4), so float32 atol is 1e-3 here"),
    # ---- GPT-2, random weights: hidden 32, 4 heads, 2 layers ----
    CaseSpec("gpt2-right-padding", "gpt2", "3 rows of 11, 6 and 1 tokens, right-padded", (11, 6, 1), seed=21),
    CaseSpec("gpt2-batch7", "gpt2", "7 rows of 15, 4, 9, 1, 15, 7 and 12 tokens, left-padded",
             (15, 4, 9, 1, 15, 7, 12), padding="left", seed=22),
    CaseSpec("gpt2-causal-lm-gradients", "gpt2",
             "GPT2LMHeadModel (output projection tied to wte): hidden states, logits, the causal-LM loss and the "
             "gradient of every parameter; 3 rows of 8, 6 and 3 tokens, right-padded, every fourth token "
             "unlabelled",
             (8, 6, 3), seed=23, causal_lm_gradients=True),
]


def select_cases(pattern=None, specs=None):
    """Return the specs whose name matches the glob ``pattern`` (all of them without one)."""
    specs = CASES if specs is None else specs
    if not pattern:
        return list(specs)
    chosen = [spec for spec in specs if fnmatch.fnmatchcase(spec.name, pattern)]
    if not chosen:
        raise RefimplError(f"no case matches {pattern!r}; the cases are {', '.join(s.name for s in specs)}")
    return chosen


# ---- generation -------------------------------------------------------------------------

def provenance():
    """Versions of what computed the goldens: Python, numpy, numba and the BLAS numpy loaded."""
    import numba

    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        versions["blas"] = "unknown (threadpoolctl is not installed)"
    else:
        # Only numpy's own BLAS (in numpy.libs or numpy's folder): other libraries,
        # torch's among them, appear only when something imported them first.
        # Thread counts and file paths change between runs, so they are left out.
        numpy_blas = [info for info in threadpool_info()
                      if info.get("user_api") == "blas" and "numpy" in str(info.get("filepath"))]
        versions["blas"] = ", ".join(
            f"{info.get('internal_api')} {info.get('version')} ({info.get('architecture', 'unknown')})"
            for info in numpy_blas) or "unknown (threadpoolctl found no BLAS loaded by numpy)"
    return versions


class ScoreRecordingOps(Ops):
    """Reference ops that also record the largest unmasked attention score, before softmax."""

    max_score = -np.inf

    def attention(self, q, k, v, mask, scale):
        group = q.shape[2] // k.shape[2]
        keys = np.repeat(np.asarray(k, dtype=np.float64), group, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, dtype=np.float64), keys) * scale
        allowed = np.broadcast_to(~np.isneginf(mask)[:, None], scores.shape)
        if allowed.any():
            self.max_score = max(self.max_score, float(scores[allowed].max()))
        return super().attention(q, k, v, mask, scale)


def random_token_rows(spec, vocab_size, pad_id):
    """Ids and mask [B, T] with random tokens in [1, vocab_size), padded on ``spec.padding``."""
    rng = np.random.default_rng(spec.seed)
    T = max(max(spec.lengths), 1)
    ids = np.full((len(spec.lengths), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(spec.lengths), T), dtype=np.int64)
    for row, length in enumerate(spec.lengths):
        span = slice(T - length, T) if spec.padding == "left" else slice(0, length)
        ids[row, span] = rng.integers(1, vocab_size, length)
        mask[row, span] = 1
    return ids, mask


def token_type_rows(mask):
    """Token types of sentence pairs: 0 for the first half of each row's tokens, 1 for the rest."""
    types = np.zeros_like(mask)
    for row in range(mask.shape[0]):
        tokens = np.flatnonzero(mask[row])
        types[row, tokens[len(tokens) // 2:]] = 1 if len(tokens) > 1 else 0
    return types


def write_random_model(spec, arch, folder):
    """Write config.json and model.safetensors of the spec's random model into ``folder``."""
    config = arch.random_config(**spec.config)
    weights = arch.random_weights(config, spec.seed)
    if spec.gradient_labels:
        labels = [f"LABEL_{i}" for i in range(spec.gradient_labels)]
        weights, config = add_token_classifier(weights, config, labels, spec.seed)
    if spec.ner_labels:
        weights, config = add_token_classifier(weights, config, list(spec.ner_labels), spec.seed, scale=2.0)
    for pattern, factor in spec.weight_scales:
        matched = [name for name in weights if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise RefimplError(f"case {spec.name}: weight pattern {pattern!r} matches no weight")
        for name in matched:
            weights[name] = (weights[name] * np.float32(factor)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    safetensors.save(folder / "model.safetensors", weights)
    return config


def add_token_classifier(weights, config, labels, seed, scale=0.2):
    """Name BERT weights as BertForTokenClassification does ("bert." prefix) and add a random classifier.

    ``scale`` is the standard deviation of the classifier weights.
    """
    rng = np.random.default_rng(seed + 1000)
    C = config["hidden_size"]
    num_labels = len(labels)
    weights = {f"bert.{name}": array for name, array in weights.items()}
    weights["classifier.weight"] = (rng.standard_normal((num_labels, C)) * scale).astype(np.float32)
    weights["classifier.bias"] = (rng.standard_normal(num_labels) * 0.05).astype(np.float32)
    config = dict(config, architectures=["BertForTokenClassification"],
                  id2label={str(i): label for i, label in enumerate(labels)},
                  label2id={label: i for i, label in enumerate(labels)})
    return weights, config


def token_labels(spec, mask, num_labels):
    """Labels [B, T]: random classes, -100 (ignored) at padding and at every third token of a row."""
    rng = np.random.default_rng(spec.seed + 2000)
    labels = rng.integers(0, num_labels, mask.shape).astype(np.int64)
    labels[:, ::3] = -100
    labels[mask == 0] = -100
    return labels


def causal_lm_token_labels(input_ids, mask):
    """Labels [B, T] as transformers' causal-LM heads take them: the input ids, -100 at padding and every fourth token.

    The model shifts them, so position t is scored on labels[t + 1].
    """
    labels = np.array(input_ids, dtype=np.int64)
    labels[:, 3::4] = -100
    labels[mask == 0] = -100
    return labels


def ner_word_pieces(spec, vocab_size):
    """Ids and mask [B, T] of the NER sentences, and the position of each word's first piece.

    There is no tokenizer for a random model, so each word becomes 1 to 3
    random piece ids between a [CLS] (id 1) and a [SEP] (id 2).
    """
    rng = np.random.default_rng(spec.seed + 3000)
    rows, word_starts = [], []
    for sentence in spec.ner_sentences:
        ids, starts = [1], []
        for _ in sentence:
            starts.append(len(ids))
            ids += rng.integers(3, vocab_size, int(rng.integers(1, 4))).tolist()
        rows.append(ids + [2])
        word_starts.append(starts)
    T = max(len(row) for row in rows)
    input_ids = np.zeros((len(rows), T), dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, row in enumerate(rows):
        input_ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    return input_ids, mask, word_starts


def entity_score_rows(report):
    """Flatten a conlleval entity report into (names, values): the counts and scores of each type, then micro."""
    names, values = [], []
    groups = list(report["per_type"].items()) + [("micro", report["micro"])]
    for group, scores in groups:
        for key in ("support", "predicted", "correct", "precision", "recall", "f1"):
            names.append(f"{group}.{key}")
            values.append(float(scores[key]))
    names.append("accuracy")
    values.append(float(report["accuracy"]))
    return names, np.array(values, dtype=np.float64)


def ner_outputs(ner, label_ids):
    """Tag each word from label ids [B, T] of every word piece; return (outputs, tags, entity report).

    ``ner`` is the case's "ner" entry. A word's tag is the label of its first
    piece. The outputs are "ner.tags" [B, W], label ids padded with -1 past
    the end of a sentence, and "ner.entity_scores" (see ``entity_score_rows``).
    Raises ValueError when ``label_ids`` has the wrong shape or an id outside
    the label list.
    """
    label_ids = np.asarray(label_ids)
    labels = ner["labels"]
    rows = len(ner["word_starts"])
    min_length = max(max(starts, default=0) for starts in ner["word_starts"]) + 1
    if label_ids.ndim != 2 or label_ids.shape[0] != rows or label_ids.shape[1] < min_length:
        raise ValueError(f"ner() returned label ids of shape {label_ids.shape}; expected [B, T] with B = {rows} "
                         "and T the length of the input_ids")
    if not np.issubdtype(label_ids.dtype, np.integer) or label_ids.min() < 0 or label_ids.max() >= len(labels):
        raise ValueError(f"ner() returned label ids outside 0..{len(labels) - 1} (dtype {label_ids.dtype}); "
                         "return the argmax over the labels of config.json's id2label")
    width = max(len(starts) for starts in ner["word_starts"])
    tags = np.full((len(ner["word_starts"]), width), -1, dtype=np.int64)
    predicted = []
    for b, starts in enumerate(ner["word_starts"]):
        tags[b, :len(starts)] = label_ids[b, starts]
        predicted.append([labels[int(i)] for i in tags[b, :len(starts)]])
    report = entity_report(ner["gold_tags"], predicted)
    return {"ner.tags": tags, "ner.entity_scores": entity_score_rows(report)[1]}, predicted, report


def registry_inputs(spec, model_dir, config):
    """Ids and mask [B, T] of the spec's texts, tokenized with the registry model's tokenizer."""
    from refimpl.embed import load_tokenizer

    tokenizer = load_tokenizer(model_dir, config.get("max_position_embeddings", 512))
    rows = [encoding.ids for encoding in tokenizer.encode_batch(list(spec.texts))]
    T = max(len(row) for row in rows)
    ids = np.full((len(rows), T), config.get("pad_token_id") or 0, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    return ids, mask


def layer_label(index):
    return "embeddings" if index == 0 else f"output of layer {index - 1}"


def build_checks(spec, arch, num_layers, parameters=None):
    """Build the checks of a case in forward order, so the first failing one is the first divergence."""
    tolerance = spec.tolerance or DEFAULT_TOLERANCES
    select = {"channels": list(spec.select_channels)} if spec.select_channels else None
    checks = [{"output": f"hidden_states.{i}", "label": layer_label(i), "metric": "allclose",
               "select": select, "tolerance": tolerance} for i in range(num_layers + 1)]

    if arch.output_name == "logits":
        metric = "logits_topk" if spec.logits_top_k else "logits"
        checks.append({"output": "logits", "label": "logits", "metric": metric, "top_k": spec.logits_top_k,
                       "select": None, "tolerance": tolerance})
    else:
        checks.append({"output": "last_hidden_state", "label": "last hidden state", "metric": "allclose",
                       "select": select, "tolerance": tolerance})
    return checks + gradient_checks(parameters, tolerance)


def gradient_checks(parameters, tolerance):
    """Build the loss check, then one check per parameter gradient in the order the backward pass computes them."""
    if not parameters:
        return []
    checks = [{"output": "loss", "label": "loss", "metric": "allclose_unmasked", "select": None,
               "tolerance": tolerance}]
    checks += [{"output": f"gradients.{name}", "label": f"gradient of {name}", "metric": "allclose_unmasked",
                "select": None, "tolerance": tolerance} for name in reversed(parameters)]
    return checks


def expected_tensors(spec, arch, hidden_states, output):
    """Return the float64 goldens of a case: every hidden state and the final output, cut to the spec's selection."""
    tensors = {}
    for i, state in enumerate(hidden_states):
        state = np.asarray(state, dtype=np.float64)
        if spec.select_channels:
            state = state[..., spec.select_channels[0]:spec.select_channels[1]]
        tensors[f"hidden_states.{i}"] = np.ascontiguousarray(state)
    output = np.asarray(output, dtype=np.float64)
    name = arch.output_name
    if name == "logits" and spec.logits_top_k:
        # Ties are broken by the lower token id (a stable sort of the negated logits).
        order = np.argsort(-output, axis=-1, kind="stable")[..., :spec.logits_top_k]
        tensors["logits.topk_indices"] = np.ascontiguousarray(order.astype(np.int64))
        tensors["logits.topk_values"] = np.ascontiguousarray(np.take_along_axis(output, order, axis=-1))
    else:
        if spec.select_channels and name != "logits":
            output = output[..., spec.select_channels[0]:spec.select_channels[1]]
        tensors[name] = np.ascontiguousarray(output)
    return tensors


def generate_case(spec, out_dir):
    """Compute and write the golden bundle of ``spec`` into ``out_dir / spec.name``; return the folder."""
    arch = architectures.get(spec.architecture)
    folder = Path(out_dir) / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    if spec.registry_model:
        model_dir = resolve_model(spec.registry_model)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        ids, mask = registry_inputs(spec, model_dir, config)
        weights_entry = {"source": "registry", "model": spec.registry_model, "file": "model.safetensors"}
    else:
        model_dir = folder
        config = write_random_model(spec, arch, folder)
        pad_id = config.get("pad_token_id") or 0
        if spec.ner_labels:
            ids, mask, word_starts = ner_word_pieces(spec, config["vocab_size"])
        else:
            ids, mask = random_token_rows(spec, config["vocab_size"], pad_id)
        weights_entry = {"source": "case", "file": "model.safetensors"}
    weights_path = model_dir / "model.safetensors"
    weights_entry["sha256"] = sha256_file(weights_path)
    weights_entry["bytes"] = weights_path.stat().st_size

    # The training forward pass takes no token types, so a gradient case keeps them all 0.
    # A NER case keeps them 0 because each row is one sentence.
    types = None if arch.causal or spec.gradient_labels or spec.ner_labels else token_type_rows(mask)
    inputs = arch.make_inputs(ids, mask, types)
    ops = ScoreRecordingOps("reference", np.float64)
    store = WeightStore(weights_path)
    try:
        model = arch.model_class(arch.config_class.from_dict(config), store, ops)
        hidden_states = []
        output = arch.forward(model, inputs, hidden_states)
    finally:
        store.close()
    if spec.min_attention_score is not None and not ops.max_score > spec.min_attention_score:
        raise RefimplError(f"case {spec.name}: the largest attention score {ops.max_score:.1f} does not exceed "
                           f"{spec.min_attention_score:.1f}; raise the query and key weight scale")

    expected = expected_tensors(spec, arch, hidden_states, output)
    gradients_entry, parameters = None, None
    if spec.gradient_labels or spec.causal_lm_gradients:
        if spec.causal_lm_gradients:
            labels = causal_lm_token_labels(ids, mask)
            gradients_entry = {"labels": labels.tolist(),
                               "loss": "mean cross-entropy of token t + 1 predicted at position t, over the "
                                       "targets whose label is not -100 (labels are not shifted in the case)"}
        else:
            labels = token_labels(spec, mask, spec.gradient_labels)
            gradients_entry = {"num_labels": spec.gradient_labels, "labels": labels.tolist(),
                               "loss": "mean cross-entropy over the tokens whose label is not -100"}
        loss, gradients = reference_gradients(folder, arch, config, inputs, labels)
        parameters = list(gradients)
        gradients_entry["parameters"] = parameters
        expected["loss"] = np.array([loss], dtype=np.float64)
        expected.update({f"gradients.{name}": np.asarray(g, dtype=np.float64) for name, g in gradients.items()})
        inputs["labels"] = labels
    ner_entry = None
    if spec.ner_labels:
        ner_entry = reference_ner(spec, folder, arch, config, inputs, word_starts)
    safetensors.save(folder / "inputs.safetensors", inputs)
    safetensors.save(folder / "expected.safetensors", expected)

    num_layers = len(hidden_states) - 1
    case = {
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "description": spec.description,
        "architecture": spec.architecture,
        "config": config,
        "weights": weights_entry,
        "inputs": {"file": "inputs.safetensors", **{name: array.tolist() for name, array in inputs.items()}},
        "expected": {"file": "expected.safetensors", "sha256": sha256_file(folder / "expected.safetensors"),
                     "dtype": "float64",
                     "tensors": {name: list(array.shape) for name, array in expected.items()}},
        "num_layers": num_layers,
        "output_name": arch.output_name,
        "checks": build_checks(spec, arch, num_layers, parameters) + ner_checks(ner_entry),
        "tolerance_reason": spec.tolerance_reason,
        "gradients": gradients_entry,
        "properties": {"max_attention_score": round(ops.max_score, 6)},
        "generator": {"command": GENERATE_COMMAND, "engine": "refimpl reference mode, float64, resident weights",
                      **provenance()},
    }
    if ner_entry:
        case["ner"] = ner_entry
    (folder / "case.json").write_text(dump_json(case), encoding="utf-8")
    return folder


def dump_json(value):
    """JSON text with one key per line but each array of numbers (a row of ids, a shape) on one line."""
    text = json.dumps(value, indent=1)
    return re.sub(r"\[[^\[\]{}\"]*\]", lambda match: " ".join(match.group(0).split()), text) + "\n"


def reference_gradients(folder, arch, config, inputs, labels):
    """Loss and parameter gradients of the model in ``folder``, by refimpl in float64."""
    from refimpl_conformance.backends import RefimplBackend

    num_layers = config.get("num_hidden_layers", config.get("n_layer"))
    info = CaseInfo(name=folder.name, architecture=arch.name, config=config, model_dir=folder,
                    weights_path=folder / "model.safetensors", input_names=tuple(inputs),
                    output_name=arch.output_name, num_layers=num_layers)
    backend = RefimplBackend()
    backend.prepare(info)
    try:
        result = backend.gradients(inputs, labels)
    finally:
        backend.close()
    return result["loss"], result["gradients"]


NER_MIN_LOGIT_GAP = 1e-2  # at each first piece, between the best and the second-best label


def reference_ner(spec, folder, arch, config, inputs, word_starts):
    """Tag the NER sentences with refimpl in float64; return the case's "ner" entry with tags and entity scores.

    Raises RefimplError when a word's best and second-best label logits are
    closer than NER_MIN_LOGIT_GAP, because a float32 backend could then pick
    either, and an exact check would fail a correct backend.
    """
    from refimpl_conformance.backends import RefimplBackend

    info = CaseInfo(name=folder.name, architecture=arch.name, config=config, model_dir=folder,
                    weights_path=folder / "model.safetensors", input_names=tuple(inputs),
                    output_name=arch.output_name, num_layers=config["num_hidden_layers"])
    backend = RefimplBackend()
    backend.prepare(info)
    try:
        logits = backend.token_logits(inputs)
    finally:
        backend.close()
    for b, starts in enumerate(word_starts):
        top2 = np.sort(logits[b, starts], axis=-1)[:, -2:]
        gap = float((top2[:, 1] - top2[:, 0]).min())
        if gap < NER_MIN_LOGIT_GAP:
            raise RefimplError(f"case {spec.name}: sentence {b} has a word whose two best label logits differ by "
                               f"{gap:.2e}, below {NER_MIN_LOGIT_GAP}; change the seed or the sentence")
    ner = {"labels": list(spec.ner_labels),
           "words": [[word for word, _ in sentence] for sentence in spec.ner_sentences],
           "gold_tags": [[tag for _, tag in sentence] for sentence in spec.ner_sentences],
           "word_starts": word_starts}
    outputs, predicted, report = ner_outputs(ner, logits.argmax(axis=-1))
    ner.update({"predicted_tags": predicted, "expected_tag_ids": outputs["ner.tags"].tolist(),
                "entity_score_names": entity_score_rows(report)[0],
                "entity_scores": outputs["ner.entity_scores"].tolist(), "entity_report": report})
    return ner


def ner_checks(ner):
    """Build the exact checks of a NER case: the tag of every word, then the entity scores."""
    if not ner:
        return []
    return [{"output": "ner.tags", "label": "tag of each word", "metric": "exact", "select": None,
             "tolerance": DEFAULT_TOLERANCES},
            {"output": "ner.entity_scores", "label": "entity scores", "metric": "exact", "select": None,
             "tolerance": DEFAULT_TOLERANCES}]


def generate(out_dir, pattern=None, log=print):
    """Write the bundle of every case (or those matching ``pattern``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for spec in select_cases(pattern):
        folders.append(generate_case(spec, out_dir))
        log(f"generated {spec.name}")
    return folders


# ---- loading -----------------------------------------------------------------------------

class WeightsMismatchError(RefimplError):
    """Weights that differ from the ones the goldens were computed from."""


@dataclass
class LoadedCase:
    """A case read from its bundle: the part a backend receives, and the goldens the runner compares with."""

    info: CaseInfo
    inputs: dict
    expected: dict
    checks: list
    mask: np.ndarray  # [B, T], 1 at positions that are compared
    labels: np.ndarray | None = None  # [B, T] token labels of a gradient case, -100 where ignored


def find_cases(golden_dir, pattern=None):
    """Return the case folders under ``golden_dir`` whose name matches ``pattern``, sorted by name."""
    golden_dir = Path(golden_dir)
    if not golden_dir.is_dir():
        raise RefimplError(f"{golden_dir}: golden folder not found; run 'refimpl-conformance generate' "
                           "or pass --golden")
    folders = sorted(p.parent for p in golden_dir.glob("*/case.json"))
    if pattern:
        folders = [f for f in folders if fnmatch.fnmatchcase(f.name, pattern)]
    return folders


def read_case_json(folder):
    path = Path(folder) / "case.json"
    try:
        case = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RefimplError(f"{path}: cannot read the case: {error}") from None
    if case.get("schema_version") != SCHEMA_VERSION:
        raise RefimplError(f"{path}: schema version {case.get('schema_version')} is not supported "
                           f"(this suite reads version {SCHEMA_VERSION}); regenerate the goldens")
    return case


def model_dir_of(case, folder):
    """Return the model folder of a case: the case folder, or the registry model's folder."""
    weights = case["weights"]
    if weights["source"] == "registry":
        return Path(resolve_model(weights["model"]))
    return Path(folder)


def load_case(folder):
    """Read a case bundle and check that its weights are the ones the goldens were computed from."""
    folder = Path(folder)
    case = read_case_json(folder)
    model_dir = model_dir_of(case, folder)
    weights_path = model_dir / case["weights"]["file"]
    if not weights_path.is_file():
        raise RefimplError(f"{weights_path}: weights not found")
    actual_sha = sha256_file(weights_path)
    if actual_sha != case["weights"]["sha256"]:
        raise WeightsMismatchError(f"{weights_path}: sha256 {actual_sha} differs from the "
                                   f"{case['weights']['sha256']} that the goldens were computed from")
    inputs = {name: np.array(array) for name, array in safetensors.load(folder / case["inputs"]["file"]).items()}
    labels = inputs.pop("labels", None)
    expected = {name: np.array(array) for name, array in
                safetensors.load(folder / case["expected"]["file"]).items()}
    if case.get("ner"):
        # The NER goldens are small and discrete, so case.json stores them.
        expected["ner.tags"] = np.array(case["ner"]["expected_tag_ids"], dtype=np.int64)
        expected["ner.entity_scores"] = np.array(case["ner"]["entity_scores"], dtype=np.float64)
    arch_inputs = tuple(name for name in inputs)
    info = CaseInfo(name=case["name"], architecture=case["architecture"], config=case["config"],
                    model_dir=model_dir, weights_path=weights_path, input_names=arch_inputs,
                    output_name=case["output_name"], num_layers=case["num_layers"], metadata=case)
    return LoadedCase(info, inputs, expected, case["checks"], inputs["attention_mask"].astype(np.int64), labels)
