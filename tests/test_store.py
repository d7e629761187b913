"""The chunked weight store: views, budgets, eviction that really releases pages."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from refimpl.errors import RefimplError
from refimpl.store import BLOCK_SIZE, WeightStore

MIB = 1 << 20


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Three float32 weights, 24 MiB in all, with rows of 4 KiB."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("store") / "weights.safetensors"
    tensors = {f"layers.{i}.weight": rng.standard_normal((2048, 1024)).astype(np.float32) for i in range(3)}
    tensors["layers.0.bias"] = rng.standard_normal(1024).astype(np.float32)
    save_file(tensors, str(path))
    return path, tensors


def test_chunks_are_views_covering_the_weight(weights_file):
    path, tensors = weights_file
    store = WeightStore(path, chunk_rows=300)
    pieces = []
    for start, stop, view in store.chunks("layers.1.weight"):
        assert view.shape == (stop - start, 1024)
        assert not view.flags.writeable
        assert np.shares_memory(view, store.files[0]._memmap)
        pieces.append(np.array(view))
    assert np.array_equal(np.concatenate(pieces), tensors["layers.1.weight"])
    assert store.n_chunks("layers.1.weight") == 7  # ceil(2048 / 300)


def test_rows_gathers_across_chunks(weights_file):
    path, tensors = weights_file
    store = WeightStore(path, chunk_rows=100, budget_bytes=9 * MIB)
    ids = np.array([5, 2047, 0, 5, 1000])
    assert np.array_equal(store.rows("layers.2.weight", ids), tensors["layers.2.weight"][ids])
    with pytest.raises(RefimplError, match="out of range"):
        store.rows("layers.2.weight", [2048])


@settings(max_examples=25, deadline=None)
@given(chunk_rows=st.sampled_from([1, 7, 97, 300, 2048, 5000]),
       budget_mib=st.floats(1, 40), prefetch=st.integers(0, 3))
def test_budget_bounds_accounted_pages(weights_file, chunk_rows, budget_mib, prefetch):
    path, tensors = weights_file
    budget = int(budget_mib * MIB)
    try:
        store = WeightStore(path, chunk_rows=chunk_rows, budget_bytes=budget, prefetch=prefetch)
    except RefimplError as error:  # only when not even one row per chunk fits
        assert "too small" in str(error)
        assert budget < (1 + prefetch) * 2 * BLOCK_SIZE
        return
    names = ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    store.set_execution_order(names)
    for name in names:
        total = 0.0
        for _, _, view in store.chunks(name):
            total += float(view[:, 0].sum())
        assert np.isclose(total, float(tensors[name][:, 0].sum()), rtol=1e-4)
    assert store.stats.peak_resident_bytes <= budget
    assert store.chunk_rows <= chunk_rows


def test_eviction_releases_resident_pages(weights_file, smaps_rss):
    path, _ = weights_file
    budget = 8 * MIB
    store = WeightStore(path, chunk_rows=64, budget_bytes=budget)
    for name in ["layers.0.weight", "layers.1.weight", "layers.2.weight"]:
        for _, _, view in store.chunks(name):
            view.sum()  # touch every page of the chunk
            assert smaps_rss(path) <= budget
    assert store.stats.evictions > 0


def test_resident_schedule_keeps_pages(weights_file, smaps_rss):
    # The counterpart of the test above, showing that it measures something.
    path, _ = weights_file
    store = WeightStore(path, chunk_rows=64)
    for name in ["layers.0.weight", "layers.1.weight", "layers.2.weight"]:
        for _, _, view in store.chunks(name):
            view.sum()
    assert smaps_rss(path) >= 20 * MIB
    assert store.stats.evictions == 0


def test_layer_schedule_releases_a_finished_layer(weights_file, smaps_rss):
    path, _ = weights_file
    store = WeightStore(path, chunk_rows=256, schedule="layer")
    for _, _, view in store.chunks("layers.0.weight"):
        view.sum()
    assert smaps_rss(path) >= 7 * MIB
    store.release("layers.0.")
    assert store.stats.resident_bytes == 0
    assert smaps_rss(path) < MIB


def test_budget_too_small_is_a_clear_error(weights_file):
    path, _ = weights_file
    with pytest.raises(RefimplError, match="too small"):
        WeightStore(path, budget_bytes=1000)


def test_unknown_weight_names_the_file(weights_file):
    path, _ = weights_file
    store = WeightStore(path)
    with pytest.raises(RefimplError, match="weights.safetensors"):
        list(store.chunks("missing.weight"))
