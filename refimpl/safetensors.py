"""A safetensors reader on np.memmap (read-only, zero-copy) and an atomic writer.

File layout: an 8-byte little-endian u64 header length N, N bytes of UTF-8 JSON,
then the data section. The JSON object maps each tensor name to
``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}`` with offsets
relative to the start of the data section. The optional key ``__metadata__``
maps strings to strings.

The reader validates the whole header before it makes any view of the data, so a
malformed file raises FormatError and never leads to a read outside the file. It
accepts the files that the reference reader (the ``safetensors`` package, version
0.8, ``safetensors.numpy.load_file``) accepts, with these exceptions:

- It rejects what the format text forbids but safetensors 0.8 accepts: duplicate
  keys (safetensors keeps the last one), a header that does not begin with ``{``,
  ``"__metadata__": null``, and a dtype written as an object (``{"F32": null}``).
- It rejects safetensors dtypes that refimpl does not support (C64, the F8, F6
  and F4 types).
- It reads BF16, which ``safetensors.numpy`` cannot load, as float32.

Like the reference reader it ignores unknown fields in a tensor entry, allows JSON
whitespace after the closing brace, limits the header to 100,000,000 bytes and
JSON nesting to 127 levels, and requires the tensors to tile the data section.
"""

import json
import math
import operator
import os
import pathlib
import re
import uuid
from dataclasses import dataclass

import numpy as np

from refimpl.errors import FormatError, RefimplError

# The reference reader rejects longer headers: safetensors 0.8 rejects a length of
# 100,000,001 as "header too large" and accepts 100,000,000.
MAX_HEADER_LENGTH = 100_000_000

# serde_json, which the reference reader uses, stops at 128 nested arrays and
# objects, counting the header object itself. Measured with safetensors 0.8.
MAX_JSON_DEPTH = 127

LENGTH_FIELD_BYTES = 8

# NumPy rejects a shape whose nonzero dimensions times the item size exceed the
# largest npy_intp, even when another dimension is 0.
_NUMPY_MAX_BYTES = 2**63 - 1

_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)

# Output dtype of each safetensors dtype. BF16 is converted exactly to float32.
SUPPORTED_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<f4"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}

# On-disk element dtype. BF16 is read as its raw 16-bit patterns.
_DISK_DTYPES = dict(SUPPORTED_DTYPES, BF16=np.dtype("<u2"))

# Dtypes that safetensors 0.8 defines but refimpl does not read.
_UNSUPPORTED_SAFETENSORS_DTYPES = frozenset({
    "C64", "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2",
    "F8_E5M2FNUZ", "F8_E8M0",
})

_NUMPY_TO_SAFETENSORS = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int16): "I16",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.float32): "F32",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64",
    np.dtype(np.float64): "F64",
}

_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")

# A surrogate left in a decoded string came from a lone \u escape, because valid
# pairs decode to one code point and the UTF-8 decoder rejects encoded surrogates.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, with absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self):
        """Size of the tensor on disk in bytes."""
        return self.end - self.start

    @property
    def row_nbytes(self):
        """Bytes of one slice along dim 0 on disk, or of the whole tensor when it is 0-d."""
        if not self.shape:
            return self.nbytes
        return math.prod(self.shape[1:]) * _DISK_DTYPES[self.dtype].itemsize


