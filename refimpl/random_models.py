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
