"""Classifier-free guidance (Ho & Salimans 2022) as a model: :func:`guided`.

A class-conditional :class:`~sdediff.Model` (its net built with ``num_classes=K``; label ``K`` is the
null class the net was trained on with probability ``p_uncond``) gives the conditional prediction
``pred(x, c)`` and the unconditional ``pred(x, null)``. The guided prediction is::

    pred(x, null) + scale * (pred(x, c) - pred(x, null))

(``scale`` 1: conditional, 0: unconditional; diffusers' ``guidance_scale``, Ho & Salimans' ``w = scale -
1``), computed from **one** network call on ``2B`` rows ``[x; x]`` with labels ``[c; null]`` (only ``B``
rows at scale 0 or 1, where one half is not needed: scale 0 is then bitwise the unconditional model).

The combination has weights ``1 - scale`` and ``scale`` summing to 1, and every conversion between
prediction kinds is affine in the prediction with the same ``x`` (``a x + b out``), so guiding the
network's native output (eps, x0, v or score) *is* guiding any other kind. The guided model is
therefore a plain :class:`~sdediff.Model` to everything downstream: the samplers' fast path (no
conversion per step), ``grid="fitted"``, :func:`~sdediff.log_likelihood` and the bounds take it as they
take any model; none of them knows guidance exists.

``interval=(sigma_lo, sigma_hi)`` (Kynkäänniemi et al. 2024) guides only where EDM's noise level
``sigma(t) / alpha(t)`` (= ``exp(-lambda/2)``; ``sigma(t)`` itself for VE schedules) lies in
``(sigma_lo, sigma_hi]`` and returns the plain conditional prediction elsewhere. That needs the schedule,
so an interval-guided model does its own schedule math through ``predict(x, t, sde, ...)`` (a
``forward`` without an sde uses the ``sde`` given to :func:`guided`).

Labels: an int (every row that class) or an int64 tensor ``(n,)``; a batch of ``B`` rows takes row
``i``'s label as ``class_labels[i % n]``, so a batch of ``R`` stacked copies ``x.repeat(R, ...)`` (how
the likelihoods batch their probes and draws) keeps each point's own label.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .errors import ArgumentError
from .models import Model, _batch_times, _to_kind, as_model, raw_net
from .parameterization import check_kind
from .sde import SDE, append_dims

__all__ = ["Guided", "guided"]


def _check_labels(class_labels, num_classes: int) -> Tensor:
    if isinstance(class_labels, bool):
        raise ArgumentError("class_labels", class_labels, "must be an int or an int64 tensor", "guided")
    if isinstance(class_labels, numbers.Integral):
        labels = torch.tensor([int(class_labels)], dtype=torch.long)
    else:
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentError(
                "class_labels", type(class_labels).__name__, "must be an int or an int64 tensor", "guided"
            ) from None
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ArgumentError("class_labels", labels.dtype, "must hold integers (int64)", "guided")
        if labels.ndim == 0:
            labels = labels.reshape(1)
        if labels.ndim != 1 or labels.numel() == 0:
            raise ArgumentError(
                "class_labels", tuple(labels.shape), "must be an int or a non-empty (n,) tensor", "guided"
            )
        labels = labels.to(torch.long)
    lo, hi = int(labels.min()), int(labels.max())  # once, at construction
    if lo < 0 or hi >= num_classes:
        raise ArgumentError(
            "class_labels",
            hi if hi >= num_classes else lo,
            f"must lie in 0..{num_classes - 1} (the model has {num_classes} classes)",
            "guided",
        )
    return labels


class Guided(Model):
    """A classifier-free-guided model (build it with :func:`guided`).

    Attributes:
        inner: the conditional model.
        class_labels: the labels, int64 ``(n,)`` (cycled over a batch's rows).
        scale: the guidance scale.
        interval: ``(sigma_lo, sigma_hi)`` or None.
        rows_per_item: network rows per guided row (2, or 1 at scale 0 or 1): what
            :class:`~sdediff.samplers.base.Evaluator` counts as ``info.rows``.
    """

    def __init__(self, model: Model, class_labels: Tensor, scale: float, interval=None, sde=None):
        torch.nn.Module.__init__(self)  # not Model.__init__: the inner model is called, not a net
        self.inner = model
        self.prediction = model.prediction
        self.learn_variance = model.learn_variance
        # the inner model's input map (EDM preconditioning, c_noise): the fast path serves bare models only
        self.sigma_data, self.c_noise = getattr(model, "sigma_data", None), getattr(model, "c_noise", "t")
        self.register_buffer("class_labels", class_labels, persistent=False)
        self.scale = float(scale)
        self.interval = interval
        self.sde = sde
        only_one_half = self.scale in (0.0, 1.0) and (interval is None or self.scale == 1.0)
        self.rows_per_item = 1 if only_one_half else 2

    @property
    def num_classes(self) -> int:
        return self.inner.num_classes

    def extra_repr(self) -> str:
        labels = self.class_labels.tolist()
        shown = labels if len(labels) <= 8 else [*labels[:8], "..."]
        iv = f", interval={self.interval}" if self.interval is not None else ""
        return f"scale={self.scale:g}, class_labels={shown}{iv}"

    def labels_for(self, batch: int, device) -> Tensor:
        """The ``(batch,)`` labels of a batch: ``class_labels[i % n]`` for row ``i``."""
        labels = self.class_labels.to(device)
        n = labels.shape[0]
        if n == batch:
            return labels
        return labels.repeat(-(-batch // n))[:batch]

    def _halves(self, call, x: Tensor, t, labels: Tensor):
        """``((cond, v), (uncond, v))`` from one call on the ``2B`` rows ``[x; x]`` with labels
        ``[c; null]``; at scale 0 or 1 (no interval) only the half needed, on ``B`` rows (the other None)."""
        null = torch.full_like(labels, self.num_classes)
        if self.rows_per_item == 1:
            if self.scale == 0.0:
                return None, call(x, t, null)
            return call(x, t, labels), None
        t = torch.as_tensor(t, device=x.device)
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        out, v = call(torch.cat([x, x]), t2, torch.cat([labels, null]))
        oc, ou = out.chunk(2)
        vc, vu = v.chunk(2) if v is not None else (None, None)
        return (oc, vc), (ou, vu)

    def _combine(self, call, x: Tensor, t, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        cond, uncond = self._halves(call, x, t, self.labels_for(x.shape[0], x.device))
        if cond is None:
            return uncond
        if uncond is None:
            return cond
        (oc, vc), (ou, _) = cond, uncond
        out = ou + self.scale * (oc - ou)
        if mask is not None:  # the plain conditional prediction outside the interval
            out = torch.where(append_dims(mask, x.ndim), out, oc)
        return out, vc  # a learned variance: the conditional half's

    # -- the fast path: the native output, what the samplers' Evaluator calls ---------------------------
    def _call_full(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None):
        _refuse(class_labels)
        return self._combine(self.inner._call_full, x, t)


def _refuse(class_labels) -> None:
    if class_labels is not None:
        raise ArgumentError(
            "class_labels",
            "a tensor",
            "must be None for a guided model: it carries its own labels (build another with sd.guided)",
            "Guided",
        )


class _PredictGuided(Guided):
    """A guided model that does its own schedule math (an interval needs sigma(t)/alpha(t); an inner
    model that overrides ``predict`` must be asked through it): the Evaluator asks it for x0."""

    def _mask(self, t, sde: SDE, x: Tensor) -> Tensor | None:
        if self.interval is None:
            return None
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t64 = t64.expand(x.shape[0]) if t64.ndim == 0 else t64
        alpha, sigma = sde.marginal(t64)  # as the conversions take them (same device handling)
        s = sigma / alpha  # EDM's noise level
        lo, hi = self.interval
        return ((s > lo) & (s <= hi)).to(x.device)

    def predict_with_v(self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels=None):
        check_kind(kind, "kind")
        _refuse(class_labels)
        # the native output of a bare net; else x0 (an inner model with its own input map, e.g. EDM's):
        # the combination's weights sum to 1 and every conversion is affine, so either space guides alike
        bare = raw_net(self.inner) is not None
        native = self.prediction if bare else "x0"

        def call(xx, tt, labels):
            if bare:
                return self.inner._call_full(xx, _batch_times(tt, xx), labels)
            return self.inner.predict_with_v(xx, tt, sde, native, class_labels=labels)

        out, v = self._combine(call, x, t, self._mask(t, sde, x))
        return _to_kind(out, native, x, t, sde, kind), v

    def predict(self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels=None) -> Tensor:
        return self.predict_with_v(x, t, sde, kind, class_labels)[0]

    def forward(self, x: Tensor, t, with_v: bool = False, class_labels=None):
        if self.sde is None:
            raise ArgumentError(
                "sde",
                None,
                "is needed to call an interval-guided model without one: use model.predict(x, t, sde, kind) "
                "or sd.guided(..., sde=sde)",
                "Guided",
            )
        out, v = self.predict_with_v(x, t, self.sde, self.prediction, class_labels)
        return (out, v) if with_v else out


def guided(model, class_labels, scale: float, interval=None, *, sde: SDE | None = None) -> Guided:
    """The classifier-free-guided version of a class-conditional model (see the module notes).

    Args:
        model: a class-conditional :class:`~sdediff.Model` (its net has ``num_classes = K > 0``; label
            ``K`` is the null class).
        class_labels: an int (every row) or an int64 tensor ``(n,)`` of labels in ``0..K-1``; row ``i`` of
            a batch takes ``class_labels[i % n]``.
        scale: the guidance scale (1: conditional, 0: unconditional, > 1: guided), a finite number.
        interval: ``(sigma_lo, sigma_hi)`` with ``0 <= sigma_lo < sigma_hi``: guide only where
            ``sigma(t)/alpha(t)`` lies in ``(sigma_lo, sigma_hi]``, the plain conditional prediction
            elsewhere. None: guide at every time.
        sde: only for calling an interval-guided model as ``model(x, t)`` (samplers and likelihoods
            pass their own sde to ``predict``).

    Returns:
        a :class:`Guided` model, usable wherever a model is; one call = one guided evaluation
        (``info.nfe``) of ``2B`` network rows (``info.rows``; ``B`` at scale 0 or 1).
    """
    if not callable(model):
        raise ArgumentError("model", type(model).__name__, "must be a class-conditional Model", "guided")
    model = as_model(model)
    if isinstance(model, Guided):
        raise ArgumentError("model", "a guided model", "must be the conditional model itself", "guided")
    K = model.num_classes
    if K < 1:
        raise ArgumentError(
            "model",
            "an unconditional model",
            "must be class-conditional (a net built with num_classes=K, trained with labels)",
            "guided",
        )
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ArgumentError(
            "scale", scale, "must be a finite number (1: conditional, 0: unconditional)", "guided"
        )
    labels = _check_labels(class_labels, K)
    if interval is not None:
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ArgumentError(
                "interval", interval, "must be a pair (sigma_lo, sigma_hi) or None", "guided"
            ) from None
        if not (0.0 <= lo < hi and not math.isnan(hi)):
            raise ArgumentError("interval", interval, "must satisfy 0 <= sigma_lo < sigma_hi", "guided")
        interval = (lo, hi)
    if sde is not None and not isinstance(sde, SDE):
        raise ArgumentError("sde", type(sde).__name__, "must be an sdediff.SDE or None", "guided")
    plain = raw_net(model) is not None and interval is None
    cls = Guided if plain else _PredictGuided
    return cls(model, labels, float(scale), interval, sde)
