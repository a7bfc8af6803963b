"""Conditioning and classifier-free guidance against closed forms (issue 23).

A class-labelled Gaussian mixture (sdediff.oracle) has exact conditional and unconditional eps at every
time of every schedule, hence an exact guided prediction, exact conditional densities and an exact class
posterior. A Gaussian class guided at scale 1 makes every deterministic sampler an affine map, whose
output law's KL to the class is exact.
"""

from __future__ import annotations

import math

import pytest
import torch

import sdediff as sd
from sdediff.errors import ArgumentError
from sdediff.oracle import GaussianMixture, labelled_ring, random_gaussian

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def three_component(D: int = 2) -> GaussianMixture:
    """Three anisotropic components, two classes (class 1 owns two components), unequal weights."""
    g = gen(3)
    means = torch.randn(3, D, generator=g, dtype=F64) * 1.5
    covs = torch.rand(3, D, generator=g, dtype=F64) * 0.5 + 0.1
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=F64), classes=[0, 1, 1])


SCHEDULES = {
    "linear-vp": lambda: sd.LinearVP(),
    "cosine-vp": lambda: sd.CosineVP(),
    "sub-vp": lambda: sd.SubVP(),
    "ve": lambda: sd.VE(),
    "ddpm": lambda: sd.DiscreteVP.ddpm(1000),
}


def conditional_mlp(K: int = 4, D: int = 2, seed: int = 0, prediction: str = "eps") -> sd.Model:
    """A conditional MLP with a randomised (non-zero) class embedding, float64."""
    torch.manual_seed(seed)
    net = sd.MLP(D, hidden=32, depth=2, emb_dim=16, num_classes=K).double()
    with torch.no_grad():
        net.class_embed.embed.weight.normal_(0, 1.0, generator=gen(seed + 1))
    return sd.Model(net, prediction)


# -- the exact guided prediction ----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES, ids=list(SCHEDULES))
def test_guided_eps_on_the_oracle_is_the_exact_combination(schedule):
    gm = three_component()
    sde = sd.SDE(SCHEDULES[schedule]())
    model = sd.Model(gm.model(sde))
    x = gm.sample(16, gen(0)) * 1.3
    labels = torch.arange(16) % 2
    for t in torch.linspace(float(sde.schedule.default_t_min), float(sde.T), 7, dtype=F64):
        for scale in (0.0, 0.5, 1.0, 1.5, 4.0):
            got = sd.guided(model, labels, scale).eps(x, t, sde)
            want = gm.guided_eps(x, t, sde, labels, scale)
            assert float((got - want).abs().max()) <= 1e-12 * max(1.0, float(want.abs().max()))
    # the combination is not the conditional (the check can fail)
    t = torch.tensor(0.5, dtype=F64)
    cond = gm.eps(x, t, sde, labels)
    assert float((sd.guided(model, labels, 3.0).eps(x, t, sde) - cond).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["x0", "v", "score"])
