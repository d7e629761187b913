"""Tests for the safetensors reader and writer, with the ``safetensors`` package (0.8) as oracle.

Where the oracle and the format text disagree, the reader follows the format. Each
such case has its own test, and ``DOCUMENTED_STRICTNESS`` below lists them.
"""

import gc
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import safetensors
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from refimpl.errors import FormatError, RefimplError
from refimpl.safetensors import (
    MAX_HEADER_LENGTH,
    SUPPORTED_DTYPES,
    SafetensorsFile,
    TensorInfo,
    format_inspect,
    load,
    save,
)

NUMPY_DTYPES = [
    np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.float16,
    np.uint32, np.int32, np.float32, np.uint64, np.int64, np.float64,
]

# Problems that refimpl reports for files which safetensors 0.8 loads. Each one
# is forbidden by the format text or outside refimpl's dtype set:
# - duplicate keys: "Duplicate keys are disallowed" (safetensors keeps the last one);
# - leading whitespace: "The header data MUST begin with a { character";
# - "__metadata__": null and a dtype written as {"F32": null}: the format gives
#   __metadata__ as a string-to-string map and dtype as a string;
# - C64 and the F8/F6/F4 dtypes: valid safetensors, not supported by refimpl.
DOCUMENTED_STRICTNESS = (
    "twice in one object: the format forbids duplicate keys",
    "header must begin with '{' but begins with whitespace",
    "__metadata__ must be an object mapping strings to strings, not null",
    "dtype must be a string such as \"F32\", not an object",
    "is valid safetensors but not supported by refimpl",
)


# ---------------------------------------------------------------- helpers


def build_file(header, data=b"", header_length=None, padding=None):
    """Return the bytes of a safetensors file with ``header`` (a dict, str or bytes) and ``data``.

    Without ``padding`` the header is padded with spaces so that the data starts at a
    multiple of 8 bytes, as the reference writer does.
    """
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    if padding is None:
        padding = b" " * (-len(header) % 8)
    header += padding
    length = len(header) if header_length is None else header_length
    return struct.pack("<Q", length) + header + data


def write_file(folder, blob):
    # A fresh name per file: rewriting a file in place under a live mapping is unsafe.
    path = folder / f"{uuid.uuid4().hex}.safetensors"
    path.write_bytes(blob)
    return path


def f32_entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def assert_same_arrays(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert actual[name].shape == expected[name].shape, name
        assert actual[name].tobytes() == expected[name].tobytes(), name
        assert np.array_equal(actual[name], expected[name], equal_nan=actual[name].dtype.kind == "f"), name


def mapped_bytes(file):
    return np.frombuffer(file.mmap, dtype=np.uint8)


def bf16_bits_from_oracle(data):
    """Return {name: uint16 bits} of the BF16 tensors, read with the oracle's core deserializer."""
    result = {}
    for name, entry in safetensors.deserialize(data):
        if entry["dtype"] == "BF16":
            result[name] = np.frombuffer(bytes(entry["data"]), dtype="<u2").reshape(entry["shape"])
    return result


def compare_with_oracle(path):
    """Assert that refimpl and safetensors.numpy.load_file agree on the file at ``path``.

    Both accept it with identical arrays, or both reject it, or the difference is
    one of DOCUMENTED_STRICTNESS, or the oracle fails only because NumPy has no
    bfloat16 (then the BF16 values are checked against the raw bits). Any
    exception from refimpl other than FormatError fails the test.
    """
    try:
        expected = load_file(path)
        oracle_error = None
    except Exception as error:  # SafetensorError, or a NumPy error the oracle lets through
        expected = None
        oracle_error = error
    try:
        actual = load(path)
        our_error = None
    except FormatError as error:
        actual = None
        our_error = error

    if oracle_error is None and our_error is None:
        assert_same_arrays(actual, expected)
    elif oracle_error is None:
        assert any(text in our_error.problem for text in DOCUMENTED_STRICTNESS), our_error.problem
    elif our_error is None:
        assert isinstance(oracle_error, TypeError), oracle_error
        assert "bfloat16" in str(oracle_error)
        bits = bf16_bits_from_oracle(path.read_bytes())
        assert bits
        for name, values in bits.items():
            assert np.array_equal(actual[name].view("<u4"), values.astype("<u4") << 16)
    return our_error


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "refimpl.cli", *args], capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------- valid files from the oracle


