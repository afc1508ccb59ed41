"""Every image the project decodes goes through here: ingest, validation, the shard readers and the
torch-free runtime (``lpt predict``). Only the standard library, numpy and Pillow are imported.

Three rules, each refused with :class:`ImageRefused` (one line, no file name: callers prefix the file):

* **Formats.** Pillow picks a decoder from a file's first bytes, whatever its name says; some decoders run
  other programs (EPS/PostScript runs Ghostscript) or are rarely exercised C code. :func:`open_image`
  passes ``formats=ALLOWED_FORMATS`` to ``Image.open``, so no other decoder is ever instantiated; a file of
  another format is refused by name (``format EPS is not allowed; allowed: PNG, JPEG, ...``), the name found
  from the plugins' signature checks alone (nothing of the file is parsed by them).
* **Size.** ``Image.MAX_IMAGE_PIXELS`` is set to :data:`MAX_IMAGE_PIXELS` on import, and any image with more
  pixels, or a side longer than :data:`MAX_IMAGE_SIDE`, is refused from its header, before a pixel is
  allocated (a 1 x 10,000,000 PNG is 40 bytes on disk).
* **Regular files.** :func:`read_image_file` reads a regular file only: a FIFO, device or socket is refused
  from ``stat`` without opening it (opening a FIFO blocks until a writer appears).

:func:`to_rgb_array` is the one conversion of a decoded image to the HxWx3 uint8 pixels the model sees
(ingest, validation and ``lpt predict`` alike: no train/serve skew).
"""

from __future__ import annotations

import functools
import io
import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "ImageRefused", "DECODE_ERRORS", "decode_error",
           "sniff_format", "file_kind", "read_image_file", "open_image", "to_8bit_gray", "to_rgb_array", "HIGH_BIT_MODES", "UINT16_MODES"]

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
"""Pillow format names the project decodes (PPM covers .ppm/.pgm/.pbm); what the image-folder extensions of
``lpt predict`` name (``lpt.runtime.IMAGE_EXTENSIONS``). Every other format is refused by name."""

MAX_IMAGE_PIXELS = 8192 * 8192
"""Pixels an image may have (67,108,864: 192 MiB as 8-bit RGB); also ``PIL.Image.MAX_IMAGE_PIXELS``."""

MAX_IMAGE_SIDE = 16384
"""Longest side an image may have, whatever its pixel count (a 1 x 10,000,000 image is refused)."""

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # deliberate: Pillow's own check agrees with ours

UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
"""PIL modes of unsigned 16-bit grayscale (16-bit PNG opens as ``I;16``; TIFF as ``I;16``/``I;16B``)."""
HIGH_BIT_MODES = (*UINT16_MODES, "I", "F")

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


class ImageRefused(ValueError):
    """An image refused by policy (format, size, not a regular file); the message does not name the file."""


DECODE_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
"""What Pillow's decoders raise on damaged bytes (found by tests/test_fuzz.py: ``struct.error`` from a
plugin's header parser, ``SyntaxError`` from a broken PNG/GIF, ``EOFError`` from a cut frame, ...). Callers
that decode untrusted bytes catch these and report the file as unreadable, in one line (:func:`decode_error`)."""


