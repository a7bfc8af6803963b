"""configs/sampler and configs/sde compose under configs/sample.yaml, instantiate and run."""

from pathlib import Path

import pytest
import sdediff.configs
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import sdediff as sd
from sdediff.oracle import GaussianMixture
from sdediff.samplers import SAMPLERS, Sampler

CONFIGS = Path(sdediff.configs.__file__).resolve().parent
SDE_NAMES = sorted(p.stem for p in (CONFIGS / "sde").glob("*.yaml"))
SAMPLER_NAMES = sorted(p.stem for p in (CONFIGS / "sampler").glob("*.yaml"))


def compose_sample(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def test_every_sampler_and_the_five_processes_have_a_config():
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert set(SDE_NAMES) == {"ddpm", "vp_linear", "vp_cosine", "subvp", "ve"}


def test_defaults_and_one_override_swaps():
    cfg = compose_sample()
    assert cfg.sampler.name == "dpm_solver" and cfg.sde.schedule._target_.endswith("LinearVP")
    assert {"steps", "n", "seed"} <= set(cfg)
    cfg = compose_sample(["sde=ddpm", "sampler=ancestral", "steps=7"])
    sde, sampler = instantiate(cfg.sde), instantiate(cfg.sampler)
    assert isinstance(sde.schedule, sd.DiscreteVP) and sde.schedule.N == 1000
    assert sampler == Sampler("ancestral", 7, options={"variance": "small", "eta": 1.0})
    assert type(sampler.options) is dict  # _convert_: all, no DictConfig leaks into the library


def _oracle(D=4):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.randn(D, generator=g, dtype=torch.float64), a @ a.T / D + 0.5 * torch.eye(D))


@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_every_sde_sampler_combination_instantiates_and_runs(sde_name, sampler_name):
    cfg = compose_sample([f"sde={sde_name}", f"sampler={sampler_name}", "steps=2", "n=5"])
    sde = instantiate(cfg.sde)
    sampler = instantiate(cfg.sampler)
    assert isinstance(sde, sd.SDE) and isinstance(sampler, Sampler) and sampler.steps == 2
    gm = _oracle()
    gen = torch.Generator().manual_seed(cfg.seed)
    x, info = sampler(
        sd.Model(gm.model(sde), "eps"),
        sde,
        shape=(cfg.n, gm.D),
        generator=gen,
        dtype=torch.float64,
        return_info=True,
    )
    assert x.shape == (cfg.n, gm.D) and bool(torch.isfinite(x).all())
    assert info.steps == 2 and info.nfe >= 1 and info.times.numel() == 3


def test_a_bad_sampler_config_fails_at_instantiation():
    cfg = compose_sample(["sampler=pf_ode", "+sampler.options.order=2"])
    with pytest.raises(Exception, match="unknown option"):
        instantiate(cfg.sampler)
    cfg = compose_sample(["sampler=pf_ode", "steps=0"])
    with pytest.raises(Exception, match="steps"):
        instantiate(cfg.sampler)
