r"""The one table of parameterisations: eps, x0, score and v as affine maps of (x, network output).

At a time with marginal coefficients (alpha, sigma), ``x = alpha x0 + sigma eps``, ``score = -eps / sigma``
and ``v = alpha eps - sigma x0``. Whatever a network predicts (its *kind*), every other kind is an affine
function of the state ``x`` and the network output ``F`` with coefficients that depend on (alpha, sigma)
alone -- EDM's ``D = c_skip x + c_out F``::

    target = a(alpha, sigma) * x + b(alpha, sigma) * F          (a, b) = affine(kind, target, alpha, sigma)

Written out, with ``r2 = alpha^2 + sigma^2`` (exact for every schedule, VP or not; each entry is the
direct closed form, never a composition that would cancel, e.g. ``1 - sigma^2`` near T):

    target \ F   eps                x0                    score                  v
    eps          (0, 1)             (1/s, -a/s)           (0, -s)                (s/r2, a/r2)
    x0           (1/a, -s/a)        (0, 1)                (1/a, s^2/a)           (a/r2, -s/r2)
    score        (0, -1/s)          (-1/s^2, a/s^2)       (0, 1)                 (-1/r2, -a/(s r2))
    v            (-s/a, r2/a)       (a/s, -r2/s)          (-s/a, -s r2/a)        (0, 1)

(a = alpha, s = sigma). Everything that converts between kinds derives from this table:
:func:`convert`, :class:`sdediff.Model`, the samplers' precomputed step coefficients, DPM-Solver's
plans and the losses (their regression target is :func:`truth`, the definition of each kind from
(x0, eps); the factor ``||eps - eps_hat||^2 / ||y - y_hat||^2`` is ``b(space -> eps)^2``,
:func:`mse_factor`). No other module switches on the prediction kind.

The functions take Python floats or tensors that broadcast against each other (float64 schedule values
on the host, or coefficients already shaped against a state) and do plain arithmetic: no host syncs.
"""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor

__all__ = ["PREDICTIONS", "check_kind", "affine", "convert", "truth", "mse_factor"]

#: the four kinds a network can predict
PREDICTIONS = ("eps", "x0", "score", "v")

C = TypeVar("C", float, Tensor)


def check_kind(kind: str, name: str = "prediction") -> str:
    """``kind`` if it is one of :data:`PREDICTIONS`, else a ``ValueError``."""
    if kind not in PREDICTIONS:
        from .errors import ArgumentError

        raise ArgumentError(name, kind, f"must be one of {PREDICTIONS}")
    return kind


def _table(alpha: C, sigma: C) -> dict[tuple[str, str], tuple[C, C]]:
    """(target, kind) -> (a, b), the closed forms of the module docstring."""
    a, s = alpha, sigma
    r2 = a * a + s * s
    zero = a * 0.0
    return {
        ("eps", "x0"): (1.0 / s, -a / s),
        ("eps", "score"): (zero, -s + zero),
        ("eps", "v"): (s / r2, a / r2),
        ("x0", "eps"): (1.0 / a, -s / a),
        ("x0", "score"): (1.0 / a, s * s / a),
        ("x0", "v"): (a / r2, -s / r2),
        ("score", "eps"): (zero, -1.0 / s),
        ("score", "x0"): (-1.0 / (s * s), a / (s * s)),
        ("score", "v"): (-1.0 / r2, -a / (s * r2)),
        ("v", "eps"): (-s / a, r2 / a),
        ("v", "x0"): (a / s, -r2 / s),
        ("v", "score"): (-s / a, -s * r2 / a),
    }


def affine(kind: str, target: str, alpha: C, sigma: C) -> tuple[C, C]:
    """``(a, b)`` with ``target = a x + b F`` for a network output ``F`` of kind ``kind``."""
    check_kind(kind)
    check_kind(target, "target")
    if kind == target:
        return alpha * 0.0, alpha * 0.0 + 1.0
    return _table(alpha, sigma)[(target, kind)]


def convert(pred: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, source: str, target: str) -> Tensor:
    """Convert a prediction of kind ``source`` at state ``x`` into kind ``target``.

    ``alpha`` and ``sigma`` must already broadcast against ``x``.
    """
    if source == target:
        check_kind(source)
        return pred
    a, b = affine(source, target, alpha, sigma)
    return a * x + b * pred


def truth(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The exact value of kind ``kind`` for data ``x0`` noised with ``eps`` (the regression target): its
    definition, not a conversion through ``x`` (which would cancel where alpha or sigma is small)."""
    check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        return -eps / sigma
    return alpha * eps - sigma * x0  # v


def mse_factor(space: str, alpha: C, sigma: C) -> C:
    """``||eps - eps_hat||^2 / ||y - y_hat||^2`` for errors measured in the space of kind ``space``
    (exact: at fixed x, eps is affine in y with slope ``q(space -> eps)``)."""
    _, q = affine(space, "eps", alpha, sigma)
    return q * q
