"""Convert a llama.cpp GGUF file of a Llama model to a Hugging Face model folder.

The folder gets ``config.json`` (LlamaForCausalLM), ``model.safetensors`` (float32),
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``, the
layout that ``transformers.LlamaForCausalLM.from_pretrained`` reads.

Quantized tensors are dequantized with ``gguf.quants.dequantize``, gguf-py's NumPy
implementation of ggml's block formats. transformers' GGUF loader calls the same
function, and the tests check that both give identical weights. The conversion
undoes the one layout change that llama.cpp's ``convert_hf_to_gguf.py`` makes to
Llama weights: the row order of the Q and K projections (see
``unpermute_rotary_rows``).

The ``gguf`` package is imported only when a conversion runs, so that the rest of
refimpl works without it.
"""

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from refimpl.errors import FormatError, RefimplError

# Bump when the converter's output changes, so cached conversions are redone.
CONVERTER_VERSION = 1

# Tensor types that convert_gguf dequantizes. The K-quants need rows whose length is
# a multiple of 256, the other block types a multiple of 32.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16",
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# GGUF tensor names (gguf.constants.TENSOR_NAMES) and the names that transformers'
# LlamaForCausalLM gives the same weights, as gguf.get_tensor_name_map maps them.
MODEL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# llama.cpp's token types (gguf.TokenType): CONTROL tokens become special added tokens,
# USER_DEFINED tokens plain added tokens, so that both match whole in the input text.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _gpt2_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


# tokenizer.ggml.pre -> (pre-tokenizer factory, clean_up_tokenization_spaces).
# llama.cpp (src/llama-vocab.cpp) splits "gpt-2" text with the GPT-2 regex. For
# "smollm", "starcoder" and "refact" it first cuts out every digit (\p{N}) and then
# applies the GPT-2 regex. Of these, it turns off clean_spaces for "smollm" only.
PRE_TOKENIZERS = {
    "gpt-2": (_gpt2_pre_tokenizer, True),
    "smollm": (_digits_then_gpt2_pre_tokenizer, False),
    "starcoder": (_digits_then_gpt2_pre_tokenizer, True),
    "refact": (_digits_then_gpt2_pre_tokenizer, True),
}


