"""Loaders for files the user downloaded: CIFAR-10 python pickles (through an allow-listing unpickler),
MNIST / Fashion-MNIST idx files, image folders, ``.npy`` / ``.npz`` arrays."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..lattice import uint8_to_float
from .dataset import ArrayDataset

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# CIFAR-10 python pickles
# --------------------------------------------------------------------------------------------


def _safe_codecs_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles (protocol <= 2) store bytes as _codecs.encode(str, "latin1").
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("refusing _codecs.encode of a non-string")
    return obj.encode("latin1")


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's multiarray._reconstruct
_NP_SCALAR = np.int64(0).__reduce__()[0]  # numpy's multiarray.scalar
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy's numeric._frombuffer (pickle protocol 5)

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _safe_codecs_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays/scalars and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("persistent id")


def safe_unpickle(path: PathLike, what: str = "pickle file") -> Any:
    """Unpickle ``path`` allowing only numpy arrays, numpy scalars and builtin containers.

    Any other global (functions, classes, ``os.system``, ...) is refused *before* it is called:
    ``ValueError`` naming the file and the refused object.  Python 2 pickles (such as the
    CIFAR-10 batches) are read with ``encoding="bytes"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise ValueError(
            f"refusing to load {path}: the pickle asks for {e}, which a {what} never contains "
            "(only numpy arrays, lists and dicts are allowed). The file is not a genuine data file "
            "and may be malicious; re-download it from the original source."
        ) from None
    except Exception as e:  # truncated/corrupt pickles raise many different exception types
        raise ValueError(
            f"cannot read {path}: the {what} is truncated or corrupt ({type(e).__name__}: {e}); "
            "re-download and re-extract it"
        ) from None


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_dir(root: PathLike) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"CIFAR-10 directory not found: {root}. Download {_CIFAR_URL}, extract it and pass the "
            "'cifar-10-batches-py' directory (or its parent) as root"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 root must be a directory, got file {root}")
    sub = root / "cifar-10-batches-py"
    if not (root / "test_batch").exists() and not (root / "data_batch_1").exists() and sub.is_dir():
        return sub
    return root


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 batch file missing: {path}. The directory must hold data_batch_1..5 and "
            f"test_batch from {_CIFAR_URL} (extract the archive without renaming files)"
        )
    d = safe_unpickle(path, what="CIFAR-10 batch")
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a pickled dict, got {type(d).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch: keys {sorted(map(str, d))} lack 'data'/'labels' "
            "(use the 'CIFAR-10 python version' archive)"
        )
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(labels)
    except Exception:  # noqa: BLE001 - any conversion problem is a format problem
        labels = np.asarray([], dtype=object)
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: 'labels' must be {data.shape[0]} integers (one per image), got "
            f"{labels.dtype} array of shape {labels.shape}; the file is corrupt"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in 0..9, got range {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 python batches: ``uint8`` images ``(N, 3, 32, 32)`` and ``int64`` labels.

    ``root`` is the extracted ``cifar-10-batches-py`` directory or its parent.  ``"train"``
    concatenates ``data_batch_1`` .. ``data_batch_5`` in that order, ``"test"`` is
    ``test_batch``.  Each batch's ``b"data"`` rows (3072 bytes, row-major ``C, H, W``) are
    reshaped to ``(3, 32, 32)`` in file order.  Files are read through :func:`safe_unpickle`.
    """
    if split not in _CIFAR_FILES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose 'train' or 'test'")
    base = _cifar_dir(root)
    parts = [_read_cifar_batch(base / name) for name in _CIFAR_FILES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cifar10(root: PathLike, split: str = "train", *, hflip: bool = False, flip_seed: int = 0) -> ArrayDataset:
    """CIFAR-10 ``split`` as an :class:`ArrayDataset` of ``(3, 32, 32)`` images in ``[-1, 1]``
    with labels 0..9 (see :func:`load_cifar10`)."""
    x, y = load_cifar10(root, split)
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), hflip=hflip, flip_seed=flip_seed)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Read one idx file (plain or gzip-compressed, detected from the content) into a numpy
    array in native byte order.

    The header is a big-endian 32-bit magic number ``0x0000TTNN`` (``TT`` the element type,
    e.g. ``0x08`` = uint8; ``NN`` the number of dimensions), then ``NN`` big-endian 32-bit
    sizes, then the data.  MNIST images have magic ``0x00000803``, labels ``0x00000801``.
    With ``expected_magic`` a different magic number raises ``ValueError``; so do truncated or
    over-long files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(
                f"cannot decompress {path}: the gzip file is truncated or corrupt ({e}); re-download it"
            ) from None
    if len(raw) < 4:
        raise ValueError(
            f"{path} is truncated: {len(raw)} bytes, too short for an idx header; re-download it"
        )
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: wrong magic number 0x{magic:08X}, expected 0x{expected_magic:08X}; this is not the "
            "expected idx file (images 0x00000803, labels 0x00000801) - check the file name and that it "
            "was fully downloaded/decompressed"
        )
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: 0x{magic:08X} is not a valid idx magic number; this is not an idx file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its header; re-download it")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        problem = "truncated" if got < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {problem}: header shape {shape} needs {expected} data bytes, found {got}; "
            "re-download the file"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx(root: Path, prefix: str, kind: str, idx_n: int) -> Path:
    names = [f"{prefix}-{kind}-idx{idx_n}-ubyte", f"{prefix}-{kind}.idx{idx_n}-ubyte"]
    dirs = [root, root / "raw"]
    tried = []
    for d in dirs:
        for name in names:
            for suffix in ("", ".gz"):
                p = d / (name + suffix)
                tried.append(p)
                if p.is_file():
                    return p
    raise FileNotFoundError(
        f"MNIST-format file {names[0]}[.gz] not found under {root} (looked for: "
        f"{', '.join(str(t) for t in tried[:4])}, ...). Put the four idx files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz) in root"
    )


def load_mnist(root: PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read MNIST-format idx files (MNIST, Fashion-MNIST, ...): ``uint8`` images
    ``(N, 1, H, W)`` and ``int64`` labels, in file order.

    ``root`` holds (directly or in ``root/raw``) ``{train,t10k}-images-idx3-ubyte`` and
    ``{train,t10k}-labels-idx1-ubyte``, each plain or ``.gz`` (``.idx3-ubyte`` spellings are
    accepted too).  ``split`` is ``"train"`` or ``"test"``.
    """
    if split not in _MNIST_PREFIX:
        raise ValueError(f"unknown MNIST split {split!r}; choose 'train' or 'test'")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"MNIST directory not found: {root}. Pass the directory holding the downloaded idx files as root"
        )
    prefix = _MNIST_PREFIX[split]
    img_path = _find_idx(root, prefix, "images", 3)
    lab_path = _find_idx(root, prefix, "labels", 1)
    images = read_idx(img_path, expected_magic=0x00000803)
    labels = read_idx(lab_path, expected_magic=0x00000801)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels; "
            "the files do not belong together (mixed splits or datasets?)"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def mnist(root: PathLike, split: str = "train", *, hflip: bool = False, flip_seed: int = 0) -> ArrayDataset:
    """MNIST ``split`` as an :class:`ArrayDataset` of ``(1, 28, 28)`` images in ``[-1, 1]``
    (see :func:`load_mnist`)."""
    x, y = load_mnist(root, split)
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), hflip=hflip, flip_seed=flip_seed)


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the four idx ``.gz`` files."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST's ten class names (index = label)."""


