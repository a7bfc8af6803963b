r"""The one table of parameterisations: eps, x0, score, v and the preconditioned ``edm`` output as affine
maps of (x, network output).

At a time with marginal coefficients (alpha, sigma), ``x = alpha x0 + sigma eps``, ``score = -eps / sigma``
and ``v = alpha eps - sigma x0``. Whatever a network predicts (its *kind*), every other kind is an affine
function of the state ``x`` and the network output ``F`` with coefficients that depend on (alpha, sigma)
alone (and on ``sigma_data`` for the edm row) -- EDM's ``D = c_skip x + c_out F``::

    target = a(alpha, sigma) * x + b(alpha, sigma) * F          (a, b) = affine(kind, target, alpha, sigma)

Written out, with ``r2 = alpha^2 + sigma^2`` (exact for every schedule, VP or not; each entry is the
direct closed form, never a composition that would cancel, e.g. ``1 - sigma^2`` near T):

    target \ F   eps                x0                    score                  v
    eps          (0, 1)             (1/s, -a/s)           (0, -s)                (s/r2, a/r2)
    x0           (1/a, -s/a)        (0, 1)                (1/a, s^2/a)           (a/r2, -s/r2)
    score        (0, -1/s)          (-1/s^2, a/s^2)       (0, 1)                 (-1/r2, -a/(s r2))
    v            (-s/a, r2/a)       (a/s, -r2/s)          (-s/a, -s r2/a)        (0, 1)

(a = alpha, s = sigma).

**The preconditioned row** (``kind="edm"``, Karras et al. 2022, for any (alpha, sigma)). With ``d`` the
data's standard deviation ``sigma_data`` and ``r = sqrt(a^2 d^2 + s^2)`` (the standard deviation of
``x_t`` on data of variance d^2 per dimension), a network ``F`` called on the unit-variance input
``c_in x`` (and a noise feature ``c_noise``, chosen by :class:`sdediff.Model`) predicts::

    x0_hat = c_skip x + c_out F(c_in x, c_noise),   c_skip = a d^2 / r^2,  c_out = s d / r,  c_in = 1 / r

(:func:`precondition`). ``c_skip x`` is the exact denoiser ``E[x0 | x_t]`` of Gaussian data
``N(0, d^2 I)``, so ``F = 0`` is that denoiser and wherever the network knows nothing the prediction
stays linear in x; ``c_out`` is the standard deviation of the remaining error, so the target of ``F``
has unit variance at every noise level. Derivation: x0 and x_t are jointly Gaussian with
``Cov(x0, x_t) = a d^2``, ``Var x_t = r^2``, hence ``E[x0 | x_t] = a d^2 / r^2 x_t`` and
``Var[x0 | x_t] = d^2 - a^2 d^4 / r^2 = s^2 d^2 / r^2``. Per schedule:

* VE (a = 1): EDM's published ``c_skip = d^2/(s^2 + d^2)``, ``c_out = s d / sqrt(s^2 + d^2)``,
  ``c_in = 1/sqrt(s^2 + d^2)`` exactly.
* VP, linear or cosine (a^2 + s^2 = 1): ``r^2 = a^2 d^2 + 1 - a^2``; with d = 1, ``c_skip = a``,
  ``c_out = s``, ``c_in = 1`` -- the v-prediction's x0 map, ``x0 = a x - s v``, so F = -v.
* sub-VP (s = 1 - a^2): the same formulas with its (a, s); near t = 0, ``c_skip -> 1/a``, ``c_out -> 0``.
* the discrete chain (:class:`~sdediff.DiscreteVP`): a VP schedule with a = sqrt(alphabar_i) and
  s = sqrt(1 - alphabar_i) at the grid times t_i = i/N (and the schedule's interpolation between them);
  the formulas apply unchanged (d = 1: the v-prediction map again).

The edm row of the table (``F`` of kind edm -> target, and back), each entry again a direct closed form
(``m = a^2 + s^2``; ``1 - d^2`` is computed as ``(1 - d)(1 + d)``)::

    target \ F   edm                                   F from target (F = (x0_hat - c_skip x) / c_out)
    x0           (a d^2 / r^2, s d / r)                 from x0    (-a d / (s r), r / (s d))
    eps          (s / r^2, -a d / r)                    from eps   (s / (a d r), -r / (a d))
    score        (-1 / r^2, a d / (s r))                from score (s / (a d r), s r / (a d))
    v            (a s (1 - d^2) / r^2, -d m / r)        from v     (a s (1 - d^2) / (m d r), -r / (m d))

The regression target of ``F`` (:func:`truth`) is ``(s x0 / d - a d eps) / r`` (EDM's
``(y - c_skip (y + n)) / c_out``, written without the cancellation); its eps-space factor
(:func:`mse_factor`) is ``a^2 d^2 / r^2``, so EDM's weighting ``(s^2 + d^2)/(s d)^2`` in x0-space is the
unit weight in F-space.

Everything that converts between kinds derives from this table: :func:`convert`,
:class:`sdediff.Model`, the samplers' precomputed step coefficients, DPM-Solver's plans and the losses
(their regression target is :func:`truth`, the definition of each kind from (x0, eps); the factor
``||eps - eps_hat||^2 / ||y - y_hat||^2`` is ``b(space -> eps)^2``, :func:`mse_factor`). No other module
switches on the prediction kind.

The functions take Python floats or tensors that broadcast against each other (float64 schedule values
on the host, or coefficients already shaped against a state) and do plain arithmetic: no host syncs.
"""

