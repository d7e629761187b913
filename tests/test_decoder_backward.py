"""Decoder backward passes with the causal language-modelling loss: finite differences, PyTorch, bitwise invariance."""

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refimpl.errors import RefimplError
from refimpl.models.gpt2 import GPT2Config, GPT2Model
from refimpl.models.llama import LlamaConfig, LlamaModel
from refimpl.ops import Ops
from refimpl.random_models import make_random_gpt2, make_random_llama
from refimpl.safetensors import SafetensorsFile
from refimpl.store import WeightStore
from refimpl.train.backward_ops import IGNORE_INDEX, TrainOps
from refimpl.train.gpt2_backward import build_gpt2_training
from refimpl.train.llama_backward import build_llama_training, causal_lm_labels
from refimpl_kernels import threads_for
from refimpl_kernels.rope import inverse_frequencies

MIB = 1 << 20


def read_weights(folder):
    with SafetensorsFile(folder / "model.safetensors") as file:
        return {name: np.array(file.array(name)) for name in file.tensors}


@pytest.fixture(autouse=True)
def one_thread():
    """Run the kernels on one thread, because on these tiny shapes waking the thread pool for each call
    costs more than the work when the cores are busy. The thread count does not change a result."""
    with threads_for(0):
        yield


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A two-layer Llama with grouped-query attention (4 query heads, 2 key/value heads) and tied embeddings."""
    folder = make_random_llama(tmp_path_factory.mktemp("llama"), seed=2, tie_word_embeddings=True)
    return folder, LlamaConfig.from_file(folder / "config.json"), read_weights(folder)


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    """A Llama with a separate lm_head and biases on every projection."""
    folder = make_random_llama(tmp_path_factory.mktemp("llama-untied"), seed=4, attention_bias=True, mlp_bias=True)
    return folder, LlamaConfig.from_file(folder / "config.json"), read_weights(folder)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A two-layer GPT-2 with 4 heads and the tanh GELU, its output projection tied to wte."""
    folder = make_random_gpt2(tmp_path_factory.mktemp("gpt2"), seed=5)
    return folder, GPT2Config.from_file(folder / "config.json"), read_weights(folder)


def make_lm_batch(seed, vocab, B=3, T=10):
    """A right-padded batch with labels = input_ids and -100 at padding, the first row unpadded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, B)
    lengths[0] = T
    attention_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    input_ids = rng.integers(0, vocab, (B, T))
    input_ids[attention_mask == 0] = 0
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def model_gradients(build, config, weights, batches, dtype=np.float64, mode="reference", **options):
    state, model = build(config, weights, dtype=dtype, mode=mode, **options)
    loss = model.accumulate_gradients(batches, state.grads)
    grads = {name: np.array(state.grads.arrays[name]) for name in state.names()}
    state.close()
    return loss, grads


def causal_lm_loss(model, batch):
    """Return the mean causal-LM loss of one batch from the forward pass alone."""
    logits = model.forward(batch["input_ids"], batch["attention_mask"], saved={})
    B, T, V = logits.shape
    targets = causal_lm_labels(batch["labels"], batch["attention_mask"]).reshape(-1)
    losses, _ = model.ops.cross_entropy(logits.reshape(B * T, V), targets, 1.0)
    return losses.sum() / np.count_nonzero(targets != IGNORE_INDEX)


def test_causal_lm_labels_shift_and_padding():
    labels = np.array([[5, 6, 7, 8], [1, 2, -100, -100]])
    attention_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    shifted = causal_lm_labels(labels, attention_mask)
    assert shifted.tolist() == [[6, 7, 8, -100], [2, -100, -100, -100]]


def test_rope_backward_is_adjoint_of_rope():
    """<rope(x), y> == <x, rope_backward(y)>, because each pair rotation is orthogonal."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 8))
    y = rng.standard_normal((5, 3, 8))
    positions = np.array([0, 1, 2, 7, 30])
    ops = TrainOps("reference", np.float64)
    inv_freq = inverse_frequencies(8, 10000.0)
    forward = ops.rope(x, positions, inv_freq)
    backward = ops.rope_backward(y, positions, inv_freq)
    assert np.sum(forward * y) == pytest.approx(np.sum(x * backward), rel=1e-13)


