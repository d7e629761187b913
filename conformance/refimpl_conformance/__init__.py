"""refimpl's conformance suite, imported as ``refimpl_conformance``."""
