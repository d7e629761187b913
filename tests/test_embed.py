"""Sentence embeddings: agreement with sentence-transformers, and bitwise identity under every schedule."""

import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.embed import SentenceEncoder
from refimpl.random_models import make_random_bert

MIB = 1 << 20

HARD_TEXTS = [
    "",
    "A plain English sentence about the weather.",
    "Crème brûlée, naïve façade, Ångström, Ærøskøbing",
    "Grüße aus München: Straße, Maß, Übermut",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "🙂🚀👩‍👩‍👧 emoji 🇩🇪",
    "see https://example.com/path?q=1&x=%20 and mail me at a.b@example.org",
    "@jack_dorsey #NLP RT @user: this is great!!!",
    "ctrl\x00char\x07bell\x1b[31m and zero\u200bwidth\u200djoiner\ufeff",
    "   leading and trailing spaces   ",
    "long text " * 300,  # more than 256 word pieces, so truncation applies
]


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    return SentenceEncoder(minilm_dir)


@pytest.fixture(scope="module")
def resident_embeddings(encoder):
    return encoder.encode(HARD_TEXTS)


@pytest.mark.peer
def test_matches_sentence_transformers(minilm_dir, resident_embeddings):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")
    expected = model.encode(HARD_TEXTS, convert_to_numpy=True, batch_size=4)
    cosine = (resident_embeddings * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
    for text, value in zip(HARD_TEXTS, cosine):
        assert value >= 0.99999, f"cosine {value} for {text[:40]!r}"


def test_truncates_to_256_word_pieces(encoder):
    ids = encoder.tokenize(["long text " * 300])[0]
    assert len(ids) == 256
    assert encoder.max_seq_length == 256


def test_embeddings_are_unit_length(resident_embeddings):
    assert resident_embeddings.dtype == np.float32
    assert resident_embeddings.shape == (len(HARD_TEXTS), 384)
    assert np.allclose(np.linalg.norm(resident_embeddings, axis=1), 1, atol=1e-6)


def test_fast_mode_close_to_reference(minilm_dir, resident_embeddings):
    fast = SentenceEncoder(minilm_dir, mode="fast").encode(HARD_TEXTS)
    assert np.abs(fast - resident_embeddings).max() < 1e-5


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_rows=st.sampled_from([1, 7, 13, 100, 383, 384, 385, 1000, 40000]),
       budget_mib=st.one_of(st.none(), st.sampled_from([8, 12.5, 40])),
       batch_size=st.integers(1, 5), order=st.randoms(use_true_random=False))
def test_schedules_are_bitwise_identical(minilm_dir, resident_embeddings, chunk_rows, budget_mib, batch_size, order):
    # Short texts keep each example fast; the long one is covered by the resident run above.
    indices = list(range(len(HARD_TEXTS) - 1))
    order.shuffle(indices)
    texts = [HARD_TEXTS[i] for i in indices]
    budget = None if budget_mib is None else int(budget_mib * MIB)
    encoder = SentenceEncoder(minilm_dir, chunk_rows=chunk_rows, budget_bytes=budget)
    embeddings = encoder.encode(texts, batch_size=batch_size)
    assert np.array_equal(embeddings, resident_embeddings[indices])
    if budget is not None:
        assert encoder.store.stats.peak_resident_bytes <= budget


def test_layer_schedule_is_bitwise_identical(minilm_dir, resident_embeddings):
    encoder = SentenceEncoder(minilm_dir, schedule="layer", chunk_rows=64)
    assert np.array_equal(encoder.encode(HARD_TEXTS), resident_embeddings)
    assert encoder.store.stats.evictions > 0


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm_dir):
    folder = make_random_bert(tmp_path_factory.mktemp("tiny-bert"), vocab_size=30522, hidden_size=24,
                              num_attention_heads=3, intermediate_size=40, max_position_embeddings=300,
                              num_hidden_layers=3)
    shutil.copy(minilm_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_rows=st.one_of(st.integers(1, 50), st.just(10**6)), prefetch=st.integers(0, 3),
       budget_mib=st.one_of(st.none(), st.floats(8, 64)),
       texts=st.lists(st.text(max_size=60), min_size=1, max_size=6), batch_size=st.integers(1, 6))
def test_tiny_model_schedules_bitwise(tiny_bert_dir, chunk_rows, prefetch, budget_mib, texts, batch_size):
    reference = SentenceEncoder(tiny_bert_dir)
    expected = np.concatenate([reference.encode([text]) for text in texts])
    budget = None if budget_mib is None else int(budget_mib * MIB)
    encoder = SentenceEncoder(tiny_bert_dir, chunk_rows=chunk_rows, budget_bytes=budget,
                              prefetch=min(prefetch, 1) if budget else prefetch)
    assert np.array_equal(encoder.encode(texts, batch_size=batch_size), expected)


@pytest.mark.peer
def test_tiny_model_matches_transformers(tiny_bert_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(str(tiny_bert_dir), attn_implementation="eager").eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30522, size=(3, 9))
    mask = np.ones((3, 9), dtype=np.int64)
    mask[1, 5:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    encoder = SentenceEncoder(tiny_bert_dir)
    hidden = encoder.model.forward(ids, mask)
    valid = mask.astype(bool)
    assert np.abs(hidden[valid] - expected[valid]).max() < 1e-5