def fashion_mnist(
    root: PathLike | None = None, split: str = "train", *, hflip: bool = False, flip_seed: int = 0
) -> ArrayDataset:
    """Fashion-MNIST ``split`` (``"train"``: 60,000, ``"test"``: 10,000 images ``(1, 28, 28)`` in [-1, 1]),
    with the ten class names as ``dataset.classes``. Same idx files as MNIST (see :func:`load_mnist`).

    ``root`` defaults to :data:`FASHION_MNIST_ROOT`, where ``apt-get install dataset-fashion-mnist``
    (Debian's archive) puts the files; a missing folder raises one ``FileNotFoundError`` naming the package
    and ``root`` (``data.root=`` on the command line).
    """
    where = Path(root if root is not None else FASHION_MNIST_ROOT).expanduser()
    if not where.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory not found: {where}. Install it with `apt-get install "
            "dataset-fashion-mnist` (Debian's archive, puts the idx files in "
            f"{FASHION_MNIST_ROOT}) or pass the folder holding the four idx files as root "
            "(data.root=... on the command line)"
        )
    x, y = load_mnist(where, split)
    return ArrayDataset(
        torch.from_numpy(x),
        torch.from_numpy(y),
        hflip=hflip,
        flip_seed=flip_seed,
        classes=FASHION_MNIST_CLASSES,
    )


