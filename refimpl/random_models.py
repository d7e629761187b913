"""Small models with random weights, for tests and golden cases.

Each function writes a folder in the Hugging Face layout (config.json and
model.safetensors) that refimpl and transformers can both load.
"""

import json
from pathlib import Path

import numpy as np

from refimpl.safetensors import save


def bert_config(**overrides):
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }
    config.update(overrides)
    return config


def bert_weights(config, seed=0):
    """Random BERT weights named as transformers' BertModel names them."""
    rng = np.random.default_rng(seed)
    C, F = config["hidden_size"], config["intermediate_size"]

    def normal(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {
        "embeddings.word_embeddings.weight": normal(config["vocab_size"], C),
        "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], C),
        "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], C),
        "embeddings.LayerNorm.weight": 1 + normal(C, std=0.1),
        "embeddings.LayerNorm.bias": normal(C, std=0.1),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (rows, cols) in {
            "attention.self.query": (C, C), "attention.self.key": (C, C), "attention.self.value": (C, C),
            "attention.output.dense": (C, C), "intermediate.dense": (F, C), "output.dense": (C, F),
        }.items():
            weights[p + name + ".weight"] = normal(rows, cols)
            weights[p + name + ".bias"] = normal(rows, std=0.05)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[p + norm + ".weight"] = 1 + normal(C, std=0.1)
            weights[p + norm + ".bias"] = normal(C, std=0.1)
    return weights


def write_model(folder, config, weights):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save(folder / "model.safetensors", weights)
    return folder


def make_random_bert(folder, seed=0, **overrides):
    """Write a random BERT into ``folder`` and return the folder."""
    config = bert_config(**overrides)
    return write_model(folder, config, bert_weights(config, seed))


# ---- decoders -----------------------------------------------------------------------

# A byte-level tokenizer: token i < 256 is byte i, then three special tokens.
BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The layout of SmolLM2-Instruct's ChatML template, shortened.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_byte_tokenizer(folder):
    """Write tokenizer.json (byte-level BPE without merges) and tokenizer_config.json with a chat template.

    Every byte is one token, so a character of several UTF-8 bytes takes several
    tokens, which exercises incremental decoding. The end-of-text token is id 256.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    folder = Path(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"eos_token": SPECIAL_TOKENS[0], "bos_token": SPECIAL_TOKENS[0], "chat_template": CHAT_TEMPLATE,
              "model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def byte_to_unicode():
    """GPT-2's table from bytes to the printable characters that byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def llama_config(**overrides):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": BYTE_VOCAB + len(SPECIAL_TOKENS),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def llama_weights(config, seed=0):
    """Random Llama weights named as transformers' LlamaForCausalLM names them."""
    rng = np.random.default_rng(seed)
    C, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H = config["num_attention_heads"]
    Hkv = config.get("num_key_value_heads") or H
    D = config.get("head_dim") or C // H

    def normal(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(V, C, std=0.5), "model.norm.weight": 1 + normal(C, std=0.1)}
    if not config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = normal(V, C)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        projections = {"self_attn.q_proj": (H * D, C), "self_attn.k_proj": (Hkv * D, C),
                       "self_attn.v_proj": (Hkv * D, C), "self_attn.o_proj": (C, H * D),
                       "mlp.gate_proj": (F, C), "mlp.up_proj": (F, C), "mlp.down_proj": (C, F)}
        for name, (rows, cols) in projections.items():
            weights[p + name + ".weight"] = normal(rows, cols)
            has_bias = config.get("attention_bias") if name.startswith("self_attn") else config.get("mlp_bias")
            if has_bias:
                weights[p + name + ".bias"] = normal(rows, std=0.05)
        weights[p + "input_layernorm.weight"] = 1 + normal(C, std=0.1)
        weights[p + "post_attention_layernorm.weight"] = 1 + normal(C, std=0.1)
    return weights


def make_random_llama(folder, seed=0, **overrides):
    """Write a random LlamaForCausalLM with a byte-level tokenizer into ``folder`` and return the folder."""
    config = llama_config(**overrides)
    write_model(folder, config, llama_weights(config, seed))
    return write_byte_tokenizer(folder)


def gpt2_config(**overrides):
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": BYTE_VOCAB + len(SPECIAL_TOKENS),
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def gpt2_weights(config, seed=0):
    """Random GPT-2 weights named as transformers' GPT2LMHeadModel names them, Conv1D weights [in, out]."""
    rng = np.random.default_rng(seed)
    C, V = config["n_embd"], config["vocab_size"]
    F = config.get("n_inner") or 4 * C

    def normal(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    p = "transformer."
    weights = {p + "wte.weight": normal(V, C, std=0.5), p + "wpe.weight": normal(config["n_positions"], C, std=0.1),
               p + "ln_f.weight": 1 + normal(C, std=0.1), p + "ln_f.bias": normal(C, std=0.1)}
    for i in range(config["n_layer"]):
        layer = f"{p}h.{i}."
        for name, (rows, cols) in {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C),
                                   "mlp.c_fc": (C, F), "mlp.c_proj": (F, C)}.items():
            weights[layer + name + ".weight"] = normal(rows, cols)
            weights[layer + name + ".bias"] = normal(cols, std=0.05)
        for norm in ("ln_1", "ln_2"):
            weights[layer + norm + ".weight"] = 1 + normal(C, std=0.1)
            weights[layer + norm + ".bias"] = normal(C, std=0.1)
    return weights


def make_random_gpt2(folder, seed=0, **overrides):
    """Write a random GPT2LMHeadModel with a byte-level tokenizer into ``folder`` and return the folder."""
    config = gpt2_config(**overrides)
    write_model(folder, config, gpt2_weights(config, seed))
    return write_byte_tokenizer(folder)
