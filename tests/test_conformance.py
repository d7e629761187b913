"""The conformance suite: goldens, comparison, backends, deliberately broken backends and the CLI."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.errors import RefimplError
from refimpl.models.llama import KVCache
from refimpl_conformance import cases as case_module
from refimpl_conformance.backends import (BUILTIN_BACKENDS, RefimplBackend, TransformersBackend, load_backend)
from refimpl_conformance.cases import find_cases, generate, load_case
from refimpl_conformance.cli import main
from refimpl_conformance.compare import compare_close, compare_logits, load_overrides, resolve_tolerance
from refimpl_conformance.runner import FAILED, PASSED, SKIPPED, verify, verify_case

import buggy_backends

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "golden"
MIB = 1 << 20
RANDOM_CASES = [p.name for p in find_cases(GOLDEN) if json.loads((p / "case.json").read_text())
                ["weights"]["source"] == "case"]
DECODER_CASES = [name for name in RANDOM_CASES if not name.startswith("bert")]


@pytest.fixture(scope="module")
def loaded_cases():
    return {name: load_case(GOLDEN / name) for name in RANDOM_CASES}


def run_backend(backend, case):
    backend.prepare(case.info)
    try:
        return backend.run({name: array.copy() for name, array in case.inputs.items()})
    finally:
        backend.close()


# ---- goldens -------------------------------------------------------------------------------

def test_golden_folder_under_6_mib():
    total = sum(path.stat().st_size for path in GOLDEN.rglob("*") if path.is_file())
    assert total < 6 * MIB, f"golden/ holds {total / MIB:.2f} MiB"


def test_golden_has_every_defined_case():
    assert sorted(p.name for p in find_cases(GOLDEN)) == sorted(spec.name for spec in case_module.CASES)


def test_goldens_are_float64_with_provenance():
    for folder in find_cases(GOLDEN):
        case = json.loads((folder / "case.json").read_text())
        assert case["expected"]["dtype"] == "float64"
        expected = load_case(folder).expected
        for name, array in expected.items():
            if not name.endswith("topk_indices") and name != "ner.tags":
                assert array.dtype == np.float64, f"{folder.name}: {name} is {array.dtype}"
        for key in ("command", "python", "numpy", "numba", "blas"):
            assert case["generator"][key], f"{folder.name}: generator.{key} is empty"
        assert len(case["weights"]["sha256"]) == 64


def test_goldens_cover_the_hard_inputs(loaded_cases):
    masks = {name: case.mask for name, case in loaded_cases.items()}
    assert any(m.shape[0] == 1 for m in masks.values()), "batch 1"
    assert any(m.shape[0] == 7 for m in masks.values()), "batch 7"
    assert any(m.shape[1] == 1 for m in masks.values()), "sequence length 1"
    assert any((m.sum(axis=1) == 0).any() for m in masks.values()), "a fully masked row"
    assert any((m[:, -1] == 0).any() and (m[:, 0] == 1).all() for m in masks.values()), "right padding"
    assert any((m[:, 0] == 0).any() and (m[:, -1] == 1).all() for m in masks.values()), "left padding"
    scores = json.loads((GOLDEN / "bert-large-scores" / "case.json").read_text())["properties"]
    assert scores["max_attention_score"] > case_module.FLOAT32_OVERFLOW


def test_generate_is_deterministic(tmp_path):
    pattern = "[bl]*-right-padding"  # one encoder and one decoder case
    first = generate(tmp_path / "first", pattern, log=lambda line: None)
    second = generate(tmp_path / "second", pattern, log=lambda line: None)
    assert [f.name for f in first] == ["bert-right-padding", "llama-right-padding"]
    for a, b in zip(first, second):
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a.name}/{name} differs"


def test_generated_tensors_match_checked_in(tmp_path):
    # Same generator, same machine kind: the checked-in goldens are up to date.
    folder = generate(tmp_path, "llama-left-padding", log=lambda line: None)[0]
    assert (folder / "expected.safetensors").read_bytes() == \
        (GOLDEN / "llama-left-padding" / "expected.safetensors").read_bytes()
    assert (folder / "model.safetensors").read_bytes() == \
        (GOLDEN / "llama-left-padding" / "model.safetensors").read_bytes()


def test_changed_weights_are_rejected(tmp_path):
    folder = generate(tmp_path, "bert-batch1", log=lambda line: None)[0]
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RefimplError, match="sha256"):
        load_case(folder)
    result = verify_case(load_backend("refimpl-fast"), folder, [])
    assert result.status == FAILED
    assert "sha256" in result.reason


# ---- comparison ------------------------------------------------------------------------------

def test_compare_excludes_masked_positions():
    expected = np.zeros((2, 3, 4))
    actual = expected.copy()
    actual[1, 2] = np.nan  # a padded position
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    passed, _, metrics, _ = compare_close(actual, expected, mask, 1e-7, 1e-7)
    assert passed
    assert metrics["compared"] == 5 * 4


def test_compare_requires_nan_in_same_places():
    expected = np.ones((1, 2, 3))
    actual = expected.copy()
    actual[0, 1, 2] = np.nan
    passed, message, metrics, pairs = compare_close(actual, expected, np.ones((1, 2)), 1e-7, 1e-7)
    assert not passed
    assert metrics["nan_or_inf_mismatched"] == 1
    assert pairs[0][0] == (0, 1, 2)
    assert "NaN or inf" in message
    both = expected.copy()
    both[0, 1, 2] = np.nan
    assert compare_close(both, both.copy(), np.ones((1, 2)), 1e-7, 1e-7)[0]


def test_compare_requires_inf_of_same_sign():
    expected = np.ones((1, 1, 2))
    expected[0, 0, 0] = np.inf
    actual = expected.copy()
    actual[0, 0, 0] = -np.inf
    assert not compare_close(actual, expected, np.ones((1, 1)), 1e-7, 1e-7)[0]
    assert compare_close(expected.copy(), expected, np.ones((1, 1)), 1e-7, 1e-7)[0]


def test_compare_uses_atol_plus_rtol():
    expected = np.full((1, 1, 2), 100.0)
    inside = expected + 1e-4 + 1e-4 * 100 - 1e-9
    outside = expected + 1e-4 + 1e-4 * 100 + 1e-9
    assert compare_close(inside, expected, np.ones((1, 1)), 1e-4, 1e-4)[0]
    passed, _, metrics, _ = compare_close(outside, expected, np.ones((1, 1)), 1e-4, 1e-4)
    assert not passed
    assert metrics["max_abs_location"] == [0, 0, 0]


def test_logits_metrics_and_top1():
    rng = np.random.default_rng(0)
    expected = rng.standard_normal((2, 3, 10))
    passed, _, metrics, _ = compare_logits(expected + 1e-9, expected, np.ones((2, 3)), 1e-7, 1e-7)
    assert passed
    assert metrics["top1_agreement"] == 1.0
    assert metrics["nmse"] < 1e-15
    assert abs(metrics["kl_mean"]) < 1e-12
    swapped = expected.copy()
    top = expected[1, 2].argmax()
    swapped[1, 2, top] -= 10
    passed, message, metrics, _ = compare_logits(swapped, expected, np.ones((2, 3)), 1e-7, 1e-7)
    assert not passed
    assert metrics["top1_disagreements"] == 1
    assert "(1, 2)" in message
    assert metrics["kl_max"] > 0


def test_override_needs_reason(tmp_path):
    path = tmp_path / "tolerances.json"
    path.write_text(json.dumps({"overrides": [{"backend": "x", "case": "*", "output": "*",
                                               "rtol": 1, "atol": 1, "reason": " "}]}))
    with pytest.raises(RefimplError, match="empty reason"):
        load_overrides(path)
    path.write_text(json.dumps({"overrides": [{"backend": "x", "case": "*", "output": "*", "rtol": 1, "atol": 1}]}))
    with pytest.raises(RefimplError, match="missing reason"):
        load_overrides(path)


def test_override_applies_to_matching_backend(tmp_path):
    path = tmp_path / "tolerances.json"
    path.write_text(json.dumps({"overrides": [{"backend": "my-*", "case": "bert-*", "output": "logits",
                                               "rtol": 0.5, "atol": 0.25, "reason": "int8 weights"}]}))
    overrides = load_overrides(path)
    check = {"output": "logits"}
    assert resolve_tolerance(check, "my-port", "float32", "bert-x", overrides) == (
        {"rtol": 0.5, "atol": 0.25}, "int8 weights")
    tolerance, reason = resolve_tolerance(check, "other", "float32", "bert-x", overrides)
    assert reason == ""
    assert tolerance == {"rtol": 1e-4, "atol": 1e-4}


def test_checked_in_overrides_are_valid():
    load_overrides(REPO / "conformance" / "tolerances.json")


# ---- refimpl's own backends ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["refimpl-reference", "refimpl-reference-f32", "refimpl-fast",
                                  "refimpl-fast-f64", "refimpl-reference-decode"])
def test_refimpl_backend_passes_all(name):
    results = verify(load_backend(name), find_cases(GOLDEN), [])
    failed = [(r.case, r.reason or r.first_failure.message) for r in results if r.status == FAILED]
    assert failed == []
    skipped = {r.case for r in results if r.status == SKIPPED}
    if name == "refimpl-reference-decode":
        encoders = {p.name for p in find_cases(GOLDEN)
                    if json.loads((p / "case.json").read_text())["architecture"] == "bert"}
        assert skipped == encoders
    else:
        assert skipped == set()


def test_reference_reproduces_goldens_bitwise():
    for result in verify(load_backend("refimpl-reference"), [GOLDEN / name for name in RANDOM_CASES], []):
        for check in result.checks:
            if check.output.startswith("ner."):
                assert check.passed, f"{result.case} {check.output}"  # an exact check has no error metric
            else:
                assert check.metrics["max_abs_error"] == 0, f"{result.case} {check.output}"


# ---- bitwise identity under store options, batch composition and decode steps -----------------

def crop_rows(inputs, rows):
    """The inputs of a subset of rows, without the columns that are padding in all of them."""
    picked = {name: array[rows] for name, array in inputs.items()}
    used = np.flatnonzero(picked["attention_mask"].any(axis=0))
    if len(used) == 0:
        return picked, slice(0, picked["attention_mask"].shape[1])
    columns = slice(int(used[0]), int(used[-1]) + 1)
    return {name: array[:, columns] for name, array in picked.items()}, columns


_RESIDENT = {}


def resident_outputs(loaded_cases, name, dtype):
    """Outputs of the default store (everything resident, 256-row chunks), computed once per case and dtype."""
    if (name, dtype) not in _RESIDENT:
        backend = RefimplBackend()
        backend.dtype = dtype
        _RESIDENT[name, dtype] = run_backend(backend, loaded_cases[name])
    return _RESIDENT[name, dtype]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(RANDOM_CASES), dtype=st.sampled_from(["float32", "float64"]),
       chunk_rows=st.one_of(st.integers(1, 40), st.just(10**6)),
       store=st.sampled_from([("resident", None), ("layer", None), ("budget", 8), ("budget", 13.5)]),
       prefetch=st.integers(0, 3), data=st.data())
def test_store_options_and_batches_are_bitwise(loaded_cases, name, dtype, chunk_rows, store, prefetch, data):
    case = loaded_cases[name]
    batch = case.mask.shape[0]
    rows = data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=batch, unique=True), label="rows")

    expected = resident_outputs(loaded_cases, name, dtype)

    schedule, budget_mib = store
    backend = RefimplBackend(chunk_rows=chunk_rows, schedule=schedule,
                             budget_bytes=None if budget_mib is None else int(budget_mib * MIB),
                             prefetch=min(prefetch, 1) if budget_mib else prefetch)
    backend.dtype = dtype
    backend.prepare(case.info)
    inputs, columns = crop_rows(case.inputs, np.array(rows))
    outputs = backend.run(inputs)
    backend.close()

    mask = inputs["attention_mask"].astype(bool)
    output_name = case.info.output_name
    pairs = [(f"hidden_states.{i}", expected["hidden_states"][i], outputs["hidden_states"][i])
             for i in range(len(expected["hidden_states"]))]
    pairs.append((output_name, expected[output_name], outputs[output_name]))
    for label, whole, part in pairs:
        whole = np.asarray(whole)[rows][:, columns]
        assert np.array_equal(whole[mask], np.asarray(part)[mask]), f"{name}: {label} differs"


def decode_in_steps(model, inputs, splits):
    """Logits and hidden states when the tokens go in as the pieces that ``splits`` cut."""
    cache = KVCache(model.config.num_hidden_layers)
    bounds = [0, *splits, inputs["input_ids"].shape[1]]
    hidden_parts, logits_parts = [], []
    for start, stop in zip(bounds, bounds[1:]):
        step_hidden = []
        logits_parts.append(model.forward(inputs["input_ids"][:, start:stop], inputs["attention_mask"][:, start:stop],
                                          cache=cache, position_ids=inputs["position_ids"][:, start:stop],
                                          hidden_states=step_hidden))
        hidden_parts.append(step_hidden)
    hidden = [np.concatenate([part[i] for part in hidden_parts], axis=1) for i in range(len(hidden_parts[0]))]
    return np.concatenate(logits_parts, axis=1), hidden


@pytest.mark.skipif(not DECODER_CASES, reason="no decoder cases in golden/")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(DECODER_CASES or ["none"]), data=st.data())
def test_prefill_then_decode_is_bitwise(loaded_cases, name, data):
    case = loaded_cases[name]
    T = case.mask.shape[1]
    splits = sorted(data.draw(st.sets(st.integers(1, max(T - 1, 1)), max_size=4), label="splits")) if T > 1 else []
    backend = RefimplBackend()
    backend.prepare(case.info)
    expected = backend.run(case.inputs)
    logits, hidden = decode_in_steps(backend.model, case.inputs, splits)
    backend.close()
    mask = case.mask.astype(bool)
    assert np.array_equal(np.asarray(expected["logits"])[mask], logits[mask])
    for i, state in enumerate(hidden):
        assert np.array_equal(np.asarray(expected["hidden_states"][i])[mask], state[mask]), f"hidden_states.{i}"


# ---- transformers ----------------------------------------------------------------------------

@pytest.mark.peer
def test_transformers_passes_supported_cases():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    results = verify(TransformersBackend(), find_cases(GOLDEN), [])
    failed = [(r.case, r.reason or r.first_failure.message) for r in results if r.status == FAILED]
    assert failed == []
    assert all(r.status == PASSED for r in results)


def test_transformers_skips_without_torch(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else real_find_spec(name, *args))
    result = verify_case(TransformersBackend(), GOLDEN / "bert-batch1", [])
    assert result.status == SKIPPED
    assert "torch not installed" in result.reason


# ---- deliberately broken backends ------------------------------------------------------------

# backend -> [(case, output where it first diverges)]
BUGS = {
    buggy_backends.WrongEpsilon: [("bert-small-variance", "hidden_states.0"), ("minilm-real", "hidden_states.0")],
    buggy_backends.TanhGelu: [("bert-batch1", "hidden_states.1"), ("bert-right-padding", "hidden_states.1")],
    buggy_backends.MissingAttentionScale: [("bert-right-padding", "hidden_states.1"),
                                           ("llama-left-padding", "hidden_states.1")],
    buggy_backends.PaddingNotMasked: [("bert-right-padding", "hidden_states.1"),
                                      ("llama-left-padding", "hidden_states.1")],
    buggy_backends.OverflowingSoftmax: [("bert-large-scores", "hidden_states.1")],
    buggy_backends.TransposedWeight: [("bert-batch1", "hidden_states.1"), ("gpt2-right-padding", "hidden_states.1"),
                                      ("llama-seq-len-1", "hidden_states.1")],
    buggy_backends.RotaryAdjacentPairs: [("llama-right-padding", "hidden_states.1"),
                                         ("llama-causal-lm-gradients", "hidden_states.1"),
                                         ("smollm2-real", "hidden_states.1")],
    buggy_backends.OffByOneCausalMask: [("gpt2-right-padding", "hidden_states.1"),
                                        ("llama-batch7-tied", "hidden_states.1"),
                                        ("gpt2-causal-lm-gradients", "hidden_states.1")],
}


def test_every_bug_has_a_case():
    assert set(BUGS) == set(buggy_backends.ALL)


@pytest.mark.parametrize("backend_class", list(BUGS), ids=lambda cls: cls.__name__)
def test_buggy_backend_fails_at_first_layer(backend_class):
    for case_name, first_output in BUGS[backend_class]:
        result = verify_case(backend_class(), GOLDEN / case_name, [])
        assert result.status == FAILED, f"{backend_class.__name__} passed {case_name}"
        assert result.first_failure.output == first_output, f"{backend_class.__name__} on {case_name}"
        assert result.first_failure.pairs, "no element pairs to show"


def test_overflowing_softmax_reports_nan():
    result = verify_case(buggy_backends.OverflowingSoftmax(), GOLDEN / "bert-large-scores", [])
    assert result.first_failure.metrics["nan_or_inf_mismatched"] > 0


def test_buggy_backends_pass_where_bug_is_inert():
    # Right padding in a causal model: the causal mask already hides the padding.
    assert verify_case(buggy_backends.PaddingNotMasked(), GOLDEN / "llama-right-padding", []).status == PASSED
    # One token attends only to itself, whatever the scale or the rotation.
    assert verify_case(buggy_backends.MissingAttentionScale(), GOLDEN / "llama-seq-len-1", []).status == PASSED


# ---- command line ----------------------------------------------------------------------------

def test_cli_verify_summary_and_reports(tmp_path, capsys):
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    status = main(["verify", "--backend", "refimpl-fast", "--cases", "bert-b*",
                   "--report", str(report), "--junit", str(junit)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[-1] == "2 passed, 0 failed"
    assert lines[0].startswith("PASSED  bert-batch1 [refimpl-fast, float32]: max abs error")
    data = json.loads(report.read_text())
    assert data["backend"] == "refimpl-fast"
    assert [c["status"] for c in data["cases"]] == ["passed", "passed"]
    assert data["cases"][0]["checks"][0]["tolerance"] == {"rtol": 1e-4, "atol": 1e-4}
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("tests") == "2"
    assert suite.get("failures") == "0"


def test_cli_buggy_backend_exits_nonzero(capsys):
    status = main(["verify", "--backend", "tests.buggy_backends:TanhGelu", "--cases", "bert-batch1"])
    out = capsys.readouterr().out
    assert status == 1
    assert "first divergence at output of layer 0 (hidden_states.1)" in out
    assert "expected" in out
    assert "actual" in out
    assert out.splitlines()[-1] == "0 passed, 1 failed"


def test_cli_all_skipped_exits_nonzero(capsys):
    # A run in which nothing was checked must not read as a pass in CI.
    status = main(["verify", "--backend", "tests.buggy_backends:RotaryAdjacentPairs", "--cases", "bert-batch1"])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out.splitlines()[-1] == "0 passed, 0 failed, 1 skipped"
    assert "no case ran" in captured.err


def test_cli_missing_tolerance_file_is_an_error(capsys):
    status = main(["verify", "--backend", "refimpl-reference", "--tolerances", "/nonexistent/tolerances.json"])
    assert status == 2
    assert "tolerance file not found" in capsys.readouterr().err


def test_cli_junit_records_failure(tmp_path, capsys):
    junit = tmp_path / "junit.xml"
    main(["verify", "--backend", "tests.buggy_backends:WrongEpsilon", "--cases", "bert-small*", "--junit", str(junit)])
    capsys.readouterr()
    failure = ElementTree.parse(junit).getroot().find("testcase/failure")
    assert failure is not None
    assert "embeddings (hidden_states.0)" in failure.get("message")


def test_cli_loads_backend_from_file_path():
    backend = load_backend(str(REPO / "tests" / "buggy_backends.py") + ":TransposedWeight")
    assert backend.name == "TransposedWeight"
    assert backend.dtype == "float32"


def test_cli_rejects_unknown_backend(capsys):
    assert main(["verify", "--backend", "no-such-backend"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["verify", "--backend", "tests.buggy_backends:NoSuchClass"]) == 2
    assert "has no 'NoSuchClass'" in capsys.readouterr().err


def test_console_script_runs_from_repo():
    script = Path(sys.executable).parent / "refimpl-conformance"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "refimpl_conformance.cli"]
    result = subprocess.run(command + ["verify", "--backend", "tests.buggy_backends:MissingAttentionScale",
                                       "--cases", "gpt2-right-padding"],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[-1] == "0 passed, 1 failed"


def test_builtin_backend_names():
    assert set(BUILTIN_BACKENDS) == {"refimpl-reference", "refimpl-reference-f32", "refimpl-reference-decode",
                                     "refimpl-fast", "refimpl-fast-f64", "transformers"}


# ---- gradients -------------------------------------------------------------------------------

GRADIENT_CASE = GOLDEN / "bert-token-classification-gradients"


def test_gradient_case_checks_every_parameter():
    case = json.loads((GRADIENT_CASE / "case.json").read_text())
    outputs = [check["output"] for check in case["checks"]]
    assert "loss" in outputs
    assert {f"gradients.{name}" for name in case["gradients"]["parameters"]} <= set(outputs)
    assert "classifier.weight" in case["gradients"]["parameters"]


def test_gradients_are_compared():
    result = verify_case(load_backend("refimpl-fast"), GRADIENT_CASE, [])
    assert result.status == PASSED
    checked = {check.output for check in result.checks}
    assert "gradients.bert.embeddings.word_embeddings.weight" in checked
    assert result.notes == []


class ForwardOnly(RefimplBackend):
    name = "forward-only"
    dtype = "float32"
    mode = "fast"

    def gradients(self, inputs, labels):
        raise NotImplementedError("no backward pass")


class WrongGradient(RefimplBackend):
    name = "wrong-gradient"
    dtype = "float32"
    mode = "fast"

    def gradients(self, inputs, labels):
        values = super().gradients(inputs, labels)
        values["gradients"]["classifier.bias"] = values["gradients"]["classifier.bias"] * 2
        return values


def test_missing_gradients_are_noted():
    result = verify_case(ForwardOnly(), GRADIENT_CASE, [])
    assert result.status == PASSED
    assert result.notes == ["gradients not checked: no backward pass"]
    assert not any(check.output.startswith("gradients.") for check in result.checks)


def test_wrong_gradient_is_located():
    result = verify_case(WrongGradient(), GRADIENT_CASE, [])
    assert result.status == FAILED
    assert result.first_failure.output == "gradients.classifier.bias"
    assert len(result.first_failure.pairs[0][0]) == 1  # a location in the [num_labels] gradient


# ---- decoder gradients -----------------------------------------------------------------------

DECODER_GRADIENT_CASES = ["llama-causal-lm-gradients", "gpt2-causal-lm-gradients"]
TIED_EMBEDDINGS = {"llama-causal-lm-gradients": "model.embed_tokens.weight",
                   "gpt2-causal-lm-gradients": "transformer.wte.weight"}


@pytest.mark.parametrize("name", DECODER_GRADIENT_CASES)
def test_decoder_gradient_case_checks_every_parameter(name):
    case = json.loads((GOLDEN / name / "case.json").read_text())
    outputs = [check["output"] for check in case["checks"]]
    parameters = case["gradients"]["parameters"]
    assert "loss" in outputs
    assert {f"gradients.{parameter}" for parameter in parameters} <= set(outputs)
    # The output projection is tied, so its gradient is part of the embedding's.
    assert TIED_EMBEDDINGS[name] in parameters
    assert "lm_head.weight" not in parameters


def test_llama_gradient_case_is_grouped_query():
    config = json.loads((GOLDEN / "llama-causal-lm-gradients" / "case.json").read_text())["config"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is True


@pytest.mark.parametrize("name", DECODER_GRADIENT_CASES)
def test_decoder_gradients_are_compared(name):
    result = verify_case(load_backend("refimpl-fast"), GOLDEN / name, [])
    assert result.status == PASSED
    assert result.notes == []
    parameters = json.loads((GOLDEN / name / "case.json").read_text())["gradients"]["parameters"]
    checked = [check.output for check in result.checks if check.output.startswith("gradients.")]
    assert len(checked) == len(parameters)


class WrongNormGradient(RefimplBackend):
    """Doubles the gradient of the final norm's weight, as a missing factor in a backward pass would."""

    name = "wrong-norm-gradient"
    dtype = "float32"
    mode = "fast"

    def gradients(self, inputs, labels):
        values = super().gradients(inputs, labels)
        values["gradients"]["model.norm.weight"] = values["gradients"]["model.norm.weight"] * 2
        return values


