"""AdamW: agreement with torch.optim.AdamW, the schedule, clipping, and offloaded state."""

import numpy as np
import pytest

from refimpl.train.adamw import AdamW, decays, linear_schedule
from refimpl.train.offload import TrainingState

SPECS = {
    "bert.embeddings.word_embeddings.weight": ((50, 8), np.float32),
    "bert.embeddings.LayerNorm.weight": ((8,), np.float32),
    "bert.embeddings.LayerNorm.bias": ((8,), np.float32),
    "classifier.weight": ((3, 8), np.float32),
    "classifier.bias": ((3,), np.float32),
}


def random_tensors(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(dtype) for name, (shape, dtype) in SPECS.items()}


def make_state(params, **options):
    state = TrainingState(SPECS, **options)
    state.load_params(params)
    return state


def set_grads(state, grads):
    for name, grad in grads.items():
        state.grads.array(name)[...] = grad


def test_decay_skips_biases_and_layer_norm():
    assert decays("bert.embeddings.word_embeddings.weight")
    assert decays("classifier.weight")
    assert not decays("classifier.bias")
    assert not decays("bert.embeddings.LayerNorm.weight")


def test_schedule_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=3e-4)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 4, 20)
    for step in range(22):
        assert linear_schedule(step, 3e-4, 4, 20) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("grad_scale", [1.0, 100.0])  # 100: clipping by global norm applies
def test_steps_match_torch_adamw(grad_scale):
    torch = pytest.importorskip("torch")
    params = random_tensors(0)
    state = make_state(params)
    optimizer = AdamW(state, lr=1e-2, weight_decay=0.1, warmup_steps=0, total_steps=1000, max_grad_norm=1.0)

    tensors = {name: torch.nn.Parameter(torch.from_numpy(array.copy())) for name, array in params.items()}
    torch_optimizer = torch.optim.AdamW(
        [{"params": [t for n, t in tensors.items() if decays(n)], "weight_decay": 0.1},
         {"params": [t for n, t in tensors.items() if not decays(n)], "weight_decay": 0.0}],
        lr=1e-2, foreach=False)
    for step in range(3):
        grads = random_tensors(10 + step, scale=grad_scale)
        set_grads(state, grads)
        norm, _ = optimizer.step()
        # The optimizer's learning rate decays linearly; apply the same one to torch.
        for group in torch_optimizer.param_groups:
            group["lr"] = linear_schedule(step, 1e-2, 0, 1000)
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(grads[name].copy())
        torch_norm = torch.nn.utils.clip_grad_norm_(list(tensors.values()), 1.0, foreach=False).item()
        torch_optimizer.step()
        assert norm == pytest.approx(torch_norm, rel=1e-6)
        for name, tensor in tensors.items():
            np.testing.assert_allclose(state.params.arrays[name], tensor.detach().numpy(), rtol=2e-6, atol=2e-7,
                                       err_msg=name)
    moments = torch_optimizer.state[tensors["classifier.weight"]]
    np.testing.assert_allclose(state.exp_avg.arrays["classifier.weight"], moments["exp_avg"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(state.exp_avg_sq.arrays["classifier.weight"], moments["exp_avg_sq"].numpy(),
                               rtol=1e-5)


def test_offloaded_steps_bitwise_equal_resident(tmp_path):
    params = random_tensors(1)
    results = []
    for options in ({}, {"offload_dir": tmp_path, "budget_bytes": 64 << 10, "chunk_rows": 7}):
        state = make_state(params, **options)
        optimizer = AdamW(state, lr=1e-3, warmup_steps=2, total_steps=5)
        for step in range(4):
            set_grads(state, random_tensors(20 + step, scale=3.0))
            optimizer.step()
        results.append({name: np.array(state.params.arrays[name]) for name in state.names()})
        state.close()
    for name in SPECS:
        assert np.array_equal(results[0][name], results[1][name]), name
    assert list(tmp_path.iterdir()) == []  # the run folder is deleted on close