def convert_gguf(gguf_path, out_dir):
    """Convert a Llama GGUF file into a new Hugging Face folder ``out_dir`` and return its path.

    The files are written into a temporary folder beside ``out_dir`` that is renamed
    into place at the end, so ``out_dir`` is never left half-written. A killed
    process can leave the hidden ``.<name>.partial-*`` folder behind. Raises
    RefimplError if the file is missing or ``out_dir`` exists and is not empty, and
    FormatError when the file is not a valid GGUF of a Llama model in a supported
    tensor type. All weights are held in memory as float32 while the file is
    written, about 4 bytes per parameter.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    _check_output_folder(out_dir)

    reader = _open_reader(gguf_path)
    metadata = _read_metadata(reader, gguf_path)
    tensors_by_name = {tensor.name: tensor for tensor in reader.tensors}
    shape = _read_model_shape(metadata, tensors_by_name, gguf_path)
    config = _model_config(metadata, shape, gguf_path)
    tokenizer, tokenizer_config = _build_tokenizer(metadata, shape, gguf_path)
    weights = _convert_tensors(tensors_by_name, shape, gguf_path)

    json_files = {
        "config.json": config,
        "generation_config.json": _generation_config(config),
        "tokenizer_config.json": tokenizer_config,
    }
    _write_folder(out_dir, weights, tokenizer, json_files, gguf_path)
    return out_dir


# --- reading the file -------------------------------------------------------------


def _import_gguf():
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise RefimplError("converting a GGUF file needs the gguf package, which is not installed. "
                           "Install it with: pip install gguf") from None
    return gguf


@functools.cache
def _checked_reader_class():
    """Return a GGUFReader subclass whose errors name the metadata key or tensor at fault.

    gguf's GGUFReader parses the whole file in its constructor. On a truncated file it
    fails with an IndexError or a reshape error that names neither. NOTE: the subclass
    overrides private methods of GGUFReader (gguf 0.19: _get, _push_field,
    _build_fields, _build_tensor_info, _build_tensors) and reads the tensor info
    fields in the order that _build_tensors unpacks them.
    """
    gguf = _import_gguf()

    class CheckedReader(gguf.GGUFReader):
        def __init__(self, path):
            self.path = Path(path)
            self.location = "the header"
            super().__init__(path, mode="r")

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.size:
                raise FormatError(self.path, f"the file is truncated: it ends inside {self.location}. "
                                             "Download or copy it again")
            return super()._get(offset, dtype, count, override_order)

        def _push_field(self, field, skip_sum=False):
            size = super()._push_field(field, skip_sum)
            if not field.name.startswith("GGUF."):
                self.location = f"the metadata entry after {field.name!r}"
            return size

        def _build_fields(self, offs, count):
            self.location = "the first metadata entry"
            return super()._build_fields(offs, count)

        def _build_tensor_info(self, offs, count):
            self.location = "the tensor info table"
            return super()._build_tensor_info(offs, count)

        def _build_tensors(self, start_offs, fields):
            for field in fields:
                self._check_tensor_extent(start_offs, field)
            self.location = "the tensor data"
            super()._build_tensors(start_offs, fields)

        def _check_tensor_extent(self, start_offs, field):
            _name_length, name_bytes, _dim_count, dims, type_id, data_offset = field.parts
            name = bytes(name_bytes).decode("utf-8", errors="replace")
            type_number = int(type_id[0])
            try:
                tensor_type = gguf.GGMLQuantizationType(type_number)
            except ValueError:
                raise FormatError(self.path, f"tensor {name!r} has the unknown ggml type id {type_number}") from None
            block_size, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
            dims = [int(dim) for dim in dims]
            if dims and dims[0] % block_size != 0:
                raise FormatError(self.path, f"tensor {name!r} has rows of {dims[0]} elements, which is not "
                                             f"a multiple of the {tensor_type.name} block size {block_size}")
            start = start_offs + int(data_offset[0])
            end = start + math.prod(dims) // block_size * block_bytes
            if end > self.data.size:
                raise FormatError(self.path, f"the file is truncated: the data of tensor {name!r} ends at "
                                             f"byte {end}, but the file has {self.data.size} bytes. "
                                             "Download or copy it again")

    return CheckedReader


def _open_reader(path):
    if not path.is_file():
        raise RefimplError(f"{path}: file not found")
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise RefimplError(f"{path}: cannot read the file: {error.strerror}") from None
    if magic != b"GGUF":
        raise FormatError(path, "not a GGUF file: it does not start with the bytes 'GGUF'")

    reader_class = _checked_reader_class()
    try:
        reader = reader_class(path)
    except RefimplError:
        raise
    except KeyError as error:  # gguf raises KeyError for a key that occurs twice
        raise FormatError(path, f"invalid GGUF file: {error.args[0]}") from None
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError, TypeError, MemoryError) as error:
        raise FormatError(path, f"invalid GGUF file: {error}") from None
    if reader.byte_order != "I":
        raise FormatError(path, "the file is big-endian, and refimpl reads only little-endian GGUF files")
    return reader


def _read_metadata(reader, path):
    """Return ``{key: value}`` for the file's metadata, with arrays as lists."""
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except UnicodeDecodeError:
            raise FormatError(path, f"metadata key {key!r} contains a string that is not valid UTF-8") from None
    return metadata


_MISSING = object()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array"}


def _metadata_value(metadata, key, kind, path, default=_MISSING):
    """Return ``metadata[key]`` checked to be of type ``kind``, or ``default`` if it is absent."""
    if key not in metadata:
        if default is _MISSING:
            raise FormatError(path, f"missing metadata key {key!r}")
        return default
    value = metadata[key]
    valid = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, valid = float(value), True
    if not valid:
        raise FormatError(path, f"metadata key {key!r} has type {type(value).__name__}, "
                                f"expected {_TYPE_NAMES[kind]}")
    return value