# --------------------------------------------------------------------------------------------
# folder of images
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def load_image_folder(
    root: PathLike,
    *,
    labels_from_subfolders: bool = False,
    mode: str = "RGB",
    size: int | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Read every image file (``.png .jpg .jpeg .bmp``, any case) under ``root`` with Pillow.

    Files are found recursively (hidden files/folders skipped) and ordered by their relative
    POSIX path.  Each is converted to ``mode`` (``"RGB"`` -> 3 channels, ``"L"`` -> 1 channel);
    16-bit and float images are refused rather than silently clipped.  All images must have
    the same size unless ``size=(H, W)`` (or an int) is given, which resizes with bicubic
    filtering.

    With ``labels_from_subfolders=True`` each immediate subfolder of ``root`` is a class (class
    index = position in the sorted folder names) and images directly in ``root`` are an error.

    Returns ``(images uint8 (N, C, H, W), labels int64 (N,) or None, class names or None)``.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {root}. Pass an existing directory of images as root"
        )
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if size is not None:
        size_hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(size_hw) != 2 or min(size_hw) <= 0:
            raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p.relative_to(root))
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; check the path"
        )
    classes: list[str] | None = None
    labels: np.ndarray | None = None
    if labels_from_subfolders:
        top = [p for p in files if p.parent == root]
        if top:
            raise ValueError(
                f"labels_from_subfolders=True but {top[0]} lies directly in {root}; put every image in a "
                "class subfolder (root/<class name>/...) or set labels_from_subfolders=False"
            )
        class_of = [p.relative_to(root).parts[0] for p in files]
        classes = sorted(set(class_of))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[c] for c in class_of], dtype=np.int64)

    arrays, first = [], None
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                if im.mode in ("I", "F") or im.mode.startswith("I;"):
                    raise ValueError(
                        f"{p}: {im.mode!r} (16-bit or float) images are not supported; convert them to "
                        "8-bit first"
                    )
                im = im.convert(mode)
                if size is not None and im.size != (size_hw[1], size_hw[0]):
                    im = im.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(
                f"cannot read image {p}: the file is truncated or corrupt ({e}); remove or replace it"
            ) from None
        if first is None:
            first = (p, a.shape)
        elif a.shape != first[1]:
            raise ValueError(
                f"mixed image sizes: {p} is {a.shape[1]}x{a.shape[0]} but {first[0]} is "
                f"{first[1][1]}x{first[1][0]} (width x height); resize the images to one size or pass "
                "size=(H, W)"
            )
        arrays.append(a)
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), labels, classes