def test_guiding_the_native_kind_is_guiding_eps(kind):
    """A net predicting x0, v or score, guided in its own kind, gives the exact guided eps."""
    gm = three_component()
    sde = sd.SDE(sd.LinearVP())
    eps_model = sd.Model(gm.model(sde))

    class AsKind:
        num_classes = gm.num_classes

        def __call__(self, x, t, class_labels=None):
            return eps_model.predict(x, t, sde, kind, class_labels=class_labels)

    model = sd.Model(AsKind(), kind)
    x = gm.sample(8, gen(1))
    labels = torch.tensor([0, 1] * 4)
    for t in torch.tensor([0.05, 0.4, 0.9], dtype=F64):
        got = sd.guided(model, labels, 2.5).eps(x, t, sde)
        want = gm.guided_eps(x, t, sde, labels, 2.5)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_scale_one_from_a_gaussian_class_has_the_exact_kl_of_its_affine_map():
    """Two single-Gaussian classes: guided at scale 1 on class c is class c's exact eps, so a deterministic
    sampler is the same affine map as on class c's own oracle: the same exact KL (as test_few_step)."""
    D = 3
    a, b = random_gaussian(D, seed=1), random_gaussian(D, seed=2)
    gm = GaussianMixture(torch.cat([a.means, b.means]), torch.cat([a.covs, b.covs]), classes=[0, 1])
    sde = sd.SDE(sd.LinearVP())
    model = sd.Model(gm.model(sde))

    def exact_kl(law, run) -> float:
        y = run(torch.cat([torch.zeros(1, D, dtype=F64), torch.eye(D, dtype=F64)]))
        bb, A = y[0], (y[1:] - y[0]).T
        alpha, sigma = (float(v) for v in sde.marginal(sde.T))
        m = A @ (alpha * law.mean) + bb
        S = A @ (alpha**2 * law.cov + sigma**2 * torch.eye(D, dtype=F64)) @ A.T
        si = torch.linalg.inv(law.cov)
        d = m - law.mean
        return 0.5 * float(torch.trace(si @ S) + d @ si @ d - D + torch.logdet(law.cov) - torch.logdet(S))

    for c, law in ((0, a), (1, b)):
        for sampler in ("dpm_solver", "pf_ode"):

            def run(m, sampler=sampler):
                return lambda x: sd.sample(m, sde, sampler=sampler, steps=12, x_T=x)

            kl_guided = exact_kl(law, run(sd.guided(model, c, 1.0)))
            kl_class = exact_kl(law, run(sd.Model(law.model(sde))))
            assert abs(kl_guided - kl_class) <= 1e-9 * max(1.0, kl_class), (c, sampler, kl_guided, kl_class)
            assert kl_class < 0.05
    # guided at scale 2 is not affine in x_T: its "KL" differs (the check has power)
    kl_2 = exact_kl(a, run(sd.guided(model, 0, 2.0)))
    assert abs(kl_2 - exact_kl(a, run(sd.Model(a.model(sde))))) > 1e-3


# -- the batched call, its cost and its end points ----------------------------------------------------
class RowCounter:
    def __init__(self, net):
        self.calls, self.rows = 0, 0
        net.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.calls += 1
        self.rows += args[0].shape[0]