def test_wrong_decoder_gradient_is_located():
    result = verify_case(WrongNormGradient(), GOLDEN / "llama-causal-lm-gradients", [])
    assert result.status == FAILED
    assert result.first_failure.output == "gradients.model.norm.weight"


# ---- SmolLM2-135M-Instruct ----------------------------------------------------------------

def test_smollm2_case_stores_slices_and_top_k():
    case = json.loads((GOLDEN / "smollm2-real" / "case.json").read_text())
    assert case["weights"]["source"] == "registry"
    assert len(case["weights"]["sha256"]) == 64
    assert not (GOLDEN / "smollm2-real" / "model.safetensors").exists()
    tensors = case["expected"]["tensors"]
    tokens = len(case["inputs"]["input_ids"][0])
    assert 8 <= tokens <= 12
    assert tensors["hidden_states.0"] == [1, tokens, 32]
    assert tensors["logits.topk_indices"] == [1, tokens, 10]
    assert tensors["logits.topk_values"] == [1, tokens, 10]
    assert "logits" not in tensors


# ---- NER -------------------------------------------------------------------------------------

NER_CASE = GOLDEN / "bert-ner-tags"


def test_ner_case_stores_tags_and_scores():
    case = json.loads((NER_CASE / "case.json").read_text())
    ner = case["ner"]
    assert [check["output"] for check in case["checks"]][-2:] == ["ner.tags", "ner.entity_scores"]
    assert [len(tags) for tags in ner["predicted_tags"]] == [len(words) for words in ner["words"]]
    assert len(ner["entity_scores"]) == len(ner["entity_score_names"])
    micro = ner["entity_report"]["micro"]
    # Some chunks are right and some wrong, so precision and recall are both strictly between 0 and 1.
    assert 0 < micro["correct"] < micro["predicted"]
    assert micro["correct"] < micro["support"]


class ShiftedNer(RefimplBackend):
    """Returns the label after the best one, as an off-by-one label list would."""

    name = "shifted-ner"

    def ner(self, inputs):
        return (super().ner(inputs) + 1) % 5


class NoNer(RefimplBackend):
    name = "no-ner"
    ner = None


def test_wrong_ner_tags_fail():
    result = verify_case(ShiftedNer(), NER_CASE, [])
    assert result.status == FAILED
    assert result.first_failure.output == "ner.tags"
    assert result.first_failure.pairs


def test_backend_without_ner_skips_ner_case():
    result = verify_case(NoNer(), NER_CASE, [])
    assert result.status == SKIPPED
    assert "no ner() method" in result.reason


class OutOfRangeNer(RefimplBackend):
    name = "out-of-range-ner"

    def ner(self, inputs):
        return super().ner(inputs) + 5


def test_out_of_range_ner_ids_fail():
    result = verify_case(OutOfRangeNer(), NER_CASE, [])
    assert result.status == FAILED
    assert "outside 0..4" in result.reason
