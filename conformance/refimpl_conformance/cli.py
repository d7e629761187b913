"""The ``refimpl-conformance`` command: generate the goldens, or verify a backend against them.

Exit status: 0 when every case passed or was skipped and at least one passed,
1 when a case failed or every case was skipped, 2 on invalid usage or an error
such as a missing golden folder.
"""

import argparse
import sys
from pathlib import Path

from refimpl.errors import RefimplError

# The repository's golden/ folder (conformance/refimpl_conformance/cli.py -> the repository root).
DEFAULT_GOLDEN = Path(__file__).resolve().parents[2] / "golden"


def build_parser():
    parser = argparse.ArgumentParser(prog="refimpl-conformance",
                                     description="Check a transformer implementation against refimpl's "
                                                 "float64 golden outputs, layer by layer.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="regenerate the golden bundles with refimpl's float64 "
                                                    "reference mode")
    generate.add_argument("--out", type=Path, default=DEFAULT_GOLDEN,
                          help=f"folder to write one bundle per case into (default: {DEFAULT_GOLDEN})")
    generate.add_argument("--cases", metavar="GLOB", help="only the cases whose name matches GLOB")

    verify = commands.add_parser("verify", help="run a backend on every case and compare its outputs")
    verify.add_argument("--backend", required=True,
                        help="a built-in backend (refimpl-reference, refimpl-reference-f32, "
                             "refimpl-reference-decode, refimpl-fast, refimpl-fast-f64, transformers) or "
                             "module:Class, where module is a dotted name importable from the current "
                             "folder or a path to a .py file")
    verify.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN,
                        help=f"folder of golden bundles (default: {DEFAULT_GOLDEN})")
    verify.add_argument("--cases", metavar="GLOB", help="only the cases whose name matches GLOB")
    verify.add_argument("--tolerances", type=Path, default=None,
                        help="JSON file of per-backend tolerance overrides, each with a reason "
                             "(default: conformance/tolerances.json)")
    verify.add_argument("--report", type=Path, metavar="FILE.json", help="also write a JSON report")
    verify.add_argument("--junit", type=Path, metavar="FILE.xml", help="also write a JUnit XML report")
    return parser


def run_generate(arguments):
    from refimpl_conformance.cases import generate

    folders = generate(arguments.out, arguments.cases)
    print(f"wrote {len(folders)} cases to {arguments.out}")
    return 0


def run_verify(arguments):
    from refimpl_conformance import report
    from refimpl_conformance.backends import load_backend
    from refimpl_conformance.cases import find_cases
    from refimpl_conformance.compare import load_overrides
    from refimpl_conformance.runner import FAILED, PASSED, verify

    overrides = load_overrides(arguments.tolerances)
    backend = load_backend(arguments.backend)
    folders = find_cases(arguments.golden, arguments.cases)
    if not folders:
        raise RefimplError(f"no case in {arguments.golden} matches {arguments.cases or '*'}")

    def print_result(result):
        for line in report.format_case(result):
            print(line, flush=True)

    results = verify(backend, folders, overrides, on_result=print_result)
    print(report.summary_line(results))
    if arguments.report:
        report.write_json(arguments.report, backend.name, results)
    if arguments.junit:
        report.write_junit(arguments.junit, backend.name, results)
    if any(result.status == FAILED for result in results):
        return 1
    if not any(result.status == PASSED for result in results):
        print("refimpl-conformance: no case ran: every selected case was skipped", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "generate":
            return run_generate(arguments)
        return run_verify(arguments)
    except RefimplError as error:
        print(f"refimpl-conformance: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
