"""Training: the BERT, Llama and GPT-2 backward passes, AdamW, and training state that can be offloaded to disk."""

import numpy as np

from refimpl.store import DEFAULT_CHUNK_ROWS
from refimpl.train.backward_ops import TrainOps
from refimpl.train.bert_backward import BertTokenClassifier, parameter_shapes
from refimpl.train.gpt2_backward import GPT2CausalLM, build_gpt2_training
from refimpl.train.llama_backward import LlamaCausalLM, build_llama_training
from refimpl.train.offload import TrainingState


def build_training(config, weights, num_labels, dtype=np.float32, mode="reference", offload_dir=None,
                   budget_bytes=None, chunk_rows=DEFAULT_CHUNK_ROWS, dropout=0.0, seed=0):
    """Return (TrainingState, BertTokenClassifier) with the parameters set to ``weights`` (name -> array)."""
    shapes = parameter_shapes(config, num_labels)
    state = TrainingState({name: (shape, dtype) for name, shape in shapes.items()},
                          offload_dir=offload_dir, budget_bytes=budget_bytes, chunk_rows=chunk_rows)
    state.load_params(weights)
    model = BertTokenClassifier(config, num_labels, state.store, TrainOps(mode, dtype), dropout=dropout, seed=seed)
    return state, model
