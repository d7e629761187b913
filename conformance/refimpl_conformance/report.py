"""Text, JSON and JUnit XML reports of a verify run."""

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from refimpl_conformance.runner import FAILED, PASSED, SKIPPED


def _number(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def worst_error(result):
    """Max absolute error over a case's checks, with the output where it occurs."""
    worst = None
    for check in result.checks:
        error = check.metrics.get("max_abs_error")
        if error is not None and (worst is None or error > worst[0]):
            worst = (error, check.output)
    return worst


def format_case(result):
    """Format the summary line of one case, and for a failure the lines that locate it."""
    head = f"{result.status.upper():7} {result.case} [{result.backend}, {result.dtype}]"
    if result.status == SKIPPED:
        return [f"{head}: skipped: {result.reason}"]
    if result.reason:
        return [f"{head}: {result.reason}"]
    overrides = sorted({f"{c.output}: rtol {c.tolerance['rtol']:g} atol {c.tolerance['atol']:g} ({c.override_reason})"
                        for c in result.checks if c.override_reason})
    if result.status == PASSED:
        worst = worst_error(result)
        if worst is None:
            detail = "all outputs compared"
        elif worst[0] == 0:
            detail = "bitwise identical to the golden"
        else:
            detail = f"max abs error {worst[0]:.3g} in {worst[1]}"
        logits = next((c for c in result.checks if c.output == "logits"), None)
        if logits is not None and logits.metrics.get("kl_max") is not None:
            detail += (f"; logits NMSE {_number(logits.metrics['nmse'])}, "
                       f"top-1 agreement {logits.metrics['top1_agreement']:.3f}, "
                       f"max KL {_number(logits.metrics['kl_max'])}")
        lines = [f"{head}: {detail} ({result.seconds:.2f} s)"]
    else:
        first = result.first_failure
        failing = sum(1 for c in result.checks if not c.passed)
        lines = [f"{head}: first divergence at {first.label} ({first.output}): {first.message}; "
                 f"{failing} of {len(result.checks)} outputs fail"]
        for location, expected, actual in first.pairs:
            lines.append(f"        at {tuple(location)}: expected {expected:.9g}, actual {actual:.9g}")
    lines += [f"        tolerance override for {text}" for text in overrides]
    lines += [f"        note: {note}" for note in result.notes]
    return lines


def summary_line(results):
    counts = {status: sum(1 for r in results if r.status == status) for status in (PASSED, FAILED, SKIPPED)}
    line = f"{counts[PASSED]} passed, {counts[FAILED]} failed"
    if counts[SKIPPED]:
        line += f", {counts[SKIPPED]} skipped"
    return line


def write_json(path, backend_name, results):
    report = {"backend": backend_name, "summary": summary_line(results),
              "cases": [result.as_dict() for result in results]}
    Path(path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def write_junit(path, backend_name, results):
    """Write a JUnit XML file: one testcase per case, with failure or skipped elements."""
    failures = sum(1 for r in results if r.status == FAILED)
    skipped = sum(1 for r in results if r.status == SKIPPED)
    suite = ElementTree.Element("testsuite", name=f"refimpl-conformance[{backend_name}]", tests=str(len(results)),
                                failures=str(failures), skipped=str(skipped), errors="0",
                                time=f"{sum(r.seconds for r in results):.3f}")
    for result in results:
        testcase = ElementTree.SubElement(suite, "testcase", classname=f"conformance.{backend_name}",
                                          name=result.case, time=f"{result.seconds:.3f}")
        lines = format_case(result)
        if result.status == FAILED:
            failure = ElementTree.SubElement(testcase, "failure", message=lines[0])
            failure.text = "\n".join(lines)
        elif result.status == SKIPPED:
            ElementTree.SubElement(testcase, "skipped", message=result.reason)
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