def decode_error(err: BaseException) -> str:
    """``not a readable image (Type: message)`` on one line, for an exception of :data:`DECODE_ERRORS`."""
    return f"not a readable image ({type(err).__name__}: {' '.join(str(err).split()) or 'no detail'})"


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a socket``, ... for an ``st_mode`` that is not a regular file (``a special file`` else)."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a regular file; anything else is refused without blocking.

    The file is checked with ``stat`` before it is opened, and again (``fstat``) on the opened descriptor,
    which is opened non-blocking: a FIFO swapped in between cannot block either.

    Raises:
        ImageRefused: a FIFO, socket, device or folder.
        OSError: missing or unreadable.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ImageRefused(f"not a regular file ({file_kind(mode)}): an image must be a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ImageRefused(f"not a regular file ({file_kind(mode)}): an image must be a regular file")
        return fh.read()


def sniff_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature check accepts ``prefix`` (the file's first 16 bytes), or None.

    Only the plugins' ``accept`` functions run (byte comparisons); formats without a signature (TGA, ...)
    are never named.
    """
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            result = accept(prefix) if accept is not None else None
        except DECODE_ERRORS:  # a signature check that needs more bytes than there are (an empty file)
            continue
        if result and not isinstance(result, str):
            return name
    return None


@functools.cache
def _decoders() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (``Image.open`` fails on a name it has no plugin for)."""
    Image.init()
    return tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)


def _refuse_size(image: Image.Image) -> None:
    width, height = image.size
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageRefused(f"{width} x {height} pixels is too large (at most {MAX_IMAGE_SIDE} pixels a side and "
                           f"{MAX_IMAGE_PIXELS:,} pixels)")


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes with the allowed decoders only; nothing is decoded yet (call ``load()``).

    Args:
        data: the whole encoded file.

    Returns:
        The opened (lazy) Pillow image; use it as a context manager.

    Raises:
        ImageRefused: a format outside :data:`ALLOWED_FORMATS`, or more pixels than allowed.
        PIL.UnidentifiedImageError: not an image of any known format (or a damaged allowed one).
    """
    try:
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS: refused below, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_decoders())
    except Image.DecompressionBombError as err:
        raise ImageRefused(f"too large ({err})") from None
    except UnidentifiedImageError:
        found = sniff_format(data[:16])
        if found is not None and found not in ALLOWED_FORMATS:
            raise ImageRefused(f"format {found} is not allowed; allowed: {', '.join(ALLOWED_FORMATS)}") from None
        what = f"a {found} header but data that does not decode" if found else "no known image format"
        raise UnidentifiedImageError(f"cannot identify image data: {what}") from None
    _refuse_size(image)
    return image


def to_8bit_gray(image: Image.Image) -> np.ndarray:
    """An HxW uint8 array from a high-bit-depth grayscale image, by a fixed rule per mode.

    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (unsigned 16 bit, 0..65535): ``v >> 8``, the high byte,
      as Pillow itself reduces 16-bit RGB PNGs; 0 -> 0, 65535 -> 255, monotone.
    * ``I`` (32-bit signed): taken as 16-bit data (what Pillow gives 16-bit files in this mode):
      ``v >> 8``; a value outside 0..65535 has no defined 8-bit value and the image is refused.
    * ``F`` (32-bit float): taken as intensities in [0, 1] (the float-image convention): ``round(v * 255)``;
      a value outside [0, 1] or NaN is refused.

    The rule never depends on an image's own min/max, so equal values give equal pixels across images.

    Raises:
        ValueError: values outside the mode's range (the message says which range).
    """
    arr = np.asarray(image)
    if image.mode in UINT16_MODES:
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if image.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"32-bit integer image with values {lo}..{hi}; only 0..65535 (16-bit data) is "
                             f"defined (convert it to 8 or 16 bit)")
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    if image.mode == "F":
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(f"float image with values outside [0, 1] ({np.nanmin(arr):g}..{np.nanmax(arr):g}); "
                             f"its intensity range is unknown (convert it to 8 or 16 bit)")
        return np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    raise ValueError(f"mode {image.mode} is not a high-bit-depth grayscale mode")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """The HxWx3 uint8 pixels of any decoded image, as training and serving see it.

    * ``RGB``: the pixels as they are.
    * High-bit-depth grayscale (``I;16*``, ``I``, ``F``): :func:`to_8bit_gray`, replicated to 3 channels
      (never Pillow's ``convert("RGB")``, which clips every value above 255 to white).
    * Palette with transparency: through ``RGBA`` (what Pillow asks for), then as below.
    * Anything else (``L``, ``1``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``, ...): Pillow's ``convert("RGB")``
      (grey replicated, palettes expanded, alpha dropped).

    Raises:
        ValueError: high-bit-depth values outside their mode's range (see :func:`to_8bit_gray`).
    """
    if image.mode in HIGH_BIT_MODES:
        return np.repeat(to_8bit_gray(image)[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)