from __future__ import annotations

import math
from typing import TypeVar

from torch import Tensor

__all__ = [
    "PREDICTIONS",
    "KINDS",
    "PRECONDITIONED",
    "check_kind",
    "check_sigma_data",
    "precondition",
    "affine",
    "convert",
    "truth",
    "mse_factor",
]

#: the four kinds a network can predict that need nothing but (alpha, sigma)
PREDICTIONS = ("eps", "x0", "score", "v")
#: the preconditioned kind: ``F`` of ``x0 = c_skip x + c_out F(c_in x, c_noise)`` (needs ``sigma_data``)
PRECONDITIONED = "edm"
#: every kind of the table
KINDS = (*PREDICTIONS, PRECONDITIONED)

C = TypeVar("C", float, Tensor)


def check_kind(kind: str, name: str = "prediction") -> str:
    """``kind`` if it is one of :data:`KINDS`, else an :class:`~sdediff.errors.ArgumentError`."""
    if kind not in KINDS:
        from .errors import ArgumentError

        raise ArgumentError(name, kind, f"must be one of {KINDS}")
    return kind


def check_sigma_data(sigma_data, owner: str | None = None) -> float:
    """``sigma_data`` as a float if it is a finite number > 0, else an
    :class:`~sdediff.errors.ArgumentError` (None, NaN, inf, <= 0, a bool or a non-number)."""
    from .errors import ArgumentError

    ok = isinstance(sigma_data, int | float) and not isinstance(sigma_data, bool)
    if ok:
        sigma_data = float(sigma_data)
        ok = math.isfinite(sigma_data) and sigma_data > 0.0
    if not ok:
        raise ArgumentError(
            "sigma_data",
            sigma_data,
            "must be a finite number > 0 for prediction='edm' (the data's standard deviation, e.g. "
            "0.5; sdediff.models.data_sigma(x) estimates it)",
            owner,
        )
    return sigma_data


