"""Property-based fuzzing of the two inputs a user hands the project: params files and image bytes.

Every generated case must end in one of two ways: accepted, or refused with the project's own named error
(``ParamsError``; ``PredictError`` / ``PredictRefused`` for ``lpt predict``; an ``Encoded.error`` line for
ingest). Any other exception is what a user would see as a traceback, and fails the test. Hypothesis runs
derandomised (the same cases on every machine) with a fixed budget of cases per property; the counts are in
docs/reliability.md (``pytest tests/test_fuzz.py --hypothesis-show-statistics`` prints them).
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lpt.config import ParamsError, load_params, parse_params, read_raw
from lpt.data.shards import encode_payload
from lpt.runtime import PredictError, load_image
from conftest import REPO_ROOT

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CASES = 300
"""Examples per property (derandomised: the same ones on every run)."""

FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

DEFAULT_RAW: dict[str, Any] = read_raw(REPO_ROOT / "params.yaml")


# ---------------------------------------------------------------------------------------------- params
def _leaf_paths(raw: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(raw, dict) or not raw:
        return [prefix]
    out: list[tuple[str, ...]] = []
    for key, value in raw.items():
        out += _leaf_paths(value, prefix + (str(key),))
    return out


LEAVES = _leaf_paths(DEFAULT_RAW)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _typo(key: str, data: st.DataObject) -> str:
    if not key:
        return "x"
    i = data.draw(st.integers(0, len(key) - 1))
    return key[:i] + data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_0123456789")) + key[i + 1:]


@FUZZ
@given(data=st.data())
def test_mutated_params_are_accepted_or_refused_by_key_path(data: st.DataObject) -> None:
    """Replace a value (any type, nan/inf, huge ints), delete a key, add an unknown or misspelt key, or
    replace a whole section: ``parse_params`` returns params or raises ``ParamsError``, nothing else."""
    raw = copy.deepcopy(DEFAULT_RAW)
    path = data.draw(st.sampled_from(LEAVES))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    kind = data.draw(st.sampled_from(["value", "delete", "unknown", "typo", "section"]))
    if kind == "value":
        parent[path[-1]] = data.draw(values)
    elif kind == "delete":
        del parent[path[-1]]
    elif kind == "unknown":
        parent[data.draw(st.text(min_size=1, max_size=12))] = data.draw(values)
    elif kind == "typo":
        parent[_typo(path[-1], data)] = parent.pop(path[-1])
    else:
        raw[path[0]] = data.draw(values)
    try:
        parse_params(raw)
    except ParamsError as err:
        assert str(err).strip() and "Traceback" not in str(err)


PARAMS_TEXT = (REPO_ROOT / "params.yaml").read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_params_yaml_text_is_loaded_or_refused_in_one_line(data: st.DataObject, tmp_path_factory) -> None:
    """Byte-level damage to params.yaml (deleted, inserted or replaced bytes, truncation, invalid UTF-8,
    YAML syntax): ``load_params`` returns params or raises ``ParamsError``."""
    text = bytearray(PARAMS_TEXT)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        chunk = data.draw(st.binary(min_size=1, max_size=6) | st.sampled_from(
            [b":", b"- ", b"  ", b"\t", b"{", b"[", b"&a", b"*a", b"!!python/object:os.system", b"\n", b"'", b'"']))
        if kind == "delete":
            del text[i:i + len(chunk)]
        elif kind == "insert":
            text[i:i] = chunk
        elif kind == "replace":
            text[i:i + len(chunk)] = chunk
        else:
            del text[i:]
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_bytes(bytes(text))
    try:
        load_params(path)
    except ParamsError as err:
        assert str(err).strip()


# ---------------------------------------------------------------------------------------------- images
def _image_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = {fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")}


def _png_with_size(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming ``width x height`` (IHDR with a correct CRC), then the seed's rest."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    png = SEEDS["PNG"]
    return png[:8] + chunk + png[8 + 25:]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "random", "header_size", "wrong_magic"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "header_size":
        return _png_with_size(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "wrong_magic":
        return draw(st.sampled_from([b"%!PS-Adobe-3.0 EPSF", b"\x00\x00\x01\x00", b"GIF89a", b"\x89PNG\r\n\x1a\n",
                                     b"BM", b"II*\x00", b"RIFF"])) + bytes(data[8:])
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] = draw(st.integers(0, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@FUZZ
@given(raw=damaged_images(), suffix=st.sampled_from([".png", ".jpg", ".gif", ".txt", ""]))
@example(raw=b"", suffix=".png")  # found by this test: an empty file crashed a plugin's signature check (struct.error)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt TIFF tags before refusing them
def test_damaged_image_bytes_are_decoded_or_refused_by_name(raw: bytes, suffix: str, tmp_path_factory) -> None:
    """Truncated, bit-flipped, padded, random or wrongly named image bytes, and headers claiming any size:
    ``lpt predict``'s loader gives an RGB image or one named ``PredictError``; ingest's encoder gives shard
    bytes or an ``error`` line. Never another exception."""
    path = tmp_path_factory.mktemp("img") / f"x{suffix}"
    path.write_bytes(raw)
    try:
        img = load_image(path)
        assert img.mode == "RGB" and img.width * img.height > 0
    except PredictError as err:
        assert str(path) in str(err)
    encoded = encode_payload(raw)  # never raises: bytes to store, or the reason in one line
    assert (encoded.error is None) == bool(encoded.data), encoded
    if encoded.error is not None:
        assert encoded.error.strip() and "\n" not in encoded.error


def test_the_seeds_themselves_decode() -> None:
    """The fuzzers mutate valid files (a broken seed would only ever exercise the refusal path)."""
    for fmt, raw in SEEDS.items():
        assert encode_payload(raw).error is None, fmt
