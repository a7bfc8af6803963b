"""Offline datasets and loaders.

Everything here works without network access: toy 2-D distributions are sampled on the fly,
scikit-learn's ``digits`` ship with scikit-learn, and the real-image formats (CIFAR-10 python
pickles, MNIST / Fashion-MNIST idx files, image folders, ``.npy``/``.npz`` arrays) are read from
files the user has downloaded themselves.

Conventions
-----------
* **Images** are float tensors of shape ``(C, H, W)`` with values in ``[-1, 1]``.  8-bit data
  (integer ``k`` in ``0..255``) is mapped by ``x = k / 127.5 - 1`` (see :func:`uint8_to_float`);
  the inverse is :func:`float_to_uint8`.
* **Points** (toy 2-D data, mixtures, ``kind="vectors"`` arrays) are float tensors ``(D,)``.
* Datasets are :class:`ArrayDataset` objects (a ``torch.utils.data.Dataset``) whose items are
  ``(x, label)`` with an ``int64`` label; unlabelled data uses label ``-1``.  The whole data set
  as one tensor is ``dataset.tensor()`` (or :func:`as_tensor`).
* 8-bit image data is stored as ``uint8`` and converted per item, so the raw 8-bit form stays
  available for likelihood code (``dataset.uint8()``), together with :func:`dequantize`.
* Every loader raises a single ``FileNotFoundError`` (missing paths) or ``ValueError`` (bad
  content) whose message names the file, the problem and how to fix it.
* Nothing is ever unpickled except CIFAR-10's dicts of arrays, through an allow-listing
  unpickler (:func:`safe_unpickle`); ``.npy``/``.npz`` files are read with ``allow_pickle=False``.

This module never imports hydra; the configs in ``configs/data/*.yaml`` point at the functions
below through ``_target_``.
"""

from ..lattice import float_to_uint8, uint8_to_float
from .dataset import ArrayDataset, as_tensor, dequantize, dequantize_uint8, hash_ints
from .files import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    cifar10,
    fashion_mnist,
    image_folder,
    load_array,
    load_cifar10,
    load_image_folder,
    load_mnist,
    mnist,
    numpy_file,
    read_idx,
    safe_unpickle,
)
from .toy import (
    DIGITS_SPLIT_SIZES,
    TOY2D_NAMES,
    digits,
    labelled_mixture_dataset,
    load_digits_uint8,
    mixture_dataset,
    mixture_samples,
    toy2d,
    toy2d_dataset,
)

__all__ = [
    "TOY2D_NAMES",
    "DIGITS_SPLIT_SIZES",
    "ArrayDataset",
    "as_tensor",
    "uint8_to_float",
    "float_to_uint8",
    "dequantize",
    "dequantize_uint8",
    "hash_ints",
    "toy2d",
    "toy2d_dataset",
    "mixture_samples",
    "labelled_mixture_dataset",
    "mixture_dataset",
    "load_digits_uint8",
    "digits",
    "safe_unpickle",
    "load_cifar10",
    "cifar10",
    "read_idx",
    "load_mnist",
    "mnist",
    "fashion_mnist",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "load_image_folder",
    "image_folder",
    "load_array",
    "numpy_file",
]