def precondition(alpha: C, sigma: C, sigma_data: float) -> tuple[C, C, C]:
    """``(c_skip, c_out, c_in)`` of the preconditioned parameterisation at (alpha, sigma):
    ``x0_hat = c_skip x + c_out F(c_in x, .)`` with ``r^2 = alpha^2 sigma_data^2 + sigma^2``,
    ``c_skip = alpha sigma_data^2 / r^2``, ``c_out = sigma sigma_data / r``, ``c_in = 1 / r``
    (EDM's at alpha = 1; see the module docstring)."""
    d = sigma_data
    r2 = alpha * alpha * (d * d) + sigma * sigma
    r = r2**0.5
    return alpha * (d * d) / r2, sigma * d / r, 1.0 / r


def _edm_rows(alpha: C, sigma: C, d: float) -> dict[tuple[str, str], tuple[C, C]]:
    """(target, kind) -> (a, b) for the entries with ``kind`` or ``target`` edm (module docstring)."""
    a, s = alpha, sigma
    r2 = a * a * (d * d) + s * s
    r = r2**0.5
    m = a * a + s * s
    one_m_d2 = (1.0 - d) * (1.0 + d)
    return {
        ("x0", "edm"): (a * (d * d) / r2, s * d / r),
        ("eps", "edm"): (s / r2, -a * d / r),
        ("score", "edm"): (-1.0 / r2, a * d / (s * r)),
        ("v", "edm"): (a * s * one_m_d2 / r2, -d * m / r),
        ("edm", "x0"): (-a * d / (s * r), r / (s * d)),
        ("edm", "eps"): (s / (a * d * r), -r / (a * d)),
        ("edm", "score"): (s / (a * d * r), s * r / (a * d)),
        ("edm", "v"): (a * s * one_m_d2 / (m * d * r), -r / (m * d)),
    }


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


def affine(kind: str, target: str, alpha: C, sigma: C, *, sigma_data: float | None = None) -> tuple[C, C]:
    """``(a, b)`` with ``target = a x + b F`` for a network output ``F`` of kind ``kind``.

    ``sigma_data`` (a number > 0) is needed when ``kind`` or ``target`` is ``"edm"`` and ignored
    otherwise."""
    check_kind(kind)
    check_kind(target, "target")
    if kind == target:
        return alpha * 0.0, alpha * 0.0 + 1.0
    if PRECONDITIONED in (kind, target):
        d = check_sigma_data(sigma_data, "affine")
        return _edm_rows(alpha, sigma, d)[(target, kind)]
    return _table(alpha, sigma)[(target, kind)]


def convert(
    pred: Tensor,
    x: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    source: str,
    target: str,
    *,
    sigma_data: float | None = None,
) -> Tensor:
    """Convert a prediction of kind ``source`` at state ``x`` into kind ``target``.

    ``alpha`` and ``sigma`` must already broadcast against ``x``; ``sigma_data`` as in :func:`affine`.
    """
    if source == target:
        check_kind(source)
        return pred
    a, b = affine(source, target, alpha, sigma, sigma_data=sigma_data)
    return a * x + b * pred


def truth(
    kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, *, sigma_data: float | None = None
) -> Tensor:
    """The exact value of kind ``kind`` for data ``x0`` noised with ``eps`` (the regression target): its
    definition, not a conversion through ``x`` (which would cancel where alpha or sigma is small).
    For ``"edm"``: ``(sigma x0 / sigma_data - alpha sigma_data eps) / r``."""
    check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        return -eps / sigma
    if kind == PRECONDITIONED:
        d = check_sigma_data(sigma_data, "truth")
        r = (alpha * alpha * (d * d) + sigma * sigma) ** 0.5
        return (sigma * x0 / d - alpha * d * eps) / r
    return alpha * eps - sigma * x0  # v


def mse_factor(space: str, alpha: C, sigma: C, *, sigma_data: float | None = None) -> C:
    """``||eps - eps_hat||^2 / ||y - y_hat||^2`` for errors measured in the space of kind ``space``
    (exact: at fixed x, eps is affine in y with slope ``q(space -> eps)``)."""
    _, q = affine(space, "eps", alpha, sigma, sigma_data=sigma_data)
    return q * q