def image_folder(
    root: PathLike,
    *,
    labels_from_subfolders: bool = False,
    mode: str = "RGB",
    size: int | Sequence[int] | None = None,
    hflip: bool = False,
    flip_seed: int = 0,
) -> ArrayDataset:
    """A folder of images as an :class:`ArrayDataset` in ``[-1, 1]`` (see
    :func:`load_image_folder`); unlabelled folders get label ``-1``, ``dataset.classes`` holds
    the class names."""
    x, y, classes = load_image_folder(
        root, labels_from_subfolders=labels_from_subfolders, mode=mode, size=size
    )
    return ArrayDataset(
        torch.from_numpy(x),
        None if y is None else torch.from_numpy(y),
        hflip=hflip,
        flip_seed=flip_seed,
        classes=classes,
    )


# --------------------------------------------------------------------------------------------
# .npy / .npz arrays
# --------------------------------------------------------------------------------------------


def _np_load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise ValueError(
                    f"{path} is neither a .npy nor a .npz file (no NumPy header); save it with np.save or "
                    "np.savez"
                )
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return {"": np.load(path, allow_pickle=False)}
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(
                f"{path} holds Python object arrays, which are never unpickled; save plain numeric arrays "
                "(np.save / np.savez with uint8 or float data)"
            ) from None
        raise ValueError(
            f"cannot read {path}: the file is truncated or corrupt ({e}); re-create it"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(
            f"cannot read {path}: the file is truncated or corrupt ({e}); re-create it"
        ) from None


def _select(arrays: dict[str, np.ndarray], key: str | None, path: Path, what: str) -> np.ndarray:
    if "" in arrays:  # a .npy file
        if key is not None:
            raise ValueError(f"{path} is a single .npy array; {what} key={key!r} only applies to .npz files")
        return arrays[""]
    if key is None:
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        raise ValueError(f"{path} holds several arrays {sorted(arrays)}; choose one with key=")
    if key not in arrays:
        raise ValueError(f"{path} has no array {key!r} ({what}); available: {sorted(arrays)}")
    return arrays[key]


def _prepare_images(
    a: np.ndarray, path: PathLike, value_range: Sequence[float] | None, layout: str
) -> Tensor:
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{path}: image arrays must be integer or float, got dtype {a.dtype}")
    if a.ndim not in (3, 4):
        raise ValueError(
            f"{path}: wrong rank: an image array must be (N, H, W) or (N, C, H, W) / (N, H, W, C), got "
            f"shape {a.shape}; reshape it (for (N, D) point data use kind='vectors')"
        )
    if a.shape[0] == 0 or a.size == 0:
        raise ValueError(f"{path}: the array is empty (shape {a.shape})")
    if a.ndim == 3:
        a = a[:, None]
    else:
        if layout == "auto":
            ch = (1, 3, 4)
            first, last = a.shape[1] in ch, a.shape[3] in ch
            if first == last:
                raise ValueError(
                    f"{path}: cannot tell channels-first from channels-last for shape {a.shape}; pass "
                    "layout='NCHW' or layout='NHWC'"
                )
            layout = "NCHW" if first else "NHWC"
        if layout == "NHWC":
            a = a.transpose(0, 3, 1, 2)
        elif layout != "NCHW":
            raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    is_int = a.dtype.kind in "iu"
    if not is_int and not np.isfinite(a).all():
        raise ValueError(f"{path}: the array contains NaN or inf values; clean the data before loading")
    if value_range is None:
        lo, hi = (0.0, 255.0) if is_int else (-1.0, 1.0)
    else:
        if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        lo, hi = float(value_range[0]), float(value_range[1])
    amin, amax = float(a.min()), float(a.max())
    tol = 1e-6 * (hi - lo)
    if amin < lo - tol or amax > hi + tol:
        hint = (
            "integer arrays must hold 8-bit values 0..255"
            if is_int and value_range is None
            else "pass value_range=[0, 1] for data in [0, 1], [0, 255] for 8-bit values stored as floats"
        )
        raise ValueError(
            f"{path}: values span [{amin:.6g}, {amax:.6g}], outside value_range [{lo:g}, {hi:g}]; {hint}"
        )
    if is_int and (lo, hi) == (0.0, 255.0):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    return ((x - lo) * (2.0 / (hi - lo)) - 1.0).clamp(-1.0, 1.0).to(torch.float32)


def _prepare_vectors(a: np.ndarray, path: PathLike, value_range: Sequence[float] | None) -> Tensor:
    if value_range is not None:
        raise ValueError("value_range only applies to kind='images'; vectors are returned unscaled")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{path}: vector arrays must be integer or float, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(
            f"{path}: wrong rank: kind='vectors' needs a non-empty (N, D) array, got shape {a.shape}"
        )
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{path}: the array contains NaN or inf values; clean the data before loading")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _load_array_raw(
    path: PathLike,
    key: str | None,
    labels_key: str | None,
    value_range: Sequence[float] | None,
    layout: str,
    kind: str,
) -> tuple[Tensor, Tensor | None]:
    path = Path(path).expanduser()
    if kind not in ("images", "vectors"):
        raise ValueError(f"kind must be 'images' or 'vectors', got {kind!r}")
    arrays = _np_load(path)
    a = _select(arrays, key, path, "data")
    x = (
        _prepare_images(a, path, value_range, layout)
        if kind == "images"
        else _prepare_vectors(a, path, value_range)
    )
    labels = None
    if labels_key is not None:
        lab = _select(arrays, labels_key, path, "labels")
        if lab.dtype.kind not in "iu" or lab.shape != (x.shape[0],):
            raise ValueError(
                f"{path}: labels {labels_key!r} must be {x.shape[0]} integers, "
                f"got {lab.dtype} of shape {lab.shape}"
            )
        labels = torch.from_numpy(lab.astype(np.int64))
    return x, labels


