"""CIFAR-100 (python version) made long-tailed with the standard CIFAR-100-LT protocol.

``data.cifar100.path`` is ``cifar-100-python.tar.gz`` or a folder holding ``train``/``test``/``meta``
(directly or under ``cifar-100-python/``). Train: class ``i`` keeps ``int(max_per_class * (1/IR)^(i/99))``
images chosen by the LDAM recipe (one seeded ``np.random.shuffle`` per class, first n_i); val takes
``val_per_class`` other images of each class from the same pool (a head class whose count does not fit
beside it is capped: 480 instead of 500 with val_per_class 20). Test: the balanced official 10k.

The official files are Python 2 pickles. ``pickle.loads`` would run whatever callable a crafted file names
(a ``__reduce__`` payload), so they are read with :class:`CifarUnpickler`, which resolves only the globals a
CIFAR pickle contains (numpy's array reconstruction: ``_reconstruct``, ``ndarray``, ``dtype``; and, for
files re-saved by Python 3 at protocol 2, ``_codecs.encode`` restricted to latin-1 text -> bytes) and
refuses every other one before anything is called; dicts, lists, strings, bytes and numbers need no global.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from lpt.data.longtail import carve_pool, longtail_counts
from lpt.data.sources.base import BadItems, IngestError, Item, SourceData

__all__ = ["load", "read_cifar", "CifarUnpickler", "RefusedGlobal", "ALLOWED_GLOBALS"]

MEMBERS = ("train", "test", "meta")

class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referenced a global outside :data:`ALLOWED_GLOBALS` (or called one with refused arguments)."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for ``_codecs.encode``: Python 3 pickles ``bytes`` at protocol <= 2 as
    ``_codecs.encode(str, 'latin1')``; any other use of it is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedGlobal(f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text -> bytes")
    return text.encode("latin-1")


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own array reconstructor, whatever its module
ALLOWED_GLOBALS = {
    # the official (Python 2, numpy 1) files reference exactly these three
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # the same objects as numpy 2 names them, and bytes as Python 3 writes them at protocol 2
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("_codecs", "encode"): _latin1_bytes,
}
"""``(module, name) -> object``: the only globals a CIFAR pickle may reference."""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; any other global raises :class:`RefusedGlobal`.

    Every callable a pickle can invoke (``REDUCE``, ``NEWOBJ``, ``BUILD`` on a class, extension codes) is
    first looked up through :meth:`find_class`, so nothing outside the list can run. Persistent ids are
    refused by the base class.
    """

    def find_class(self, module: str, name: str):
        """Return the allowed object for ``module.name`` or refuse it."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refused global {module}.{name}") from None


def _read_members(path: Path) -> dict[str, dict]:
    """Unpickle train/test/meta from the tarball or folder (pickles with bytes keys)."""
    found: dict[str, dict] = {}
    if path.is_file():
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in MEMBERS:
                        found[name] = _unpickle(tar.extractfile(member).read(), f"{path}:{member.name}")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise IngestError(f"{path}: not a readable CIFAR-100 tarball ({err})") from None
    elif path.is_dir():
        base = path / "cifar-100-python" if (path / "cifar-100-python").is_dir() else path
        for name in MEMBERS:
            if (base / name).is_file():
                found[name] = _unpickle((base / name).read_bytes(), str(base / name))
    else:
        raise IngestError(f"{path}: data.cifar100.path not found (cifar-100-python.tar.gz or its folder)")
    missing = [m for m in MEMBERS if m not in found]
    if missing:
        raise IngestError(f"{path}: CIFAR-100 {', '.join(missing)} not found inside")
    return found


def _unpickle(raw: bytes, where: str) -> dict:
    """Load one CIFAR pickle with :class:`CifarUnpickler` (strings of Python 2 files come back as bytes).

    Raises:
        IngestError: naming ``where`` and the refused global, or why the bytes are not a CIFAR pickle.
    """
    try:
        obj = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedGlobal as err:
        raise IngestError(f"{where}: {err}: a CIFAR pickle holds only dicts, lists, strings, bytes, numbers and "
                          f"numpy arrays (the file may be crafted to run code; not loaded)") from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes can fail in any way; all mean "not a CIFAR pickle"
        raise IngestError(f"{where}: not a CIFAR pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise IngestError(f"{where}: not a CIFAR pickle (a {type(obj).__name__}, expected a dict)")
    return obj


def _images_labels(d: dict, where: str, num_classes: int, bad: BadItems) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [k for k in (b"data", b"fine_labels") if k not in d]
    if missing:
        raise IngestError(f"{where}: missing key {missing[0]!r} (expected b'data' and b'fine_labels')")
    data, raw_labels = d[b"data"], d[b"fine_labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise IngestError(f"{where}: b'data' is {type(data).__name__} {getattr(data, 'dtype', '')}, "
                          f"expected a uint8 numpy array")
    if not isinstance(raw_labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer))
                                                                 and not isinstance(v, bool) for v in raw_labels):
        raise IngestError(f"{where}: b'fine_labels' must be a list of integers")
    labels = np.asarray(raw_labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise IngestError(f"{where}: data has shape {data.shape}, expected N x 3072")
    n = min(len(data), len(labels))
    if len(data) != len(labels):
        bad(where, f"{len(labels)} labels for {len(data)} images; records from {n} have no partner",
            n=abs(len(data) - len(labels)))
    images = data[:n].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = labels[:n]
    for i in np.where((labels < 0) | (labels >= num_classes))[0]:
        bad(f"{where}: record {i}", f"unknown label {labels[i]} (expected 0..{num_classes - 1})")
    keep = np.where((labels >= 0) & (labels < num_classes))[0]
    return images, labels, keep


def read_cifar(path: Path, bad: BadItems):
    """``(class_names, (train images, labels, valid idx), (test images, labels, valid idx))``."""
    found = _read_members(Path(path))
    raw_names = found["meta"].get(b"fine_label_names", [])
    if not isinstance(raw_names, list) or not all(isinstance(n, (bytes, str)) for n in raw_names):
        raise IngestError(f"{path}:meta: b'fine_label_names' must be a list of strings")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in raw_names]
    if not names:
        raise IngestError(f"{path}: meta has no b'fine_label_names'")
    train = _images_labels(found["train"], f"{path}:train", len(names), bad)
    test = _images_labels(found["test"], f"{path}:test", len(names), bad)
    return names, train, test


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """CIFAR-100-LT splits (IR from ``data.imbalance_ratio``: 100, 50 or 10 in the literature)."""
    names, (x, y, ok), (tx, ty, tok) = read_cifar(cfg.cifar100.path, bad)
    pool_labels = np.where(np.isin(np.arange(len(y)), ok), y, -1)  # invalid records never selected
    counts = longtail_counts(len(names), cfg.max_per_class, cfg.imbalance_ratio)
    train_idx, val_idx = carve_pool(pool_labels, len(names), counts, cfg.val_per_class, seed)
    splits = {}
    for code, (split, xs, ys, idx, origin) in enumerate((("train", x, y, train_idx, "train"), ("val", x, y, val_idx, "train"),
                                                        ("test", tx, ty, tok, "test"))):
        order = idx[np.random.default_rng([seed, code]).permutation(len(idx))]
        splits[split] = [Item(f"cifar100/{origin}[{i}]", int(ys[i]), xs[i]) for i in order]
    return SourceData(class_names=names, splits=splits, image_size=(32, 32))
