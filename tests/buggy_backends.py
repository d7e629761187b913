"""Deliberately broken backends: refimpl in float32 with one bug each, of the kinds real ports have.

The conformance suite must report each of them as failing and name the first
layer whose output diverges. Use them as
``refimpl-conformance verify --backend tests.buggy_backends:WrongEpsilon``.
The bugs run in float32, the precision of most ports, so they are caught
under the float32 tolerance and not only under the float64 one.
"""

import dataclasses

import numpy as np

from refimpl.ops import Ops
from refimpl_conformance.backends import RefimplReferenceFloat32


class BuggyOps(Ops):
    """Reference float32 ops; a subclass overrides one method with a bug."""

    def __init__(self, causal):
        super().__init__("reference", np.float32)
        self.causal = causal


class BuggyBackend(RefimplReferenceFloat32):
    ops_class = BuggyOps
    architectures = ("bert", "llama", "gpt2")

    def supports(self, case):
        if case.architecture not in self.architectures:
            return f"this bug applies to {', '.join(self.architectures)} only"
        return super().supports(case)

    def make_ops(self, case):
        return self.ops_class(causal=case.architecture != "bert")


# ---- wrong layer-norm epsilon -------------------------------------------------------------

class WrongEpsilon(BuggyBackend):
    """BERT's layer norm with PyTorch's default epsilon 1e-5 instead of the config's 1e-12."""

    name = "WrongEpsilon"
    architectures = ("bert",)

    def make_config(self, arch, case):
        return dataclasses.replace(super().make_config(arch, case), layer_norm_eps=1e-5)


# ---- tanh GELU --------------------------------------------------------------------------

class TanhGeluOps(BuggyOps):
    def gelu(self, x):
        return self.gelu_tanh(x)


class TanhGelu(BuggyBackend):
    """The tanh approximation of GELU where BERT uses the erf form."""

    name = "TanhGelu"
    ops_class = TanhGeluOps
    architectures = ("bert",)


# ---- missing attention scale --------------------------------------------------------------

class NoScaleOps(BuggyOps):
    def attention(self, q, k, v, mask, scale):
        return super().attention(q, k, v, mask, 1.0)


class MissingAttentionScale(BuggyBackend):
    """Attention scores not divided by sqrt(head size)."""

    name = "MissingAttentionScale"
    ops_class = NoScaleOps


# ---- padding not masked -------------------------------------------------------------------

class UnmaskedPaddingOps(BuggyOps):
    def attention(self, q, k, v, mask, scale):
        B, Tq, Tk = mask.shape
        if self.causal:
            # Keep only the causal part: key j is visible to query i when j <= i (no cache here).
            causal = np.triu(np.full((Tq, Tk), -np.inf, dtype=self.dtype), k=1)
            mask = np.broadcast_to(causal, (B, Tq, Tk))
        else:
            mask = np.zeros((B, Tq, Tk), dtype=self.dtype)
        return super().attention(q, k, v, mask, scale)


class PaddingNotMasked(BuggyBackend):
    """Padding tokens attended to like real tokens."""

    name = "PaddingNotMasked"
    ops_class = UnmaskedPaddingOps


# ---- overflowing softmax ------------------------------------------------------------------

class OverflowingSoftmaxOps(BuggyOps):
    def attention(self, q, k, v, mask, scale):
        q, k, v, mask = self.cast(q), self.cast(k), self.cast(v), self.cast(mask)
        group = q.shape[2] // k.shape[2]
        k = np.repeat(k, group, axis=2)
        v = np.repeat(v, group, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) * self.dtype.type(scale) + mask[:, None]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            weights = np.exp(scores)  # the bug: no max subtraction, so exp() overflows to inf
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return np.einsum("bhqk,bkhd->bqhd", weights, v).astype(self.dtype)


class OverflowingSoftmax(BuggyBackend):
    """A softmax without the max subtraction: exp() of a score above 88.7 is inf in float32."""

    name = "OverflowingSoftmax"
    ops_class = OverflowingSoftmaxOps


# ---- transposed weight --------------------------------------------------------------------

# The square projection after attention, named as each architecture names it.
OUTPUT_PROJECTIONS = ("attention.output.dense", "self_attn.o_proj", "attn.c_proj")


class TransposedWeightOps(BuggyOps):
    def linear(self, x, store, prefix, bias=True):
        if not prefix.endswith(OUTPUT_PROJECTIONS):
            return super().linear(x, store, prefix, bias)
        weight = store.tensor(prefix + ".weight")
        out = self.cast(x) @ self.cast(weight)  # the bug: x @ W instead of x @ W.T
        if bias:
            out += store.tensor(prefix + ".bias")
        return out

    def conv1d(self, x, store, prefix, bias=True):
        if not prefix.endswith(OUTPUT_PROJECTIONS):
            return super().conv1d(x, store, prefix, bias)
        weight = store.tensor(prefix + ".weight")
        out = self.cast(x) @ self.cast(weight).T  # the bug: GPT-2's Conv1D weight is [in, out] already
        if bias:
            out += store.tensor(prefix + ".bias")
        return out


class TransposedWeight(BuggyBackend):
    """The square attention output projection used transposed."""

    name = "TransposedWeight"
    ops_class = TransposedWeightOps


# ---- decoders: rotary pairing and causal mask ---------------------------------------------

class AdjacentRotaryOps(BuggyOps):
    def rope(self, x, positions, inv_freq):
        # The bug: rotate the adjacent pairs (2i, 2i + 1), the convention of the RoFormer
        # paper (Su et al., 2021) and of llama.cpp. Transformers' Llama weights expect
        # the pairs (i, i + D/2).
        x = self.cast(x)
        angles = np.asarray(positions, dtype=self.dtype)[:, None] * self.cast(inv_freq)  # [N, D/2]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = odd * cos + even * sin
        return out


class RotaryAdjacentPairs(BuggyBackend):
    """Rotary embeddings on adjacent pairs instead of the rotate_half pairs."""

    name = "RotaryAdjacentPairs"
    ops_class = AdjacentRotaryOps
    architectures = ("llama",)


class OffByOneCausalOps(BuggyOps):
    def attention(self, q, k, v, mask, scale):
        # The bug: query i also attends to key i + 1 (a "<=" where "<" belonged, or a mask shifted by one).
        mask = np.array(mask, dtype=self.dtype)
        B, Tq, Tk = mask.shape
        for i in range(min(Tq, Tk - 1)):
            # Key i + 1 is padding exactly when it is masked for its own query.
            visible = mask[:, i + 1, i + 1] == 0
            mask[visible, i, i + 1] = 0
        return super().attention(q, k, v, mask, scale)


class OffByOneCausalMask(BuggyBackend):
    """A causal mask that lets each token see the next one."""

    name = "OffByOneCausalMask"
    ops_class = OffByOneCausalOps
    architectures = ("llama", "gpt2")


ALL = (WrongEpsilon, TanhGelu, MissingAttentionScale, PaddingNotMasked, OverflowingSoftmax,
       TransposedWeight, RotaryAdjacentPairs, OffByOneCausalMask)
