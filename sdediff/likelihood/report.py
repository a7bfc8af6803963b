"""All applicable likelihoods of one model on the same data, side by side."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..sde import SDE
from ._common import _check_batch, _check_sde, _mean_and_stderr
from .bounds import continuous_elbo, discrete_vlb
from .pf_ode import bits_per_dim, log_likelihood

__all__ = ["LikelihoodReport", "likelihood_report"]

_LN2 = math.log(2.0)


class LikelihoodReport(NamedTuple):
    """Result of :func:`likelihood_report`: ``results`` (a plain dict) and ``text`` (a formatted table)."""

    results: dict
    text: str

    def __str__(self) -> str:
        return self.text


def likelihood_report(
    model,
    sde: SDE,
    x: Tensor,
    *,
    data_range: str | None = None,
    generator: torch.Generator | None = None,
    ll_kwargs: dict | None = None,
    elbo_kwargs: dict | None = None,
    vlb_kwargs: dict | None = None,
) -> LikelihoodReport:
    """PF-ODE NLL, continuous -ELBO and (for discrete schedules) the discrete VLB of one model on one data.

    For 8-bit data (``x`` uint8, or ``data_range`` given) all three bound ``-log P(k)``: the PF-ODE NLL by
    uniform dequantization (:func:`bits_per_dim`), the -ELBO and VLB with discretized decoders. For continuous
    data (``data_range=None`` and float x) all three are negative log-densities (Gaussian decoders). Values
    are means over the samples, with the standard error of that mean, in nats/dim and bits/dim. For a good
    model the PF-ODE NLL should not exceed the -ELBO (nor the VLB); the report states whether it does.

    Returns:
        :class:`LikelihoodReport` ``(results, text)``; ``results`` maps ``"pf_ode"``, ``"neg_elbo"``,
        ``"discrete_vlb"`` (None for continuous schedules) to ``{"nats_per_dim", "bits_per_dim", "stderr_bpd",
        "nfe"}`` and holds ``"n"``, ``"D"``, ``"discrete_data"``, ``"neg_elbo_minus_nll_bpd"`` with its
        ``"neg_elbo_minus_nll_stderr"`` (paired per-sample differences) and ``"pf_ode_le_neg_elbo"``.
    """
    _check_sde(sde)
    _check_batch(x)
    discrete_data = x.dtype == torch.uint8 or data_range is not None
    if discrete_data and data_range is None:
        data_range = "[-1,1]"
    ll_kwargs, elbo_kwargs, vlb_kwargs = (
        dict(ll_kwargs or {}),
        dict(elbo_kwargs or {}),
        dict(vlb_kwargs or {}),
    )
    B, D = x.shape[0], x[0].numel()

    def row(bpd: Tensor, nfe=None) -> dict:
        mean, se = _mean_and_stderr(bpd)
        return {"nats_per_dim": mean * _LN2, "bits_per_dim": mean, "stderr_bpd": se, "nfe": nfe}

    if discrete_data:
        res = bits_per_dim(model, sde, x, data_range=data_range, generator=generator, **ll_kwargs)
        pf_bpd, nfe = res.bpd, res.nfe
        dec = {"decoder": "discretized", "data_range": data_range}
    else:
        res = log_likelihood(model, sde, x, generator=generator, **ll_kwargs)
        pf_bpd, nfe = -res.logp.to(torch.float64) / (D * _LN2), res.nfe
        dec = {"decoder": "gaussian"}
    elbo = continuous_elbo(model, sde, x, generator=generator, **{**dec, **elbo_kwargs})
    pf_bpd, elbo_bpd = pf_bpd.to(elbo.bpd.device), elbo.bpd
    results = {"n": B, "D": D, "discrete_data": discrete_data, "pf_ode": row(pf_bpd, nfe)}
    results["neg_elbo"] = row(elbo_bpd)
    results["discrete_vlb"] = None
    if sde.schedule.timesteps is not None:
        vlb = discrete_vlb(model, sde, x, generator=generator, **{**dec, **vlb_kwargs})
        results["discrete_vlb"] = row(vlb.total)
    # the relation users check, on paired per-sample differences (their noise is far below the data's spread)
    gap, gap_se = _mean_and_stderr(elbo_bpd - pf_bpd)
    results["neg_elbo_minus_nll_bpd"] = gap
    results["neg_elbo_minus_nll_stderr"] = gap_se
    results["pf_ode_le_neg_elbo"] = gap >= 0

    kind = (
        f"8-bit data on {data_range}, bounds on -log P(k)" if discrete_data else "continuous data, densities"
    )
    lines = [
        f"likelihoods of {B} samples, D = {D} ({kind})",
        f"{'quantity':<16}{'nats/dim':>12}{'bits/dim':>12}{'± bits/dim':>12}{'NFE':>7}",
    ]
    names = {"pf_ode": "PF-ODE NLL", "neg_elbo": "-ELBO (VDM)", "discrete_vlb": "discrete VLB"}
    for key, name in names.items():
        r = results[key]
        if r is None:
            lines.append(f"{name:<16}{'n/a (continuous schedule)':>36}")
            continue
        nfe_s = "" if r["nfe"] is None else str(r["nfe"])
        lines.append(
            f"{name:<16}{r['nats_per_dim']:>12.5f}{r['bits_per_dim']:>12.5f}{r['stderr_bpd']:>12.5f}{nfe_s:>7}"
        )
    if gap >= 0:
        verdict = "yes"
    elif not gap_se < -gap / 2:  # within two standard errors (or no error estimate)
        verdict = "within noise"
    else:
        verdict = "NO"
    lines.append(
        f"PF-ODE NLL <= -ELBO: {verdict} "
        f"(-ELBO - NLL = {gap:+.5f} ± {gap_se:.5f} bits/dim, paired over samples)"
    )
    return LikelihoodReport(results, "\n".join(lines))
