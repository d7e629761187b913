"""Running one backend over the golden cases."""

import time

import numpy as np
import traceback
from dataclasses import dataclass, field

from refimpl.errors import RefimplError
from refimpl_conformance.cases import WeightsMismatchError, load_case, ner_outputs
from refimpl_conformance.compare import resolve_tolerance, run_check

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class CaseResult:
    """The outcome of one case for one backend."""

    case: str
    backend: str
    dtype: str
    status: str  # PASSED, FAILED or SKIPPED
    reason: str = ""  # why it was skipped, or the error that stopped it
    notes: list = field(default_factory=list)  # what was not checked, e.g. gradients the backend lacks
    checks: list = field(default_factory=list)  # CheckResult, in forward order
    seconds: float = 0.0

    @property
    def first_failure(self):
        """The first failing check in forward order: the first layer whose output diverges."""
        return next((check for check in self.checks if not check.passed), None)

    def as_dict(self):
        first = self.first_failure
        return {"case": self.case, "backend": self.backend, "dtype": self.dtype, "status": self.status,
                "reason": self.reason, "notes": self.notes, "seconds": round(self.seconds, 3),
                "first_divergence": None if first is None else {"output": first.output, "label": first.label},
                "checks": [check.as_dict() for check in self.checks]}


def verify_case(backend, folder, overrides):
    """Run ``backend`` on the case in ``folder`` and compare every checked output."""
    start = time.perf_counter()
    name = folder.name
    result = CaseResult(name, backend.name, backend.dtype, FAILED)
    try:
        case = load_case(folder)
    except WeightsMismatchError as error:
        result.reason = str(error)
        return result
    except RefimplError as error:  # a registry model that cannot be fetched, an unreadable bundle
        result.status, result.reason = SKIPPED, f"case not available: {error}"
        return result

    supported = backend.supports(case.info)
    if supported is True and case.info.metadata.get("ner") and not callable(getattr(backend, "ner", None)):
        supported = "a NER case, and the backend has no ner() method"
    if supported is not True:
        result.status = SKIPPED
        result.reason = supported if isinstance(supported, str) else "not supported by the backend"
        return result

    try:
        backend.prepare(case.info)
        outputs = backend.run({key: value.copy() for key, value in case.inputs.items()})
        if isinstance(outputs, dict) and case.labels is not None:
            outputs = dict(outputs, **run_gradients(backend, case, result))
        if isinstance(outputs, dict) and case.info.metadata.get("ner"):
            label_ids = backend.ner({key: value.copy() for key, value in case.inputs.items()})
            outputs = dict(outputs, **ner_outputs(case.info.metadata["ner"], label_ids)[0])
    except Exception as error:  # a broken backend is a failed case, not a crashed suite
        last = traceback.extract_tb(error.__traceback__)[-1]
        result.reason = f"backend raised {type(error).__name__}: {error} ({last.filename}:{last.lineno})"
        result.seconds = time.perf_counter() - start
        return result
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
    if not isinstance(outputs, dict):
        result.reason = f"run() returned {type(outputs).__name__}; it must return a dict of named outputs"
        return result

    for check in case.checks:
        is_gradient = check["output"] == "loss" or check["output"].startswith("gradients.")
        if is_gradient and "loss" not in outputs:
            continue  # the backend computes no gradients; run_gradients added a note
        tolerance, reason = resolve_tolerance(check, backend.name, backend.dtype, name, overrides)
        result.checks.append(run_check(check, outputs, case.expected, case.mask, tolerance, reason))
    result.status = PASSED if all(check.passed for check in result.checks) else FAILED
    result.seconds = time.perf_counter() - start
    return result


def run_gradients(backend, case, result):
    """Outputs "loss" and "gradients.<name>" from ``backend.gradients``, or {} with a note if it has none."""
    gradients = getattr(backend, "gradients", None)
    if not callable(gradients):
        result.notes.append("gradients not checked: the backend has no gradients()")
        return {}
    try:
        values = gradients({key: value.copy() for key, value in case.inputs.items()}, case.labels.copy())
    except NotImplementedError as error:
        result.notes.append(f"gradients not checked: {error}")
        return {}
    outputs = {"loss": np.array([values["loss"]], dtype=np.float64)}
    outputs.update({f"gradients.{name}": grad for name, grad in values["gradients"].items()})
    return outputs


def verify(backend, folders, overrides, on_result=None):
    """Verify every case folder; call ``on_result`` after each case; return the list of CaseResult."""
    results = []
    for folder in folders:
        result = verify_case(backend, folder, overrides)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
