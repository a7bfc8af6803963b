"""A class-conditional diffusion model as a classifier: Bayes' rule over its conditional likelihoods.

    log p(y | x) = log p(y) + log p(x | y) - log sum_c p(c) p(x | c)

``log p(x | y)`` is the PF-ODE log-likelihood of the model conditioned on ``y``
(:func:`~sdediff.log_likelihood` of ``sd.guided(model, y, 1.0)``, method ``"pf_ode"``), or minus the
continuous negative ELBO (:func:`~sdediff.continuous_elbo`, method ``"elbo"``: a bound, so the posterior
is approximate; every class sees the same Monte-Carlo draws, so their noise largely cancels in the
differences). The prior ``p(y)`` is the training labels' frequencies, stored in the net
(``class_embed.class_prior``, set by training) or given as ``prior``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..models import as_model
from ..sde import SDE
from .bounds import continuous_elbo
from .pf_ode import log_likelihood

__all__ = ["classify", "class_prior_of", "CLASSIFY_METHODS"]

CLASSIFY_METHODS = ("pf_ode", "elbo")


def class_prior_of(model) -> Tensor | None:
    """The training label frequencies a conditional model carries (float64 ``(K,)``), or None."""
    seen = set()
    obj = model
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        prior = getattr(obj, "class_prior", None)
        if prior is None:
            emb = getattr(obj, "class_embed", None)
            prior = getattr(emb, "class_prior", None)
        if prior is not None:
            return torch.as_tensor(prior).detach().to("cpu", torch.float64)
        modules = getattr(obj, "_modules", {})
        obj = modules.get("net") or modules.get("inner") or getattr(obj, "_fn", None)
    return None


def classify(
    model,
    sde: SDE,
    x: Tensor,
    method: str = "pf_ode",
    *,
    prior=None,
    seed: int = 0,
    **options,
) -> Tensor:
    """``log p(y | x)`` for every class ``y`` by Bayes' rule over the model's conditional likelihoods.

    Args:
        model: a class-conditional :class:`~sdediff.Model` (``num_classes = K > 0``).
        sde: the SDE it was trained for.
        x: the points, ``(B, ...)``.
        method: ``"pf_ode"`` (exact PF-ODE log-likelihoods) or ``"elbo"`` (the continuous ELBO).
        prior: ``(K,)`` class probabilities; default the model's training label frequencies
            (uniform for a net that has none).
        seed: seeds one generator per class, the same for every class (common random numbers: the ELBO's
            draws, Hutchinson's probes).
        **options: passed to :func:`~sdediff.log_likelihood` or :func:`~sdediff.continuous_elbo`
            (``rtol``, ``atol``, ``trace``, ``n_t``, ...).

    Returns:
        float64 ``(B, K)``: ``log p(y | x)``; ``argmax(1)`` is the predicted class.
    """
    from ..guidance import guided

    if method not in CLASSIFY_METHODS:
        raise ArgumentError("method", method, f"must be one of {', '.join(CLASSIFY_METHODS)}", "classify")
    model = as_model(model)
    K = model.num_classes
    if K < 1:
        raise ArgumentError(
            "model", "an unconditional model", "must be class-conditional (num_classes=K)", "classify"
        )
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2:
        raise ArgumentError("x", type(x).__name__, "must be a floating-point tensor (B, ...)", "classify")
    if "generator" in options:
        raise ArgumentError("generator", "a generator", "is set per class from seed; pass seed=", "classify")
    if prior is None:
        prior = class_prior_of(model)
    if prior is None:
        prior = torch.full((K,), 1.0 / K, dtype=torch.float64)
    prior = torch.as_tensor(prior, dtype=torch.float64).cpu()
    if prior.shape != (K,) or not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()):
        raise ArgumentError("prior", tuple(prior.shape), f"must be ({K},) non-negative numbers", "classify")
    if float(prior.sum()) <= 0:
        raise ArgumentError("prior", prior.tolist(), "must have a positive sum", "classify")
    prior = prior / prior.sum()
    cols = []
    for c in range(K):
        g = torch.Generator(device=x.device).manual_seed(int(seed))
        mc = guided(model, c, 1.0)  # the conditional model of class c (B network rows per call)
        if method == "pf_ode":
            cols.append(log_likelihood(mc, sde, x, generator=g, **options).logp.to(torch.float64))
        else:
            cols.append(-continuous_elbo(mc, sde, x, generator=g, **options).nelbo.to(torch.float64))
    logj = torch.stack(cols, 1).cpu() + prior.log()[None]
    return torch.log_softmax(logj, dim=1)
