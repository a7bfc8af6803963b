"""diffusers interop: a diffusers DDPM folder under sdediff's samplers and likelihoods, with parity to
diffusers' own DDIM and DDPM loops.

The networks are small random ``UNet2DModel``s (their output layer perturbed so the predictions are not
trivially zero), saved with ``DDPMPipeline.save_pretrained`` into a temporary folder and loaded back
through :func:`sdediff.interop.from_diffusers`. Skipped when diffusers is not installed (CI installs the
``diffusers`` extra).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")

import sdediff as sd  # noqa: E402
from sdediff.interop import DiffusersError, DiffusersUNet, from_diffusers  # noqa: E402
from sdediff.models import ClippedModel  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
C, H = 3, 8


def small_unet(out_channels=C, seed=0):
    torch.manual_seed(seed)
    u = diffusers.UNet2DModel(
        sample_size=H,
        in_channels=C,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    with torch.no_grad():
        u.conv_out.weight.add_(0.05 * torch.randn_like(u.conv_out.weight))
        u.conv_out.bias.add_(0.05 * torch.randn_like(u.conv_out.bias))
    return u.eval()


def save(tmp_path, name="pipe", out_channels=C, **scheduler):
    unet = small_unet(out_channels)
    sch = diffusers.DDPMScheduler(**scheduler)
    path = tmp_path / name
    diffusers.DDPMPipeline(unet=unet, scheduler=sch).save_pretrained(str(path))
    return path, unet, sch


def tolerance(sde):
    """float32 round-off relative to the sample scale: x0 = (x - sigma eps) / alpha amplifies the
    network's rounding by up to 1 / alpha_T at the first step; ten times that per loop."""
    alpha_T = float(sde.schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
    return 10 * EPS32 / alpha_T


def x_T(n=4, seed=0):
    return torch.randn(n, C, H, H, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ddim_loop(unet, sch, x, steps, **step_kw):
    ddim = diffusers.DDIMScheduler.from_config(sch.config, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x, eta=0.0, **step_kw).prev_sample
    return x


@torch.no_grad()
def ddpm_loop(unet, sch, x, generator):
    sch = diffusers.DDPMScheduler.from_config(sch.config)
    sch.set_timesteps(sch.config.num_train_timesteps)
    for t in sch.timesteps:
        x = sch.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return x


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- the loader's rules -----------------------------------------------------------------------------
def test_the_schedule_and_the_timestep_rule(tmp_path):
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"):
        path, unet, sch = save(tmp_path, kind, beta_schedule=kind, beta_start=1e-4, beta_end=0.02)
        model, sde = from_diffusers(path)
        torch.testing.assert_close(sde.schedule.betas, sch.betas.double(), rtol=2e-6, atol=1e-9)
        # DDPM's q(x_k | x_0) is the marginal at the grid time (k + 1) / N
        k = torch.tensor([0, 1, 499, 999])
        alpha = sde.schedule.alpha(((k + 1) / 1000).double())
        # diffusers' float32 cumprod rounds once per factor: N float32 epsilons of relative error at most
        torch.testing.assert_close(alpha**2, sch.alphas_cumprod[k].double(), rtol=1000 * EPS32, atol=0)
    trained = torch.linspace(1e-4, 0.03, 50).tolist()
    path, _, _ = save(tmp_path, "trained", num_train_timesteps=50, trained_betas=trained)
    _, sde = from_diffusers(path)
    torch.testing.assert_close(sde.schedule.betas, torch.tensor(trained, dtype=torch.float64))

    net = DiffusersUNet(small_unet(), 1000)
    grid = torch.tensor([1.0, 0.5, 0.001], dtype=torch.float32)  # float32 grid times land on integers
    assert net.index(grid).tolist() == [999.0, 499.0, 0.0]
    off = torch.tensor([0.5005, 0.0004, 0.9999], dtype=torch.float64)
    torch.testing.assert_close(net.index(off), torch.tensor([499.5, 0.0, 998.9]), rtol=0, atol=1e-4)
    x = x_T(2)
    with torch.no_grad():  # on the grid the network is called with the integer timestep itself
        torch.testing.assert_close(net(x, torch.full((2,), 0.25)), net.unet(x, 249).sample, rtol=0, atol=0)
        # off the grid, the fractional index (a tensor: diffusers casts a Python number to int)
        half = torch.full((2,), 0.2505, dtype=torch.float64)
        torch.testing.assert_close(net(x, half), net.unet(x, torch.tensor(249.5)).sample, rtol=0, atol=0)
        assert not torch.equal(net(x, half), net(x, torch.full((2,), 0.25)))


def test_prediction_variance_and_clipping_are_read_from_the_scheduler(tmp_path):
    path, _, _ = save(tmp_path, "v", prediction_type="v_prediction", variance_type="fixed_large")
    model, _ = from_diffusers(path)
    assert isinstance(model, ClippedModel) and model.prediction == "v"  # clip_sample defaults to True
    assert model.diffusers["variance"] == "large" and model.diffusers["clip"] == "x0 clipped to [-1, 1]"
    model, _ = from_diffusers(path, clip=False)
    assert type(model) is sd.Model and model.diffusers["clip"] is None
    path, _, _ = save(tmp_path, "lr", out_channels=2 * C, variance_type="learned_range", clip_sample=False)
    model, _ = from_diffusers(path)
    assert model.learn_variance and model.diffusers["variance"] == "learned"
    assert model.diffusers["item_shape"] == (C, H, H)


def test_thresholding_is_diffusers_dynamic_thresholding():
    sch = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    x0 = 2.0 * torch.randn(6, C, H, H, generator=torch.Generator().manual_seed(3))
    clip = ClippedModel(sd.Model(lambda x, t: x), sd.SDE(sd.DiscreteVP.ddpm(10)), thresholding=(0.9, 1.5))
    torch.testing.assert_close(clip.clip(x0), sch._threshold_sample(x0), rtol=0, atol=1e-6)


# -- parity with diffusers' own loops -----------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_ddim_eta0_equals_diffusers_ddim(tmp_path, prediction, clip):
    path, unet, sch = save(tmp_path, prediction_type=prediction, clip_sample=clip)
    model, sde = from_diffusers(path)
    for steps in (10, 50):
        want = ddim_loop(unet, sch, x_T(), steps, use_clipped_model_output=True)
        got = sd.sample(model, sde, sampler="ancestral", steps=steps, x_T=x_T(), eta=0.0)
        assert rel_err(got, want) < tolerance(sde), (steps, rel_err(got, want))
    if clip:  # diffusers' default pairs the clipped x0 with the raw eps: a different update, documented
        raw = ddim_loop(unet, sch, x_T(), 10)
        assert raw.shape == want.shape and bool(torch.isfinite(raw).all())


@pytest.mark.parametrize(
    "variance_type, clip",
    [("fixed_small", False), ("fixed_large", False), ("fixed_small", True), ("learned_range", False)],
)
def test_ancestral_with_all_steps_equals_the_diffusers_ddpm_loop(tmp_path, variance_type, clip):
    out = 2 * C if variance_type == "learned_range" else C
    path, unet, sch = save(
        tmp_path,
        out_channels=out,
        num_train_timesteps=100,
        beta_end=0.2,
        variance_type=variance_type,
        clip_sample=clip,
    )
    model, sde = from_diffusers(path)
    variance = model.diffusers["variance"]
    # the same generator state: both draw one randn(x.shape) per noisy step, in order
    want = ddpm_loop(unet, sch, x_T(), torch.Generator().manual_seed(7))

    def ours(seed):
        g = torch.Generator().manual_seed(seed)
        return sd.sample(
            model, sde, sampler="ancestral", steps=100, x_T=x_T(), variance=variance, generator=g
        )

    got, other = ours(7), ours(8)
    assert rel_err(got, want) < tolerance(sde), rel_err(got, want)
    assert rel_err(other, want) > 100 * tolerance(sde)  # the noise matters: the parity is not vacuous


# -- everything else runs on the loaded model ----------------------------------------------------------
# (steps, options) where the default (10 steps, no options) does not suit a sampler
SMOKE = {
    "euler_maruyama": (20, {}),
    "torchdiffeq": (4, {"rtol": 1e-3, "atol": 1e-3}),
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path, unet, sch = save(tmp_path_factory.mktemp("d"))
    return path, unet


@pytest.mark.parametrize("name", sorted(sd.SAMPLERS))
def test_every_sampler_runs_on_a_loaded_model(loaded, name):
    model, sde = from_diffusers(loaded[0])
    steps, opts = SMOKE.get(name, (10, {}))
    x = sd.sample(
        model,
        sde,
        sampler=name,
        steps=steps,
        shape=(2, C, H, H),
        generator=torch.Generator().manual_seed(0),
        **opts,
    )
    assert x.shape == (2, C, H, H) and bool(torch.isfinite(x).all())


def test_likelihoods_equal_a_hand_written_wrapper(loaded):
    """PF-ODE bits/dim, the discrete VLB and the continuous ELBO of the loaded model equal the same
    quantities through a wrapper written here from diffusers' documented timestep convention."""
    path, unet = loaded
    model, sde = from_diffusers(path, clip=False)
    N = 1000

    def by_hand(x, t):  # the documented rule: index t N - 1, snapped within 1e-3, clamped to [0, N-1]
        u = t.double() * N - 1
        u = torch.where((u - u.round()).abs() <= 1e-3, u.round(), u).clamp(0, N - 1)
        return unet(x, u.float()).sample

    ref = sd.Model(by_hand, "eps")
    x = (torch.randint(0, 256, (3, C, H, H), generator=torch.Generator().manual_seed(1)) / 127.5 - 1).float()
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    kw = dict(trace="hutchinson", rtol=1e-3, atol=1e-3, t_eps=1e-3)
    a = sd.bits_per_dim(model, sde, x, generator=g(), **kw)
    b = sd.bits_per_dim(ref, sde, x, generator=g(), **kw)
    torch.testing.assert_close(a.bpd, b.bpd, rtol=1e-6, atol=1e-6)
    assert bool(torch.isfinite(a.bpd).all()) and 0 < float(a.bpd.mean()) < 30
    va = sd.discrete_vlb(model, sde, x, steps=20, generator=g())
    vb = sd.discrete_vlb(ref, sde, x, steps=20, generator=g())
    torch.testing.assert_close(va.total, vb.total, rtol=1e-6, atol=1e-6)
    assert bool(torch.isfinite(va.total).all())
    ea = sd.continuous_elbo(model, sde, x, n_t=4, t_eps=1e-3, generator=g())
    eb = sd.continuous_elbo(ref, sde, x, n_t=4, t_eps=1e-3, generator=g())
    torch.testing.assert_close(ea.nelbo, eb.nelbo, rtol=1e-6, atol=1e-6)
    assert bool(torch.isfinite(ea.nelbo).all())


# -- bad folders: one line each ------------------------------------------------------------------------
def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_folders_give_one_line(tmp_path):
    path, _, _ = save(tmp_path)

    def variant(name, edit):
        p = tmp_path / name
        shutil.copytree(path, p)
        edit(p)
        return p

    def set_json(rel, **kv):
        def edit(p):
            f = p / rel
            d = json.loads(f.read_text())
            d.update(kv)
            f.write_text(json.dumps(d))

        return edit

    cases = [
        (tmp_path / "nowhere", ("does not exist",)),
        (variant("no_index", lambda p: (p / "model_index.json").unlink()), ("model_index.json", "missing")),
        (
            variant("no_weights", lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").unlink()),
            ("safetensors", "missing"),
        ),
        (variant("bad_json", lambda p: (p / "unet" / "config.json").write_text("{not json")), ("corrupt",)),
        (
            variant(
                "foreign_sched",
                set_json("scheduler/scheduler_config.json", _class_name="EulerDiscreteScheduler"),
            ),
            ("EulerDiscreteScheduler", "DDPMScheduler"),
        ),
        (
            variant("foreign_unet", set_json("unet/config.json", _class_name="UNet2DConditionModel")),
            ("UNet2DConditionModel", "unconditional"),
        ),
        (
            variant("zero_snr", set_json("scheduler/scheduler_config.json", rescale_betas_zero_snr=True)),
            ("rescale_betas_zero_snr",),
        ),
        (
            variant("bad_pred", set_json("scheduler/scheduler_config.json", prediction_type="flow")),
            ("prediction_type", "flow"),
        ),
        (
            variant("learned", set_json("scheduler/scheduler_config.json", variance_type="learned")),
            ("variance_type", "learned_range"),
        ),
        (
            variant("bad_sched", set_json("scheduler/scheduler_config.json", beta_schedule="laplace")),
            ("beta_schedule", "laplace"),
        ),
        (
            variant(
                "lr_channels", set_json("scheduler/scheduler_config.json", variance_type="learned_range")
            ),
            ("channels",),
        ),
    ]
    pickled = variant(
        "pickled",
        lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").rename(
            p / "unet" / "diffusion_pytorch_model.bin"
        ),
    )
    cases.append((pickled, ("pickle", "safetensors")))
    for folder, words in cases:
        with pytest.raises(DiffusersError) as e:
            from_diffusers(folder)
        _one_line(e, *words)
    with pytest.raises(DiffusersError, match="not both"):
        from_diffusers(path, unet=small_unet(), scheduler=diffusers.DDPMScheduler())


def test_in_memory_objects_and_a_foreign_scheduler_object():
    model, sde = from_diffusers(unet=small_unet(), scheduler=diffusers.DDIMScheduler(clip_sample=False))
    assert model.diffusers["scheduler"] == "DDIMScheduler" and sde.schedule.N == 1000
    with pytest.raises(DiffusersError, match="EulerDiscreteScheduler"):
        from_diffusers(unet=small_unet(), scheduler=diffusers.EulerDiscreteScheduler())


# -- the command-line apps accept a diffusers folder ---------------------------------------------------
def test_the_commands_accept_a_diffusers_folder(loaded, tmp_path, monkeypatch):
    import numpy as np
    from test_workflows import QUIET, rows_of, run_main

    folder = loaded[0]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(
        "sample",
        [f"diffusers={folder}", "sampler=dpm_solver", "steps=5", "n=3", f"out_dir={tmp_path / 's'}", *QUIET],
    )
    assert code == 0, err
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (3, C, H, H)
    # the ancestral sampler takes the scheduler's variance unless told otherwise
    large, _, _ = save(tmp_path, "large", variance_type="fixed_large")
    for extra, want in (([], "large"), (["sampler.options.variance=small"], "small")):
        code, out, err = run_main(
            "sample",
            [
                f"diffusers={large}",
                "sampler=ancestral",
                "steps=5",
                "n=2",
                f"out_dir={tmp_path / want}",
                *extra,
                *QUIET,
            ],
        )
        assert code == 0 and f"ancestral ({want} variance)" in out + err, out + err
    imgs = (
        (torch.randint(0, 256, (4, C, H, H), generator=torch.Generator().manual_seed(0)))
        .numpy()
        .astype("uint8")
    )
    np.save(tmp_path / "imgs.npy", imgs)
    args = [
        f"diffusers={folder}",
        "data=npz",
        f"data.path={tmp_path / 'imgs.npy'}",
        "n=4",
        "pf_ode.rtol=1e-2",
        "pf_ode.atol=1e-2",
        "elbo.n_t=2",
        "vlb.steps=10",
        "vlb.analytic.n=4",
        f"out_dir={tmp_path / 'l'}",
    ]
    code, out, err = run_main("likelihood", [*args, *QUIET])
    assert code == 0, err
    rows = rows_of(tmp_path / "l" / "likelihood.csv")
    assert {r["unit"] for r in rows} == {"bits/dim"} and all(0 < float(r["value"]) < 50 for r in rows)
    code, out, err = run_main(
        "compare",
        [
            f"diffusers={folder}",
            "samplers=[ancestral,dpm_solver]",
            "reference.rtol=1e-3",
            "reference.atol=1e-3",
            "steps=[5]",
            "n=4",
            f"out_dir={tmp_path / 'c'}",
            *QUIET,
        ],
    )
    assert code == 0, err
    # one line for a bad folder, and sde= cannot replace the scheduler's chain
    code, out, err = run_main("sample", [f"diffusers={tmp_path / 'nope'}", *QUIET])
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_main("sample", [f"diffusers={folder}", "sde=vp_linear", *QUIET])
    assert code == 2 and "scheduler" in err, err
