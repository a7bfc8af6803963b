"""``Features``: the penultimate layer of a small classifier trained on the data set, as the feature space
of FD / KID / precision-recall (FID uses Inception's pool3 the same way; no pretrained weights are needed).

    from sdediff.data import digits
    from sdediff.metrics import Features, fd

    feats = Features.cached(digits("train"), digits("test"), cache_dir="runs/features")  # trains once
    print(feats.test_accuracy)                        # the classifier's own accuracy on the test split
    fd(samples, digits("test").tensor(), features=feats)

A CNN for images ``(C, H, W)`` (two or three 3x3-conv stages, average pooling, a 2x2 adaptive pool, then a
``feature_dim`` layer), an MLP for vectors. Training is seeded (initialisation and batch order) and takes
seconds (8x8 digits) to a couple of minutes (28x28 Fashion-MNIST) on a CPU. Saved as
``features.safetensors`` + ``features.json`` (architecture, class names, accuracies, the data's and the
weights' SHA-256 and the JSON's own); loading checks both hashes and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ArgumentError, ConfigError

__all__ = ["Features", "FeaturesError", "default_cache_dir"]

FORMAT = "sdediff-features-1"


class FeaturesError(ConfigError):
    """A classifier cache that is missing, corrupt, edited or of another format."""


def default_cache_dir() -> Path:
    """``$SDEDIFF_CACHE/features``, else ``$XDG_CACHE_HOME/sdediff/features``, else ``~/.cache/...``."""
    if os.environ.get("SDEDIFF_CACHE"):
        return Path(os.environ["SDEDIFF_CACHE"]) / "features"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdediff" / "features"


def _conv_net(item_shape: Sequence[int], width: int, feature_dim: int) -> nn.Sequential:
    c, h, _ = item_shape
    layers: list[nn.Module] = []
    cur, res = c, h
    for mult in (1, 2, 4):
        out = width * mult
        layers += [nn.Conv2d(cur, out, 3, padding=1), nn.SiLU(), nn.Conv2d(out, out, 3, padding=1), nn.SiLU()]
        cur = out
        if res < 8 or res % 2:
            break
        layers.append(nn.AvgPool2d(2))
        res //= 2
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * cur, feature_dim), nn.SiLU()]
    return nn.Sequential(*layers)


def _mlp_net(dim: int, width: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, width),
        nn.SiLU(),
        nn.Linear(width, width),
        nn.SiLU(),
        nn.Linear(width, feature_dim),
        nn.SiLU(),
    )


def _split(data, what: str) -> tuple[Tensor, Tensor]:
    """``(x, labels)`` of an ArrayDataset or an ``(x, labels)`` pair; unlabelled data is refused."""
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    elif hasattr(data, "tensor") and hasattr(data, "labels"):
        x, y = data.tensor(), torch.as_tensor(data.labels)
    else:
        raise ArgumentError(
            what, type(data).__name__, "must be a labelled data set (ArrayDataset or (x, labels))", "Features"
        )
    if y.ndim != 1 or len(y) != len(x) or torch.is_floating_point(y):
        raise ArgumentError(
            what, f"labels of shape {tuple(y.shape)}", f"must be {len(x)} integer labels", "Features"
        )
    if len(y) == 0 or bool((y < 0).any()):
        raise ArgumentError(
            what,
            "unlabelled data (label -1)",
            "must be labelled: Features trains a classifier on the labels; for unlabelled data pass any "
            "callable as features= (e.g. local Inception/DINOv2 features)",
            "Features",
        )
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ArgumentError(what, "NaN or inf values", "must be finite", "Features")
    return x, y.long()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def data_digest(x: Tensor, y: Tensor) -> str:
    """SHA-256 of a labelled data set's values (float32 bytes), labels and shape."""
    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().long().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Features(nn.Module):
    """A classifier's penultimate layer as a feature map ``(n, *item_shape) -> (n, feature_dim)``.

    Build one with :meth:`fit` (train on a labelled split), :meth:`load` (a saved folder) or :meth:`cached`
    (load if a matching cache exists, else fit and save). Calling it returns float32 features, computed in
    batches without gradients on the classifier's device; :meth:`logits` gives the class scores.

    Attributes: ``item_shape``, ``num_classes``, ``feature_dim``, ``classes`` (names or None),
    ``test_accuracy`` / ``train_accuracy`` (fractions; ``None`` when not measured), ``data_sha256``.
    """

    def __init__(
        self,
        item_shape: Sequence[int],
        num_classes: int,
        *,
        feature_dim: int = 64,
        width: int = 32,
        classes: Sequence[str] | None = None,
    ):
        super().__init__()
        self.item_shape = tuple(int(s) for s in item_shape)
        self.num_classes, self.feature_dim, self.width = int(num_classes), int(feature_dim), int(width)
        if len(self.item_shape) == 3:
            self.body = _conv_net(self.item_shape, self.width, self.feature_dim)
        elif len(self.item_shape) == 1:
            self.body = _mlp_net(self.item_shape[0], 8 * self.width, self.feature_dim)
        else:
            raise ArgumentError(
                "item_shape", self.item_shape, "must be (C, H, W) images or (D,) vectors", "Features"
            )
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        self.classes = list(classes) if classes is not None else None
        self.test_accuracy: float | None = None
        self.train_accuracy: float | None = None
        self.data_sha256: str | None = None
        self.fit_options: dict[str, Any] = {}

    # -------------------------------------------------------------------------------- use
    def _check(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if tuple(x.shape[1:]) != self.item_shape:
            raise ArgumentError(
                "x",
                f"shape {tuple(x.shape)}",
                f"must be (n, {', '.join(map(str, self.item_shape))}) for these features",
                "Features",
            )
        return x

    def _batched(self, fn, x: Tensor, batch_size: int) -> Tensor:
        x = self._check(x)
        dev = next(self.parameters()).device
        was = self.training
        self.eval()
        with torch.no_grad():
            out = [fn(c.to(dev, torch.float32)).float().cpu() for c in x.split(batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim)

    def forward(self, x: Tensor, batch_size: int = 1000) -> Tensor:  # type: ignore[override]
        """Penultimate-layer features ``(n, feature_dim)`` of ``x`` ``(n, *item_shape)``."""
        return self._batched(self.body, x, batch_size)

    def logits(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """Class scores ``(n, num_classes)``."""
        return self._batched(lambda c: self.head(self.body(c)), x, batch_size)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Fraction of ``x`` classified as ``y``."""
        return float((self.logits(x).argmax(1) == torch.as_tensor(y)).double().mean())

    # -------------------------------------------------------------------------------- training
    @classmethod
    def fit(
        cls,
        train,
        test=None,
        *,
        steps: int = 1500,
        batch_size: int = 128,
        lr: float = 2e-3,
        feature_dim: int = 64,
        width: int = 32,
        seed: int = 0,
        classes: Sequence[str] | None = None,
        progress: bool = True,
        log=None,
    ) -> Features:
        """Train a classifier on the labelled ``train`` split (an ArrayDataset or ``(x, labels)``): Adam
        with a cosine learning rate, ``steps`` batches drawn by a seeded generator, label smoothing 0.1.
        Reports (and stores) its accuracy on ``test`` when given."""
        x, y = _split(train, "train")
        tx, ty = _split(test, "test") if test is not None else (None, None)
        for key, v, lo in (
            ("steps", steps, 1),
            ("batch_size", batch_size, 1),
            ("feature_dim", feature_dim, 2),
            ("width", width, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ArgumentError(key, v, f"must be an integer >= {lo}", "Features.fit")
        if tx is not None and tuple(tx.shape[1:]) != tuple(x.shape[1:]):
            raise ArgumentError(
                "test",
                f"items of shape {tuple(tx.shape[1:])}",
                f"must match train's {tuple(x.shape[1:])}",
                "Features.fit",
            )
        if classes is None:
            classes = getattr(train, "classes", None)
        num_classes = int(y.max()) + 1
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = cls(tuple(x.shape[1:]), num_classes, feature_dim=feature_dim, width=width, classes=classes)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
        )
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="Features.fit", unit="step", leave=False)
        net.train()
        for _ in range(steps):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
            loss = loss_fn(net.head(net.body(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        net.eval()
        net.train_accuracy = net.accuracy(x, y)
        net.test_accuracy = net.accuracy(tx, ty) if tx is not None else None
        net.data_sha256 = data_digest(x, y)
        net.fit_options = dict(
            steps=steps, batch_size=batch_size, lr=lr, feature_dim=feature_dim, width=width, seed=seed
        )
        if log is not None:
            acc = f"{net.test_accuracy:.4f}" if net.test_accuracy is not None else "not measured"
            log(
                f"Features: classifier trained on {len(x)} items, test accuracy {acc} "
                f"(train {net.train_accuracy:.4f})"
            )
        return net

    # -------------------------------------------------------------------------------- files
    def save(self, folder) -> Path:
        """Write ``features.safetensors`` and ``features.json`` into ``folder`` (the JSON last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / "features.safetensors"
        tmp = weights.with_suffix(".safetensors.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, weights)
        record: dict[str, Any] = {
            "format": FORMAT,
            "item_shape": list(self.item_shape),
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "width": self.width,
            "classes": self.classes,
            "test_accuracy": self.test_accuracy,
            "train_accuracy": self.train_accuracy,
            "data_sha256": self.data_sha256,
            "fit": self.fit_options,
            "weights_sha256": _sha256_file(weights),
        }
        record["meta_sha256"] = _digest(record)
        meta = folder / "features.json"
        tmpj = meta.with_suffix(".json.tmp")
        tmpj.write_text(json.dumps(record, indent=1))
        os.replace(tmpj, meta)
        return folder

    @classmethod
    def load(cls, folder) -> Features:
        """Load a saved classifier, checking the JSON's own SHA-256 and the weights' SHA-256 first."""
        folder = Path(folder)
        meta, weights = folder / "features.json", folder / "features.safetensors"
        fix = f"delete {folder} to retrain it"
        if not meta.is_file() or not weights.is_file():
            raise FeaturesError(
                f"classifier cache {folder} is incomplete (needs features.json and "
                f"features.safetensors); {fix}"
            )
        try:
            record = json.loads(meta.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise FeaturesError(f"classifier cache {meta} is not valid JSON ({e}); {fix}") from None
        if record.get("format") != FORMAT:
            raise FeaturesError(
                f"classifier cache {meta} has format {record.get('format')!r}, not {FORMAT!r}; {fix}"
            )
        if record.get("meta_sha256") != _digest(record):
            raise FeaturesError(f"classifier cache {meta} fails its SHA-256 check (edited or corrupt); {fix}")
        got = _sha256_file(weights)
        if got != record.get("weights_sha256"):
            raise FeaturesError(
                f"classifier cache {weights} fails its SHA-256 check (expected "
                f"{str(record.get('weights_sha256'))[:12]}..., got {got[:12]}...); {fix}"
            )
        try:
            net = cls(
                record["item_shape"],
                record["num_classes"],
                feature_dim=record["feature_dim"],
                width=record["width"],
                classes=record.get("classes"),
            )
            net.load_state_dict(load_file(str(weights)))
        except Exception as e:  # noqa: BLE001 - any mismatch is one line
            raise FeaturesError(
                f"classifier cache {folder} does not match its architecture ({type(e).__name__}: {e}); {fix}"
            ) from None
        net.test_accuracy, net.train_accuracy = record.get("test_accuracy"), record.get("train_accuracy")
        net.data_sha256, net.fit_options = record.get("data_sha256"), record.get("fit") or {}
        return net.eval()

    @classmethod
    def cached(cls, train, test=None, *, cache_dir=None, log=None, **fit_options) -> Features:
        """:meth:`load` the classifier fitted to exactly this ``train`` split with these options from
        ``cache_dir/<key>`` (default :func:`default_cache_dir`), else :meth:`fit` and :meth:`save` it there.
        A cache that fails its hash check raises :class:`FeaturesError` (one line) rather than retraining."""
        x, y = _split(train, "train")
        key_src = {
            "data": data_digest(x, y),
            **{k: fit_options[k] for k in sorted(fit_options) if k not in ("progress",)},
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = folder / key
        if (folder / "features.json").exists():
            net = cls.load(folder)
            if log is not None:
                log(f"Features: loaded {folder} (test accuracy {net.test_accuracy})")
            return net
        net = cls.fit(train, test, log=log, **fit_options)
        net.save(folder)
        return net