def test_scale_zero_is_the_unconditional_model_bitwise():
    model = conditional_mlp()
    sde = sd.SDE(sd.LinearVP())
    x_T = torch.randn(6, 2, generator=gen(0), dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    for sampler in ("dpm_solver", "ancestral"):
        a = sd.sample(sd.guided(model, labels, 0.0), sde, sampler=sampler, steps=8, x_T=x_T, generator=gen(1))
        b = sd.sample(model, sde, sampler=sampler, steps=8, x_T=x_T, generator=gen(1))
        assert torch.equal(a, b)
    t = torch.full((6,), 0.3, dtype=F64)
    assert torch.equal(sd.guided(model, labels, 0.0).x0(x_T, t, sde), model.x0(x_T, t, sde))
    assert torch.equal(sd.guided(model, labels, 1.0).x0(x_T, t, sde), model.x0(x_T, t, sde, labels))
    # the labels matter (a conditional net is not silently unconditional)
    assert not torch.allclose(model.x0(x_T, t, sde), model.x0(x_T, t, sde, labels))


def test_the_batched_call_equals_two_separate_calls_and_is_one_call():
    model = conditional_mlp()
    sde = sd.SDE(sd.CosineVP())
    counter = RowCounter(model.net)
    x = torch.randn(5, 2, generator=gen(2), dtype=F64)
    labels = torch.tensor([3, 1, 0, 2, 1])
    t = torch.rand(5, generator=gen(3), dtype=F64) * 0.9 + 0.05
    g = sd.guided(model, labels, 2.0)
    got = g.predict(x, t, sde, "v")
    assert (counter.calls, counter.rows) == (1, 10)
    c, u = model.predict(x, t, sde, "v", class_labels=labels), model.predict(x, t, sde, "v")
    assert torch.allclose(got, u + 2.0 * (c - u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "sampler, steps, nfe", [("dpm_solver", 10, 10), ("pf_ode", 6, 12), ("ancestral", 7, 7)]
)
@pytest.mark.parametrize("scale, rows_per", [(2.0, 2), (1.0, 1), (0.0, 1)])
def test_nfe_and_network_rows_are_counted_exactly(sampler, steps, nfe, scale, rows_per):
    model = conditional_mlp()
    sde = sd.SDE(sd.LinearVP())
    counter = RowCounter(model.net)
    B = 4
    _, info = sd.sample(
        sd.guided(model, torch.arange(B), scale),
        sde,
        sampler=sampler,
        steps=steps,
        shape=(B, 2),
        generator=gen(0),
        return_info=True,
    )
    assert info.nfe == nfe == counter.calls
    assert info.rows == rows_per * B * nfe == counter.rows


def test_the_interval_end_points():
    """Guidance on (sigma_lo, sigma_hi] of sigma/alpha: lo itself is plain conditional, hi guided."""
    gm = three_component()
    for sde in (sd.SDE(sd.LinearVP()), sd.SDE(sd.VE())):
        model = sd.Model(gm.model(sde))
        ta, tb = torch.tensor(0.3, dtype=F64), torch.tensor(0.7, dtype=F64)
        lo, hi = (float(sde.marginal(t)[1] / sde.marginal(t)[0]) for t in (ta, tb))
        g = sd.guided(model, 1, 3.0, interval=(lo, hi))
        x = gm.sample(6, gen(4))
        labels = torch.ones(6, dtype=torch.long)
        for t, inside in ((ta, False), (tb, True), (0.5, True), (0.29, False), (0.71, False)):
            t = torch.as_tensor(t, dtype=F64)
            want = gm.guided_eps(x, t, sde, labels, 3.0) if inside else gm.eps(x, t, sde, labels)
            assert torch.allclose(g.eps(x, t, sde), want, rtol=1e-12, atol=1e-12), (float(t), inside)
        # samplers take it (through predict) and count 2B rows per evaluation
        y, info = sd.sample(g, sde, steps=6, shape=(3, 2), dtype=F64, generator=gen(0), return_info=True)
        assert y.shape == (3, 2) and bool(torch.isfinite(y).all()) and info.rows == 2 * 3 * info.nfe
    # on VE the noise level is sigma(t) itself
    sde = sd.SDE(sd.VE())
    t = torch.tensor(0.4, dtype=F64)
    assert math.isclose(
        float(torch.exp(-0.5 * sde.schedule.log_snr(t))), float(sde.marginal(t)[1]), rel_tol=1e-12
    )


# -- likelihoods and the classifier -------------------------------------------------------------------
def test_the_conditional_pf_ode_likelihood_is_exact_per_point():
    gm = labelled_ring(8)
    sde = sd.SDE(sd.LinearVP())
    model = sd.Model(gm.model(sde))
    x, y = gm.sample_labelled(64, gen(5))
    tol = 1e-5
    res = sd.log_likelihood(
        sd.guided(model, y, 1.0),
        sde,
        x,
        rtol=tol,
        atol=tol,
        prior_log_prob=lambda z: gm.log_prob(z, sde.T, sde, y),
    )
    exact = gm.log_prob(x, 1e-5, sde, y)
    err = (res.logp - exact).abs() / 2  # nats per dimension
    assert float(err.max()) <= 10 * tol
    # and it is the conditional, not the marginal, density (log p(x|y) - log p(x) = log 8 here)
    assert float((exact - gm.log_prob(x, 1e-5, sde)).mean()) > 1.0


@pytest.mark.slow
def test_classify_equals_the_exact_posterior():
    gm = three_component()
    sde = sd.SDE(sd.LinearVP(beta_max=60.0))  # p_T = N(0, I) to 3e-7: no prior-mismatch error
    model = sd.Model(gm.model(sde))
    x = gm.sample(24, gen(6))
    got = sd.classify(model, sde, x, rtol=1e-8, atol=1e-8)
    exact = gm.log_posterior(x, 1e-5, sde)
    assert got.shape == (24, 2)
    assert float((got.exp() - exact.exp()).abs().max()) <= 1e-4
    # the prior matters: a uniform prior gives another posterior
    flat = sd.classify(model, sde, x[:4], prior=torch.tensor([0.9, 0.1]), rtol=1e-8, atol=1e-8)
    assert float((flat.exp() - exact[:4].exp()).abs().max()) > 1e-2


def test_classify_by_elbo_on_separated_classes():
    gm = labelled_ring(8)
    sde = sd.SDE(sd.LinearVP())
    model = sd.Model(gm.model(sde))
    x, y = gm.sample_labelled(16, gen(7))
    logp = sd.classify(model, sde, x, "elbo", n_t=16)
    assert torch.allclose(logp.exp().sum(1), torch.ones(16, dtype=F64))
    assert torch.equal(logp.argmax(1), y)


# -- everything that takes a model takes a guided one -------------------------------------------------
@pytest.mark.parametrize("sampler", sorted(sd.SAMPLERS))
def test_every_sampler_runs_guided(sampler):
    model = conditional_mlp()
    sde = sd.SDE(sd.LinearVP())
    g = sd.guided(model, torch.tensor([0, 1, 2]), 2.0)
    y = sd.sample(g, sde, sampler=sampler, steps=5, shape=(6, 2), generator=gen(0))
    assert y.shape == (6, 2) and bool(torch.isfinite(y).all())


def test_fitted_grid_likelihood_and_bounds_take_a_guided_model():
    model = conditional_mlp()
    sde = sd.SDE(sd.DiscreteVP.ddpm(100))
    g = sd.guided(model, torch.tensor([0, 3]), 1.5)
    y, info = sd.sample(
        g,
        sde,
        grid="fitted",
        steps=4,
        shape=(4, 2),
        generator=gen(0),
        fit={"n_pilot": 8, "max_evals": 6},
        return_info=True,
    )
    assert y.shape == (4, 2) and bool(torch.isfinite(y).all()) and info.pilot_nfe > 0
    x = torch.randn(4, 2, generator=gen(1), dtype=F64)
    assert bool(torch.isfinite(sd.log_likelihood(g, sde, x, rtol=1e-3, atol=1e-3).logp).all())
    assert bool(torch.isfinite(sd.continuous_elbo(g, sde, x, n_t=4, generator=gen(2)).nelbo).all())
    k = torch.randint(0, 256, (4, 2), generator=gen(3))
    x8 = k.to(F64) / 127.5 - 1.0
    assert bool(torch.isfinite(sd.discrete_vlb(g, sde, x8, n_t=4, generator=gen(3)).total).all())


def test_a_fresh_conditional_net_is_its_unconditional_net():
    """The class embedding is zero-initialised: same weights, same output, for any label."""
    for make in (
        lambda k: sd.MLP(3, hidden=16, depth=1, emb_dim=8, num_classes=k),
        lambda k: sd.UNet(in_ch=1, ch=8, ch_mult=(1, 2), attn_resolutions=(), resolution=8, num_classes=k),
    ):
        torch.manual_seed(0)
        uncond = make(0)
        torch.manual_seed(0)
        cond = make(5)
        assert set(cond.state_dict()) - set(uncond.state_dict()) == {
            "class_embed.embed.weight",
            "class_embed.class_prior",
        }
        x = torch.randn(4, 3) if isinstance(uncond, sd.MLP) else torch.randn(4, 1, 8, 8)
        t = torch.rand(4)
        with torch.no_grad():
            assert torch.equal(cond(x, t, class_labels=torch.tensor([0, 4, 5, 2])), uncond(x, t))


# -- bad inputs: one line each ------------------------------------------------------------------------
def test_bad_inputs_raise_one_line():
    cond = conditional_mlp(K=4)
    uncond = sd.Model(sd.MLP(2, hidden=8, depth=1, emb_dim=8))
    x, t = torch.randn(3, 2), torch.rand(3)
    cases = [
        (lambda: uncond.net(x, t, class_labels=torch.zeros(3, dtype=torch.long)), "unconditional"),
        (lambda: sd.guided(uncond, 0, 2.0), "class-conditional"),
        (lambda: sd.guided(cond, 4, 2.0), r"0\.\.3"),
        (lambda: sd.guided(cond, -1, 2.0), r"0\.\.3"),
        (lambda: sd.guided(cond, torch.tensor([0.5]), 2.0), "integers"),
        (lambda: sd.guided(cond, 0, float("nan")), "finite"),
        (lambda: sd.guided(cond, 0, 2.0, interval=(2.0, 1.0)), "sigma_lo < sigma_hi"),
        (lambda: sd.guided(cond, 0, 2.0, interval=3.0), "pair"),
        (lambda: sd.guided(sd.guided(cond, 0, 2.0), 0, 2.0), "conditional model itself"),
        (lambda: sd.guided(cond, 0, 2.0)(x.double(), t.double(), class_labels=torch.zeros(3)), "own labels"),
        (lambda: cond.net(x.double(), t, class_labels=torch.zeros(2, dtype=torch.long)), r"shape \(3,\)"),
        (lambda: sd.classify(uncond, sd.SDE(sd.LinearVP()), x), "class-conditional"),
        (lambda: sd.classify(cond, sd.SDE(sd.LinearVP()), x, method="knn"), "pf_ode"),
        (
            lambda: GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), classes=[0]),
            "one class per component",
        ),
    ]
    for fn, match in cases:
        with pytest.raises(ArgumentError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_from_diffusers_passes_class_labels():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=4,
    )
    with torch.no_grad():
        unet.class_embedding.weight.normal_()
    model, sde = sd.from_diffusers(unet=unet, scheduler=diffusers.DDPMScheduler(), clip=False)
    assert model.num_classes == 3  # the last row is the null class
    x, labels = torch.randn(2, 1, 8, 8, generator=gen(0)), torch.tensor([0, 2])
    with torch.no_grad():
        got = model.eps(x, torch.tensor(0.5, dtype=F64), sde, class_labels=labels)
        assert torch.equal(got, unet(x, torch.tensor(499.0), class_labels=labels).sample)
        null = unet(x, torch.tensor(499.0), class_labels=torch.tensor([3, 3])).sample
        assert torch.equal(model.eps(x, torch.tensor(0.5, dtype=F64), sde), null)
        g = sd.guided(model, labels, 2.0).eps(x, torch.tensor(0.5, dtype=F64), sde)
        assert torch.allclose(g, null + 2.0 * (got - null), atol=1e-5)