def test_llama_forward_matches_llama_model_bitwise(tiny_llama):
    folder, config, weights = tiny_llama
    batch = make_lm_batch(0, config.vocab_size)
    state, model = build_llama_training(config, weights)
    logits = model.forward(batch["input_ids"], batch["attention_mask"], saved={})
    state.close()
    expected = LlamaModel(config, WeightStore(folder / "model.safetensors"), Ops()).forward(
        batch["input_ids"], batch["attention_mask"])
    # Padding positions differ: LlamaModel repeats the last position there, and their logits are never used.
    tokens = batch["attention_mask"] == 1
    assert np.array_equal(logits[tokens], expected[tokens])


def test_llama_rejects_left_padding(tiny_llama):
    _, config, weights = tiny_llama
    batch = make_lm_batch(0, config.vocab_size)
    state, model = build_llama_training(config, weights)
    with pytest.raises(RefimplError, match="padding precedes a token"):
        model.forward(batch["input_ids"], batch["attention_mask"][:, ::-1], saved={})
    state.close()


def check_finite_differences(build, config, weights, batch):
    """Return the max relative error of central differences against the gradient, over sampled entries of every tensor."""
    weights64 = {name: array.astype(np.float64) for name, array in weights.items()}
    loss, grads = model_gradients(build, config, weights64, [batch])
    state, model = build(config, weights64, dtype=np.float64)
    assert causal_lm_loss(model, batch) == pytest.approx(loss, rel=1e-12)
    rng = np.random.default_rng(0)
    step = 1e-5
    worst = 0.0
    for name in state.names():
        grad = grads[name]
        assert np.abs(grad).max() > 0, name
        # Entries far below the largest one would be dominated by the rounding of the loss.
        candidates = np.flatnonzero(np.abs(grad).ravel() >= 0.1 * np.abs(grad).max())
        picks = [int(np.argmax(np.abs(grad)))] + list(rng.choice(candidates, size=min(2, candidates.size),
                                                                  replace=False))
        param = state.params.arrays[name]
        for flat in picks:
            index = np.unravel_index(flat, grad.shape)
            original = param[index]
            param[index] = original + step
            plus = causal_lm_loss(model, batch)
            param[index] = original - step
            minus = causal_lm_loss(model, batch)
            param[index] = original
            numeric = (plus - minus) / (2 * step)
            error = abs(numeric - grad[index]) / max(abs(numeric), abs(grad[index]))
            worst = max(worst, error)
            assert error < 1e-6, f"{name}{index}: numeric {numeric}, analytic {grad[index]}"
    state.close()
    return worst


