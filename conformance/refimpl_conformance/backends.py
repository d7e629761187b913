"""The shipped backends, and loading a backend by name or by ``module:Class``.

- ``refimpl-reference``: refimpl's Numba kernels in float64. It reproduces the
  goldens bitwise, because they were computed the same way.
- ``refimpl-reference-f32``: the same kernels in float32.
- ``refimpl-reference-decode``: decoders only, float64: the first token of
  each row goes in as a prefill, every later one as a decode step over the
  KV cache.
- ``refimpl-fast``: numpy and its BLAS in float32, the mode for speed.
- ``refimpl-fast-f64``: numpy and its BLAS in float64.
- ``transformers``: PyTorch and Hugging Face transformers in float32 with
  eager attention. Every case is skipped if torch or transformers is missing.
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from refimpl.errors import RefimplError
from refimpl.ops import Ops
from refimpl.store import DEFAULT_CHUNK_ROWS, WeightStore
from refimpl_conformance import architectures
from refimpl_conformance.protocol import Backend


class RefimplBackend(Backend):
    """refimpl itself; subclasses pick the mode and dtype, or change ``make_ops`` / ``make_config``.

    The store options (chunk rows, budget, schedule, prefetch) only change how
    weights are read, never the results, which the property tests check.
    """

    name = "refimpl-reference"
    mode = "reference"
    dtype = "float64"

    def __init__(self, chunk_rows=DEFAULT_CHUNK_ROWS, budget_bytes=None, schedule=None, prefetch=1):
        self.store_options = {"chunk_rows": chunk_rows, "budget_bytes": budget_bytes,
                              "schedule": schedule, "prefetch": prefetch}
        self.store = None

    def supports(self, case):
        try:
            architectures.get(case.architecture)
        except RefimplError as error:
            return str(error)
        return True

    def make_config(self, arch, case):
        return arch.config_class.from_dict(case.config)

    def make_ops(self, case):
        return Ops(self.mode, np.dtype(self.dtype))

    def prepare(self, case):
        self.close()
        self.case = case
        self.arch = architectures.get(case.architecture)
        self.store = WeightStore(case.weights_path, **self.store_options)
        self.model = self.arch.model_class(self.make_config(self.arch, case), self.store, self.make_ops(case))

    def run(self, inputs):
        hidden_states = []
        output = self.arch.forward(self.model, inputs, hidden_states)
        return {"hidden_states": hidden_states, self.arch.output_name: output}

    def gradients(self, inputs, labels):
        """Compute the loss and the gradient of every parameter with refimpl's training pass.

        BERT cases use the token classifier (mean cross-entropy over labelled
        tokens, without dropout). Llama and GPT-2 cases use the causal-LM head,
        which shifts ``labels`` so that position t is scored on token t + 1.
        Both run in this backend's mode and dtype.
        """
        from refimpl import safetensors
        from refimpl.train import build_gpt2_training, build_llama_training, build_training

        weights = safetensors.load(self.case.weights_path)
        config = self.make_config(self.arch, self.case)
        dtype = np.dtype(self.dtype)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
        if self.arch.name == "bert":
            num_labels = len(self.case.config["id2label"])
            state, model = build_training(config, weights, num_labels, dtype=dtype, mode=self.mode)
            batch["example_ids"] = np.arange(len(labels))
            options = {"train": False}
        else:
            build = build_llama_training if self.arch.name == "llama" else build_gpt2_training
            state, model = build(config, weights, dtype=dtype, mode=self.mode)
            options = {}
        try:
            loss = model.accumulate_gradients([batch], state.grads, **options)
            gradients = {name: np.array(state.grads.arrays[name]) for name in state.names()}
        finally:
            state.close()
        return {"loss": loss, "gradients": gradients}

    def token_logits(self, inputs):
        """Return the token-classification logits [B, T, L]: the BERT encoder, then the classifier."""
        if self.arch.name != "bert" or "classifier.weight" not in self.store.index:
            raise NotImplementedError(f"case {self.case.name} has no token-classification head")
        hidden = np.asarray(self.arch.forward(self.model, inputs, []))
        B, T, C = hidden.shape
        logits = self.model.ops.linear(hidden.reshape(B * T, C), self.store, "classifier")
        return np.asarray(logits).reshape(B, T, -1)

    def ner(self, inputs):
        """Return the label id [B, T] of every word piece: the argmax of the token-classification logits."""
        return self.token_logits(inputs).argmax(axis=-1)

    def close(self):
        if self.store is not None:
            self.store.close()
            self.store = None


class RefimplReferenceFloat32(RefimplBackend):
    name = "refimpl-reference-f32"
    dtype = "float32"


class RefimplFast(RefimplBackend):
    name = "refimpl-fast"
    mode = "fast"
    dtype = "float32"


class RefimplFastFloat64(RefimplBackend):
    name = "refimpl-fast-f64"
    mode = "fast"
    dtype = "float64"


class RefimplDecode(RefimplBackend):
    """Decoders through the KV cache: a one-token prefill, then one decode step per token."""

    name = "refimpl-reference-decode"

    def supports(self, case):
        supported = super().supports(case)
        if supported is not True:
            return supported
        return True if architectures.get(case.architecture).causal else "decode steps apply to decoders only"

    def run(self, inputs):
        from refimpl.models.llama import KVCache

        ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        cache = KVCache(self.model.config.num_hidden_layers)
        steps = []  # per step: (hidden states, logits)
        for t in range(ids.shape[1]):
            step_hidden = []
            logits = self.model.forward(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache,
                                        position_ids=positions[:, t:t + 1], hidden_states=step_hidden)
            steps.append((step_hidden, logits))
        hidden_states = [np.concatenate([hidden[i] for hidden, _ in steps], axis=1)
                         for i in range(len(steps[0][0]))]
        return {"hidden_states": hidden_states, "logits": np.concatenate([logits for _, logits in steps], axis=1)}


class TransformersBackend(Backend):
    """Hugging Face transformers on PyTorch, float32, eager attention.

    The hidden states are taken with forward hooks on the embedding and on each
    layer, because transformers' own ``hidden_states`` output ends with the
    final norm applied for Llama and GPT-2, where refimpl's ends before it.
    """

    name = "transformers"
    dtype = "float32"

    def supports(self, case):
        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install -e '.[peer]')"
        try:
            architectures.get(case.architecture)
        except RefimplError as error:
            return str(error)
        return True

    def prepare(self, case):
        import torch
        import transformers

        # Keep the report readable: no download progress bars or load reports
        # (a random model has no pooler weights, which transformers reports).
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        self.model_dir = case.model_dir
        self.arch = architectures.get(case.architecture)
        model_class = getattr(transformers, self.arch.transformers_class)
        self.model = model_class.from_pretrained(str(case.model_dir), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
        self.captured = {}
        self.hooks = []
        embedding, layers = self.hook_points()
        self.hooks.append(embedding.register_forward_hook(self.capture("embeddings")))
        for i, layer in enumerate(layers):
            self.hooks.append(layer.register_forward_hook(self.capture(i)))
        self.num_layers = len(layers)

    def hook_points(self):
        """Return the module whose output is the embedding output, and the list of layers."""
        if self.arch.name == "bert":
            return self.model.embeddings, self.model.encoder.layer
        if self.arch.name == "llama":
            return self.model.model.embed_tokens, self.model.model.layers
        # GPT-2: the dropout after wte + wpe is the identity in eval mode.
        return self.model.transformer.drop, self.model.transformer.h

    def capture(self, key):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            self.captured[key] = tensor.detach().to(self.torch.float32).numpy().copy()
        return hook

    def run(self, inputs):
        torch = self.torch
        self.captured = {}
        arguments = {name: torch.from_numpy(np.asarray(array, dtype=np.int64)) for name, array in inputs.items()}
        with torch.no_grad():
            output = self.model(**arguments)
        hidden_states = [self.captured["embeddings"]] + [self.captured[i] for i in range(self.num_layers)]
        final = output.logits if self.arch.output_name == "logits" else output.last_hidden_state
        return {"hidden_states": hidden_states, self.arch.output_name: final.detach().numpy()}

    def gradients(self, inputs, labels):
        """Compute the loss and parameter gradients by autograd in float32, without dropout.

        BERT cases load BertForTokenClassification. Llama and GPT-2 cases load
        LlamaForCausalLM or GPT2LMHeadModel, which shift ``labels`` themselves.
        A tied output projection is one parameter, listed under the embedding's name.
        """
        torch = self.torch
        import transformers

        class_name = "BertForTokenClassification" if self.arch.name == "bert" else self.arch.transformers_class
        model = getattr(transformers, class_name).from_pretrained(
            str(self.model_dir), attn_implementation="eager", dtype=torch.float32).eval()  # eval: no dropout
        arguments = {name: torch.from_numpy(np.asarray(array, dtype=np.int64)) for name, array in inputs.items()}
        output = model(**arguments, labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        output.loss.backward()
        gradients = {name: parameter.grad.detach().numpy().copy() for name, parameter in model.named_parameters()
                     if parameter.grad is not None}
        return {"loss": float(output.loss.detach()), "gradients": gradients}

    def ner(self, inputs):
        """Return the label id [B, T] of every word piece from BertForTokenClassification in float32."""
        torch = self.torch
        import transformers

        if self.arch.name != "bert":
            raise NotImplementedError(f"no NER head for {self.arch.name}")
        model = transformers.BertForTokenClassification.from_pretrained(
            str(self.model_dir), attn_implementation="eager", dtype=torch.float32).eval()
        arguments = {name: torch.from_numpy(np.asarray(array, dtype=np.int64)) for name, array in inputs.items()}
        with torch.no_grad():
            logits = model(**arguments).logits
        return logits.argmax(dim=-1).numpy()

    def close(self):
        for hook in getattr(self, "hooks", []):
            hook.remove()
        self.hooks = []
        self.model = None


BUILTIN_BACKENDS = {cls.name: cls for cls in (RefimplBackend, RefimplReferenceFloat32, RefimplDecode,
                                              RefimplFast, RefimplFastFloat64, TransformersBackend)}


def _import_module(module_name):
    """Import a module by dotted name (searched from the current folder too) or by file path."""
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise RefimplError(f"backend module file {path} not found")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise RefimplError(f"backend module {module_name!r} cannot be imported: {error}") from None


def load_backend(spec):
    """Return a backend instance for a built-in name or ``module:Class`` (module dotted or a .py path)."""
    if spec in BUILTIN_BACKENDS:
        return BUILTIN_BACKENDS[spec]()
    if ":" not in spec:
        raise RefimplError(f"backend {spec!r} is unknown; use one of {', '.join(BUILTIN_BACKENDS)} "
                           "or module:Class")
    module_name, class_name = spec.rsplit(":", 1)
    module = _import_module(module_name)
    backend_class = getattr(module, class_name, None)
    if backend_class is None:
        raise RefimplError(f"backend module {module_name!r} has no {class_name!r}")
    backend = backend_class()
    for member in ("prepare", "run"):
        if not callable(getattr(backend, member, None)):
            raise RefimplError(f"backend {spec} has no {member}() method; see docs/conformance.md")
    if not getattr(backend, "name", None) or backend.name == "unnamed":
        backend.name = class_name
    if getattr(backend, "dtype", None) not in ("float32", "float64"):
        raise RefimplError(f"backend {spec} has dtype {getattr(backend, 'dtype', None)!r}; "
                           "set its dtype attribute to 'float32' or 'float64'")
    return backend