def load_array(
    path: PathLike,
    *,
    key: str | None = None,
    value_range: Sequence[float] | None = None,
    layout: str = "auto",
    kind: str = "images",
) -> Tensor:
    """Load a ``.npy`` / ``.npz`` array (never unpickling) as a float tensor.

    ``kind="images"`` (default): the array is ``(N, H, W)`` (one channel added),
    ``(N, C, H, W)`` or ``(N, H, W, C)`` (``layout="auto"`` decides by which axis has 1, 3 or 4
    entries; pass ``"NCHW"``/``"NHWC"`` when ambiguous).  Value rule: the stored values must lie
    in ``value_range = (low, high)`` and are mapped linearly onto ``[-1, 1]``.  Default range:
    ``(0, 255)`` for integer arrays (8-bit images, mapped by ``k / 127.5 - 1``) and ``(-1, 1)``
    for float arrays (used as is); use ``value_range=(0, 1)`` for float data in ``[0, 1]``.
    Out-of-range values, NaN/inf or a rank other than 3/4 raise ``ValueError``.

    ``kind="vectors"``: a finite ``(N, D)`` array returned unscaled as float32.

    ``key`` picks the array of an ``.npz`` holding several.
    """
    x, _ = _load_array_raw(path, key, None, value_range, layout, kind)
    return uint8_to_float(x) if x.dtype == torch.uint8 else x


def numpy_file(
    path: PathLike,
    *,
    key: str | None = None,
    labels_key: str | None = None,
    value_range: Sequence[float] | None = None,
    layout: str = "auto",
    kind: str = "images",
    hflip: bool = False,
    flip_seed: int = 0,
) -> ArrayDataset:
    """A ``.npy``/``.npz`` array as an :class:`ArrayDataset` (rules in :func:`load_array`);
    ``labels_key`` names an integer ``(N,)`` label array in the same ``.npz``.  8-bit integer
    images are kept as ``uint8`` so ``dataset.uint8()`` is exact."""
    x, labels = _load_array_raw(path, key, labels_key, value_range, layout, kind)
    return ArrayDataset(x, labels, hflip=hflip, flip_seed=flip_seed)