class SafetensorsFile:
    """A validated safetensors file mapped read-only into memory.

    Arrays returned by ``array`` and ``rows`` are read-only. They are views of
    the mapping when possible, and they keep the mapping alive after ``close``.

    NOTE: like any memory-mapped reader, a process that truncates the file in
    place while it is mapped makes later reads of the missing pages fail with
    SIGBUS. ``save`` replaces files by rename, which never does that.
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._memmap = None
        self._closed = False
        try:
            with open(self.path, "rb") as file:
                file_size = os.fstat(file.fileno()).st_size
                self.header_length, self.metadata, self.tensors = _read_header(self.path, file, file_size)
                data_start = LENGTH_FIELD_BYTES + self.header_length
                if file_size > data_start:
                    self._memmap = _map_file(self.path, file, file_size)
        except OSError as error:
            raise RefimplError(f"{self.path}: cannot read the file: {error.strerror or error}") from None

    @property
    def mmap(self):
        """The mmap.mmap object behind the arrays.

        None when the data section is empty or the file is closed.
        """
        if self._memmap is None:
            return None
        return self._memmap._mmap

    def array(self, name):
        """Return the whole tensor ``name`` as a read-only array.

        The array is a view of the mapping when the tensor's offset is aligned to
        its item size and the dtype is not BF16. Otherwise it is a copy: BF16 is
        converted exactly to float32, and unaligned data is copied.
        """
        info = self._tensor_info(name)
        return self._read(info, info.start, info.end, info.shape)

    def rows(self, name, start, stop):
        """Return rows ``[start, stop)`` along dim 0 of tensor ``name``, with the rules of ``array``.

        Raises ValueError for a 0-d tensor or when ``0 <= start <= stop <= shape[0]`` does not hold.
        """
        info = self._tensor_info(name)
        if not info.shape:
            raise ValueError(f"tensor {name!r} in {self.path} is 0-d and has no rows")
        start = operator.index(start)
        stop = operator.index(stop)
        row_count = info.shape[0]
        if not 0 <= start <= stop <= row_count:
            raise ValueError(
                f"rows [{start}, {stop}) are out of range for tensor {name!r} in {self.path}, "
                f"which has {row_count} rows"
            )
        row_nbytes = info.row_nbytes
        shape = (stop - start,) + info.shape[1:]
        return self._read(info, info.start + start * row_nbytes, info.start + stop * row_nbytes, shape)

    def close(self):
        """Drop this object's reference to the mapping.

        Arrays already returned stay valid: the mapping is unmapped when the last
        of them is garbage-collected.
        """
        self._memmap = None
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    def _tensor_info(self, name):
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None

    def _read(self, info, start, end, shape):
        output_dtype = SUPPORTED_DTYPES[info.dtype]
        if start == end:
            empty = np.empty(shape, dtype=output_dtype)
            empty.flags.writeable = False
            return empty

        disk_dtype = _DISK_DTYPES[info.dtype]
        raw = self._memmap[start:end].view(np.ndarray)
        if info.dtype == "BF16":
            # BF16 is the upper half of a float32, so the shift is exact.
            # NumPy reads unaligned bits correctly, and astype makes an aligned copy.
            bits = raw.view(disk_dtype)
            array = (bits.astype("<u4") << 16).view(output_dtype).reshape(shape)
        elif raw.ctypes.data % disk_dtype.itemsize == 0:
            return raw.view(disk_dtype).reshape(shape)
        else:
            array = raw.copy().view(disk_dtype).reshape(shape)
        array.flags.writeable = False
        return array


def load(path):
    """Read every tensor of a safetensors file as a read-only array.

    The arrays are views of one mapping (except BF16 and unaligned tensors, which
    are copies), and they keep the mapping alive.
    """
    with SafetensorsFile(path) as file:
        return {name: file.array(name) for name in file.tensors}


def format_inspect(path):
    """Validate a safetensors file and return a table of its tensors and metadata.

    Each row gives name, dtype, shape and the absolute byte range ``[start, end)``
    in the file. Rows are in header order.
    """
    with SafetensorsFile(path) as file:
        header_line = (
            f"{file.path}: header {file.header_length} bytes, "
            f"data starts at byte {LENGTH_FIELD_BYTES + file.header_length}"
        )
        rows = [("name", "dtype", "shape", "bytes [start, end)")]
        for info in file.tensors.values():
            shape_text = "[" + ", ".join(str(dim) for dim in info.shape) + "]"
            rows.append((_printable(info.name), info.dtype, shape_text, f"[{info.start}, {info.end})"))

        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        lines = [header_line]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[3]]
            lines.append("  ".join(cells))

        tensor_count = len(file.tensors)
        data_bytes = sum(info.nbytes for info in file.tensors.values())
        noun = "tensor" if tensor_count == 1 else "tensors"
        lines.append(f"total: {tensor_count} {noun}, {data_bytes} bytes of data")

        if file.metadata:
            lines.append("metadata:")
            for key, value in file.metadata.items():
                lines.append(f"  {_printable(key)}: {_printable(value)}")
    return "\n".join(lines)


def save(path, tensors, metadata=None):
    """Write ``tensors`` and ``metadata`` to a safetensors file atomically.

    The bytes go to a temporary file in the same folder, which is flushed,
    fsynced and renamed over ``path`` with os.replace. A rename never rewrites
    the bytes of the old file, so a reader that still has it mapped keeps seeing
    the old contents. The header is padded with spaces to a multiple of 8 bytes,
    and tensors are laid out by decreasing itemsize, then by name, which keeps
    every tensor aligned. Arrays are written as
    C-contiguous little-endian bytes. Supported dtypes are bool, the signed and
    unsigned integers of 8 to 64 bits, float16, float32 and float64.
    """
    path = pathlib.Path(path)
    header = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        header["__metadata__"] = dict(metadata)

    arrays = []
    offset = 0
    # Widest dtypes first, then by name, as the reference writer orders them:
    # every offset then stays a multiple of its tensor's itemsize.
    def layout_key(name):
        return (-np.asarray(tensors[name]).dtype.itemsize, name) if isinstance(name, str) else (0, "")

    for name in sorted(tensors, key=layout_key):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved for metadata and cannot name a tensor")
        array = np.asarray(tensors[name])
        dtype_name = _NUMPY_TO_SAFETENSORS.get(array.dtype.newbyteorder("="))
        if dtype_name is None:
            supported = ", ".join(str(dtype) for dtype in _NUMPY_TO_SAFETENSORS)
            raise TypeError(f"tensor {name!r} has unsupported dtype {array.dtype}, expected one of {supported}")
        # np.require keeps 0-d arrays 0-d, unlike np.ascontiguousarray.
        array = np.require(array, dtype=SUPPORTED_DTYPES[dtype_name], requirements="C")
        header[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)

    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    temporary_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(len(header_bytes).to_bytes(LENGTH_FIELD_BYTES, "little"))
            file.write(header_bytes)
            for array in arrays:
                file.write(memoryview(array.reshape(-1).view(np.uint8)))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder):
    # Makes the rename durable. Some platforms cannot open or fsync a folder.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _map_file(path, file, file_size):
    try:
        memmap = np.memmap(file, dtype=np.uint8, mode="r", shape=(file_size,))
    except ValueError as error:
        # np.memmap raises ValueError when the file shrank after it was validated.
        raise FormatError(path, f"file changed while it was being opened ({error}): open it again") from None
    return memmap


# ---------------------------------------------------------------- header parsing


def _read_header(path, file, file_size):
    """Read and validate the header and return (header_length, metadata, tensors).

    ``tensors`` maps names to TensorInfo in header order. Raises FormatError for
    any problem, before any tensor data is read.
    """
    if file_size < LENGTH_FIELD_BYTES:
        raise FormatError(
            path,
            f"file is {file_size} bytes long but a safetensors file starts with an 8-byte header length: "
            "the file is truncated or is not a safetensors file",
        )
    header_length = int.from_bytes(_read_exactly(path, file, LENGTH_FIELD_BYTES), "little")
    if header_length < 2:
        raise FormatError(
            path,
            f"header length {header_length} is invalid: a safetensors file starts with a u64 header length "
            "of at least 2",
        )
    if header_length > MAX_HEADER_LENGTH:
        raise FormatError(
            path,
            f"header length {header_length} exceeds the maximum of {MAX_HEADER_LENGTH} bytes that the "
            "reference reader accepts: the length field is corrupt or this is not a safetensors file",
        )
    available = file_size - LENGTH_FIELD_BYTES
    if header_length > available:
        raise FormatError(
            path,
            f"file is truncated: header says {header_length} bytes of header but the file has "
            f"{available} bytes after the length field",
        )

    header = _parse_header_json(path, _read_exactly(path, file, header_length))
    metadata = _validate_metadata(path, header.pop("__metadata__", {}))
    data_start = LENGTH_FIELD_BYTES + header_length
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _validate_entry(path, name, entry, data_start)
    _check_layout(path, tensors, data_start, file_size - data_start)
    return header_length, metadata, tensors


def _read_exactly(path, file, count):
    data = file.read(count)
    if len(data) != count:
        raise FormatError(path, f"file shrank while it was being read: expected {count} more bytes, got {len(data)}")
    return data


class _HeaderJsonError(ValueError):
    """A JSON problem that the standard json module accepts but serde_json rejects."""


def _parse_header_json(path, header_bytes):
    """Decode the header as UTF-8 JSON with serde_json's rules and return the top-level dict."""
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(path, f"header is not valid UTF-8: {error.reason} at byte {error.start} of the header") from None

    if not text.startswith("{"):
        first = text[:1]
        if first.isspace():
            problem = f"header must begin with '{{' but begins with whitespace {first!r}: remove the leading whitespace"
        else:
            problem = f"header must be a JSON object beginning with '{{' but begins with {first!r}"
        raise FormatError(path, problem)

    try:
        header = json.loads(
            text,
            object_pairs_hook=_reject_duplicate_keys,
            parse_int=_parse_json_int,
            parse_float=_parse_json_float,
            parse_constant=_reject_json_constant,
        )
    except _HeaderJsonError as error:
        raise FormatError(path, f"header {error}") from None
    except json.JSONDecodeError as error:
        # Some json messages end in " at" because they expect the position to follow.
        message = error.msg.removesuffix(" at")
        raise FormatError(path, f"header is not valid JSON: {message} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise FormatError(
            path, f"header JSON is nested too deeply: the reference reader accepts at most {MAX_JSON_DEPTH} levels"
        ) from None

    if not isinstance(header, dict):
        raise FormatError(path, f"header must be a JSON object, not {_json_type(header)}")
    _check_strings_and_depth(path, header)
    return header


