"""Comparison of a backend's outputs with the float64 goldens.

An element passes when ``|actual - expected| <= atol + rtol * |expected|``,
the rule of numpy's ``allclose`` and torch.testing's ``assert_close``. NaN and
inf must sit in the same places in both (inf with the same sign). Positions
whose attention mask is 0 are left out, because their values are not defined
the same way by every implementation.

The tolerance depends on the dtype the backend computes in, not on the
golden, which is always float64:

========  ======  ======  ==============================================
dtype     rtol    atol    source
========  ======  ======  ==============================================
float64   1e-7    1e-7    torch.testing.assert_close defaults for float64
float32   1e-4    1e-4    model level; see FLOAT32 below
========  ======  ======  ==============================================

Logits get more metrics: the max absolute and relative error with their
location, NMSE, top-1 agreement and the KL divergence of the backend's softmax
from the golden's. NMSE is the sum of squared errors over the sum of squared
expected values, the metric of llama.cpp's test-backend-ops. Logits pass when they
are close by the rule above and the top-1 token agrees at every position
whose golden top-1 and top-2 logits differ by more than the tolerance.
"""

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.errors import RefimplError

FLOAT64 = {"rtol": 1e-7, "atol": 1e-7}
# torch.testing's float32 defaults (rtol 1.3e-6, atol 1e-5) are for one
# operation. A float32 forward pass through a few layers against a float64
# golden differs by up to 1.8e-5 on these cases (refimpl's float32 modes and
# transformers, measured on bert-large-scores), so the model-level table is
# 10x wider than torch's atol. It still
# catches a layer-norm epsilon of 1e-5 instead of 1e-12 on the small-variance
# case and a tanh GELU in place of the erf GELU.
FLOAT32 = {"rtol": 1e-4, "atol": 1e-4}
DEFAULT_TOLERANCES = {"float64": FLOAT64, "float32": FLOAT32}

PAIRS_SHOWN = 4
DEFAULT_OVERRIDES_PATH = Path(__file__).resolve().parent.parent / "tolerances.json"


@dataclass
class CheckResult:
    """The outcome of one checked output of one case."""

    output: str  # "hidden_states.2", "logits", ...
    label: str  # "output of layer 1", ...
    passed: bool
    message: str = ""
    tolerance: dict = field(default_factory=dict)
    override_reason: str = ""
    metrics: dict = field(default_factory=dict)
    pairs: list = field(default_factory=list)  # [(location, expected, actual)] of failing elements

    def as_dict(self):
        return {"output": self.output, "label": self.label, "passed": self.passed, "message": self.message,
                "tolerance": self.tolerance, "override_reason": self.override_reason,
                "metrics": self.metrics,
                "pairs": [{"location": list(loc), "expected": e, "actual": a} for loc, e, a in self.pairs]}


# ---- tolerance overrides ------------------------------------------------------------

def load_overrides(path=None):
    """Read the per-backend tolerance overrides; every entry must give a reason.

    The file is JSON: ``{"overrides": [{"backend": GLOB, "case": GLOB, "output":
    GLOB, "rtol": float, "atol": float, "reason": str}, ...]}``. Without the
    default file there are no overrides; a path given explicitly must exist.
    """
    if path is not None and not Path(path).is_file():
        raise RefimplError(f"{path}: tolerance file not found; check the --tolerances path")
    path = Path(path) if path is not None else DEFAULT_OVERRIDES_PATH
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("overrides", [])
    except ValueError as error:
        raise RefimplError(f"{path}: invalid JSON: {error}") from None
    for number, entry in enumerate(entries):
        missing = [key for key in ("backend", "case", "output", "rtol", "atol", "reason") if key not in entry]
        if missing:
            raise RefimplError(f"{path}: override {number} is missing {', '.join(missing)}; "
                               "every override needs backend, case, output, rtol, atol and a reason")
        if not str(entry["reason"]).strip():
            raise RefimplError(f"{path}: override {number} has an empty reason; say why the tolerance differs")
    return entries


