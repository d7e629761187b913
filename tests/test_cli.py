"""The refimpl command line, run as a user runs it: in a subprocess."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from refimpl.random_models import make_random_bert

MIB = 1 << 20


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "refimpl.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("refimpl: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_embed_prints_one_vector_per_text(minilm_dir):
    result = run("embed", "--model", str(minilm_dir), "first text", "second text")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert [len(row) for row in rows] == [384, 384]


def test_embed_output_file_and_stdin(minilm_dir, tmp_path):
    texts = "one\ntwo\nthree\n"
    out = tmp_path / "embeddings.npy"
    result = run("embed", "--model", str(minilm_dir), "--input", "-", "--output", str(out), stdin=texts)
    assert result.returncode == 0, result.stderr
    embeddings = np.load(out)
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (3, 384)
    assert not list(tmp_path.glob(".*.tmp"))


def test_embed_similarity_matrix(minilm_dir):
    result = run("embed", "--model", str(minilm_dir), "--similarity", "a cat", "a kitten", "stock prices")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4  # a header and one row per text
    matrix = np.array([[float(v) for v in line.split()[1:]] for line in lines[1:]])
    assert np.allclose(np.diag(matrix), 1, atol=1e-4)
    assert matrix[0, 1] > matrix[0, 2]


def test_embed_stats_name_units(minilm_dir):
    result = run("embed", "--model", str(minilm_dir), "--budget-mib", "8", "--stats", "hello")
    assert result.returncode == 0, result.stderr
    for fragment in ("tokens/s", "weight bytes read", "peak resident weight bytes: ", "peak RSS"):
        assert fragment in result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["embed", "--budget-mib", "1", "x"], ["too small", "raise the budget"]),
    (["embed", "--budget-mib", "-3", "x"], ["--budget-mib -3"]),
    (["embed", "--batch-size", "0", "x"], ["--batch-size 0"]),
    (["embed", "--input", "/nonexistent/texts.txt"], ["/nonexistent/texts.txt", "not found"]),
    (["embed", "--model", "/nonexistent-model", "x"], ["/nonexistent-model"]),
    (["embed"], ["no texts"]),
])
def test_user_errors_are_one_line(args, fragments, minilm_dir):
    if "--model" not in args:
        args = args[:1] + ["--model", str(minilm_dir)] + args[1:]
    assert_one_line_error(run(*args), *fragments)


def test_model_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_one_line_error(run("embed", "--model", str(tmp_path), "x"), "model.safetensors", "not found")


def peak_rss_mib(*args):
    result = run(*args, "--stats", "--quiet")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stderr.splitlines() if l.startswith("peak RSS"))
    return float(line.split(":")[1].split()[0])


def test_budget_bounds_peak_rss(minilm_dir, tmp_path):
    """Peak RSS under a small budget stays within baseline + budget + activations + 24 MiB.

    The baseline is the same command on a model of about 1 MiB that shares
    MiniLM's tokenizer: it measures Python, numpy, Numba, the tokenizer and
    the activations of these short texts, everything but the weights.
    """
    tiny = make_random_bert(tmp_path / "tiny", vocab_size=30522, hidden_size=8, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=512, num_hidden_layers=1)
    shutil.copy(minilm_dir / "tokenizer.json", tiny / "tokenizer.json")
    texts = ["The quick brown fox jumps over the lazy dog."] * 4
    baseline = peak_rss_mib("embed", "--model", str(tiny), *texts)
    budget_mib = 8
    bounded = peak_rss_mib("embed", "--model", str(minilm_dir), "--budget-mib", str(budget_mib), *texts)
    resident = peak_rss_mib("embed", "--model", str(minilm_dir), *texts)
    assert bounded <= baseline + budget_mib + 24, (baseline, bounded, resident)
    # Without a budget about 40 MiB of the 87 MiB file becomes resident: every
    # weight but the word-embedding rows these texts do not use. This shows
    # that the measurement can tell the two apart.
    assert resident >= bounded + 25, (baseline, bounded, resident)


@pytest.mark.parametrize("args, fragments", [
    (["embed", "--budget-mib", "inf", "x"], ["--budget-mib inf"]),
    (["embed", "--budget-mib", "nan", "x"], ["--budget-mib nan"]),
    (["embed", "--prefetch", "-1", "x"], ["--prefetch -1"]),
    (["embed", "--chunk-rows", "0", "x"], ["--chunk-rows 0"]),
    (["embed", "--schedule", "resident", "--budget-mib", "8", "x"], ["--schedule resident"]),
    (["embed", "--schedule", "budget", "x"], ["--budget-mib"]),
])
def test_invalid_numbers_are_one_line(args, fragments, minilm_dir):
    args = args[:1] + ["--model", str(minilm_dir)] + args[1:]
    assert_one_line_error(run(*args), *fragments)


def test_unwritable_cache_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "refimpl.cli", "embed", "x"], capture_output=True, text=True,
                            env={**os.environ, "REFIMPL_CACHE": str(blocker / "cache")}, timeout=120)
    assert_one_line_error(result, "REFIMPL_CACHE")
