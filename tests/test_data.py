"""Tests for sdediff.data: toy distributions, digits, file formats, safety, hydra configs."""

from __future__ import annotations

import ast
import gzip
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdediff import data as D
from sdediff.data import toy as toy_data

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------------------------
# writers for the real formats
# --------------------------------------------------------------------------------------------


def _cifar_dict(data: np.ndarray, labels: list[int], tag: bytes) -> dict:
    return {
        b"batch_label": tag,
        b"labels": list(labels),
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
    }


def _py2_cpickle(d: dict) -> bytes:
    """Hand-assemble a pickle the way Python 2's cPickle (protocol 2) wrote the CIFAR-10
    batches: byte strings as SHORT_BINSTRING/BINSTRING, arrays via numpy.core.multiarray."""

    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def integer(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    def arr(a: np.ndarray) -> bytes:
        assert a.dtype == np.uint8 and a.ndim == 2
        out = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        out += b"(K\x01" + integer(a.shape[0]) + integer(a.shape[1]) + b"\x86"
        out += b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|")
        out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        return out + b"\x89" + s(a.tobytes()) + b"tb"

    def value(v) -> bytes:
        if isinstance(v, bytes):
            return s(v)
        if isinstance(v, np.ndarray):
            return arr(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        if isinstance(v, int):
            return integer(v)
        raise TypeError(type(v))

    return b"\x80\x02}(" + b"".join(s(k) + value(v) for k, v in d.items()) + b"u."


def write_cifar(root: Path, sizes=(3, 2, 4, 1, 2), test_size=3, seed=0, style="py3") -> dict:
    """Write a small cifar-10-batches-py directory; return the arrays written."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, list(sizes) + [test_size]):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        d = _cifar_dict(data, labels, name.encode())
        with open(base / name, "wb") as f:
            if style == "py2":
                f.write(_py2_cpickle(d))
            else:
                pickle.dump(d, f, protocol=2 if style == "py3-proto2" else pickle.HIGHEST_PROTOCOL)
        written[name] = (data, labels)
    return written


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    raw += arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist(root: Path, *, gz: bool, n_train=5, n_test=3, hw=(28, 28), seed=0, dotted=False) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n).astype(np.uint8)
        sep = "." if dotted else "-"
        sfx = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images{sep}idx3-ubyte{sfx}", imgs, gz=gz)
        write_idx(root / f"{prefix}-labels{sep}idx1-ubyte{sfx}", labs, gz=gz)
        out[prefix] = (imgs, labs)
    return out


# --------------------------------------------------------------------------------------------
# toy 2-D data and mixtures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", D.TOY2D_NAMES)
def test_toy2d_shape_seed_and_finite(name):
    a = D.toy2d(name, 257, seed=3)
    b = D.toy2d(name, 257, seed=3)
    c = D.toy2d(name, 257, seed=4)
    assert a.shape == (257, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(D.toy2d(name, 10, seed=g1), D.toy2d(name, 10, seed=g2))
    assert D.toy2d(name, 0).shape == (0, 2)
    assert D.toy2d(name, 5, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("name", D.TOY2D_NAMES)
def test_toy2d_documented_scaling(name):
    # documented: centred, average per-coordinate variance 1 (fixed constants, not per-sample)
    x = D.toy2d(name, 200_000, seed=1, dtype=torch.float64)
    assert x.mean(0).abs().max() < 0.02
    assert abs(x.var(0).mean().item() - 1.0) < 0.02
    # fixed constants, not per-sample standardisation: a small draw is not exactly centred
    assert D.toy2d(name, 5, seed=1, dtype=torch.float64).mean(0).abs().max() > 1e-6


def test_toy2d_shapes_are_the_documented_ones():
    # checkerboard: only squares with (row + col) even of the 4x4 board are occupied
    raw = D.toy2d("checkerboard", 5000, seed=0, dtype=torch.float64) * math.sqrt(4 / 3)
    cells = torch.floor(raw + 2.0)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert raw.abs().max() <= 2.0
    # rings: radii cluster around 1, 2, 3, 4 (in raw units)
    scale = math.sqrt((1 + 4 + 9 + 16) / 4 / 2 + 0.08**2)
    r = (D.toy2d("rings", 4000, seed=0, dtype=torch.float64) * scale).norm(dim=1)
    assert (r - r.round()).abs().max() < 0.5
    assert set(r.round().long().tolist()) == {1, 2, 3, 4}
    # eight gaussians: 8 clusters at equally spaced angles
    x = D.toy2d("eight_gaussians", 4000, seed=0, dtype=torch.float64)
    k = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)) % 8
    assert torch.bincount(k.long(), minlength=8).min() > 350


def test_toy2d_unknown_name_lists_names():
    with pytest.raises(ValueError) as e:
        D.toy2d("spiral_galaxy", 10)
    for name in D.TOY2D_NAMES:
        assert name in str(e.value)


class _FakeMixture:
    """Any object with .sample(n, generator=...) works as a mixture."""

    def __init__(self, means):
        self.means = torch.as_tensor(means, dtype=torch.float64)

    def sample(self, n, generator=None):
        k = torch.randint(0, len(self.means), (n,), generator=generator)
        return self.means[k] + 0.1 * torch.randn(
            n, self.means.shape[1], generator=generator, dtype=torch.float64
        )


def test_mixture_samples_seeded():
    m = _FakeMixture([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    a, b = D.mixture_samples(m, 100, seed=2), D.mixture_samples(m, 100, seed=2)
    assert a.shape == (100, 3) and torch.equal(a, b)
    assert not torch.equal(a, D.mixture_samples(m, 100, seed=3))
    ds = D.mixture_dataset(m, n=20, seed=2)
    assert len(ds) == 20 and ds.tensor().dtype == torch.float32
    assert torch.equal(D.mixture_samples(m, 20, seed=2).float(), ds.tensor())
    with pytest.raises(ValueError, match="sample"):
        D.mixture_samples(object(), 5)


def test_mixture_samples_with_oracle_gaussian_mixture():
    oracle = pytest.importorskip("sdediff.oracle")
    gm = oracle.GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 0.0]]),
        torch.stack([torch.eye(2), 0.5 * torch.eye(2)]),
        torch.tensor([0.3, 0.7]),
    )
    a = D.mixture_samples(gm, 4000, seed=0)
    assert a.shape == (4000, 2) and torch.isfinite(a).all()
    assert torch.equal(a, D.mixture_samples(gm, 4000, seed=0))
    assert abs(a[:, 0].mean().item() - (0.3 * -2 + 0.7 * 2)) < 0.15


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _rows_sorted(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rows = np.concatenate([images.reshape(len(images), -1).astype(np.int64), labels[:, None]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_split_sizes_disjoint_deterministic():
    from sklearn.datasets import load_digits

    full = load_digits()
    parts = {s: D.load_digits_uint8(s) for s in ("train", "val", "test")}
    sizes = {s: len(p[0]) for s, p in parts.items()}
    assert sizes == D.DIGITS_SPLIT_SIZES
    assert sum(sizes.values()) == len(full.images)
    # together the splits are exactly the full data set (a multiset of (image, label) rows):
    # with the sizes adding up, this means they are disjoint and cover everything
    expected_k = np.floor(full.images * 255 / 16 + 0.5).astype(np.int64)[:, None]
    got = _rows_sorted(
        np.concatenate([p[0] for p in parts.values()]), np.concatenate([p[1] for p in parts.values()])
    )
    assert np.array_equal(got, _rows_sorted(expected_k, full.target.astype(np.int64)))
    idx = toy_data._digits_split_indices()
    assert not set(idx["train"]) & set(idx["val"]) and not set(idx["train"]) & set(idx["test"])
    assert not set(idx["val"]) & set(idx["test"])
    # deterministic across calls
    again = D.load_digits_uint8("val")
    assert np.array_equal(again[0], parts["val"][0]) and np.array_equal(again[1], parts["val"][1])
    # not the trivial "first 1397" split
    assert not np.array_equal(idx["train"], np.arange(1397))


def test_digits_values_on_8bit_lattice():
    ds = D.digits("test")
    x = ds.tensor()
    assert x.shape == (200, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    k = (x.double() + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4)
    allowed = {math.floor(v * 255 / 16 + 0.5) for v in range(17)}
    assert set(ds.uint8().unique().tolist()) <= allowed
    img, label = ds[5]
    assert img.shape == (1, 8, 8) and label.dtype == torch.int64 and 0 <= int(label) <= 9
    assert torch.equal(D.float_to_uint8(x), ds.uint8())
    with pytest.raises(ValueError, match="split"):
        D.digits("holdout")


# --------------------------------------------------------------------------------------------
# 8-bit helpers and dequantization
# --------------------------------------------------------------------------------------------


def test_uint8_roundtrip_and_dequantize():
    k = torch.arange(256, dtype=torch.uint8).repeat(40)
    x = D.uint8_to_float(k, torch.float64)
    assert x[0] == -1 and x[255] == 1
    assert torch.equal(D.float_to_uint8(x), k)
    y = D.dequantize(x, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert torch.equal(y, D.dequantize(x, generator=torch.Generator().manual_seed(0)))
    assert (y >= -1).all() and (y < 1).all()
    # k -> (k + u) / 256 mapped to [-1, 1]: bin index recovered by floor, u uniform on [0, 1)
    u = (y + 1) * 128 - k.double()
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.03 and abs(u.var().item() - 1 / 12) < 0.01
    with pytest.raises(ValueError, match="lattice"):
        D.dequantize(torch.tensor([0.123456]))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        D.dequantize(torch.tensor([1.5]))


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py3", "py3-proto2", "py2"])
def test_cifar10_roundtrip(tmp_path, style):
    written = write_cifar(tmp_path, style=style)
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the directory itself
        x, y = D.load_cifar10(root, "train")
        assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8
        assert y.tolist() == train_labels
        # row-major C, H, W: element (c, h, w) is data[c * 1024 + h * 32 + w]
        assert x[4, 2, 5, 7] == train_data[4, 2 * 1024 + 5 * 32 + 7]
        assert np.array_equal(x.reshape(12, -1), train_data)
    xt, yt = D.load_cifar10(tmp_path, "test")
    assert (
        np.array_equal(xt.reshape(3, -1), written["test_batch"][0])
        and yt.tolist() == written["test_batch"][1]
    )
    ds = D.cifar10(tmp_path, "train")
    img, label = ds[6]
    assert img.shape == (3, 32, 32) and int(label) == train_labels[6]
    assert torch.equal(img, torch.from_numpy(train_data[6].reshape(3, 32, 32)).float() / 127.5 - 1)
    assert torch.equal(ds.uint8(), torch.from_numpy(x))


def test_cifar10_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        D.load_cifar10(tmp_path / "nope")
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        D.load_cifar10(tmp_path, "train")
    D.load_cifar10(tmp_path, "test")  # the test split is still complete


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "label_count", "not_a_dict"])
def test_cifar10_corrupt_batches(tmp_path, damage):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a pickle at all\x00\x01")
    elif damage == "wrong_shape":
        pickle.dump(_cifar_dict(np.zeros((2, 3000), np.uint8), [1, 2], b"x"), open(path, "wb"))
    elif damage == "label_count":
        pickle.dump(_cifar_dict(np.zeros((2, 3072), np.uint8), [1, 2, 3], b"x"), open(path, "wb"))
    else:
        pickle.dump([np.zeros((2, 3072), np.uint8)], open(path, "wb"))
    with pytest.raises(ValueError) as e:
        D.load_cifar10(tmp_path, "test")
    assert "test_batch" in str(e.value)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", ["system_in_dict", "exec_top_level", "object_array"])
def test_cifar10_malicious_pickle_is_refused(tmp_path, payload):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    if payload == "system_in_dict":
        obj = {b"data": _Evil(marker), b"labels": [0]}
    elif payload == "exec_top_level":
        obj = _EvilExec(marker)
    else:
        obj = {b"data": np.array([_Evil(marker)], dtype=object), b"labels": [0]}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(ValueError) as e:
        D.load_cifar10(tmp_path, "test")
    msg = str(e.value)
    assert "refusing" in msg and "test_batch" in msg
    assert "system" in msg or "exec" in msg
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing"):
        D.safe_unpickle(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# MNIST idx
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_roundtrip(tmp_path, gz):
    written = write_mnist(tmp_path / "mnist", gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = D.load_mnist(tmp_path / "mnist", split)
        imgs, labs = written[prefix]
        assert x.shape == (len(imgs), 1, 28, 28) and x.dtype == np.uint8
        assert np.array_equal(x[:, 0], imgs) and y.tolist() == labs.tolist()
    ds = D.fashion_mnist(tmp_path / "mnist", "test")
    img, label = ds[2]
    assert img.shape == (1, 28, 28) and int(label) == int(written["t10k"][1][2])
    assert torch.equal(img[0], torch.from_numpy(written["t10k"][0][2]).float() / 127.5 - 1)


def test_mnist_dotted_names_and_raw_subdir(tmp_path):
    written = write_mnist(tmp_path / "m" / "raw", gz=False, dotted=True, hw=(5, 4))
    x, y = D.load_mnist(tmp_path / "m", "train")
    assert x.shape == (5, 1, 5, 4) and np.array_equal(x[:, 0], written["train"][0])


def test_read_idx_generic(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, gz=True)
    assert np.array_equal(D.read_idx(tmp_path / "a.idx"), a)  # gzip detected from content


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.load_mnist(tmp_path / "absent")
    root = tmp_path / "m"
    write_mnist(root, gz=False)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        D.load_mnist(root, "test")
    # wrong magic: a label file where the images should be
    img = root / "train-images-idx3-ubyte"
    img.write_bytes((root / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(ValueError, match=r"(?s)wrong magic number 0x00000801.*0x00000803") as e:
        D.load_mnist(root, "train")
    assert "train-images-idx3-ubyte" in str(e.value)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated(tmp_path, gz):
    root = tmp_path / "m"
    write_mnist(root, gz=gz)
    p = root / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 37])
    with pytest.raises(ValueError, match="truncated") as e:
        D.load_mnist(root, "train")
    assert p.name in str(e.value)


def test_mnist_count_mismatch(tmp_path):
    root = tmp_path / "m"
    write_mnist(root, gz=False)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        D.load_mnist(root, "train")


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------


def _write_pngs(root: Path, spec: dict[str, int], hw=(6, 5), mode="RGB", seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for rel, _ in spec.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        shape = (*hw, 3) if mode == "RGB" else hw
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(a, mode=mode).save(p)
        out[rel] = a
    return out


def test_image_folder_with_labels(tmp_path):
    files = ["dog/b.png", "cat/z.png", "cat/a.png", "dog/a.PNG", "cat/sub/c.png"]
    arrays = _write_pngs(tmp_path, dict.fromkeys(files, 0))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (1, 1)).save(tmp_path / ".hidden" / "x.png")
    ds = D.image_folder(tmp_path, labels_from_subfolders=True)
    order = sorted(files)  # cat/a, cat/sub/c, cat/z, dog/a.PNG, dog/b
    assert ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    x = ds.uint8()
    assert x.shape == (5, 3, 6, 5)
    for i, rel in enumerate(order):
        assert np.array_equal(x[i].numpy().transpose(1, 2, 0), arrays[rel])
    img, label = ds[3]
    assert torch.equal(img, torch.from_numpy(arrays["dog/a.PNG"]).permute(2, 0, 1).float() / 127.5 - 1)
    assert int(label) == 1


def test_image_folder_grey_unlabelled_resize_and_jpeg(tmp_path):
    arrays = _write_pngs(tmp_path, {"a.png": 0, "b/c.png": 0}, hw=(4, 7), mode="L")
    ds = D.image_folder(tmp_path, mode="L")
    assert ds.labels.tolist() == [-1, -1] and ds.classes is None
    assert np.array_equal(ds.uint8()[1, 0].numpy(), arrays["b/c.png"])
    Image.fromarray(np.full((10, 10, 3), 200, np.uint8)).save(tmp_path / "d.jpg", quality=95)
    with pytest.raises(ValueError, match="mixed image sizes"):
        D.image_folder(tmp_path, mode="L")
    ds = D.image_folder(tmp_path, size=(4, 7))
    assert ds.uint8().shape == (3, 3, 4, 7)
    assert abs(int(ds.uint8()[2].float().mean()) - 200) <= 3  # d.jpg, JPEG is lossy


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        D.image_folder(tmp_path / "empty")
    _write_pngs(tmp_path / "mixed", {"a.png": 0}, hw=(6, 5))
    _write_pngs(tmp_path / "mixed", {"b.png": 0}, hw=(6, 6))
    with pytest.raises(ValueError, match=r"(?s)mixed image sizes.*b\.png.*a\.png"):
        D.image_folder(tmp_path / "mixed")
    _write_pngs(tmp_path / "bad", {"a.png": 0, "b.png": 0})
    raw = (tmp_path / "bad" / "b.png").read_bytes()
    (tmp_path / "bad" / "b.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"b\.png"):
        D.image_folder(tmp_path / "bad")
    _write_pngs(tmp_path / "top", {"a.png": 0, "cls/b.png": 0})
    with pytest.raises(ValueError, match="class subfolder"):
        D.image_folder(tmp_path / "top", labels_from_subfolders=True)


# --------------------------------------------------------------------------------------------
# .npy / .npz
# --------------------------------------------------------------------------------------------


def test_npz_uint8_channels_last_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1])
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    ds = D.numpy_file(tmp_path / "d.npz", key="images", labels_key="labels")
    assert ds.is_uint8 and ds.uint8().shape == (4, 3, 5, 6)
    assert np.array_equal(ds.uint8().numpy(), imgs.transpose(0, 3, 1, 2))
    assert ds.labels.tolist() == [3, 1, 4, 1]
    x = D.load_array(tmp_path / "d.npz", key="images")
    assert torch.equal(x, torch.from_numpy(imgs.transpose(0, 3, 1, 2)).float() / 127.5 - 1)
    with pytest.raises(ValueError, match=r"several arrays \['images', 'labels'\]"):
        D.load_array(tmp_path / "d.npz")


def test_npy_float_value_ranges(tmp_path):
    rng = np.random.default_rng(1)
    a01 = rng.random((3, 1, 6, 6)).astype(np.float32)
    np.save(tmp_path / "a01.npy", a01)
    x = D.load_array(tmp_path / "a01.npy", value_range=(0, 1))
    assert torch.allclose(x, torch.from_numpy(a01) * 2 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="value_range"):
        D.load_array(tmp_path / "a01.npy", value_range=(0, 0.5))
    apm = (a01 * 2 - 1).astype(np.float64)[:, 0]  # (N, H, W): channel added
    np.save(tmp_path / "apm.npy", apm)
    x = D.load_array(tmp_path / "apm.npy")
    assert x.shape == (3, 1, 6, 6) and torch.allclose(x[:, 0].double(), torch.from_numpy(apm), atol=1e-7)
    np.save(tmp_path / "big.npy", apm * 3)
    with pytest.raises(ValueError, match=r"outside value_range \[-1, 1\]"):
        D.load_array(tmp_path / "big.npy")
    pts = rng.normal(size=(10, 2))
    np.save(tmp_path / "pts.npy", pts)
    v = D.numpy_file(tmp_path / "pts.npy", kind="vectors")
    assert v.tensor().shape == (10, 2) and torch.allclose(
        v.tensor().double(), torch.from_numpy(pts), atol=1e-6
    )


def test_npy_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        D.load_array(tmp_path / "missing.npy")
    a = np.zeros((2, 1, 5, 5), np.float32)
    a[1, 0, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(ValueError, match=r"(?s)nan\.npy.*NaN"):
        D.load_array(tmp_path / "nan.npy")
    np.save(tmp_path / "rank2.npy", np.zeros((5, 9), np.uint8))
    with pytest.raises(ValueError, match="wrong rank"):
        D.load_array(tmp_path / "rank2.npy")
    np.save(tmp_path / "rank5.npy", np.zeros((1, 2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="wrong rank"):
        D.load_array(tmp_path / "rank5.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        D.load_array(tmp_path / "obj.npy")
    np.save(tmp_path / "ints.npy", np.full((2, 1, 2, 2), 300, np.int32))
    with pytest.raises(ValueError, match="0..255"):
        D.load_array(tmp_path / "ints.npy")
    np.save(tmp_path / "trunc.npy", np.zeros((4, 3, 8, 8), np.uint8))
    raw = (tmp_path / "trunc.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[:-50])
    with pytest.raises(ValueError, match=r"(?s)trunc\.npy.*truncated or corrupt"):
        D.load_array(tmp_path / "trunc.npy")
    np.savez(tmp_path / "z.npz", x=np.zeros((2, 1, 3, 3), np.uint8))
    raw = (tmp_path / "z.npz").read_bytes()
    (tmp_path / "z.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"z\.npz"):
        D.load_array(tmp_path / "z.npz")
    np.save(tmp_path / "amb.npy", np.zeros((2, 3, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="layout"):
        D.load_array(tmp_path / "amb.npy")
    assert D.load_array(tmp_path / "amb.npy", layout="NHWC").shape == (2, 3, 3, 5)


# --------------------------------------------------------------------------------------------
# dataset behaviour: flips, tensors, loaders
# --------------------------------------------------------------------------------------------


def test_hflip_seeded_transform():
    data = torch.randint(0, 256, (64, 1, 3, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = D.ArrayDataset(data, hflip=True, flip_seed=7)
    base = D.uint8_to_float(data)
    flips = []
    for i in range(len(ds)):
        x, _ = ds[i]
        is_flipped = torch.equal(x, base[i].flip(-1)) and not torch.equal(x, base[i])
        assert is_flipped or torch.equal(x, base[i])
        assert is_flipped == ds.flipped(i)
        flips.append(ds.flipped(i))
    assert 16 < sum(flips) < 48
    same = D.ArrayDataset(data, hflip=True, flip_seed=7)
    assert [same.flipped(i) for i in range(64)] == flips
    other = D.ArrayDataset(data, hflip=True, flip_seed=8)
    assert [other.flipped(i) for i in range(64)] != flips
    same.set_epoch(1)
    assert [same.flipped(i) for i in range(64)] != flips
    assert torch.equal(ds.tensor(), base)  # tensor() never flips
    assert not any(D.ArrayDataset(data).flipped(i) for i in range(64))
    with pytest.raises(ValueError, match="images"):
        D.ArrayDataset(torch.zeros(5, 2), hflip=True)


def test_dataloader_and_helpers():
    ds = D.digits("val")
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 8, 8) and yb.dtype == torch.int64
    assert torch.equal(xb, ds.tensor()[:64])
    assert torch.equal(D.as_tensor(ds), ds.tensor())
    assert torch.equal(D.as_tensor(torch.utils.data.TensorDataset(ds.tensor()[:3])), ds.tensor()[:3])


def test_library_modules_do_not_import_hydra():
    """Only the command-line entry points (sdediff/cli) may import hydra / omegaconf."""
    root = Path(D.__file__).resolve().parents[1]  # the sdediff package
    files = [p for p in root.rglob("*.py") if "cli" not in p.relative_to(root).parts]
    assert len(files) > 20
    for path in files:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"hydra", "omegaconf"}, path


# --------------------------------------------------------------------------------------------
# hydra configs
# --------------------------------------------------------------------------------------------


def _compose(name: str, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+data={name}", *overrides])


def test_all_data_configs_target_sdediff_data():
    names = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
    assert {"toy2d", "digits", "cifar10", "mnist", "image_folder", "npz"} <= set(names)
    for name in names:
        cfg = _compose(name)
        module, _, attr = cfg.data._target_.rpartition(".")
        assert module == "sdediff.data" and callable(getattr(D, attr))


def test_configs_instantiate_without_paths():
    from hydra.utils import instantiate

    ds = instantiate(_compose("toy2d", ["data.n=123", "data.name=two_moons"]).data)
    assert isinstance(ds, D.ArrayDataset) and ds.tensor().shape == (123, 2)
    assert torch.equal(ds.tensor(), D.toy2d("two_moons", 123, seed=0))
    ds = instantiate(_compose("digits", ["data.split=val"]).data)
    assert isinstance(ds, D.ArrayDataset) and len(ds) == D.DIGITS_SPLIT_SIZES["val"]


def test_file_configs_need_a_path_and_instantiate_with_one(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for name, key in (("cifar10", "root"), ("mnist", "root"), ("image_folder", "root"), ("npz", "path")):
        assert OmegaConf.is_missing(_compose(name).data, key)

    write_cifar(tmp_path / "c")
    ds = instantiate(_compose("cifar10", [f"data.root={tmp_path / 'c'}", "data.split=test"]).data)
    assert len(ds) == 3 and ds.hflip

    write_mnist(tmp_path / "m", gz=True)
    ds = instantiate(_compose("mnist", [f"data.root={tmp_path / 'm'}"]).data)
    assert len(ds) == 5 and ds.item_shape == (1, 28, 28)

    _write_pngs(tmp_path / "f", {"x/a.png": 0, "y/b.png": 0}, hw=(6, 4))
    _write_pngs(tmp_path / "f", {"y/c.png": 0}, hw=(3, 3), seed=1)
    ds = instantiate(
        _compose(
            "image_folder",
            [f"data.root={tmp_path / 'f'}", "data.labels_from_subfolders=true", "data.size=[6,4]"],
        ).data
    )
    assert ds.labels.tolist() == [0, 1, 1] and ds.item_shape == (3, 6, 4)

    np.savez(tmp_path / "a.npz", x=np.random.default_rng(0).random((2, 3, 5, 5)), y=np.array([0, 1]))
    ds = instantiate(
        _compose(
            "npz",
            [f"data.path={tmp_path / 'a.npz'}", "data.key=x", "data.labels_key=y", "data.value_range=[0,1]"],
        ).data
    )
    assert ds.item_shape == (3, 5, 5) and ds.labels.tolist() == [0, 1]
    assert ds.tensor().min() >= -1 and ds.tensor().max() <= 1
