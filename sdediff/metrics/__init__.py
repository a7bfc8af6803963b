"""Sample-quality metrics: Fréchet distance, KID, precision/recall and sliced W2, in pixel space or in the
feature space of a classifier trained on the data (:class:`Features`) or of any callable.

A leaf package: it imports torch, numpy, safetensors and :mod:`sdediff.errors`, nothing above.

    from sdediff.metrics import Features, fd, kid, floor

    feats = Features.cached(train_split, test_split)      # a small CNN classifier, trained once, cached
    fd(samples, test_x, features=feats)                   # FD in its penultimate layer
    kid(samples, test_x, features=feats)                  # KID(mean, stderr, subsets, subset_size)
    floor(test_x, held_out_x, features=feats)             # the same metrics between two real sets
"""

from .distances import KID, PrecisionRecall, embed, fd, fd_gaussians, kid, precision_recall, sliced_w2
from .features import Features, FeaturesError, default_cache_dir

__all__ = [
    "fd",
    "fd_gaussians",
    "kid",
    "KID",
    "precision_recall",
    "PrecisionRecall",
    "sliced_w2",
    "embed",
    "Features",
    "FeaturesError",
    "default_cache_dir",
    "quality",
]


def quality(samples, reference, features=None, *, held_out=None, subsets: int = 10, seed: int = 0) -> dict:
    """FD and KID of ``samples`` to ``reference`` (e.g. the test split) and, given ``held_out`` real data of
    the same size as ``samples``, the floor: the same metrics between ``reference`` and ``held_out``.

    Returns ``{"fd", "kid", "kid_stderr", "n"}`` plus ``"floor": {"fd", "kid", "kid_stderr", "n"}`` when
    ``held_out`` is given. Samples and held-out set are cut to a common size ``n`` (FD's bias depends on
    ``n``: a figure and its floor are only comparable at equal ``n``).
    """
    out: dict = {}
    if held_out is not None:
        n = min(len(samples), len(held_out))
        samples, held_out = samples[:n], held_out[:n]
    fs, fr = embed(samples, features, name="samples"), embed(reference, features, name="reference")
    ident = None  # the features are computed once; the metrics then run on them

    def row(fa):
        k = kid(fa, fr, ident, subsets=subsets, seed=seed)
        return {"fd": fd(fa, fr, ident), "kid": k.mean, "kid_stderr": k.stderr, "n": len(fa)}

    out.update(row(fs))
    if held_out is not None:
        out["floor"] = row(embed(held_out, features, name="held_out"))
    return out