# -- training: labels from the data, dropped to the null class with the run's generator ---------------
class _Crash(Exception):
    pass


def _labelled(n=96):
    return sd.data.labelled_mixture_dataset(labelled_ring(4), n, seed=0, classes=["a", "b", "c", "d"])


def _cond_model(K=4, seed=0):
    torch.manual_seed(seed)
    return sd.Model(sd.MLP(2, hidden=16, depth=1, emb_dim=8, num_classes=K))


TKW = dict(batch_size=16, lr=1e-2, ema_decay=0.9, seed=3, progress=False, tensorboard=False)


def test_labels_reach_the_loss_with_p_uncond_drops():
    data = _labelled()
    sde = sd.SDE(sd.LinearVP())
    base = sd.losses.DiffusionLoss(sde)
    seen = []

    def loss(model, x, generator=None, class_labels=None):
        seen.append(class_labels.clone())
        return base(model, x, generator=generator, class_labels=class_labels)

    res = sd.training.train(_cond_model(), loss, data, steps=12, p_uncond=0.0, **TKW)
    b = sd.training.Batches(data, 16, seed=3)
    for step, y in enumerate(seen):
        assert torch.equal(y, data.labels[b.indices(step)])
    # the training label frequencies are the net's class prior
    freq = torch.bincount(data.labels, minlength=4).double() / len(data)
    assert torch.allclose(res.model.net.class_embed.class_prior.double(), freq)
    seen.clear()
    sd.training.train(_cond_model(), loss, data, steps=40, p_uncond=0.3, **TKW)
    y = torch.cat(seen)
    dropped = float((y == 4).double().mean())
    n = y.numel()
    assert abs(dropped - 0.3) <= 4 * math.sqrt(0.3 * 0.7 / n)  # binomial, 4 standard errors
    kept = y != 4
    b = sd.training.Batches(data, 16, seed=3)
    truth = torch.cat([data.labels[b.indices(s)] for s in range(40)])
    assert torch.equal(y[kept], truth[kept])