def resolve_tolerance(check, backend_name, backend_dtype, case_name, overrides):
    """Return (tolerance dict, override reason) for one check of one backend."""
    table = check.get("tolerance") or DEFAULT_TOLERANCES
    if backend_dtype not in table:
        raise RefimplError(f"backend dtype {backend_dtype!r} has no tolerance; use one of {', '.join(table)}")
    tolerance = dict(table[backend_dtype])
    reason = ""
    for entry in overrides:
        if (fnmatch.fnmatchcase(backend_name, entry["backend"]) and fnmatch.fnmatchcase(case_name, entry["case"])
                and fnmatch.fnmatchcase(check["output"], entry["output"])):
            tolerance = {"rtol": float(entry["rtol"]), "atol": float(entry["atol"])}
            reason = entry["reason"]
    return tolerance, reason


# ---- elementwise comparison -----------------------------------------------------------

def _location(positions, flat_index, row_width):
    """(b, t, channel) of element ``flat_index`` of the [N, row_width] array of unmasked positions."""
    row, column = divmod(int(flat_index), row_width)
    b, t = positions[row]
    return (int(b), int(t), int(column))


def _unmasked(array, mask):
    """[B, T, X] -> [N, X]: the rows at positions where ``mask`` is 1."""
    return array[mask.astype(bool)]


def compare_close(actual, expected, mask, rtol, atol):
    """Compare [B, T, X] arrays at unmasked positions; return (passed, message, metrics, pairs)."""
    positions = np.argwhere(mask.astype(bool))
    a = _unmasked(actual.astype(np.float64), mask)
    e = _unmasked(expected.astype(np.float64), mask)
    width = e.shape[-1] if e.ndim > 1 else 1
    a = a.reshape(len(positions), width)
    e = e.reshape(len(positions), width)
    metrics = {"compared": int(e.size)}
    if e.size == 0:
        return True, "no unmasked positions", metrics, []

    nan_mismatch = np.isnan(a) != np.isnan(e)
    inf_mismatch = (np.isinf(a) | np.isinf(e)) & (a != e) & ~np.isnan(a) & ~np.isnan(e)
    finite = np.isfinite(a) & np.isfinite(e)
    a_finite, e_finite = np.where(finite, a, 0.0), np.where(finite, e, 0.0)
    difference = np.abs(a_finite - e_finite)
    allowed = atol + rtol * np.abs(e_finite)
    close_failures = finite & (difference > allowed)
    failures = nan_mismatch | inf_mismatch | close_failures

    flat_max = int(np.argmax(difference))
    relative = difference / np.maximum(np.abs(np.where(finite, e, 1.0)), np.finfo(np.float64).tiny)
    flat_rel = int(np.argmax(np.where(finite, relative, 0.0)))
    metrics.update({
        "max_abs_error": float(difference.reshape(-1)[flat_max]),
        "max_abs_location": list(_location(positions, flat_max, width)),
        "max_rel_error": float(relative.reshape(-1)[flat_rel]),
        "max_rel_location": list(_location(positions, flat_rel, width)),
        "mismatched": int(failures.sum()),
        "nan_or_inf_mismatched": int((nan_mismatch | inf_mismatch).sum()),
    })
    if not failures.any():
        return True, "", metrics, []

    # Show the worst elements: NaN/inf mismatches first, then by how far they exceed the tolerance.
    excess = np.where(nan_mismatch | inf_mismatch, np.inf, difference - allowed)
    worst = np.argsort(-excess.reshape(-1), kind="stable")[:PAIRS_SHOWN]
    pairs = [(_location(positions, i, width), float(e.reshape(-1)[i]), float(a.reshape(-1)[i]))
             for i in worst if failures.reshape(-1)[i]]
    parts = [f"{metrics['mismatched']} of {e.size} elements outside atol {atol:g} + rtol {rtol:g} * |expected|"]
    if metrics["nan_or_inf_mismatched"]:
        parts.append(f"{metrics['nan_or_inf_mismatched']} with NaN or inf in different places")
    parts.append(f"max abs error {metrics['max_abs_error']:.3g} at {tuple(metrics['max_abs_location'])}")
    return False, ", ".join(parts), metrics, pairs