def _positive_int(metadata, key, path, default=_MISSING):
    value = _metadata_value(metadata, key, int, path, default)
    if value <= 0:
        raise FormatError(path, f"metadata key {key!r} is {value}, expected a positive integer")
    return value


def _float32_value(metadata, key, path, default=_MISSING):
    """Return a float32 metadata value as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05)."""
    value = _metadata_value(metadata, key, float, path, default)
    return float(str(np.float32(value)))


def _token_id(metadata, key, vocab_size, path):
    token_id = _metadata_value(metadata, key, int, path, None)
    if token_id is not None and not 0 <= token_id < vocab_size:
        raise FormatError(path, f"metadata key {key!r} is {token_id}, outside the vocabulary of {vocab_size} tokens")
    return token_id


# --- model shape and config -------------------------------------------------------


def _read_model_shape(metadata, tensors_by_name, path):
    """Return the model dimensions as a dict, checked for consistency, or raise FormatError."""
    architecture = _metadata_value(metadata, "general.architecture", str, path)
    if architecture != "llama":
        raise FormatError(path, f"general.architecture is {architecture!r}, but refimpl converts only "
                                "'llama' GGUF files")
    if _metadata_value(metadata, "llama.expert_count", int, path, 0) > 0:
        raise FormatError(path, "llama.expert_count is set, but mixture-of-experts models are not supported")
    rope_scaling = _metadata_value(metadata, "llama.rope.scaling.type", str, path, "none")
    rope_factor = _metadata_value(metadata, "llama.rope.scaling.factor", float, path, 1.0)
    if not (rope_scaling == "none" or (rope_scaling == "linear" and rope_factor == 1.0)):
        raise FormatError(path, f"llama.rope.scaling.type is {rope_scaling!r} with factor {rope_factor}, "
                                "but only models without RoPE scaling are supported")

    hidden_size = _positive_int(metadata, "llama.embedding_length", path)
    num_heads = _positive_int(metadata, "llama.attention.head_count", path)
    num_kv_heads = _positive_int(metadata, "llama.attention.head_count_kv", path, num_heads)
    if num_heads % num_kv_heads != 0:
        raise FormatError(path, f"llama.attention.head_count ({num_heads}) is not a multiple of "
                                f"llama.attention.head_count_kv ({num_kv_heads})")
    if "llama.attention.key_length" not in metadata and hidden_size % num_heads != 0:
        raise FormatError(path, f"llama.embedding_length ({hidden_size}) is not a multiple of "
                                f"llama.attention.head_count ({num_heads})")
    head_dim = _positive_int(metadata, "llama.attention.key_length", path, hidden_size // num_heads)
    value_dim = _positive_int(metadata, "llama.attention.value_length", path, head_dim)
    rope_dim = _positive_int(metadata, "llama.rope.dimension_count", path, head_dim)
    if value_dim != head_dim or rope_dim != head_dim or head_dim % 2 != 0:
        raise FormatError(path, f"the key length {head_dim}, value length {value_dim} and rotary dimension "
                                f"{rope_dim} must be equal and even for a Hugging Face Llama")

    embedding = tensors_by_name.get("token_embd.weight")
    if embedding is None:
        raise FormatError(path, "missing tensor 'token_embd.weight'")
    vocab_size = int(embedding.shape[-1])  # ggml order: [hidden_size, vocab_size]
    declared_vocab_size = _positive_int(metadata, "llama.vocab_size", path, vocab_size)
    if declared_vocab_size != vocab_size:
        raise FormatError(path, f"llama.vocab_size is {declared_vocab_size}, but tensor 'token_embd.weight' "
                                f"has {vocab_size} rows")

    return {
        "hidden_size": hidden_size,
        "intermediate_size": _positive_int(metadata, "llama.feed_forward_length", path),
        "num_hidden_layers": _positive_int(metadata, "llama.block_count", path),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors_by_name,
    }


def _model_config(metadata, shape, path):
    vocab_size = shape["vocab_size"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": _float32_value(metadata, "llama.attention.layer_norm_rms_epsilon", path),
        # llama.cpp (src/llama-model.cpp) treats rope.freq_base as optional, with 10000 as default.
        "rope_theta": _float32_value(metadata, "llama.rope.freq_base", path, 10000.0),
        "rope_scaling": None,
        "max_position_embeddings": _positive_int(metadata, "llama.context_length", path),
        "bos_token_id": _token_id(metadata, "tokenizer.ggml.bos_token_id", vocab_size, path),
        "eos_token_id": _token_id(metadata, "tokenizer.ggml.eos_token_id", vocab_size, path),
        "pad_token_id": _token_id(metadata, "tokenizer.ggml.padding_token_id", vocab_size, path),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _generation_config(model_config):
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {name: model_config[name] for name in names if model_config[name] is not None}


# --- tensors ----------------------------------------------------------------------


def _expected_tensors(shape):
    """Return ``{gguf_name: (hf_name, hf_shape)}`` for every tensor a Llama GGUF may contain."""
    hidden = shape["hidden_size"]
    q_rows = shape["num_attention_heads"] * shape["head_dim"]
    kv_rows = shape["num_key_value_heads"] * shape["head_dim"]
    intermediate = shape["intermediate_size"]
    vocab = shape["vocab_size"]

    model_shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
                    "output.weight": (vocab, hidden)}
    layer_shapes = {
        "attn_norm.weight": (hidden,),
        "attn_q.weight": (q_rows, hidden),
        "attn_k.weight": (kv_rows, hidden),
        "attn_v.weight": (kv_rows, hidden),
        "attn_output.weight": (hidden, q_rows),
        "ffn_norm.weight": (hidden,),
        "ffn_gate.weight": (intermediate, hidden),
        "ffn_up.weight": (intermediate, hidden),
        "ffn_down.weight": (hidden, intermediate),
    }
    expected = {name: (MODEL_TENSOR_NAMES[name], hf_shape) for name, hf_shape in model_shapes.items()}
    for layer in range(shape["num_hidden_layers"]):
        for suffix, hf_shape in layer_shapes.items():
            hf_name = f"model.layers.{layer}.{LAYER_TENSOR_NAMES[suffix]}"
            expected[f"blk.{layer}.{suffix}"] = (hf_name, hf_shape)
    return expected


def _convert_tensors(tensors_by_name, shape, path):
    """Return ``{hf_name: float32 array}`` in Hugging Face names, shapes and row order."""
    expected = _expected_tensors(shape)
    for name in tensors_by_name:
        if name not in expected:
            raise FormatError(path, f"tensor {name!r} has no Hugging Face Llama equivalent, "
                                    "so the file is not a plain Llama model")
    for name in expected:
        if name not in tensors_by_name and name != "output.weight":
            raise FormatError(path, f"missing tensor {name!r}")

    weights = {}
    for name, (hf_name, hf_shape) in expected.items():
        tensor = tensors_by_name.get(name)
        if tensor is None:  # output.weight: the output projection is tied to the embeddings
            continue
        values = _dequantize(tensor, path)
        if values.shape != hf_shape:
            raise FormatError(path, f"tensor {name!r} has shape {list(values.shape)}, but the metadata "
                                    f"implies {list(hf_shape)} (in Hugging Face order, rows first)")
        if name.endswith(".attn_q.weight"):
            values = unpermute_rotary_rows(values, shape["num_attention_heads"])
        elif name.endswith(".attn_k.weight"):
            values = unpermute_rotary_rows(values, shape["num_key_value_heads"])
        weights[hf_name] = values
    return weights


def _dequantize(tensor, path):
    """Return a tensor's values as a float32 array in NumPy (row-major) order."""
    gguf = _import_gguf()
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise FormatError(path, f"tensor {tensor.name!r} has type {type_name}, which refimpl cannot convert "
                                f"(supported types: {', '.join(SUPPORTED_TYPES)})")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(dim) for dim in reversed(tensor.shape))  # ggml lists the fastest-varying dimension first
    if values.size != math.prod(shape):
        raise FormatError(path, f"tensor {tensor.name!r} dequantizes to {values.size} elements, "
                                f"but its shape {list(shape)} has {math.prod(shape)}")
    # A copy, because the values of an F32 tensor are a view of the memory-mapped file.
    return np.array(values, dtype=np.float32).reshape(shape)


