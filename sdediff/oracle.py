"""Exact ground truth: Gaussian-mixture data and its exact noised marginals under any schedule.

If ``x_0 ~ sum_k w_k N(mu_k, Sigma_k)`` then, for every schedule,
``x_t ~ sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``: exact densities, scores and
eps-predictions at every time. Each covariance is diagonalised once (``Sigma_k = U diag(l) U^T``) so that
every noise level costs one rotation. All arithmetic is float64; results come back in the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ArgumentError
from .sde import SDE

__all__ = [
    "GaussianMixture",
    "ring_mixture",
    "random_gaussian",
    "affine_law",
    "gaussian_kl_full",
    "labelled_ring",
]


class GaussianMixture:
    """A Gaussian mixture in ``D`` dimensions with exact noised marginals.

    Args:
        means: ``(K, D)`` component means (or ``(D,)`` for one component).
        covs: ``(K, D, D)`` symmetric positive semi-definite covariances, ``(K, D)`` diagonals,
            or ``(D, D)`` / ``(D,)`` for one component.
        weights: ``(K,)`` non-negative weights (normalised here); uniform if omitted.
        classes: optional component -> class map, ``(K,)`` integers in ``0..C-1`` (C = ``num_classes``,
            default ``max + 1``). Then the mixture is class-labelled: ``log_prob``/``score``/``eps``
            take ``class_labels`` (``(B,)`` ints, or None; label ``C`` is the null class = unconditional)
            and give the exact conditional law ``p_t(x | y)`` (the components of class ``y``, renormalised)
            at every time of every schedule; :meth:`guided_eps` is the exact guided prediction and
            :meth:`log_posterior` the exact ``log p(y | x_t)``.
    """

    def __init__(self, means, covs, weights=None, classes=None, num_classes: int | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.ndim == 1:
            means = means[None]
            covs = covs[None]
        if means.ndim != 2:
            raise ValueError(f"GaussianMixture: means must have shape (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        if covs.shape == (K, D):
            covs = torch.diag_embed(covs)
        if covs.shape != (K, D, D):
            raise ValueError(
                f"GaussianMixture: covs must have shape (K, D, D) or (K, D) with K={K}, D={D}, "
                f"got {tuple(covs.shape)}"
            )
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,):
            raise ValueError(f"GaussianMixture: weights must have shape ({K},), got {tuple(weights.shape)}")
        for name, v in (("means", means), ("covs", covs), ("weights", weights)):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"GaussianMixture: {name} must be finite")
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("GaussianMixture: weights must be non-negative with a positive sum")
        if not torch.allclose(covs, covs.transpose(1, 2), atol=1e-12):
            raise ValueError("GaussianMixture: covs must be symmetric")
        evals, evecs = torch.linalg.eigh(covs)
        if bool((evals < -1e-12 * evals.abs().max().clamp(min=1)).any()):
            raise ValueError("GaussianMixture: covs must be positive semi-definite")
        self.means, self.covs = means, covs
        self.weights = weights / weights.sum()
        self.evals, self.evecs = evals.clamp(min=0), evecs
        self.K, self.D = K, D
        self.classes, self.num_classes = _class_map(classes, num_classes, K)

    # -- data law -------------------------------------------------------------------------------------
    @property
    def mean(self) -> Tensor:
        """Mean of the mixture (float64, ``(D,)``)."""
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        """Covariance of the mixture (float64, ``(D, D)``)."""
        m = self.mean
        diff = self.means - m
        second = self.covs + diff[:, :, None] * diff[:, None, :]
        return torch.einsum("k,kij->ij", self.weights, second)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples (float64, ``(n, D)``)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        scale = self.evecs[comp] * self.evals[comp].sqrt()[:, None, :]
        return self.means[comp] + torch.einsum("nij,nj->ni", scale, z)

    # -- noised marginals -------------------------------------------------------------------------------
    def _components(self, x: Tensor, t, sde: SDE):
        """Per-sample, per-component rotated residuals and variances at time t."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        if x64.shape[1] != self.D:
            raise ValueError(
                f"GaussianMixture: x has {x64.shape[1]} dimensions per sample, expected {self.D}"
            )
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha, sigma = sde.marginal(t)
        alpha, sigma = alpha.to(x64.device), sigma.to(x64.device)
        dev = x64.device
        evecs, evals, means = self.evecs.to(dev), self.evals.to(dev), self.means.to(dev)
        resid = x64[:, None, :] - alpha[:, None, None] * means[None]  # (B, K, D)
        y = torch.einsum("kji,bkj->bki", evecs, resid)  # U_k^T r
        var = alpha[:, None, None] ** 2 * evals[None] + sigma[:, None, None] ** 2  # (B, K, D)
        logn = -0.5 * (y * y / var).sum(-1) - 0.5 * var.log().sum(-1) - 0.5 * self.D * math.log(2 * math.pi)
        return y, var, logn + self.weights.to(dev).log()[None], sigma, evecs

    def log_prob(self, x: Tensor, t, sde: SDE, class_labels=None) -> Tensor:
        """Exact ``log p_t(x)`` of the noised marginal (nats, one value per sample, float64); with
        ``class_labels`` the class-conditional ``log p_t(x | y)``."""
        _, _, logw, _, _ = self._components(x, t, sde)
        logw, log_py = self._condition(logw, class_labels)
        return torch.logsumexp(logw, dim=1) - log_py

    def score(self, x: Tensor, t, sde: SDE, class_labels=None) -> Tensor:
        """Exact ``grad_x log p_t(x)`` (or ``grad_x log p_t(x | y)``), shaped and typed like ``x``."""
        y, var, logw, _, evecs = self._components(x, t, sde)
        logw, _ = self._condition(logw, class_labels)
        resp = torch.softmax(logw, dim=1)  # (B, K)
        comp = torch.einsum("kij,bkj->bki", evecs, -y / var)  # U_k (-(y/var))
        return (resp[:, :, None] * comp).sum(1).reshape(x.shape).to(x.dtype)

    def eps(self, x: Tensor, t, sde: SDE, class_labels=None) -> Tensor:
        """Exact eps-prediction ``-sigma(t) * score`` (conditional with ``class_labels``), shaped and typed
        like ``x``."""
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t64.ndim == 0:
            t64 = t64.expand(x.shape[0])
        sigma = sde.marginal(t64)[1].to(x.device)
        s = self.score(x, t64, sde, class_labels).to(torch.float64).reshape(x.shape[0], -1)
        return (-sigma[:, None] * s).reshape(x.shape).to(x.dtype)

    def sample_marginal(self, n: int, t, sde: SDE, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of the noised marginal ``p_t`` (float64): ``alpha x_0 + sigma eps``."""
        alpha, sigma = (float(v) for v in sde.marginal(t))
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        return alpha * self.sample(n, generator) + sigma * z

    def marginal_moments(self, t, sde: SDE) -> tuple[Tensor, Tensor]:
        """Mean and covariance (float64) of the noised marginal ``p_t``: ``alpha m`` and
        ``alpha^2 C + sigma^2 I`` (its exact law when the mixture has one component)."""
        alpha, sigma = (float(v) for v in sde.marginal(t))
        cov = alpha**2 * self.cov + sigma**2 * torch.eye(self.D, dtype=torch.float64)
        return alpha * self.mean, 0.5 * (cov + cov.T)

    def model(self, sde: SDE):
        """The exact eps-predictor as a plain callable ``(x, t) -> eps``, usable wherever a net is; for
        a class-labelled mixture ``(x, t, class_labels=None) -> eps`` with ``num_classes`` and
        ``class_prior`` (what :func:`sdediff.guided` and :func:`sdediff.classify` read)."""
        if self.classes is not None:
            return _ConditionalOracle(self, sde)

        def exact_eps(x: Tensor, t: Tensor) -> Tensor:
            return self.eps(x, t, sde)

        return exact_eps

    # -- class labels ---------------------------------------------------------------------------------
    @property
    def class_prior(self) -> Tensor:
        """``p(y)``: the total weight of each class's components (float64, ``(C,)``)."""
        self._need_classes("class_prior")
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.classes, self.weights)

    def _need_classes(self, what: str) -> None:
        if self.classes is None:
            raise ArgumentError(
                "classes", None, f"must be given (a component -> class map) to use {what}", "GaussianMixture"
            )

    def _condition(self, logw: Tensor, class_labels) -> tuple[Tensor, Tensor]:
        """``(log w_k N_k restricted to each row's class, log p(y) per row)``; rows labelled None or the
        null class ``C`` keep every component (log p = 0)."""
        if class_labels is None:
            return logw, torch.zeros(logw.shape[0], dtype=logw.dtype, device=logw.device)
        self._need_classes("class_labels")
        B, C = logw.shape[0], self.num_classes
        labels = torch.as_tensor(class_labels, device=logw.device)
        if labels.ndim == 0:
            labels = labels.expand(B)
        if labels.dtype.is_floating_point or tuple(labels.shape) != (B,):
            raise ArgumentError(
                "class_labels", tuple(labels.shape), f"must be ints of shape ({B},)", "GaussianMixture"
            )
        if bool(((labels < 0) | (labels > C)).any()):
            raise ArgumentError(
                "class_labels", labels.tolist(), f"must lie in 0..{C} ({C} = null)", "GaussianMixture"
            )
        null = labels == C
        keep = (self.classes.to(logw.device)[None, :] == labels[:, None]) | null[:, None]
        log_py = self.class_prior.to(logw.device).log()[labels.clamp(max=C - 1)]
        return logw.masked_fill(~keep, -math.inf), torch.where(null, torch.zeros_like(log_py), log_py)

    def log_posterior(self, x: Tensor, t, sde: SDE) -> Tensor:
        """Exact ``log p(y | x_t)`` for every class (float64, ``(B, C)``)."""
        self._need_classes("log_posterior")
        _, _, logw, _, _ = self._components(x, t, sde)
        C = self.num_classes
        per = torch.full((logw.shape[0], C), -math.inf, dtype=logw.dtype, device=logw.device)
        for c in range(C):
            sel = self.classes.to(logw.device) == c
            if bool(sel.any()):
                per[:, c] = torch.logsumexp(logw[:, sel], dim=1)
        return per - torch.logsumexp(logw, dim=1, keepdim=True)

    def guided_eps(self, x: Tensor, t, sde: SDE, class_labels, scale: float) -> Tensor:
        """The exact guided eps ``eps(x) + scale (eps(x | y) - eps(x))`` (float64 arithmetic)."""
        xx = x.to(torch.float64)
        u = self.eps(xx, t, sde)
        c = self.eps(xx, t, sde, class_labels)
        return (u + float(scale) * (c - u)).to(x.dtype)

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` exact samples with their class labels: ``(x (n, D) float64, y (n,) int64)``."""
        self._need_classes("sample_labelled")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        scale = self.evecs[comp] * self.evals[comp].sqrt()[:, None, :]
        return self.means[comp] + torch.einsum("nij,nj->ni", scale, z), self.classes[comp].clone()

    def class_mixture(self, c: int) -> GaussianMixture:
        """The data law of class ``c`` alone (its components, renormalised) as a mixture."""
        self._need_classes("class_mixture")
        sel = self.classes == int(c)
        return GaussianMixture(self.means[sel], self.covs[sel], self.weights[sel])

    def __repr__(self) -> str:
        extra = f", classes={self.num_classes}" if self.classes is not None else ""
        return f"GaussianMixture(K={self.K}, D={self.D}{extra})"


def _class_map(classes, num_classes, K: int):
    """``(classes (K,) int64 or None, C)`` checked."""
    if classes is None:
        if num_classes is not None:
            raise ArgumentError("num_classes", num_classes, "needs classes (the component -> class map)")
        return None, 0
    classes = torch.as_tensor(classes)
    if classes.dtype.is_floating_point or classes.dtype == torch.bool or tuple(classes.shape) != (K,):
        raise ArgumentError(
            "classes",
            tuple(classes.shape),
            f"must be ({K},) integers, one class per component",
            "GaussianMixture",
        )
    classes = classes.to(torch.long)
    C = int(classes.max()) + 1 if num_classes is None else num_classes
    if isinstance(C, bool) or int(C) != C or int(classes.min()) < 0 or int(classes.max()) >= C:
        raise ArgumentError(
            "classes", classes.tolist(), f"must lie in 0..num_classes-1 (num_classes={C})", "GaussianMixture"
        )
    return classes, int(C)


class _ConditionalOracle:
    """The exact conditional eps-predictor ``net(x, t, class_labels=None)`` of a class-labelled mixture."""

    def __init__(self, gm: GaussianMixture, sde: SDE):
        self.gm, self.sde = gm, sde
        self.num_classes = gm.num_classes
        self.class_prior = gm.class_prior

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.gm.eps(x, t, self.sde, class_labels)


def labelled_ring(k: int = 8, radius: float = 2.0, var: float = 0.05) -> GaussianMixture:
    """:func:`ring_mixture` with one class per mode (component ``i`` is class ``i``): toy2d_cond's law."""
    gm = ring_mixture(k, radius, var)
    return GaussianMixture(gm.means, gm.covs, gm.weights, classes=torch.arange(k))


def ring_mixture(k: int = 8, radius: float = 2.0, var: float = 0.05) -> GaussianMixture:
    """``k`` equal isotropic Gaussians (variance ``var``) evenly spaced on a circle of ``radius`` (2-D)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArgumentError("k", k, "must be a positive integer", "ring_mixture")
    if not (radius > 0 and var > 0):
        raise ArgumentError("var", var, "must be positive (and so must radius)", "ring_mixture")
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixture(means, torch.full((k, 2), float(var), dtype=torch.float64))


def random_gaussian(d: int = 8, eig_min: float = 0.1, eig_max: float = 4.0, seed: int = 0) -> GaussianMixture:
    """One Gaussian in ``d`` dimensions: eigenvalues log-spaced in ``[eig_min, eig_max]`` along a random
    rotation, and a random non-zero mean (seeded): anisotropic, correlated, off-centre."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ArgumentError("d", d, "must be a positive integer", "random_gaussian")
    if not 0 < eig_min <= eig_max:
        raise ArgumentError(
            "eig_min", eig_min, f"must satisfy 0 < eig_min <= eig_max = {eig_max}", "random_gaussian"
        )
    g = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(math.log10(eig_min), math.log10(eig_max), d, dtype=torch.float64)
    cov = q @ torch.diag(evals) @ q.T
    return GaussianMixture(torch.randn(d, generator=g, dtype=torch.float64), 0.5 * (cov + cov.T))


# ---------------------------------------------------------------------------------------------------
# exact laws of affine maps (a sampler on Gaussian data)
# ---------------------------------------------------------------------------------------------------
def gaussian_kl_full(mean_q: Tensor, cov_q: Tensor, mean_p: Tensor, cov_p: Tensor) -> float:
    """``KL(N(mean_q, cov_q) || N(mean_p, cov_p))`` in nats (float64, full covariances); ``inf`` when
    ``cov_q`` is singular or not positive definite."""
    mq, mp = mean_q.to(torch.float64).reshape(-1), mean_p.to(torch.float64).reshape(-1)
    Sq, Sp = cov_q.to(torch.float64), cov_p.to(torch.float64)
    D = mq.numel()
    Lp = torch.linalg.cholesky(0.5 * (Sp + Sp.T))
    Lq, info = torch.linalg.cholesky_ex(0.5 * (Sq + Sq.T))
    if int(info) != 0 or not bool(torch.isfinite(Sq).all()) or not bool(torch.isfinite(mq).all()):
        return math.inf
    M = torch.linalg.solve_triangular(Lp, Lq, upper=False)  # Lp^-1 Lq
    d = torch.linalg.solve_triangular(Lp, (mq - mp)[:, None], upper=False)[:, 0]
    logdet_p = 2.0 * Lp.diagonal().log().sum()
    logdet_q = 2.0 * Lq.diagonal().log().sum()
    kl = 0.5 * float((M * M).sum() + d @ d - D + logdet_p - logdet_q)
    return max(kl, 0.0)


class _Columns:
    """A noise source that returns, at its ``k``-th call, the basis vector ``e_j`` in row
    ``first + k * D + j`` (j < D) and zeros elsewhere: one row per (draw, coordinate)."""

    def __init__(self, first: int | None, D: int):
        self.first, self.D, self.calls = first, D, 0

    def __call__(self, x: Tensor, s_from=None, s_to=None) -> Tensor:
        z = torch.zeros_like(x)
        if self.first is not None:
            flat = z.view(x.shape[0], -1)
            rows = self.first + self.calls * self.D + torch.arange(self.D, device=x.device)
            if int(rows[-1]) < x.shape[0]:
                flat[rows, torch.arange(self.D, device=x.device)] = 1.0
        self.calls += 1
        return z


def affine_law(run, mean: Tensor, cov: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor, int]:
    """The exact output law of a map that is affine in its start and in its noise draws.

    ``run(x, noise) -> y`` maps a batch of starts ``x`` (``(B, *item)``, float64) to outputs of the same
    shape, drawing its standard normal noise only through ``noise(x, s_from, s_to) -> z`` (the
    ``noise`` option of the stochastic samplers; k-diffusion's ``noise_sampler``). If ``y`` is affine in
    ``x`` and the draws (a sampler on an affine model, e.g. the exact eps of Gaussian data), then for
    ``x ~ N(mean, cov)``, ``y`` is exactly Gaussian; this returns its ``(mean, covariance, draws)``,
    found by running ``run`` itself twice: once on ``mean`` with zero noise (counting the draws ``K``),
    once on the batch ``[mean, mean + e_1 .. mean + e_D, mean (x K D)]`` with the noise of draw ``k``
    set to ``e_j`` in row ``1 + D + k D + j``: ``y = y_0 + A (x - mean) + sum_k C_k z_k``, so
    ``Cov y = A cov A^T + sum_k C_k C_k^T``. Costs a batch of ``1 + D (K + 1)`` rows (+1 for ``check``).

    ``check``: one more row ``mean + u`` verifies that ``run`` is affine in ``x`` (``ValueError`` if not).
    """
    mean = torch.as_tensor(mean, dtype=torch.float64)
    item = tuple(mean.shape)
    D = mean.numel()
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.shape != (D, D):
        raise ValueError(f"affine_law: cov must have shape ({D}, {D}), got {tuple(cov.shape)}")
    counter = _Columns(None, D)
    y0 = run(mean.reshape(1, *item).clone(), counter)
    K = counter.calls
    first = 1 + D
    n = first + K * D
    rows = [mean.reshape(1, D).expand(n, D).clone()]
    rows[0][1 : 1 + D] += torch.eye(D, dtype=torch.float64)
    u = None
    if check:
        g = torch.Generator().manual_seed(0)
        u = torch.randn(D, generator=g, dtype=torch.float64)
        rows.append((mean.reshape(-1) + u)[None])
    x = torch.cat(rows).reshape(-1, *item)
    cols = _Columns(first, D)
    y = run(x, cols).to(torch.float64).reshape(x.shape[0], D)
    if cols.calls != K:
        raise ValueError(f"affine_law: run drew noise {cols.calls} times on the batch, {K} times alone")
    base = y[0]
    A = (y[1 : 1 + D] - base).T
    N = y[first:n] - base
    out_cov = A @ cov @ A.T + N.T @ N
    if check:
        pred = base + A @ u
        scale = 1.0 + float(y[: 1 + D].abs().max()) + float(A.abs().max()) * float(u.abs().max())
        if float((y[-1] - pred).abs().max()) > 1e-8 * scale or float((base - y0.reshape(-1)).abs().max()) > (
            1e-8 * scale
        ):
            raise ValueError(
                "affine_law: the map is not affine in its start (is the model the exact eps of Gaussian "
                "data, in float64?)"
            )
    return base.reshape(item), 0.5 * (out_cov + out_cov.T), K