def _reject_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise _HeaderJsonError(f"has the key {key!r} twice in one object: the format forbids duplicate keys")
        result[key] = value
    return result


def _parse_json_int(text):
    # serde_json reads -0 and integers outside [-2**63, 2**64 - 1] as floats.
    digits = text.lstrip("-")
    if text == "-0" or len(digits) > 20:
        return _parse_json_float(text)
    value = int(text)
    if _I64_MIN <= value <= _U64_MAX:
        return value
    return _parse_json_float(text)


def _parse_json_float(text):
    value = float(text)
    if math.isinf(value):
        raise _HeaderJsonError(f"has the number {_shorten(text)}, which is out of range for a 64-bit float")
    return value


def _reject_json_constant(name):
    raise _HeaderJsonError(f"contains {name}, which is not valid JSON")


def _check_strings_and_depth(path, header):
    """Reject lone UTF-16 surrogates and nesting that serde_json rejects.

    Python's json module accepts a lone surrogate escape such as "\\ud800", but
    serde_json does not.
    """
    stack = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_surrogates(path, value)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise FormatError(
                path,
                f"header JSON is nested more than {MAX_JSON_DEPTH} levels deep, "
                "which the reference reader rejects",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                _check_surrogates(path, key)
                stack.append((item, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in value)


def _check_surrogates(path, text):
    match = _SURROGATE.search(text)
    if match:
        raise FormatError(
            path,
            f"header contains the lone UTF-16 surrogate \\u{ord(match.group()):04x} in a string: "
            "\\u escapes must encode valid Unicode",
        )


def _validate_metadata(path, metadata):
    if not isinstance(metadata, dict):
        raise FormatError(
            path,
            f"__metadata__ must be an object mapping strings to strings, not {_json_type(metadata)}; "
            "omit the key when there is no metadata",
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise FormatError(
                path, f"__metadata__ value of key {key!r} is {_json_type(value)}: metadata values must be strings"
            )
    return metadata


def _validate_entry(path, name, entry, data_start):
    """Validate one tensor entry and return its TensorInfo with absolute offsets."""
    label = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(
            path, f"{label}: entry must be an object with dtype, shape and data_offsets, not {_json_type(entry)}"
        )
    missing = [field for field in _ENTRY_FIELDS if field not in entry]
    if missing:
        noun = "field" if len(missing) == 1 else "fields"
        missing_text = ", ".join(repr(field) for field in missing)
        raise FormatError(path, f"{label}: missing {noun} {missing_text}: each tensor needs dtype, shape and data_offsets")

    dtype = entry["dtype"]
    supported = ", ".join(SUPPORTED_DTYPES)
    if not isinstance(dtype, str):
        raise FormatError(path, f"{label}: dtype must be a string such as \"F32\", not {_json_type(dtype)}")
    if dtype in _UNSUPPORTED_SAFETENSORS_DTYPES:
        raise FormatError(
            path, f"{label}: dtype {dtype} is valid safetensors but not supported by refimpl, expected one of {supported}"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise FormatError(path, f"{label}: unknown dtype {dtype!r}, expected one of {supported}")

    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_non_negative_int(dim) for dim in shape):
        raise FormatError(
            path, f"{label}: shape must be a list of non-negative integers, not {_json_text(shape)}"
        )
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_non_negative_int(x) for x in offsets):
        raise FormatError(
            path,
            f"{label}: data_offsets must be a list of two non-negative integers [begin, end], "
            f"not {_json_text(offsets)}",
        )
    begin, end = offsets
    if begin > end:
        raise FormatError(path, f"{label}: data_offsets [{begin}, {end}] are reversed: begin must not exceed end")

    shape_text = _json_text(shape)
    nonzero_elements = math.prod(dim for dim in shape if dim != 0)
    if nonzero_elements * SUPPORTED_DTYPES[dtype].itemsize > _NUMPY_MAX_BYTES:
        raise FormatError(
            path,
            f"{label}: shape {shape_text} of {dtype} is too large for NumPy: its nonzero dimensions "
            "times the item size exceed 2**63 - 1 bytes",
        )
    needed = math.prod(shape) * _DISK_DTYPES[dtype].itemsize
    if end - begin != needed:
        raise FormatError(
            path,
            f"{label}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape_text} "
            f"of {dtype} needs {needed}",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path, tensors, data_start, data_size):
    """Check that the tensors, sorted by offset, tile the data section exactly."""
    previous_name = None
    cursor = 0
    for info in sorted(tensors.values(), key=lambda info: (info.start, info.end)):
        begin = info.start - data_start
        end = info.end - data_start
        label = f"tensor {info.name!r}: data_offsets [{begin}, {end}]"
        if end > data_size:
            raise FormatError(
                path,
                f"{label} end past the data section, which has {data_size} bytes: "
                "the file is truncated or the offsets are wrong",
            )
        if begin > cursor:
            if previous_name is None:
                where = "at the start of the data section"
            else:
                where = f"after tensor {previous_name!r}, which ends at {cursor}"
            raise FormatError(
                path,
                f"{label} leave a gap of {_count_bytes(begin - cursor)} {where}: "
                "tensors must cover the data section without gaps",
            )
        if begin < cursor:
            raise FormatError(path, f"{label} overlap tensor {previous_name!r}, which ends at {cursor}")
        previous_name = info.name
        cursor = end

    if cursor < data_size:
        trailing = data_size - cursor
        if not tensors:
            problem = f"data section has {_count_bytes(trailing)} but the header lists no tensors"
        else:
            problem = (
                f"data section has {_count_bytes(trailing)} after the last tensor, which ends at {cursor}: "
                "tensors must cover the data section exactly"
            )
        raise FormatError(path, problem)


# ---------------------------------------------------------------- small helpers


def _is_non_negative_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _count_bytes(count):
    return "1 byte" if count == 1 else f"{count} bytes"


def _json_text(value):
    return _shorten(json.dumps(value, separators=(", ", ": ")))


def _shorten(text, limit=80):
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def _printable(text):
    return text if text.isprintable() else repr(text)
