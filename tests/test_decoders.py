"""Llama and GPT-2 decoders: agreement with transformers, and bitwise identity under
KV-cache decoding, chunking, budgets and prompt splits."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.models.gpt2 import GPT2Config, GPT2Model
from refimpl.models.llama import KVCache, LlamaConfig, LlamaModel
from refimpl.ops import Ops
from refimpl.random_models import make_random_gpt2, make_random_llama
from refimpl.store import WeightStore
from refimpl_kernels.conv1d import accumulate_xw
from refimpl_kernels.rope import inverse_frequencies, rope

MIB = 1 << 20
FAST_TOLERANCE = 1e-4
PEER_TOLERANCE = 1e-4

# name -> (writer, config overrides)
MODELS = {
    "llama-gqa": (make_random_llama, {}),
    "llama-tied": (make_random_llama, {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama-bias-mqa": (make_random_llama, {"attention_bias": True, "mlp_bias": True,
                                           "num_key_value_heads": 1, "rope_theta": 500.0}),
    "gpt2": (make_random_gpt2, {}),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {name: writer(root / name, seed=i, **overrides)
            for i, (name, (writer, overrides)) in enumerate(MODELS.items())}


def load(folder, mode="reference", **store_options):
    store = WeightStore(folder / "model.safetensors", **store_options)
    if (folder / "config.json").read_text().find("GPT2LMHeadModel") >= 0:
        return GPT2Model(GPT2Config.from_file(folder / "config.json"), store, Ops(mode))
    return LlamaModel(LlamaConfig.from_file(folder / "config.json"), store, Ops(mode))


def padded_batch(seed, padding_side):
    """Three rows of lengths 11, 6 and 1, padded on one side: ids and mask [3, 11]."""
    rng = np.random.default_rng(seed)
    lengths = [11, 6, 1]
    ids = np.zeros((3, 11), dtype=np.int64)
    mask = np.zeros((3, 11), dtype=np.int64)
    for row, length in enumerate(lengths):
        span = slice(11 - length, 11) if padding_side == "left" else slice(0, length)
        ids[row, span] = rng.integers(0, 259, length)
        mask[row, span] = 1
    return ids, mask


def transformers_logits(folder, ids, mask):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = (folder / "config.json").read_text()
    model_class = transformers.GPT2LMHeadModel if "GPT2LMHeadModel" in config else transformers.LlamaForCausalLM
    model = model_class.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    # Positions count the tokens of each row, as in refimpl and transformers' generate().
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    with torch.no_grad():
        output = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions))
    return output.logits.numpy()


# ---- kernels ----------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 7), k=st.integers(1, 70), n=st.integers(1, 150), chunk=st.integers(1, 80),
       seed=st.integers(0, 2**32 - 1))
def test_conv1d_kernel_ignores_chunk_size(m, k, n, chunk, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    whole = np.zeros((m, n), dtype=np.float32)
    accumulate_xw(x, w, whole, 0)
    chunked = np.zeros((m, n), dtype=np.float32)
    for k0 in range(0, k, chunk):
        accumulate_xw(x, np.ascontiguousarray(w[k0:k0 + chunk]), chunked, k0)
    assert np.array_equal(whole, chunked)
    # The order is the plain sequential sum over k.
    sequential = np.zeros((m, n), dtype=np.float32)
    for kk in range(k):
        sequential = sequential + x[:, kk:kk + 1] * w[kk]
    assert np.array_equal(whole, sequential)


def test_rope_rows_independent():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 3, 16)).astype(np.float32)
    positions = np.array([0, 1, 2, 5, 9, 40, 41, 100, 8191])
    inv_freq = inverse_frequencies(16, 10000.0)
    together = np.empty_like(x)
    rope(x, positions, inv_freq, together)
    for n in range(9):
        alone = np.empty_like(x[n:n + 1])
        rope(x[n:n + 1], positions[n:n + 1], inv_freq, alone)
        assert np.array_equal(alone[0], together[n])


def test_rope_matches_rotate_half():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 2, 8))
    positions = np.arange(5) * 7
    inv_freq = 1 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angles = np.concatenate([positions[:, None] * inv_freq] * 2, axis=1)[:, None, :]  # [N, 1, D]
    rotated_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    expected = x * np.cos(angles) + rotated_half * np.sin(angles)
    out = Ops("reference", np.float64).rope(x, positions, inv_freq)
    assert np.abs(out - expected).max() < 1e-12


# ---- agreement with transformers --------------------------------------------------

@pytest.mark.peer
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers(model_dirs, name, padding_side):
    folder = model_dirs[name]
    ids, mask = padded_batch(7, padding_side)
    expected = transformers_logits(folder, ids, mask)
    ours = load(folder).forward(ids, mask)
    assert ours.shape == expected.shape
    real = mask.astype(bool)
    assert np.abs(ours[real] - expected[real]).max() < PEER_TOLERANCE


def test_padding_does_not_change_rows(model_dirs):
    for name in MODELS:
        model = load(model_dirs[name])
        for side in ("left", "right"):
            ids, mask = padded_batch(3, side)
            batch = model.forward(ids, mask)
            for row in range(3):
                real = mask[row].astype(bool)
                alone = model.forward(ids[row:row + 1, real])
                assert np.array_equal(alone[0], batch[row, real]), f"{name}, {side} padding, row {row}"


def test_hidden_states_per_layer(model_dirs):
    hidden = []
    load(model_dirs["llama-gqa"]).forward(np.array([[1, 2, 3]]), hidden_states=hidden)
    assert len(hidden) == 3  # the embedding and two layers
    assert hidden[-1].shape == (1, 3, 32)


# ---- bitwise identity -------------------------------------------------------------

def decode_incrementally(model, ids, mask, prefill):
    """Logits of a batch when the first ``prefill`` tokens go in at once, then one token per step."""
    cache = KVCache(model.config.num_hidden_layers)
    parts = [model.forward(ids[:, :prefill], mask[:, :prefill], cache=cache)]
    for t in range(prefill, ids.shape[1]):
        parts.append(model.forward(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache))
    return np.concatenate(parts, axis=1)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(list(MODELS)), prefill=st.integers(1, 11), seed=st.integers(0, 1000))
def test_kv_cache_decoding_is_bitwise(model_dirs, name, prefill, seed):
    model = load(model_dirs[name])
    ids, mask = padded_batch(seed, "left")
    full = model.forward(ids, mask)
    incremental = decode_incrementally(model, ids, mask, prefill)
    real = mask.astype(bool)
    assert np.array_equal(full[real], incremental[real])


def greedy_tokens(model, prompt, n_new, prefill):
    """Greedy continuation of one prompt, fed in two pieces split at ``prefill``."""
    cache = KVCache(model.config.num_hidden_layers)
    model.forward(np.array([prompt[:prefill]]), cache=cache)
    logits = model.forward(np.array([prompt[prefill:]]), cache=cache)
    tokens = []
    for _ in range(n_new):
        tokens.append(int(np.argmax(logits[0, -1])))
        logits = model.forward(np.array([[tokens[-1]]]), cache=cache)
    return tokens


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(list(MODELS)),
       chunk_rows=st.sampled_from([1, 7, 13, 31, 33, 100, 259, 1000]),
       budget=st.sampled_from([None, ("budget", 8), ("budget", 13.5), ("layer", None)]),
       prefill=st.integers(1, 7))
def test_store_options_are_bitwise(model_dirs, name, chunk_rows, budget, prefill):
    folder = model_dirs[name]
    ids, mask = padded_batch(5, "right")
    prompt = [5, 200, 17, 99, 3, 42, 8, 1]
    reference = load(folder)
    expected_logits = reference.forward(ids, mask)
    expected_tokens = greedy_tokens(reference, prompt, 6, 4)

    options = {"chunk_rows": chunk_rows}
    if budget is not None:
        schedule, mib = budget
        options.update(schedule=schedule, budget_bytes=None if mib is None else int(mib * MIB))
    model = load(folder, **options)
    assert np.array_equal(model.forward(ids, mask), expected_logits)
    assert greedy_tokens(model, prompt, 6, prefill) == expected_tokens


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_mode_close_to_reference(model_dirs, name):
    ids, mask = padded_batch(11, "left")
    reference = load(model_dirs[name]).forward(ids, mask)
    fast = load(model_dirs[name], mode="fast").forward(ids, mask)
    real = mask.astype(bool)
    assert np.abs(fast[real] - reference[real]).max() < FAST_TOLERANCE
