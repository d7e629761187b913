"""BERT token-classifier backward pass: finite differences, PyTorch autograd, and bitwise invariance."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.models.bert import BertModel
from refimpl.ner.model import initial_weights, read_model_config
from refimpl.ops import Ops
from refimpl.random_models import make_random_bert
from refimpl.store import WeightStore
from refimpl.train import build_training

LABELS = ["O", "B-a", "I-a", "B-b", "I-b"]
MIB = 1 << 20


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    folder = make_random_bert(tmp_path_factory.mktemp("bert"), seed=3)
    values, config = read_model_config(folder)
    weights = initial_weights(folder, config, LABELS, seed=1, initializer_range=0.2)
    weights["classifier.bias"] = np.linspace(-0.2, 0.2, len(LABELS)).astype(np.float32)
    return folder, values, config, weights


def make_batch(seed, B=3, T=9, vocab=100, num_labels=len(LABELS)):
    """A padded batch with labelled, unlabelled (-100) and padding positions."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, B)
    lengths[0] = T
    input_ids = rng.integers(1, vocab, (B, T))
    attention_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    input_ids[attention_mask == 0] = 0
    labels = rng.integers(0, num_labels, (B, T))
    labels[rng.random((B, T)) < 0.3] = -100
    labels[:, 0] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "example_ids": np.arange(B)}


def gradients(config, weights, batches, dtype=np.float64, mode="reference", **options):
    state, model = build_training(config, weights, len(LABELS), dtype=dtype, mode=mode, **options)
    loss = model.accumulate_gradients(batches, state.grads, train=False)
    grads = {name: np.array(state.grads.arrays[name]) for name in state.names()}
    state.close()
    return loss, grads


def test_forward_matches_bert_model_bitwise(small_model):
    folder, _, config, weights = small_model
    batch = make_batch(0)
    state, model = build_training(config, weights, len(LABELS))
    saved = {}
    model.forward(batch["input_ids"], batch["attention_mask"], saved=saved)
    store = WeightStore(folder / "model.safetensors")
    hidden = BertModel(config, store, Ops()).forward(batch["input_ids"], batch["attention_mask"])
    assert np.array_equal(saved["classifier"], hidden.reshape(-1, config.hidden_size))


def test_finite_differences_float64(small_model):
    """Central differences on sampled entries of every parameter tensor, relative error < 1e-6."""
    _, _, config, weights = small_model
    weights64 = {name: array.astype(np.float64) for name, array in weights.items()}
    batch = make_batch(1)
    loss, grads = gradients(config, weights64, [batch])
    state, model = build_training(config, weights64, len(LABELS), dtype=np.float64)
    rng = np.random.default_rng(0)
    step = 1e-5
    checked = 0
    for name in state.names():
        grad = grads[name]
        if name.endswith("attention.self.key.bias"):
            # softmax is invariant to a shift shared by all keys of a query, so this gradient is 0
            assert np.abs(grad).max() < 1e-12, name
            continue
        candidates = np.flatnonzero(np.abs(grad).ravel() >= 1e-3 * np.abs(grad).max())
        picks = [int(np.argmax(np.abs(grad)))] + list(rng.choice(candidates, size=min(2, candidates.size),
                                                                  replace=False))
        param = state.params.arrays[name]
        for flat in picks:
            index = np.unravel_index(flat, grad.shape)
            original = param[index]
            values = []
            for delta in (step, -step):
                param[index] = original + delta
                scratch, _ = build_training(config, {n: state.params.arrays[n] for n in state.names()},
                                            len(LABELS), dtype=np.float64)
                values.append(model.accumulate_gradients([batch], scratch.grads, train=False))
                scratch.close()
            param[index] = original
            numeric = (values[0] - values[1]) / (2 * step)
            error = abs(numeric - grad[index]) / max(abs(numeric), abs(grad[index]))
            assert error < 1e-6, f"{name}{index}: numeric {numeric}, analytic {grad[index]}"
            checked += 1
    assert checked > 3 * len(grads) // 2


def torch_gradients(values, weights, batch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(**{k: v for k, v in values.items() if k != "architectures"},
                                     num_labels=len(LABELS))
    config._attn_implementation = "eager"
    model = transformers.BertForTokenClassification(config).eval()
    missing, unexpected = model.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in weights.items()},
                                                strict=False)
    assert not unexpected
    assert all("position_ids" in name or "token_type_ids" in name for name in missing)
    output = model(input_ids=torch.from_numpy(batch["input_ids"]),
                   attention_mask=torch.from_numpy(batch["attention_mask"]),
                   labels=torch.from_numpy(batch["labels"]))
    output.loss.backward()
    return output.loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def assert_close_to_torch(loss, grads, torch_loss, torch_grads):
    assert abs(loss - torch_loss) <= 1e-5 * abs(torch_loss)
    for name, expected in torch_grads.items():
        if name.endswith("attention.self.key.bias"):
            # 0 in exact arithmetic (softmax is shift invariant), so both sides hold only rounding noise
            assert np.abs(grads[name]).max() < 1e-6, name
            continue
        scale = np.abs(expected).max()
        error = np.abs(grads[name] - expected).max() / max(scale, 1e-30)
        assert error < 1e-4, f"{name}: max error relative to max |grad| {error:.2e}"


@pytest.mark.peer
def test_matches_pytorch_small(small_model):
    _, values, config, weights = small_model
    batch = make_batch(2)
    loss, grads = gradients(config, weights, [batch], dtype=np.float32)
    assert_close_to_torch(loss, grads, *torch_gradients(values, weights, batch))


@pytest.mark.peer
def test_fast_mode_matches_pytorch(small_model):
    _, values, config, weights = small_model
    batch = make_batch(2)
    loss, grads = gradients(config, weights, [batch], dtype=np.float32, mode="fast")
    assert_close_to_torch(loss, grads, *torch_gradients(values, weights, batch))


@pytest.mark.peer
def test_matches_pytorch_minilm(minilm_dir):
    values, config = read_model_config(minilm_dir)
    weights = initial_weights(minilm_dir, config, LABELS, seed=5)
    batch = make_batch(4, B=2, T=10, vocab=config.vocab_size)
    loss, grads = gradients(config, weights, [batch], dtype=np.float32)
    assert_close_to_torch(loss, grads, *torch_gradients(values, weights, batch))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_rows=st.integers(1, 70), split=st.integers(1, 4), budget_mib=st.sampled_from([None, 1, 3]))
def test_gradients_bitwise_under_chunks_budgets_splits(small_model, tmp_path, chunk_rows, split, budget_mib):
    _, _, config, weights = small_model
    batch = make_batch(7, B=5, T=11)
    loss, grads = gradients(config, weights, [batch], dtype=np.float32)

    # The same examples in order, cut into micro-batches and padded to their own length.
    cuts = sorted({0, 5, *np.random.default_rng(split).integers(1, 5, split - 1).tolist()})
    micro = []
    for first, last in zip(cuts, cuts[1:]):
        T = int(batch["attention_mask"][first:last].sum(axis=1).max())
        micro.append({key: value[first:last, :T] if value.ndim == 2 else value[first:last]
                      for key, value in batch.items()})
    options = {"chunk_rows": chunk_rows}
    if budget_mib is not None:
        options.update(offload_dir=tmp_path / "offload", budget_bytes=budget_mib * MIB)
    split_loss, split_grads = gradients(config, weights, micro, dtype=np.float32, **options)
    assert split_loss == loss
    for name, grad in grads.items():
        assert np.array_equal(split_grads[name], grad), name
