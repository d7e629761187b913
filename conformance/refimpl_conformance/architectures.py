"""The model architectures that conformance cases cover, as pluggable entries.

Each ``Architecture`` names the refimpl config and model classes, the inputs a
case of that architecture stores, the name of its final output, and how to
write a small random model of it. Adding an architecture means adding one
entry to ``ARCHITECTURES``; the generator, the comparison and the refimpl
backends read everything else from the entry.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refimpl.errors import RefimplError


@dataclass(frozen=True)
class Architecture:
    """One model architecture: its refimpl classes and the shape of its cases."""

    name: str
    config_class: type
    model_class: type
    input_names: tuple  # the int64 [B, T] arrays a case stores and a backend receives
    output_name: str  # "last_hidden_state" for encoders, "logits" for decoders
    causal: bool
    random_config: Callable  # overrides -> config dict (refimpl.random_models)
    random_weights: Callable  # (config dict, seed) -> {name: float32 array}
    transformers_class: str  # class name in transformers, for the PyTorch backend

    def forward(self, model, inputs, hidden_states):
        """Run refimpl's ``model`` on a case's inputs; return the final output and fill ``hidden_states``."""
        if self.causal:
            return model.forward(inputs["input_ids"], inputs["attention_mask"],
                                 position_ids=inputs["position_ids"], hidden_states=hidden_states)
        return model.forward(inputs["input_ids"], inputs["attention_mask"],
                             token_type_ids=inputs["token_type_ids"], hidden_states=hidden_states)

    def make_inputs(self, input_ids, attention_mask, token_type_ids=None):
        """Return the input arrays of a case from ids and mask [B, T], adding what this architecture needs."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if self.causal:
            # Positions count the tokens of each row, as transformers' generate() computes them.
            positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions}
        if token_type_ids is None:
            token_type_ids = np.zeros_like(input_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": np.asarray(token_type_ids, dtype=np.int64)}


def _bert():
    from refimpl.models.bert import BertConfig, BertModel
    from refimpl.random_models import bert_config, bert_weights

    return Architecture("bert", BertConfig, BertModel, ("input_ids", "attention_mask", "token_type_ids"),
                        "last_hidden_state", False, bert_config, bert_weights, "BertModel")


def _llama():
    from refimpl.models.llama import LlamaConfig, LlamaModel
    from refimpl.random_models import llama_config, llama_weights

    return Architecture("llama", LlamaConfig, LlamaModel, ("input_ids", "attention_mask", "position_ids"),
                        "logits", True, llama_config, llama_weights, "LlamaForCausalLM")


def _gpt2():
    from refimpl.models.gpt2 import GPT2Config, GPT2Model
    from refimpl.random_models import gpt2_config, gpt2_weights

    return Architecture("gpt2", GPT2Config, GPT2Model, ("input_ids", "attention_mask", "position_ids"),
                        "logits", True, gpt2_config, gpt2_weights, "GPT2LMHeadModel")


# Builders rather than instances, so that a missing model module only affects its own cases.
_BUILDERS = {"bert": _bert, "llama": _llama, "gpt2": _gpt2}
_CACHE = {}


def names():
    return list(_BUILDERS)


def get(name):
    """Return the ``Architecture`` called ``name``; raise RefimplError if it is unknown or cannot be imported."""
    if name not in _BUILDERS:
        raise RefimplError(f"architecture {name!r} is unknown; use one of {', '.join(_BUILDERS)}")
    if name not in _CACHE:
        try:
            _CACHE[name] = _BUILDERS[name]()
        except ImportError as error:
            raise RefimplError(f"architecture {name!r} is not available in this refimpl: {error}") from None
    return _CACHE[name]