def unpermute_rotary_rows(weight, num_heads):
    """Return a Q or K projection from a GGUF file with its rows in Hugging Face order.

    transformers' Llama rotates dimension ``i`` of each head together with dimension
    ``i + head_dim/2`` (``rotate_half``), while ggml's default RoPE rotates adjacent
    pairs ``(2i, 2i+1)``. llama.cpp's ``convert_hf_to_gguf.py`` therefore interleaves
    the two halves of each head's rows: GGUF row ``2i`` of a head is Hugging Face row
    ``i`` and GGUF row ``2i+1`` is Hugging Face row ``i + head_dim/2``. ``num_heads`` is
    the number of heads that the projection produces (the KV heads for K).
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    by_pair = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(by_pair.swapaxes(1, 2)).reshape(weight.shape)


# --- tokenizer --------------------------------------------------------------------


def _build_tokenizer(metadata, shape, path):
    """Return a ``tokenizers.Tokenizer`` and the tokenizer_config.json dict for the file's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, processors

    tokenizer_model = _metadata_value(metadata, "tokenizer.ggml.model", str, path)
    if tokenizer_model != "gpt2":
        raise FormatError(path, f"tokenizer.ggml.model is {tokenizer_model!r}, but refimpl converts only "
                                "byte-level BPE tokenizers ('gpt2')")
    pre = _metadata_value(metadata, "tokenizer.ggml.pre", str, path, None)
    if pre not in PRE_TOKENIZERS:
        found = "missing" if pre is None else repr(pre)
        raise FormatError(path, f"tokenizer.ggml.pre is {found}, but refimpl supports only the "
                                f"pre-tokenizers {', '.join(PRE_TOKENIZERS)}")
    make_pre_tokenizer, clean_up_spaces = PRE_TOKENIZERS[pre]

    tokens = _metadata_value(metadata, "tokenizer.ggml.tokens", list, path)
    token_types = _metadata_value(metadata, "tokenizer.ggml.token_type", list, path, [1] * len(tokens))
    if len(token_types) != len(tokens):
        raise FormatError(path, f"tokenizer.ggml.token_type has {len(token_types)} entries, "
                                f"but tokenizer.ggml.tokens has {len(tokens)}")
    if len(tokens) > shape["vocab_size"]:
        raise FormatError(path, f"tokenizer.ggml.tokens has {len(tokens)} tokens, more than the "
                                f"{shape['vocab_size']} rows of 'token_embd.weight'")

    vocab = {}
    for token_id, token in enumerate(tokens):
        if token in vocab:
            raise FormatError(path, f"tokenizer.ggml.tokens contains {token!r} twice (ids {vocab[token]} and "
                                    f"{token_id}), which a tokenizer.json cannot represent")
        vocab[token] = token_id

    merges = []
    for index, merge in enumerate(_metadata_value(metadata, "tokenizer.ggml.merges", list, path)):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise FormatError(path, f"tokenizer.ggml.merges entry {index} ({merge!r}) is not two tokens "
                                    "separated by one space")
        merges.append(tuple(pair))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    except Exception as error:  # tokenizers raises a plain Exception for a merge of unknown tokens
        raise FormatError(path, f"tokenizer.ggml.merges: {error}") from None

    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = make_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    _add_added_tokens(tokenizer, vocab, tokens, token_types, path)

    special = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        token_id = _token_id(metadata, f"tokenizer.ggml.{key}", len(tokens), path)
        special[name] = tokens[token_id] if token_id is not None else None
    add_bos = _metadata_value(metadata, "tokenizer.ggml.add_bos_token", bool, path, False)
    add_eos = _metadata_value(metadata, "tokenizer.ggml.add_eos_token", bool, path, False)
    tokenizer.post_processor = _post_processor(processors, special, vocab, add_bos, add_eos, path)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": special["bos"],
        "eos_token": special["eos"],
        "unk_token": special["unk"],
        "pad_token": special["pad"],
        "clean_up_tokenization_spaces": clean_up_spaces,
        "model_max_length": _positive_int(metadata, "llama.context_length", path),
    }
    chat_template = _metadata_value(metadata, "tokenizer.chat_template", str, path, None)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer, tokenizer_config