# ---- logits ----------------------------------------------------------------------------

def _log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logits_metrics(actual, expected, mask):
    """NMSE, top-1 agreement and KL(expected || actual) over unmasked positions with finite logits."""
    a = _unmasked(actual.astype(np.float64), mask)
    e = _unmasked(expected.astype(np.float64), mask)
    rows = np.isfinite(a).all(axis=-1) & np.isfinite(e).all(axis=-1)
    if not rows.any():
        return {"nmse": None, "top1_agreement": None, "kl_mean": None, "kl_max": None}
    a, e = a[rows], e[rows]
    nmse = float(((a - e) ** 2).sum() / max((e ** 2).sum(), np.finfo(np.float64).tiny))
    log_p = _log_softmax(e)
    kl = (np.exp(log_p) * (log_p - _log_softmax(a))).sum(axis=-1)
    return {"nmse": nmse, "top1_agreement": float((a.argmax(-1) == e.argmax(-1)).mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def top1_disagreements(actual, expected_top2, mask, rtol, atol):
    """Positions (b, t) where the backend's top-1 token differs from the golden's and the golden is decisive.

    ``expected_top2`` is a tuple of [B, T] arrays: the golden top-1 token ids,
    top-1 logits and top-2 logits. A position is decisive when its golden
    top-1 and top-2 logits differ by more than twice the tolerance at the top-1
    value, so rounding alone cannot swap them.
    """
    indices, top1, top2 = expected_top2
    gap = top1 - top2
    decisive = mask.astype(bool) & (gap > 2 * (atol + rtol * np.abs(top1)))
    agree = np.argmax(actual, axis=-1) == indices
    return [tuple(int(i) for i in p) for p in np.argwhere(decisive & ~agree)]


def compare_logits(actual, expected, mask, rtol, atol):
    passed, message, metrics, pairs = compare_close(actual, expected, mask, rtol, atol)
    metrics.update(logits_metrics(actual, expected, mask))
    top = np.sort(expected, axis=-1)
    disagreements = top1_disagreements(actual, (np.argmax(expected, axis=-1), top[..., -1], top[..., -2]),
                                       mask, rtol, atol)
    metrics["top1_disagreements"] = len(disagreements)
    if disagreements:
        passed = False
        where = ", ".join(str(p) for p in disagreements[:PAIRS_SHOWN])
        message = "; ".join(m for m in (message, f"top-1 token differs at {len(disagreements)} "
                                                 f"positions (b, t): {where}") if m)
    return passed, message, metrics, pairs


def compare_logits_topk(actual, topk_indices, topk_values, mask, rtol, atol):
    """Compare the backend's logits at the golden's top-k token ids, and the top-1 token."""
    gathered = np.take_along_axis(np.asarray(actual, dtype=np.float64), topk_indices, axis=-1)
    passed, message, metrics, pairs = compare_close(gathered, topk_values, mask, rtol, atol)
    disagreements = top1_disagreements(actual, (topk_indices[..., 0], topk_values[..., 0], topk_values[..., 1]),
                                       mask, rtol, atol)
    metrics["top1_disagreements"] = len(disagreements)
    if disagreements:
        passed = False
        where = ", ".join(str(p) for p in disagreements[:PAIRS_SHOWN])
        message = "; ".join(m for m in (message, f"top-1 token differs at {len(disagreements)} "
                                                 f"positions (b, t): {where}") if m)
    return passed, message, metrics, pairs


def compare_exact(actual, expected):
    """Exact equality, for NER tags and other discrete outputs."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return False, f"shape {actual.shape} differs from the expected {expected.shape}", {}, []
    different = np.argwhere(actual != expected)
    if len(different) == 0:
        return True, "", {"compared": int(expected.size)}, []
    pairs = [(tuple(int(i) for i in p), expected[tuple(p)].item(), actual[tuple(p)].item())
             for p in different[:PAIRS_SHOWN]]
    return False, f"{len(different)} of {expected.size} elements differ", {"mismatched": len(different)}, pairs


def compare_whole(actual, expected, rtol, atol):
    """Compare every element of two arrays of any shape (a loss, a gradient); locations index ``expected``."""
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return False, f"shape {actual.shape} differs from the expected {expected.shape}", {}, []
    flat = (1, 1, max(expected.size, 1))
    passed, message, metrics, pairs = compare_close(actual.reshape(flat), expected.reshape(flat),
                                                    np.ones((1, 1)), rtol, atol)

    def unflatten(location):
        return tuple(int(i) for i in np.unravel_index(location[2], expected.shape)) if expected.shape else ()

    for key in ("max_abs_location", "max_rel_location"):
        if key in metrics:
            metrics[key] = list(unflatten(metrics[key]))
    pairs = [(unflatten(location), e, a) for location, e, a in pairs]
    if not passed and "max_abs_location" in metrics:
        message = message.rsplit(" at ", 1)[0] + f" at {tuple(metrics['max_abs_location'])}"
    return passed, message, metrics, pairs


# ---- one check -------------------------------------------------------------------------

def select_output(outputs, name):
    """Return the array called ``name`` ("hidden_states.3", "logits") from a backend's outputs."""
    if name.startswith("hidden_states."):
        index = int(name.split(".", 1)[1])
        states = outputs.get("hidden_states")
        if states is None:
            raise KeyError("the backend returned no hidden_states")
        if index >= len(states):
            raise KeyError(f"the backend returned {len(states)} hidden states, {name} needs {index + 1}")
        return np.asarray(states[index])
    if name not in outputs:
        raise KeyError(f"the backend returned no {name!r} (it returned {', '.join(sorted(outputs)) or 'nothing'})")
    return np.asarray(outputs[name])


def apply_selection(array, selection):
    """Cut the stored slice out of a full output: ``{"channels": [start, stop]}`` on the last axis."""
    if not selection:
        return array
    start, stop = selection["channels"]
    return array[..., start:stop]


def run_check(check, outputs, expected, mask, tolerance, override_reason=""):
    """Compare one output named by ``check`` (an entry of case.json's "checks")."""
    rtol, atol = tolerance["rtol"], tolerance["atol"]
    result = CheckResult(check["output"], check.get("label", check["output"]), False,
                         tolerance=tolerance, override_reason=override_reason)
    try:
        actual = select_output(outputs, check["output"])
    except KeyError as error:
        result.message = str(error.args[0])
        return result
    metric = check["metric"]
    if metric == "logits_topk":
        indices = expected[check["output"] + ".topk_indices"]
        values = expected[check["output"] + ".topk_values"]
        if actual.shape[:-1] != values.shape[:-1]:
            result.message = f"shape {actual.shape} does not match the expected [B, T] {values.shape[:-1]}"
            return result
        outcome = compare_logits_topk(actual, indices, values, mask, rtol, atol)
    elif metric == "allclose_unmasked":
        outcome = compare_whole(actual, expected[check["output"]], rtol, atol)
    elif metric == "exact":
        outcome = compare_exact(actual, expected[check["output"]])
    else:
        golden = expected[check["output"]]
        actual = apply_selection(actual, check.get("select"))
        if actual.shape != golden.shape:
            result.message = f"shape {actual.shape} differs from the expected {golden.shape}"
            return result
        compare = compare_logits if metric == "logits" else compare_close
        outcome = compare(actual, golden, mask, rtol, atol)
    result.passed, result.message, result.metrics, result.pairs = outcome
    return result
