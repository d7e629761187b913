"""NER training: word-piece alignment, windows, resumable and offloaded runs, and the ner commands."""

import argparse
import json

import numpy as np
import pytest

from refimpl.errors import RefimplError
from refimpl.ner.cli import add_ner_parser
from refimpl.ner.conll import Sentence, read_conll, write_conll
from refimpl.ner.model import NerTagger, WindowEncoder
from refimpl.ner.train import TrainOptions, train
from refimpl.random_models import make_random_bert
from refimpl.safetensors import load

WORDS = ["the", "a", "in", "to", "visit", "met", "with", "today", "paris", "london", "rome", "john", "mary",
         "google", "apple", "went", "saw", "and", "##s", "##ing", "un", "##known", "new", "york"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
ENTITIES = {"paris": "loc", "london": "loc", "rome": "loc", "john": "per", "mary": "per", "google": "org",
            "apple": "org"}


def write_word_piece_tokenizer(folder):
    """A lowercasing BERT word-piece tokenizer over a tiny vocabulary (ids below 100, as the random model has)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    return folder


def synthetic_sentences(count, seed):
    """Sentences whose tags follow from the words, so a small model can learn them."""
    rng = np.random.default_rng(seed)
    plain = ["the", "a", "in", "to", "visit", "met", "with", "today", "went", "saw", "and"]
    sentences = []
    for _ in range(count):
        words, tags = [], []
        for _ in range(rng.integers(3, 9)):
            if rng.random() < 0.3:
                word = rng.choice(list(ENTITIES))
                words.append(str(word))
                tags.append("B-" + ENTITIES[word])
            elif rng.random() < 0.05:
                words += ["new", "york"]
                tags += ["B-loc", "I-loc"]
            else:
                words.append(str(rng.choice(plain)))
                tags.append("O")
        sentences.append(Sentence(words, tags))
    return sentences


@pytest.fixture(scope="module", autouse=True)
def one_numba_thread():
    """Run the kernels on one thread: a tiny model's steps are dominated by waking threads.

    The kernels split output elements between threads, never a sum, so the
    results do not depend on the thread count.
    """
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random BERT with a word-piece tokenizer and train/dev CoNLL files."""
    root = tmp_path_factory.mktemp("ner")
    model = write_word_piece_tokenizer(make_random_bert(root / "model", seed=2, max_position_embeddings=32))
    write_conll(root / "train.conll", synthetic_sentences(24, 0))
    write_conll(root / "dev.conll", synthetic_sentences(8, 1))
    return root, model


def options(tiny, out, **overrides):
    root, model = tiny
    values = dict(out=str(out), model=str(model), train_file=str(root / "train.conll"),
                  dev_file=str(root / "dev.conll"), epochs=2, lr=3e-3, batch_size=6, max_length=12,
                  mode="reference", progress=False)
    values.update(overrides)
    return TrainOptions(**values)


def final_weights(out):
    return load(out / "checkpoint" / "training_state.safetensors")


# ---- alignment and windows ----------------------------------------------------------------


def test_first_piece_carries_label(tiny):
    encoder = WindowEncoder(tiny[1], max_length=16)
    [window] = encoder.encode([["john", "visiting", "paris"]], [[1, 0, 2]])
    pieces = [WORDS[i - 4] if i >= 4 else SPECIAL[i] for i in window.input_ids]
    assert pieces == ["[CLS]", "john", "visit", "##ing", "paris", "[SEP]"]
    assert window.word_starts == [1, 2, 4]
    assert window.labels == [-100, 1, 0, -100, 2, -100]


def test_empty_word_becomes_unk(tiny):
    encoder = WindowEncoder(tiny[1], max_length=16)
    [window] = encoder.encode([["john", "\u200b", "paris"]], [[1, 3, 2]])
    assert window.input_ids[2] == SPECIAL.index("[UNK]")
    assert window.labels[1:4] == [1, 3, 2]


def test_long_sentence_split_into_windows(tiny):
    encoder = WindowEncoder(tiny[1], max_length=6)
    words = ["john", "visiting", "paris", "and", "rome", "today", "with", "mary"]
    windows = encoder.encode([words], [list(range(len(words)))])
    assert all(len(w.input_ids) <= 6 for w in windows)
    covered = [w.first_word + i for w in windows for i in range(len(w.word_starts))]
    assert covered == list(range(len(words)))
    labels = [label for w in windows for label in w.labels if label != -100]
    assert labels == list(range(len(words)))


def test_tagger_scores_every_word_of_long_sentence(tiny, tmp_path):
    out = tmp_path / "run"
    train(options(tiny, out, epochs=1))
    tagger = NerTagger(out / "best", max_length=5)
    words = [["john", "visiting", "paris", "and", "rome", "today", "with", "mary"]]
    [tags] = tagger.predict(words)
    assert len(tags) == len(words[0])


# ---- training --------------------------------------------------------------------------


def test_resident_offloaded_resumed_bitwise_equal(tiny, tmp_path):
    resident = train(options(tiny, tmp_path / "resident"))
    offloaded = train(options(tiny, tmp_path / "offloaded", offload_dir=str(tmp_path / "offload"),
                              budget_bytes=1 << 20, chunk_rows=8, micro_batch_size=4))
    train(options(tiny, tmp_path / "resumed", stop_after_epoch=1))
    resumed = train(options(tiny, tmp_path / "resumed", resume=True))

    losses = [entry["loss"] for entry in resident["steps"]]
    assert len(losses) == 2 * 4
    assert [entry["loss"] for entry in offloaded["steps"]] == losses
    assert [entry["loss"] for entry in resumed["steps"]] == losses
    assert losses[-1] < losses[0]
    expected = final_weights(tmp_path / "resident")
    for run in ("offloaded", "resumed"):
        weights = final_weights(tmp_path / run)
        for name, array in expected.items():
            assert np.array_equal(weights[name], array), f"{run}: {name}"
    assert list((tmp_path / "offload").iterdir()) == []  # offload files are removed after the run


def test_resume_rejects_changed_options(tiny, tmp_path):
    train(options(tiny, tmp_path / "run", stop_after_epoch=1))
    with pytest.raises(RefimplError, match="--lr"):
        train(options(tiny, tmp_path / "run", resume=True, lr=1e-3))


def test_best_model_eval_matches_dev_score(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "run"
    history = train(options(tiny, out, epochs=5, lr=1e-2, batch_size=4, dropout=0.0, warmup_ratio=0.0))
    best_f1 = max(entry["dev_f1"] for entry in history["epochs"])
    assert best_f1 > 0.3
    assert (out / "training.png").stat().st_size > 0
    assert json.loads((out / "history.json").read_text())["epochs"] == history["epochs"]

    from refimpl.ner.scoring import entity_report

    dev = read_conll(root / "dev.conll")
    predicted = NerTagger(out / "best").predict([s.words for s in dev], batch_size=3)
    assert entity_report([s.tags for s in dev], predicted)["micro"]["f1"] == best_f1


@pytest.mark.peer
def test_best_model_loads_in_transformers(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    train(options(tiny, out, epochs=1))
    model = transformers.AutoModelForTokenClassification.from_pretrained(out / "best").eval()
    tagger = NerTagger(out / "best")
    input_ids = np.array([[2, 15, 12, 3]])
    mask = np.ones_like(input_ids)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits
    np.testing.assert_allclose(tagger.logits(input_ids, mask), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert model.config.id2label[0] == "O"


# ---- commands --------------------------------------------------------------------------


def run_command(argv):
    parser = argparse.ArgumentParser(prog="refimpl")
    add_ner_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)


def test_commands_train_eval_predict(tiny, tmp_path, capsys):
    root, model = tiny
    out = tmp_path / "run"
    run_command(["ner", "train", "--model", str(model), "--train", str(root / "train.conll"), "--dev",
                 str(root / "dev.conll"), "--epochs", "1", "--batch-size", "8", "--max-length", "12",
                 "--mode", "reference", "--quiet", "--out", str(out)])
    assert "best dev entity F1" in capsys.readouterr().out

    run_command(["ner", "eval", "--model", str(out / "best"), "--data", str(root / "dev.conll")])
    text = capsys.readouterr().out
    assert "processed" in text
    assert "weighted avg" in text

    run_command(["ner", "eval", "--model", str(out / "best"), "--data", str(root / "dev.conll"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"entity", "token"}

    run_command(["ner", "predict", "--model", str(out / "best"), "john visited paris", "mary"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines if line] == ["john", "visited", "paris", "mary"]


def test_commands_reject_bad_input(tiny, tmp_path):
    with pytest.raises(RefimplError, match="--model"):
        run_command(["ner", "predict", "john"])
    with pytest.raises(RefimplError, match="not a token-classification model"):
        run_command(["ner", "predict", "--model", str(tiny[1]), "john"])
    with pytest.raises(RefimplError, match="--offload-dir"):
        run_command(["ner", "train", "--model", str(tiny[1]), "--budget-mib", "4", "--out", str(tmp_path)])