def _add_added_tokens(tokenizer, vocab, tokens, token_types, path):
    from tokenizers import AddedToken

    special, plain = [], []
    for token, token_type in zip(tokens, token_types):
        if token_type == TOKEN_TYPE_CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TOKEN_TYPE_USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)
    # An added token keeps its vocabulary id only if the vocabulary has it, which the
    # duplicate check in _build_tokenizer guarantees. Check anyway, because a wrong id is silent.
    for added in special + plain:
        if tokenizer.token_to_id(added.content) != vocab[added.content]:
            raise FormatError(path, f"added token {added.content!r} did not keep its id")


def _post_processor(processors, special, vocab, add_bos, add_eos, path):
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False)
    prefix, suffix, special_tokens = [], [], []
    for enabled, name, place in ((add_bos, "bos", prefix), (add_eos, "eos", suffix)):
        if not enabled:
            continue
        token = special[name]
        if token is None:
            raise FormatError(path, f"tokenizer.ggml.add_{name}_token is true, "
                                    f"but tokenizer.ggml.{name}_token_id is missing")
        place.append(token)
        special_tokens.append((token, vocab[token]))
    single = [*prefix, "$A", *suffix]
    pair = [*single, *(f"{token}:1" for token in prefix), "$B:1", *(f"{token}:1" for token in suffix)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict(special_tokens).items()))