def every_dtype_tensors():
    rng = np.random.default_rng(7)
    tensors = {}
    for dtype in NUMPY_DTYPES:
        name = f"t_{np.dtype(dtype).name}"
        if dtype is np.bool_:
            tensors[name] = rng.integers(0, 2, size=(3, 2)).astype(np.bool_)
        else:
            raw = rng.integers(0, 256, size=6 * np.dtype(dtype).itemsize, dtype=np.uint8)
            tensors[name] = raw.view(dtype).reshape(3, 2)
    return tensors


def test_oracle_file_every_dtype(tmp_path):
    path = tmp_path / "every.safetensors"
    save_file(every_dtype_tensors(), path)

    expected = load_file(path)
    with SafetensorsFile(path) as file:
        actual = {name: file.array(name) for name in file.tensors}
        for name, array in actual.items():
            assert not array.flags.writeable, name
            assert np.shares_memory(array, mapped_bytes(file)), name
    assert_same_arrays(actual, expected)


def test_oracle_file_empty_and_scalar(tmp_path):
    tensors = {
        "empty": np.zeros((0,), np.float32),
        "empty_rows": np.zeros((3, 0), np.int64),
        "empty_first": np.zeros((0, 5), np.float16),
        "scalar_f64": np.array(2.5),
        "scalar_bool": np.array(True),
        "scalar_u8": np.array(7, np.uint8),
    }
    path = tmp_path / "edge.safetensors"
    save_file(tensors, path)

    actual = load(path)
    assert_same_arrays(actual, load_file(path))
    assert_same_arrays(actual, tensors)
    for name, array in actual.items():
        assert not array.flags.writeable, name


def test_oracle_file_metadata(tmp_path):
    path = tmp_path / "meta.safetensors"
    metadata = {"format": "np", "note": "ünïcode ✓", "": ""}
    save_file({"w": np.arange(4, dtype=np.float32)}, path, metadata=metadata)

    with SafetensorsFile(path) as file:
        assert file.metadata == metadata
    with safe_open(path, framework="np") as oracle:
        assert oracle.metadata() == metadata