def torch_gradients(class_name, folder, batch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = getattr(transformers, class_name).from_pretrained(str(folder), attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    output = model(input_ids=torch.from_numpy(batch["input_ids"]),
                   attention_mask=torch.from_numpy(batch["attention_mask"]),
                   labels=torch.from_numpy(batch["labels"]))
    output.loss.backward()
    # Tied weights are one parameter, listed once, under the embedding's name.
    return output.loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def assert_close_to_torch(loss, grads, torch_loss, torch_grads):
    assert abs(loss - torch_loss) <= 1e-5 * abs(torch_loss)
    assert sorted(grads) == sorted(torch_grads)
    worst = 0.0
    for name, expected in torch_grads.items():
        error = np.abs(grads[name] - expected).max() / np.abs(expected).max()
        worst = max(worst, error)
        assert error < 1e-4, f"{name}: max error relative to max |grad| {error:.2e}"
    print(f"max error relative to max |grad| against PyTorch: {worst:.2e}")


def split_batch(batch, cuts):
    """Cut a batch into micro-batches of consecutive rows, each trimmed to its own longest row."""
    micro = []
    for first, last in zip(cuts, cuts[1:]):
        T = int(batch["attention_mask"][first:last].sum(axis=1).max())
        micro.append({key: value[first:last, :T] for key, value in batch.items()})
    return micro


def check_bitwise_invariance(build, config, weights, tmp_path, chunk_rows, split, budget_mib):
    """Assert that chunking, an offload budget and a micro-batch split leave loss and gradients bitwise equal."""
    batch = make_lm_batch(7, config.vocab_size, B=4, T=9)
    loss, grads = model_gradients(build, config, weights, [batch], dtype=np.float32)

    cuts = sorted({0, 4, *np.random.default_rng(split).integers(1, 4, split - 1).tolist()})
    options = {"chunk_rows": chunk_rows}
    if budget_mib is not None:
        options.update(offload_dir=tmp_path / f"offload-{chunk_rows}-{split}-{budget_mib}", budget_bytes=budget_mib * MIB)
    split_loss, split_grads = model_gradients(build, config, weights, split_batch(batch, cuts),
                                              dtype=np.float32, **options)
    assert split_loss == loss
    for name, grad in grads.items():
        assert np.array_equal(split_grads[name], grad), name


# chunk_rows 1, a prime, and more rows than any weight has.
invariance_cases = given(chunk_rows=st.sampled_from([1, 7, 1000]), split=st.integers(1, 3),
                         budget_mib=st.sampled_from([None, 1, 3]))
invariance_settings = settings(max_examples=10, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- Llama ---------------------------------------------------------------------------


def test_llama_rejects_step_without_targets(tiny_llama):
    _, config, weights = tiny_llama
    batch = make_lm_batch(0, config.vocab_size)
    batch["labels"][:, 1:] = IGNORE_INDEX
    state, model = build_llama_training(config, weights)
    with pytest.raises(RefimplError, match="no labelled target token"):
        model.accumulate_gradients([batch], state.grads)
    state.close()


def test_llama_finite_differences_float64(tiny_llama):
    """Central differences on sampled entries of every parameter tensor, relative error < 1e-6."""
    _, config, weights = tiny_llama
    worst = check_finite_differences(build_llama_training, config, weights, make_lm_batch(1, config.vocab_size))
    print(f"max relative error against finite differences: {worst:.2e}")


@pytest.mark.peer
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_llama_matches_pytorch_tied(tiny_llama, mode):
    folder, config, weights = tiny_llama
    batch = make_lm_batch(2, config.vocab_size)
    loss, grads = model_gradients(build_llama_training, config, weights, [batch], dtype=np.float32, mode=mode)
    assert_close_to_torch(loss, grads, *torch_gradients("LlamaForCausalLM", folder, batch))


@pytest.mark.peer
def test_llama_matches_pytorch_untied(untied_llama):
    folder, config, weights = untied_llama
    batch = make_lm_batch(3, config.vocab_size)
    loss, grads = model_gradients(build_llama_training, config, weights, [batch], dtype=np.float32)
    assert "lm_head.weight" in grads
    assert "model.layers.0.mlp.up_proj.bias" in grads
    assert_close_to_torch(loss, grads, *torch_gradients("LlamaForCausalLM", folder, batch))


@invariance_settings
@invariance_cases
@example(chunk_rows=1, split=3, budget_mib=1)
@example(chunk_rows=7, split=2, budget_mib=None)
@example(chunk_rows=1000, split=1, budget_mib=3)
def test_llama_gradients_bitwise_invariant(tiny_llama, tmp_path, chunk_rows, split, budget_mib):
    _, config, weights = tiny_llama
    check_bitwise_invariance(build_llama_training, config, weights, tmp_path, chunk_rows, split, budget_mib)


# ---- GPT-2 ---------------------------------------------------------------------------


def test_gpt2_forward_matches_gpt2_model_bitwise(tiny_gpt2):
    folder, config, weights = tiny_gpt2
    batch = make_lm_batch(0, config.vocab_size)
    state, model = build_gpt2_training(config, weights)
    logits = model.forward(batch["input_ids"], batch["attention_mask"], saved={})
    state.close()
    expected = GPT2Model(config, WeightStore(folder / "model.safetensors"), Ops()).forward(
        batch["input_ids"], batch["attention_mask"])
    tokens = batch["attention_mask"] == 1
    assert np.array_equal(logits[tokens], expected[tokens])


def test_gpt2_finite_differences_float64(tiny_gpt2):
    """Central differences on sampled entries of every parameter tensor, relative error < 1e-6."""
    _, config, weights = tiny_gpt2
    worst = check_finite_differences(build_gpt2_training, config, weights, make_lm_batch(1, config.vocab_size))
    print(f"max relative error against finite differences: {worst:.2e}")


@pytest.mark.peer
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_gpt2_matches_pytorch(tiny_gpt2, mode):
    folder, config, weights = tiny_gpt2
    batch = make_lm_batch(2, config.vocab_size)
    loss, grads = model_gradients(build_gpt2_training, config, weights, [batch], dtype=np.float32, mode=mode)
    assert_close_to_torch(loss, grads, *torch_gradients("GPT2LMHeadModel", folder, batch))


@invariance_settings
@invariance_cases
@example(chunk_rows=1, split=3, budget_mib=1)
@example(chunk_rows=1000, split=2, budget_mib=None)
def test_gpt2_gradients_bitwise_invariant(tiny_gpt2, tmp_path, chunk_rows, split, budget_mib):
    _, config, weights = tiny_gpt2
    check_bitwise_invariance(build_gpt2_training, config, weights, tmp_path, chunk_rows, split, budget_mib)