def test_conditional_training_resumes_bitwise(tmp_path):
    data = _labelled()
    sde = sd.SDE(sd.LinearVP())
    kw = dict(steps=12, ckpt_every=4, keep_checkpoints=None, **TKW)
    full = sd.training.train(_cond_model(), sd.losses.DiffusionLoss(sde), data, out_dir=tmp_path / "a", **kw)

    def crash(step, info):
        if step == 7:
            raise _Crash

    with pytest.raises(_Crash):
        sd.training.train(
            _cond_model(), sd.losses.DiffusionLoss(sde), data, out_dir=tmp_path / "b", callback=crash, **kw
        )
    res = sd.training.train(
        _cond_model(seed=5), sd.losses.DiffusionLoss(sde), data, out_dir=tmp_path / "b", resume=True, **kw
    )
    assert res.start_step == 4 and torch.equal(res.losses, full.losses[4:])
    for a, b in zip(full.model.state_dict().values(), res.model.state_dict().values()):
        assert torch.equal(a, b)
    _, meta = sd.load_checkpoint(tmp_path / "b")
    assert meta["train"]["num_classes"] == 4 and meta["train"]["class_names"] == ["a", "b", "c", "d"]
    # a conditional checkpoint resumed as an unconditional model: one line, before any work
    torch.manual_seed(0)
    uncond = sd.Model(sd.MLP(2, hidden=16, depth=1, emb_dim=8))
    with pytest.raises(sd.ConfigError, match="num_classes=4") as err:
        sd.training.train(
            uncond,
            sd.losses.DiffusionLoss(sde),
            data,
            out_dir=tmp_path / "b",
            resume=True,
            **{**kw, "steps": 20},
        )
    assert "\n" not in str(err.value)