def test_only_empty_tensors_has_no_mapping(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({"a": np.zeros((0, 4), np.float32), "b": np.zeros((2, 0), np.uint8)}, path)

    with SafetensorsFile(path) as file:
        assert file.mmap is None
        assert file.array("a").shape == (0, 4)
        assert file.rows("a", 0, 0).shape == (0, 4)
        assert file.rows("b", 1, 2).shape == (1, 0)
    assert_same_arrays(load(path), load_file(path))


def test_header_only_file(tmp_path):
    path = write_file(tmp_path, build_file({}, padding=b"      "))

    with SafetensorsFile(path) as file:
        assert file.tensors == {}
        assert file.metadata == {}
        assert file.mmap is None
        assert file.header_length == 8
    assert load(path) == {}
    assert load_file(path) == {}


def test_padded_header_accepted(tmp_path):
    header = {"a": f32_entry([2], 0, 8)}
    data = np.array([1.5, -2.0], np.float32).tobytes()
    for padding in [b" ", b"       ", b" " * 64, b"\n\t\r "]:
        # JSON allows all four whitespace characters after the object, and so does the oracle.
        path = write_file(tmp_path, build_file(header, data, padding=padding))
        assert_same_arrays(load(path), load_file(path))


def test_extra_entry_fields_ignored(tmp_path):
    # The oracle ignores unknown fields in a tensor entry, and the format text does not forbid them.
    entry = dict(f32_entry([2], 0, 8), note={"any": [1, "json"]}, scale=0.5)
    path = write_file(tmp_path, build_file({"a": entry}, bytes(8)))

    assert_same_arrays(load(path), load_file(path))


# ---------------------------------------------------------------- BF16, alignment, rows


BF16_BITS = np.array([
    0x3F80,  # 1.0
    0xC000,  # -2.0
    0x7F80,  # +inf
    0xFF80,  # -inf
    0x8000,  # -0.0
    0x0001,  # smallest subnormal, 2**-133
    0x7FC1,  # NaN with a payload
    0x4049,  # 3.140625
], dtype="<u2")


def test_bf16_exact_float32(tmp_path):
    header = {"b": f32_entry([2, 4], 0, 16, dtype="BF16")}
    blob = build_file(header, BF16_BITS.tobytes())
    path = write_file(tmp_path, blob)

    array = load(path)["b"]

    assert array.dtype == np.float32
    assert array.shape == (2, 4)
    assert not array.flags.writeable
    assert np.array_equal(array.reshape(-1).view("<u4"), BF16_BITS.astype("<u4") << 16)
    assert array[0, 0] == 1.0
    assert array[0, 1] == -2.0
    assert array[0, 2] == np.inf
    assert array[1, 1] == np.float32(2.0**-133)
    assert array[1, 3] == 3.140625
    assert np.array_equal(bf16_bits_from_oracle(blob)["b"].reshape(-1), BF16_BITS)


def test_bf16_oracle_numpy_cannot_load(tmp_path):
    # safetensors.numpy has no bfloat16 and fails with TypeError, but refimpl reads it.
    path = write_file(tmp_path, build_file({"b": f32_entry([8], 0, 16, dtype="BF16")}, BF16_BITS.tobytes()))

    with pytest.raises(TypeError, match="bfloat16"):
        load_file(path)
    compare_with_oracle(path)


def test_bf16_unaligned_and_rows(tmp_path):
    header = {"pad": f32_entry([1], 0, 1, dtype="U8"), "b": f32_entry([4, 2], 1, 17, dtype="BF16")}
    path = write_file(tmp_path, build_file(header, b"\x09" + BF16_BITS.tobytes()))

    with SafetensorsFile(path) as file:
        whole = file.array("b")
        middle = file.rows("b", 1, 3)
    expected = (BF16_BITS.astype("<u4") << 16).view(np.float32).reshape(4, 2)
    assert whole.tobytes() == expected.tobytes()
    assert middle.tobytes() == expected[1:3].tobytes()


def test_unaligned_tensor_copied(tmp_path):
    values = np.array([1.25, -3.5], np.float32)
    header = {"odd": f32_entry([3], 0, 3, dtype="U8"), "a": f32_entry([2], 3, 11)}
    path = write_file(tmp_path, build_file(header, b"\x01\x02\x03" + values.tobytes()))

    with SafetensorsFile(path) as file:
        assert file.tensors["a"].start % 4 != 0
        odd = file.array("odd")
        unaligned = file.array("a")
        assert np.shares_memory(odd, mapped_bytes(file))
        assert not np.shares_memory(unaligned, mapped_bytes(file))
        assert unaligned.flags.aligned
        assert not unaligned.flags.writeable
        assert np.array_equal(file.rows("a", 1, 2), values[1:])
    assert_same_arrays(load(path), load_file(path))


def test_aligned_view_is_zero_copy(tmp_path):
    path = tmp_path / "aligned.safetensors"
    weights = np.arange(24, dtype=np.float32).reshape(6, 4)
    save(path, {"w": weights})

    with SafetensorsFile(path) as file:
        view = file.array("w")
        rows = file.rows("w", 2, 5)
        assert np.shares_memory(view, mapped_bytes(file))
        assert np.shares_memory(rows, mapped_bytes(file))
        assert rows.base is not None
    assert np.array_equal(view, weights)
    assert np.array_equal(rows, weights[2:5])
    assert not rows.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 1.0


def test_rows_bounds_and_scalars(tmp_path):
    path = tmp_path / "rows.safetensors"
    save(path, {"w": np.arange(6, dtype=np.int32).reshape(3, 2), "s": np.array(4.0, np.float32)})

    with SafetensorsFile(path) as file:
        assert file.rows("w", 0, 3).shape == (3, 2)
        assert file.rows("w", 3, 3).shape == (0, 2)
        assert file.rows("w", 1, 1).shape == (0, 2)
        for start, stop in [(-1, 2), (0, 4), (2, 1), (4, 4)]:
            with pytest.raises(ValueError, match="out of range"):
                file.rows("w", start, stop)
        with pytest.raises(ValueError, match="0-d"):
            file.rows("s", 0, 1)
        with pytest.raises(TypeError):
            file.rows("w", 0.5, 2)
        with pytest.raises(KeyError, match="missing"):
            file.array("missing")
        assert file.array("s").shape == ()
        assert file.array("s") == 4.0


def test_tensor_info_absolute_offsets(tmp_path):
    path = tmp_path / "info.safetensors"
    save(path, {"a": np.zeros((3, 5), np.float16), "b": np.array(1, np.int64), "c": np.zeros((0, 7), np.float32)})
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    data_start = 8 + header_length

    # Tensors are laid out by decreasing itemsize, then name: b (I64), c (F32), a (F16).
    with SafetensorsFile(path) as file:
        assert file.header_length == header_length
        assert list(file.tensors) == ["b", "c", "a"]
        b, c, a = file.tensors.values()
    assert b == TensorInfo("b", "I64", (), data_start, data_start + 8)
    assert (b.nbytes, b.row_nbytes) == (8, 8)
    assert a == TensorInfo("a", "F16", (3, 5), data_start + 8, data_start + 38)
    assert (a.nbytes, a.row_nbytes) == (30, 10)
    assert (c.nbytes, c.row_nbytes) == (0, 28)


def test_mmap_property_supports_madvise(tmp_path):
    path = tmp_path / "map.safetensors"
    save(path, {"w": np.ones(1024, np.float32)})

    with SafetensorsFile(path) as file:
        assert isinstance(file.mmap, mmap.mmap)
        assert len(file.mmap) == path.stat().st_size
        if hasattr(mmap, "MADV_WILLNEED"):
            file.mmap.madvise(mmap.MADV_WILLNEED)
    assert file.mmap is None


def test_views_outlive_close(tmp_path):
    path = tmp_path / "alive.safetensors"
    save(path, {"w": np.arange(10, dtype=np.float64)})

    arrays = load(path)
    gc.collect()
    assert np.array_equal(arrays["w"], np.arange(10, dtype=np.float64))
    assert not arrays["w"].flags.owndata

    file = SafetensorsFile(path)
    view = file.array("w")
    file.close()
    gc.collect()
    assert view[9] == 9.0
    with pytest.raises(ValueError, match="closed"):
        file.array("w")


def test_supported_dtypes_table():
    assert set(SUPPORTED_DTYPES) == {
        "BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64",
    }
    assert SUPPORTED_DTYPES["BF16"] == np.float32
    assert SUPPORTED_DTYPES["BOOL"] == np.bool_
    assert SUPPORTED_DTYPES["F16"] == np.float16


# ---------------------------------------------------------------- save


def test_save_loads_identically_in_oracle(tmp_path):
    tensors = every_dtype_tensors()
    tensors.update({
        "scalar": np.array(-1.5, np.float32),
        "empty": np.zeros((3, 0), np.float64),
        "big_endian": np.arange(5, dtype=">i4"),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
    })
    metadata = {"format": "np", "created_by": "refimpl"}
    path = tmp_path / "saved.safetensors"

    save(path, tensors, metadata)

    expected = {name: np.require(array, dtype=array.dtype.newbyteorder("<"), requirements="C")
                for name, array in tensors.items()}
    assert_same_arrays(load_file(path), expected)
    assert_same_arrays(load(path), expected)
    with safe_open(path, framework="np") as oracle:
        assert oracle.metadata() == metadata


def test_save_layout_aligned_and_padded(tmp_path):
    path = tmp_path / "layout.safetensors"
    save(path, {"b": np.zeros(3, np.uint8), "a": np.zeros(2, np.float32), "c": np.zeros(1, np.float64)})
    blob = path.read_bytes()
    header_length = int.from_bytes(blob[:8], "little")
    header_text = blob[8:8 + header_length].decode("utf-8")

    assert header_length % 8 == 0
    assert header_text.startswith("{")
    assert header_text.rstrip(" ").endswith("}")
    with SafetensorsFile(path) as file:
        starts = {name: info.start for name, info in file.tensors.items()}
    # Widest itemsize first keeps every offset aligned: c (F64), a (F32), b (U8).
    assert sorted(starts, key=starts.get) == ["c", "a", "b"]
    for name, start in starts.items():
        assert (start - 8 - header_length) % file.tensors[name].row_nbytes == 0 or name == "b"


def test_save_empty_dict(tmp_path):
    path = tmp_path / "nothing.safetensors"
    save(path, {})

    assert load(path) == {}
    assert load_file(path) == {}


def test_save_replaces_without_touching_old_mapping(tmp_path):
    path = tmp_path / "replace.safetensors"
    save(path, {"w": np.full(4, 1.0, np.float32)})
    old = load(path)["w"]

    save(path, {"w": np.full(4, 2.0, np.float32)})

    assert np.array_equal(old, np.full(4, 1.0, np.float32))
    assert np.array_equal(load(path)["w"], np.full(4, 2.0, np.float32))
    assert [entry.name for entry in tmp_path.iterdir()] == ["replace.safetensors"]


def test_save_rejects_bad_input(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match="unsupported dtype"):
        save(path, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="reserved"):
        save(path, {"__metadata__": np.zeros(2, np.float32)})
    with pytest.raises(TypeError, match="metadata"):
        save(path, {"a": np.zeros(2, np.float32)}, {"step": 3})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- differences from the oracle


@pytest.mark.parametrize("header", [
    '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    '{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"\\u0061":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
], ids=["tensor", "metadata_key", "escaped_name"])
def test_duplicate_keys_rejected_unlike_oracle(tmp_path, header):
    # The format states "Duplicate keys are disallowed", but safetensors 0.8 keeps the last one.
    path = write_file(tmp_path, build_file(header, bytes(8)))

    load_file(path)
    with pytest.raises(FormatError, match="twice in one object"):
        load(path)


def test_leading_whitespace_rejected_unlike_oracle(tmp_path):
    # The format states that the header MUST begin with '{', but safetensors 0.8 accepts leading whitespace.
    path = write_file(tmp_path, build_file(' {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)))

    load_file(path)
    with pytest.raises(FormatError, match="begins with whitespace"):
        load(path)


def test_null_metadata_rejected_unlike_oracle(tmp_path):
    # The format gives __metadata__ as a string-to-string map, but safetensors 0.8 reads null as absent.
    path = write_file(tmp_path, build_file({"__metadata__": None, "a": f32_entry([2], 0, 8)}, bytes(8)))

    load_file(path)
    with pytest.raises(FormatError, match="not null"):
        load(path)


def test_dtype_object_rejected_unlike_oracle(tmp_path):
    # serde reads {"F32": null} as the enum variant F32, but the format gives dtype as a string.
    path = write_file(tmp_path, build_file({"a": dict(f32_entry([2], 0, 8), dtype={"F32": None})}, bytes(8)))

    load_file(path)
    with pytest.raises(FormatError, match="dtype must be a string"):
        load(path)


def test_complex64_not_supported(tmp_path):
    # C64 is a safetensors dtype that safetensors.numpy loads; refimpl has no use for it.
    path = write_file(tmp_path, build_file({"a": f32_entry([1], 0, 8, dtype="C64")}, bytes(8)))

    load_file(path)
    with pytest.raises(FormatError, match="C64 is valid safetensors but not supported by refimpl, expected one of BOOL"):
        load(path)


@pytest.mark.parametrize("extra, oracle_accepts", [
    ("[" * 125 + "]" * 125, True),
    ("[" * 126 + "]" * 126, False),
    ('{"k":' * 125 + "1" + "}" * 125, True),
    ('{"k":' * 126 + "1" + "}" * 126, False),
    ("[" * 5000 + "]" * 5000, False),
])
def test_json_nesting_limit_matches_oracle(tmp_path, extra, oracle_accepts):
    # serde_json stops at 128 levels; the header object and the entry are two of them.
    header = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + extra + "}}"
    path = write_file(tmp_path, build_file(header, bytes(8)))

    if oracle_accepts:
        load_file(path)
        assert load(path)["a"].shape == (2,)
    else:
        with pytest.raises(SafetensorError, match="recursion limit"):
            load_file(path)
        with pytest.raises(FormatError, match="nested"):
            load(path)


@pytest.mark.parametrize("number, oracle_accepts", [
    ("1e308", True), ("1e-400", True), ("-0", True), ("9" * 30, True),
    ("1e400", False), ("1" + "0" * 309, False), ("9" * 5000, False), ("NaN", False), ("-Infinity", False),
])
def test_json_numbers_match_oracle(tmp_path, number, oracle_accepts):
    header = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + number + "}}"
    path = write_file(tmp_path, build_file(header, bytes(8)))

    if oracle_accepts:
        load_file(path)
        load(path)
    else:
        with pytest.raises(SafetensorError):
            load_file(path)
        with pytest.raises(FormatError):
            load(path)


@pytest.mark.parametrize("shape, oracle_accepts", [
    ("[-0, 2]", False),  # serde_json reads -0 as a float
    ("[2e0]", False),
    ("[18446744073709551616]", False),  # 2**64 does not fit a u64
    ("[2305843009213693951, 0]", True),  # (2**61 - 1) * 4 bytes fits NumPy's limit
    ("[2305843009213693952, 0]", False),  # 2**61 * 4 bytes does not
    ("[0, 4611686018427387904, 4]", False),
])
def test_shape_limits_match_oracle(tmp_path, shape, oracle_accepts):
    header = '{"a":{"dtype":"F32","shape":' + shape + ',"data_offsets":[0,0]}}'
    path = write_file(tmp_path, build_file(header))

    if oracle_accepts:
        assert load_file(path)["a"].size == 0
        assert load(path)["a"].size == 0
    else:
        with pytest.raises((SafetensorError, ValueError)):
            load_file(path)
        with pytest.raises(FormatError):
            load(path)


@pytest.mark.parametrize("name", ["a\\ud800", "a\\udc00", "a\\ud800\\u0041"])
def test_lone_surrogate_rejected_like_oracle(tmp_path, name):
    header = '{"' + name + '":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = write_file(tmp_path, build_file(header, bytes(8)))

    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(FormatError, match="lone UTF-16 surrogate"):
        load(path)


# ---------------------------------------------------------------- malformed files, by name


def valid_blob():
    return build_file({"a.weight": f32_entry([2, 2], 0, 16)}, bytes(16))


def two_tensors(second_begin, second_end, data_size):
    header = {"a.weight": f32_entry([2, 2], 0, 16), "b.weight": f32_entry([2, 2], second_begin, second_end)}
    return build_file(header, bytes(data_size))


def one_tensor(entry, data_size=16, **extra):
    return build_file(dict({"a.weight": entry}, **extra), bytes(data_size))


# (case id, file bytes, True when safetensors 0.8 also rejects it, expected text of the problem)
MALFORMED = [
    ("truncated_length_field", b"\x40\x00\x00", True,
     "file is 3 bytes long but a safetensors file starts with an 8-byte header length"),
    ("truncated_header", valid_blob()[:30], True,
     "file is truncated: header says"),
    ("header_length_zero", b"\x00" * 8 + valid_blob()[8:], True,
     "header length 0 is invalid: a safetensors file starts with a u64 header length of at least 2"),
    ("header_length_over_limit", struct.pack("<Q", MAX_HEADER_LENGTH + 1) + valid_blob()[8:], True,
     "header length 100000001 exceeds the maximum of 100000000 bytes"),
    ("header_length_beyond_file", struct.pack("<Q", 120) + b"{}" + bytes(30), True,
     "file is truncated: header says 120 bytes of header but the file has 32 bytes after the length field"),
    ("invalid_utf8", build_file(b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)), True,
     "header is not valid UTF-8: invalid start byte at byte 3 of the header"),
    ("invalid_json", build_file('{"a.weight": {"dtype": "F32",', bytes(16)), True,
     "header is not valid JSON: "),
    ("json_array", build_file("[]"), True,
     "header must be a JSON object beginning with '{' but begins with '['"),
    ("duplicate_keys", build_file('{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
                                  '"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}', bytes(16)), False,
     "header has the key 'a.weight' twice in one object"),
    ("unknown_dtype", one_tensor(f32_entry([2, 2], 0, 16, dtype="F128")), True,
     "tensor 'a.weight': unknown dtype 'F128', expected one of BOOL, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, "
     "I64, F64"),
    ("negative_shape", one_tensor(f32_entry([-2, 2], 0, 16)), True,
     "tensor 'a.weight': shape must be a list of non-negative integers, not [-2, 2]"),
    ("float_shape", one_tensor(f32_entry([2.0, 2], 0, 16)), True,
     "tensor 'a.weight': shape must be a list of non-negative integers, not [2.0, 2]"),
    ("bool_shape", one_tensor(f32_entry([True, 4], 0, 16)), True,
     "shape must be a list of non-negative integers, not [true, 4]"),
    ("offsets_reversed", one_tensor(f32_entry([2, 2], 16, 0)), True,
     "tensor 'a.weight': data_offsets [16, 0] are reversed: begin must not exceed end"),
    ("offsets_not_a_pair", one_tensor(f32_entry([2, 2], 0, 16) | {"data_offsets": [0, 16, 16]}), True,
     "data_offsets must be a list of two non-negative integers [begin, end], not [0, 16, 16]"),
    ("offsets_beyond_data", one_tensor(f32_entry([2, 2], 0, 16), data_size=8), True,
     "tensor 'a.weight': data_offsets [0, 16] end past the data section, which has 8 bytes"),
    ("gap", two_tensors(20, 36, 36), True,
     "tensor 'b.weight': data_offsets [20, 36] leave a gap of 4 bytes after tensor 'a.weight', which ends at 16"),
    ("gap_at_start", one_tensor(f32_entry([2, 2], 4, 20), data_size=20), True,
     "leave a gap of 4 bytes at the start of the data section"),
    ("overlap", two_tensors(8, 24, 24), True,
     "tensor 'b.weight': data_offsets [8, 24] overlap tensor 'a.weight', which ends at 16"),
    ("size_mismatch", one_tensor(f32_entry([2, 2], 0, 12), data_size=12), True,
     "tensor 'a.weight': data_offsets [0, 12] span 12 bytes but shape [2, 2] of F32 needs 16"),
    ("trailing_bytes", valid_blob() + b"\x00\x00\x00\x00", True,
     "data section has 4 bytes after the last tensor, which ends at 16"),
    ("data_without_tensors", build_file({}, b"\x00\x00"), True,
     "data section has 2 bytes but the header lists no tensors"),
    ("metadata_non_string_value", one_tensor(f32_entry([2, 2], 0, 16), __metadata__={"step": 3}), True,
     "__metadata__ value of key 'step' is a number: metadata values must be strings"),
    ("metadata_not_object", one_tensor(f32_entry([2, 2], 0, 16), __metadata__=["x"]), True,
     "__metadata__ must be an object mapping strings to strings, not a list"),
    ("entry_not_object", build_file({"a.weight": [2, 2]}), True,
     "tensor 'a.weight': entry must be an object with dtype, shape and data_offsets, not a list"),
    ("missing_field", one_tensor({"dtype": "F32", "shape": [2, 2]}), True,
     "tensor 'a.weight': missing field 'data_offsets'"),
    ("shape_too_large", one_tensor(f32_entry([2**62, 0], 0, 0), data_size=0), True,
     "is too large for NumPy"),
]


@pytest.mark.parametrize("blob, oracle_rejects, problem",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_file(tmp_path, blob, oracle_rejects, problem):
    path = write_file(tmp_path, blob)

    result = run_cli("inspect", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"refimpl: error: {path}: ")
    assert problem in lines[0]

    with pytest.raises(FormatError) as error:
        load(path)
    assert problem in error.value.problem
    assert error.value.path == str(path)

    if oracle_rejects:
        with pytest.raises(Exception):
            load_file(path)
    else:
        load_file(path)  # duplicate keys: see test_duplicate_keys_rejected_unlike_oracle


def test_missing_file_is_one_line_error(tmp_path):
    path = tmp_path / "absent.safetensors"

    with pytest.raises(RefimplError, match="cannot read the file"):
        load(path)
    result = run_cli("inspect", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"refimpl: error: {path}: cannot read the file: No such file or directory"]


# ---------------------------------------------------------------- inspect


def test_inspect_lists_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save(path, {"embed.weight": np.zeros((4, 3), np.float16), "norm.bias": np.zeros(3, np.float32),
                "step": np.array(9, np.int64)}, {"format": "np"})
    with SafetensorsFile(path) as file:
        infos = list(file.tensors.values())

    result = run_cli("inspect", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(path))
    assert lines[1].split() == ["name", "dtype", "shape", "bytes", "[start,", "end)"]
    for info, line in zip(infos, lines[2:5]):
        assert line.startswith(info.name)
        assert f" {info.dtype} " in line
        assert "[" + ", ".join(map(str, info.shape)) + "]" in line
        assert line.endswith(f"[{info.start}, {info.end})")
    assert lines[5] == "total: 3 tensors, 44 bytes of data"
    assert lines[6:] == ["metadata:", "  format: np"]
    assert result.stdout.rstrip("\n") == format_inspect(path)


def test_inspect_escapes_control_characters(tmp_path):
    path = tmp_path / "names.safetensors"
    save(path, {"line\nbreak": np.zeros(1, np.uint8)})

    text = format_inspect(path)

    assert "'line\\nbreak'" in text
    assert len(text.splitlines()) == 4


# ---------------------------------------------------------------- property tests against the oracle


@st.composite
def tensor_dicts(draw, min_tensors=0, max_tensors=4):
    names = draw(st.lists(st.text(max_size=6).filter(lambda name: name != "__metadata__"),
                          min_size=min_tensors, max_size=max_tensors, unique=True))
    tensors = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        count = math.prod(shape)
        if dtype == np.bool_:
            values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
            tensors[name] = np.array(values, dtype=np.bool_).reshape(shape)
        else:
            raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
            tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return tensors


metadata_maps = st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("safetensors_property")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts(), metadata=metadata_maps)
def test_oracle_written_files_read_identically(scratch, tensors, metadata):
    path = write_file(scratch, b"")
    save_file(tensors, path, metadata=metadata)

    # compare_with_oracle and not a plain comparison: see test_oracle_writer_bug_empty_metadata.
    if compare_with_oracle(path) is None:
        with SafetensorsFile(path) as file:
            assert file.metadata == (metadata or {})
    path.unlink()


def test_oracle_writer_bug_empty_metadata(tmp_path):
    # safetensors 0.8 writes the invalid header '{},"__metadata__":{}}' for no tensors
    # and empty metadata. Its own reader rejects that file, and so does refimpl.
    path = tmp_path / "oracle_bug.safetensors"
    save_file({}, path, metadata={})

    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(FormatError, match="not valid JSON: Extra data"):
        load(path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts(), metadata=metadata_maps)
def test_saved_files_read_identically_by_oracle(scratch, tensors, metadata):
    path = scratch / f"{uuid.uuid4().hex}.safetensors"
    save(path, tensors, metadata)

    assert_same_arrays(load_file(path), tensors)
    assert_same_arrays(load(path), tensors)
    path.unlink()


INTERESTING_BYTES = list(b'{}[]",:-. 0123456789eEn\x00\xff\x80')


@st.composite
def corrupted_files(draw):
    blob = bytearray(safetensors.numpy.save(draw(tensor_dicts(min_tensors=1, max_tensors=3)), metadata=draw(metadata_maps)))
    header_end = 8 + int.from_bytes(blob[:8], "little")
    kind = draw(st.sampled_from(["truncate", "overwrite", "digit", "letter", "flip", "append", "length"]))
    # "digit" and "letter" rewrite shapes, offsets and dtype names, and so reach the layout checks.
    digits = [i for i in range(8, header_end) if chr(blob[i]).isdigit()]
    letters = [i for i in range(8, header_end) if chr(blob[i]) in "FIUBC"]
    if kind == "digit" and digits:
        for _ in range(draw(st.integers(1, 2))):
            blob[draw(st.sampled_from(digits))] = draw(st.sampled_from(b"0123456789"))
    elif kind == "letter" and letters:
        blob[draw(st.sampled_from(letters))] = draw(st.sampled_from(b"FIUBC"))
    elif kind == "truncate":
        del blob[draw(st.integers(1, len(blob) - 1)):]
    elif kind == "overwrite":
        for _ in range(draw(st.integers(1, 3))):
            position = draw(st.integers(0, header_end - 1))
            blob[position] = draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
    elif kind == "flip":
        position = draw(st.integers(0, len(blob) - 1))
        blob[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "append":
        blob += draw(st.binary(min_size=1, max_size=16))
    else:
        length = draw(st.integers(0, header_end + 24) | st.integers(0, 2**64 - 1))
        blob[:8] = length.to_bytes(8, "little")
    return bytes(blob)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=corrupted_files())
def test_corrupted_files_match_oracle(scratch, blob):
    path = write_file(scratch, blob)
    compare_with_oracle(path)
    path.unlink()


# Supported names, valid safetensors names that refimpl does not support, and invalid names.
DTYPE_NAMES = list(SUPPORTED_DTYPES) + ["C64", "F8_E4M3", "F8_E5M2", "F4", "f32", "", "F32 "]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)


@st.composite
def perturbed_headers(draw):
    """A header whose entries are valid, then some fields replaced, shifted or extended."""
    entries = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(list(SUPPORTED_DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        itemsize = 2 if dtype == "BF16" else SUPPORTED_DTYPES[dtype].itemsize
        size = math.prod(shape) * itemsize
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        field = draw(st.sampled_from(["none", "dtype", "shape", "data_offsets", "shift", "extra", "drop"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES) | json_values)
        elif field in ("shape", "data_offsets"):
            entry[field] = draw(json_values)
        elif field == "shift":
            index = draw(st.integers(0, 1))
            entry["data_offsets"][index] = max(0, entry["data_offsets"][index] + draw(st.integers(-3, 3)))
        elif field == "extra":
            entry[draw(st.text(max_size=3))] = draw(json_values)
        elif field == "drop":
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        entries[name] = entry
    if draw(st.booleans()):
        entries["__metadata__"] = draw(metadata_maps.filter(lambda value: value is not None) | json_values)
    data_size = offset + draw(st.sampled_from([0, 0, 0, 1, -1, 4]))
    assume(data_size >= 0)
    return json.dumps(entries, allow_nan=False), data_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_and_size=perturbed_headers(), padding=st.sampled_from([b"", b"  ", b"\n"]))
def test_perturbed_headers_match_oracle(scratch, header_and_size, padding):
    header, data_size = header_and_size
    path = write_file(scratch, build_file(header, bytes(data_size), padding=padding))
    compare_with_oracle(path)
    path.unlink()
