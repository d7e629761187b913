"""The backend protocol and the case object that a backend receives.

A backend is any object with these members (``Backend`` below is a base class
that supplies the optional ones):

- ``name``: str, shown in the report.
- ``dtype``: "float32" or "float64", the precision it computes in. It selects
  the tolerance table a case applies to the backend's outputs.
- ``supports(case) -> bool | str``: True to run the case. False or a string
  skips it, and the string is reported as the reason.
- ``prepare(case)``: load the model of ``case`` (see ``CaseInfo``).
- ``run(inputs) -> dict``: run the model on ``inputs``, a dict of int64
  [B, T] arrays named by ``case.input_names``. Return a dict with
  ``hidden_states``, a list of [B, T, C] arrays (the embedding output, then
  the output of each layer), and the final output under ``case.output_name``.
  That is ``last_hidden_state`` [B, T, C] for encoders and ``logits``
  [B, T, V] for decoders. Arrays may be numpy arrays or anything
  ``np.asarray`` accepts.
- ``gradients(inputs, labels) -> dict`` (optional): for cases with a loss,
  ``{"loss": float, "gradients": {name: array}}``. For a BERT token
  classifier the loss is the mean cross-entropy over tokens whose label is
  not -100. For a Llama or GPT-2 causal LM, position t is scored on
  ``labels[t + 1]`` and the mean runs over the targets that are not -100.
- ``ner(inputs) -> array`` (optional): for cases with a NER head, the label
  id [B, T] of every word piece, the argmax of the token-classification
  logits. The runner takes each word's tag at its first piece, scores the
  tags against the gold ones with conlleval's rules and compares tags and
  scores exactly. A backend without ``ner`` skips NER cases.
- ``close()`` (optional): release the model after a case.
"""

from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1


@dataclass
class CaseInfo:
    """Description of a case for a backend: everything except the expected outputs."""

    name: str
    architecture: str  # "bert", "llama" or "gpt2"
    config: dict  # the Hugging Face config.json of the model
    model_dir: Path  # a Hugging Face model folder: config.json and model.safetensors
    weights_path: Path  # model_dir / "model.safetensors"
    input_names: tuple
    output_name: str  # "last_hidden_state" or "logits"
    num_layers: int
    metadata: dict = field(default_factory=dict)  # the whole case.json

    @property
    def config_path(self):
        return self.model_dir / "config.json"


class Backend:
    """Base class for backends: subclasses implement ``prepare`` and ``run``."""

    name = "unnamed"
    dtype = "float32"

    def supports(self, case):
        return True

    def prepare(self, case):
        raise NotImplementedError

    def run(self, inputs):
        raise NotImplementedError

    def gradients(self, inputs, labels):
        raise NotImplementedError(f"backend {self.name} does not compute gradients")

    def close(self):
        pass


class BackendError(Exception):
    """A backend that cannot be loaded or that returned outputs of the wrong form."""