def test_training_bad_labels_fail_before_any_work():
    sde = sd.SDE(sd.LinearVP())
    loss = sd.losses.DiffusionLoss(sde)
    cases = [
        (_cond_model(), torch.randn(64, 2), {}, "unlabelled"),
        (_cond_model(K=3), _labelled(), {}, "label 3"),
        (_cond_model(), _labelled(), {"p_uncond": 1.5}, "p_uncond"),
        (sd.Model(sd.MLP(2, hidden=8, depth=1, emb_dim=8)), _labelled(), {"p_uncond": 0.1}, "p_uncond"),
    ]
    for model, data, extra, match in cases:
        with pytest.raises(sd.ConfigError, match=match) as err:
            sd.training.train(model, loss, data, steps=2, **{**TKW, **extra})
        assert "\n" not in str(err.value)


# -- the three commands --------------------------------------------------------------------------------
@pytest.mark.slow
def test_conditional_commands_end_to_end(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from sdediff.cli import compare as compare_cli
    from sdediff.cli import likelihood as likelihood_cli
    from sdediff.cli import sample as sample_cli
    from sdediff.cli import train as train_cli
    from sdediff.cli._common import config_dir

    def cfg(*overrides, name="config"):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(name, overrides=list(overrides))

    run = tmp_path / "run"
    train_cli.run(
        cfg(
            "experiment=toy2d_cond",
            "data.n=512",
            "model.net.hidden=16",
            "model.net.depth=1",
            "train.steps=20",
            "train.batch_size=64",
            "train.ckpt_every=0",
            "train.progress=false",
            "eval.n_samples=0",
            "eval.likelihood=null",
            "eval.baseline=null",
            f"out_dir={run}",
        )
    )
    out = sample_cli.run(
        cfg(
            f"ckpt={run}",
            "class_labels=all",
            "guidance=2.0",
            "n=16",
            "steps=4",
            f"out_dir={tmp_path / 's'}",
            name="sample_checkpoint",
        )
    )
    assert out["samples"].shape == (16, 2) and torch.equal(
        out["labels"], torch.arange(8).repeat_interleave(2)
    )
    assert out["class_names"][3] == "135°" and out["rows"] == 2 * 16 * out["nfe"]
    npz = __import__("numpy").load(tmp_path / "s" / "samples.npz")
    assert npz["labels"].tolist() == out["labels"].tolist()
    one = sample_cli.run(
        cfg(
            f"ckpt={run}",
            "class_labels=[3]",
            "guidance=2.0",
            "n=5",
            "steps=4",
            f"out_dir={tmp_path / 's1'}",
            name="sample_checkpoint",
        )
    )
    assert torch.equal(one["labels"], torch.full((5,), 3))
    lik = likelihood_cli.run(
        cfg(
            f"ckpt={run}",
            "conditional=true",
            "n=20",
            "elbo.enabled=false",
            "progress=false",
            "pf_ode.rtol=1e-3",
            "pf_ode.atol=1e-3",
            f"out_dir={tmp_path / 'l'}",
            name="likelihood",
        )
    )
    assert any("own label" in r["method"] for r in lik["rows"])
    cmp = compare_cli.run(
        cfg(
            f"ckpt={run}",
            "guidance=[1,2,4]",
            "samplers=[dpm_solver]",
            "steps=[4]",
            "n=50",
            "progress=false",
            f"out_dir={tmp_path / 'c'}",
            name="compare",
        )
    )
    assert [r["sampler"] for r in cmp["rows"]] == ["dpm_solver@1", "dpm_solver@2", "dpm_solver@4"]
    # bad inputs: one line, exit 2
    for bad, name, match in (
        (["class_labels=[8]"], "sample_checkpoint", "must be a class 0..7"),
        (["guidance=2.0"], "sample_checkpoint", "needs class_labels"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample_cli.run(cfg(f"ckpt={run}", f"out_dir={tmp_path / 'bad'}", *bad, name=name))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and match in err and "\n" not in err


@pytest.mark.parametrize("interval", [None, (0.1, 2.0)])
def test_guided_edm_model_equals_the_exact_combination_and_samples(interval):
    """A preconditioned ("edm") conditional model has its own input map: guidance runs in x0 space
    (the combination's weights sum to 1 and the conversions are affine), so the guided eps must equal
    the combination of the conditional and unconditional eps; every sampler runs on it."""
    from sdediff.nets import MLP

    torch.manual_seed(0)
    sde = sd.SDE(sd.LinearVP())
    m = sd.Model(MLP(2, num_classes=3), prediction="edm", sigma_data=0.7).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(6, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.full((6,), 0.4, dtype=torch.float64)
    g = sd.guided(m, y, 2.5, interval=interval)
    e_c = m.predict(x, t, sde, "eps", class_labels=y)
    e_u = m.predict(x, t, sde, "eps", class_labels=torch.full_like(y, 3))
    want = e_u + 2.5 * (e_c - e_u)
    if interval is not None:  # sigma/alpha at t = 0.4 decides whether guidance applies
        a, s = sde.marginal(torch.tensor(0.4, dtype=torch.float64))
        if not (interval[0] < float(s / a) <= interval[1]):
            want = e_c
    assert torch.allclose(g.predict(x, t, sde, "eps"), want, atol=1e-12, rtol=0)
    for name in sd.SAMPLERS:
        out = sd.sample(
            g, sde, sampler=name, steps=6, shape=(4, 2), generator=torch.Generator().manual_seed(0)
        )
        assert out.shape == (4, 2) and bool(torch.isfinite(out).all()), name