# --- output -----------------------------------------------------------------------


def _check_output_folder(out_dir):
    if out_dir.exists() and not out_dir.is_dir():
        raise RefimplError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise RefimplError(f"{out_dir}: already exists and is not empty; remove it or choose another output folder")


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_folder(out_dir, weights, tokenizer, json_files, gguf_path):
    """Write all files into a temporary folder beside ``out_dir``, then rename it to ``out_dir``."""
    from refimpl import safetensors

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as error:
        raise RefimplError(f"{out_dir}: cannot create the output folder: {error.strerror}") from None
    try:
        safetensors.save(scratch / "model.safetensors", weights,
                         metadata={"format": "pt", "converted_from": gguf_path.name})
        tokenizer.save(str(scratch / "tokenizer.json"))
        for name, content in json_files.items():
            text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            (scratch / name).write_text(text, encoding="utf-8")
        os.chmod(scratch, 0o777 & ~_current_umask())  # mkdtemp creates the folder with mode 0700
        os.rename(scratch, out_dir)
    except OSError as error:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RefimplError(f"{out_dir}: cannot write the converted model: {error}") from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


# --- command line -----------------------------------------------------------------


def run_convert_gguf(args):
    out_dir = convert_gguf(args.file, args.out)
    print(f"refimpl: converted {args.file} to {out_dir}")


def add_convert_parser(subparsers):
    """Add the ``convert gguf`` command to the refimpl command-line parser."""
    convert = subparsers.add_parser(
        "convert", help="convert a model file to a Hugging Face model folder",
        description="Convert a model file to a Hugging Face model folder that refimpl and transformers load.",
    )
    formats = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf_parser = formats.add_parser(
        "gguf", help="convert a llama.cpp GGUF file of a Llama model",
        description="Convert a llama.cpp GGUF file of a Llama model to config.json, a float32 "
                    "model.safetensors, tokenizer.json and tokenizer_config.json. Supported tensor types: "
                    + ", ".join(SUPPORTED_TYPES) + ".",
    )
    gguf_parser.add_argument("file", metavar="FILE.gguf", help="path of the GGUF file")
    gguf_parser.add_argument("--out", required=True, metavar="DIR",
                             help="output folder, which must not exist or must be empty")
    gguf_parser.set_defaults(run=run_convert_gguf)
    return convert
