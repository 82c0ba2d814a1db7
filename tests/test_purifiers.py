"""Purifiers through real adapters: time steps, boundary condition, DDPM timestep rule, PF-ODE integration, labels."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cpcluster.models.consistency import ConsistencyFunction
from cpcluster.models.ddpm import alphas_cumprod, carlini_timestep, ddpm_betas, onestep_timestep
from cpcluster.models.loaded import LoadedClassifier, LoadedDenoiser
from cpcluster.models.purifier_base import LabelPolicy, SmoothedBase
from cpcluster.models.purifiers import PURIFIERS, build_purifier
from cpcluster.models.specs import load_denoiser
from cpcluster.util.errors import InputError
from unet_files import CM_SCHEDULER, DDPM_SCHEDULER, save_unet, unet_module

torch.set_num_threads(1)
EXPECTED_T = {18: (0.5853, 1.0882, 1.9233), 40: (0.4700, 1.0717, 1.7672)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("unets")
    return {
        # N = 40 from the diffusers consistency scheduler config
        "cm40": save_unet(str(root / "cm40"), scheduler=CM_SCHEDULER),
        # N = 18 from cpcluster.json (the JAX-converted CIFAR-10 models carry no scheduler config)
        "cm18": save_unet(str(root / "cm18"), seed=1, cpcluster={"kind": "consistency", "grid_steps": 18}),
        "cm_cond": save_unet(str(root / "cm_cond"), seed=2, scheduler=CM_SCHEDULER, num_class_embeds=10),
        "ddpm": save_unet(str(root / "ddpm"), seed=3, scheduler=DDPM_SCHEDULER, out_channels=6),
    }


@pytest.mark.parametrize("name, steps", [("cm18", 18), ("cm40", 40)])
def test_t_sigma_through_diffusers_folder(folders, name, steps):
    den = load_denoiser(f"diffusers:{folders[name]}")
    assert den.kind == "consistency" and den.meta["grid_steps"] == steps and den.meta["c_noise"] == "openai"
    got = [build_purifier("consistency", den, s).describe()["t_sigma"] for s in (0.25, 0.5, 1.0)]
    assert got == pytest.approx(EXPECTED_T[steps], abs=5e-5)
    exact = build_purifier("consistency", den, 0.5, time_rule="exact").describe()
    assert exact["t_sigma"] == 1.0 and exact["time_rule"] == "exact"


def test_consistency_purifier_matches_diffusers_scheduler(folders):
    """D(x_t, t) = c_skip x_t + c_out F(x_t / sqrt(t^2 + sd^2), sigma_to_t(t)) with diffusers' own scalings."""
    from diffusers import CMStochasticIterativeScheduler

    den = load_denoiser(f"diffusers:{folders['cm40']}")
    pur = build_purifier("consistency", den, 0.5)
    sched = CMStochasticIterativeScheduler(**{k: v for k, v in CM_SCHEDULER.items() if k != "_class_name"})
    t = pur.describe()["t_sigma"]
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x_t = 2 * noisy - 1
    c_skip, c_out = sched.get_scalings_for_boundary_condition(torch.tensor(t, dtype=torch.float64))
    time_input = torch.tensor(sched.sigma_to_t(np.array([t])), dtype=torch.float32).expand(3)
    with torch.no_grad():
        f = unet_module(folders["cm40"])(x_t / math.sqrt(t**2 + 0.25), time_input).sample
        ref = ((float(c_skip) * x_t + float(c_out) * f + 1) / 2).clamp(0, 1)
        got = pur(noisy)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=2e-5)
    assert not torch.allclose(got, noisy.clamp(0, 1), atol=1e-2)  # the network actually acted


def test_boundary_condition_exact_through_adapter(folders):
    den = load_denoiser(f"diffusers:{folders['cm18']}")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ConsistencyFunction(den.module, den.meta["c_noise"])(x, 0.002), x)
        pur = build_purifier("consistency", den, 0.001, time_rule="exact")  # t = 2 sigma = eps
        clean = torch.rand(2, 3, 16, 16)
        assert torch.allclose(pur(clean), clean, atol=1e-6)


@pytest.mark.parametrize("schedule, diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_onestep_timestep_matches_independent_rule(schedule, diffusers_name):
    """First t with sqrt(1 - abar_t)/sqrt(abar_t) >= 2 sigma, against diffusers' schedule and Carlini's loop."""
    from diffusers import DDPMScheduler

    ref_abar = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name).alphas_cumprod.double().numpy()
    abar = alphas_cumprod(ddpm_betas(schedule, 1000))
    assert np.allclose(abar, ref_abar, rtol=1e-5, atol=1e-7)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        t, real_sigma = 0, 0.0  # the loop of Carlini et al.'s reference code
        while real_sigma < 2 * sigma:
            t += 1
            real_sigma = math.sqrt(1 - ref_abar[t]) / math.sqrt(ref_abar[t])
        assert onestep_timestep(abar, sigma) == t, (schedule, sigma)
    # a cosine schedule reaches a given noise level later than the linear one
    assert onestep_timestep(alphas_cumprod(ddpm_betas("cosine")), 0.5) > onestep_timestep(
        alphas_cumprod(ddpm_betas("linear")), 0.5)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.005, 20.0), st.sampled_from(["linear", "cosine", "scaled_linear"]))
def test_onestep_timestep_is_first_reaching(sigma, schedule):
    abar = alphas_cumprod(ddpm_betas(schedule, 1000, 1e-4, 0.02 if schedule != "scaled_linear" else 0.012))
    ratio = np.sqrt((1 - abar) / abar)
    if ratio[-1] < 2 * sigma:
        with pytest.raises(InputError):
            onestep_timestep(abar, sigma)
        return
    t = onestep_timestep(abar, sigma)
    assert ratio[t] >= 2 * sigma and (t == 0 or ratio[t - 1] < 2 * sigma)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0, 2.0])
def test_exact_rule_timestep_is_carlinis_closed_form(sigma):
    """Cosine schedule: round(t*) of the continuous time t* at which improved-diffusion's abar(t) = f(t/T)/f(0)
    equals 1 / (1 + 4 sigma^2), solved here numerically; other schedules: the step with the nearest abar."""
    from scipy.optimize import brentq

    steps, target = 4000, 1 / (1 + 4 * sigma**2)
    f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    t_star = brentq(lambda t: f(t) / f(0) - target, 0, steps, xtol=1e-10)
    cosine = alphas_cumprod(ddpm_betas("cosine", steps))
    assert carlini_timestep(cosine, sigma) == round(t_star)
    assert abs(carlini_timestep(cosine, sigma) - onestep_timestep(cosine, sigma)) <= 1
    linear = alphas_cumprod(ddpm_betas("linear", 1000))
    j = carlini_timestep(linear, sigma)
    assert abs(linear[j] - target) == min(abs(a - target) for a in linear)


class OracleNet(nn.Module):
    """A DDPM network that knows the clean image: returns the exact epsilon (or v) of its input."""

    def __init__(self, clean_model, abar, prediction="epsilon"):
        super().__init__()
        self.clean, self.abar, self.prediction, self.seen = clean_model, abar, prediction, []

    def forward(self, x_t, steps, labels):
        self.seen.append(steps.clone())
        a = float(self.abar[int(steps[0])])
        eps = (x_t - math.sqrt(a) * self.clean) / math.sqrt(1 - a)
        return eps if self.prediction == "epsilon" else math.sqrt(a) * eps - math.sqrt(1 - a) * self.clean


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_onestep_ddpm_recovers_clean_image_with_oracle(prediction):
    betas = ddpm_betas("cosine", 1000)
    abar = alphas_cumprod(betas)
    clean = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    noisy = clean + 0.25 * torch.randn(clean.shape, dtype=torch.float64)
    net = OracleNet(2 * clean - 1, abar, prediction)
    den = LoadedDenoiser(net, "ddpm", {"betas": betas.tolist(), "prediction": prediction, "num_classes": None})
    pur = build_purifier("onestep-ddpm", den, 0.25)
    out = pur(noisy)
    assert torch.allclose(out, clean, atol=1e-9)
    assert net.seen[0].tolist() == [onestep_timestep(abar, 0.25)] * 4 and net.seen[0].dtype == torch.int64
    assert pur.describe()["timestep"] == onestep_timestep(abar, 0.25)


def test_pf_ode_one_step_equals_onestep_ddpm(folders):
    den = load_denoiser(f"diffusers:{folders['ddpm']}")
    assert den.kind == "ddpm" and len(den.meta["betas"]) == 1000
    x = torch.rand(3, 3, 16, 16) + 0.25 * torch.randn(3, 3, 16, 16)
    one, ode = build_purifier("onestep-ddpm", den, 0.25), build_purifier("pf-ode", den, 0.25, steps=1)
    with torch.no_grad():
        a, b = one(x), ode(x)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5)
    times = build_purifier("pf-ode", den, 0.25, steps=5).describe()["times"]
    sig = np.sqrt((1 - alphas_cumprod(den.meta["betas"])) / alphas_cumprod(den.meta["betas"]))
    assert times[0] == pytest.approx(sig[onestep_timestep(alphas_cumprod(den.meta["betas"]), 0.25)])
    assert times[-2] == pytest.approx(sig[0]) and times[-1] == 0.0 and times == sorted(times, reverse=True)


class GaussianDenoiser(nn.Module):
    """Exact denoiser of data x0 ~ N(m, s^2 I): D(x, t) = m + s^2/(s^2 + t^2) (x - m).

    ``preconditioned=True``: called as net(x, t, labels) -> D. Otherwise it is the raw EDM network F with
    D = c_skip x + c_out F(c_in x, ln(t)/4), solved for F.
    """

    def __init__(self, m, s, preconditioned):
        super().__init__()
        self.m, self.s, self.pre = m, s, preconditioned

    def forward(self, x, time_input, labels):
        if self.pre:
            t = time_input.view(-1, 1, 1, 1)
            return self.m + self.s**2 / (self.s**2 + t**2) * (x - self.m)
        t = torch.exp(4 * time_input.double()).view(-1, 1, 1, 1)
        c_skip, c_out, c_in = 0.25 / (t**2 + 0.25), t * 0.5 / torch.sqrt(t**2 + 0.25), 1 / torch.sqrt(t**2 + 0.25)
        xx = x / c_in
        d = self.m + self.s**2 / (self.s**2 + t**2) * (xx - self.m)
        return ((d - c_skip * xx) / c_out).to(x.dtype)


@pytest.mark.parametrize("preconditioned", [True, False])
def test_pf_ode_converges_to_exact_flow(preconditioned):
    """For Gaussian data the PF-ODE has a closed form: x(0) = m + (x(t0) - m) s / sqrt(s^2 + t0^2)."""
    m, s = 0.1, 0.3
    den = LoadedDenoiser(GaussianDenoiser(m, s, preconditioned), "edm",
                         {"c_noise": "edm", "preconditioned": preconditioned, "num_classes": None})
    x = 0.5 + 0.4 * torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = 1.0  # --time exact at sigma 0.5
    exact = ((m + (2 * x - 1 - m) * s / math.sqrt(s**2 + t0**2)) + 1) / 2
    assert 0 < exact.min() and exact.max() < 1
    errors = {}
    for solver in ("heun", "euler"):
        for k in (1, 3, 10, 20, 40, 80):
            pur = build_purifier("pf-ode", den, 0.5, steps=k, time_rule="exact", solver=solver)
            errors[solver, k] = float((pur(x) - exact).abs().max())
    assert errors["heun", 80] < 2e-4 and errors["heun", 10] < errors["euler", 10]
    for solver, order in (("heun", 2), ("euler", 1)):
        assert errors[solver, 1] > errors[solver, 3] > errors[solver, 10] > errors[solver, 20] > errors[solver, 40]
        for k in (20, 40):  # halving the step divides the error by about 2^order
            assert 2 ** (order - 0.4) < errors[solver, k] / errors[solver, 2 * k] < 2 ** (order + 0.4)
    # K = 1 is one-shot denoising D(x_t, t0)
    d = ((m + s**2 / (s**2 + t0**2) * (2 * x - 1 - m)) + 1) / 2
    one = build_purifier("pf-ode", den, 0.5, steps=1, time_rule="exact")
    assert torch.allclose(one(x), d.clamp(0, 1), atol=1e-12)


def test_network_evaluations_per_image_are_what_the_purifiers_report():
    """``nfe`` (recorded per certify shard for cost accounting) equals the denoiser calls a forward makes."""
    calls = []
    net = GaussianDenoiser(0.1, 0.3, True)
    net.register_forward_hook(lambda *_: calls.append(1))
    den = LoadedDenoiser(net, "edm", {"c_noise": "edm", "preconditioned": True, "num_classes": None})
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    for solver in ("heun", "euler"):
        for k in (1, 2, 5):
            pur = build_purifier("pf-ode", den, 0.5, steps=k, time_rule="exact", solver=solver)
            calls.clear()
            pur(x)
            assert pur.nfe == len(calls) == (2 * k - 1 if solver == "heun" else k)
    assert build_purifier("none", None, 0.5).nfe == 0


def test_grid_steps_walk_the_rest_of_the_training_grid_like_the_papers_pf_ode():
    """--solver-steps grid: from the point of the N-point Karras grid nearest 2 sigma, Heun along every later grid
    point down to t_min, then Euler into 0 (the paper's PF-ODE EDM code): the same times as the explicit K."""
    calls = []

    class Counting(GaussianDenoiser):
        def forward(self, x, t, labels):
            calls.append(t)
            return super().forward(x, t, labels)

    den = LoadedDenoiser(Counting(0.3, 0.7, True), "edm", {"c_noise": "edm", "preconditioned": True,
                                                             "num_classes": None, "grid_steps": 18}, spec="x")
    i = np.arange(18)
    grid = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # descending, t_max to t_min
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    for sigma in (0.25, 0.5, 1.0):
        start = int(np.argmin(np.abs(grid - 2 * sigma)))
        walk = build_purifier("pf-ode", den, sigma, steps="grid")
        assert walk.times == pytest.approx([*grid[start:], 0.0], rel=1e-12)
        explicit = build_purifier("pf-ode", den, sigma, steps=18 - start)
        assert walk.times == explicit.times and walk.describe()["steps"] == 18 - start
        calls.clear()
        out = walk(x)
        assert walk.nfe == len(calls) == 2 * (18 - start) - 1  # Heun on every grid interval, Euler into 0
        assert torch.equal(out, explicit(x))
    with pytest.raises(InputError, match="--time-rule nearest"):
        build_purifier("pf-ode", den, 0.5, steps="grid", time_rule="exact")
    no_grid = LoadedDenoiser(GaussianDenoiser(0, 1, True), "edm", {"c_noise": "edm", "num_classes": None}, spec="y")
    with pytest.raises(InputError, match="grid_steps"):
        build_purifier("pf-ode", no_grid, 0.5, steps="grid")


def test_pf_ode_refuses_bad_inputs(folders):
    edm = LoadedDenoiser(GaussianDenoiser(0, 1, True), "edm", {"c_noise": "edm", "num_classes": None}, spec="x")
    with pytest.raises(InputError, match="--time-rule exact"):
        build_purifier("pf-ode", edm, 0.5)  # continuous-time network, no grid for "nearest"
    with pytest.raises(InputError, match="steps"):
        build_purifier("pf-ode", edm, 0.5, steps=0, time_rule="exact")
    cm = load_denoiser(f"diffusers:{folders['cm18']}")
    with pytest.raises(InputError, match="consistency"):
        build_purifier("pf-ode", cm, 0.5)
    with pytest.raises(InputError, match="pf-ode"):
        build_purifier("consistency", edm, 0.5)
    with pytest.raises(InputError, match="onestep-ddpm"):
        build_purifier("consistency", load_denoiser(f"diffusers:{folders['ddpm']}"), 0.5)
    with pytest.raises(InputError, match="DDPM"):
        build_purifier("onestep-ddpm", cm, 0.5)
    assert set(PURIFIERS) == {"none", "consistency", "onestep-ddpm", "onestep-edm", "pf-ode"}


def _steps(purifier: str, k: int) -> dict:
    """``steps=k`` for the purifiers that take it (onestep-edm refuses any other than 1)."""
    return {} if purifier == "onestep-edm" else {"steps": k}


class LabelRecorder(nn.Module):
    """Class-conditional test network: records every label it is given; output depends on the label."""

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x, time_input, labels):
        if labels is None:
            return x * 0.5
        self.labels.append(labels.clone())
        return x * 0.5 + labels.view(-1, 1, 1, 1).to(x.dtype) * 0.01


@pytest.mark.parametrize("kind, purifier, meta", [
    ("consistency", "consistency", {"c_noise": "openai", "grid_steps": 18}),
    ("ddpm", "onestep-ddpm", {"betas": ddpm_betas("linear").tolist()}),
    ("ddpm", "pf-ode", {"betas": ddpm_betas("linear").tolist()}),
    ("edm", "pf-ode", {"c_noise": "edm", "grid_steps": 18}),
    ("edm", "onestep-edm", {"c_noise": "edm", "grid_steps": 18})])
def test_conditional_network_never_sees_true_label(kind, purifier, meta):
    net = LabelRecorder()
    den = LoadedDenoiser(net, kind, {**meta, "num_classes": 10})
    clf = LoadedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)), 10)
    true_a, true_b = torch.arange(8) % 10, (torch.arange(8) * 3 + 7) % 10
    x = torch.rand(8, 3, 8, 8)
    for text in ("fixed:3", "random"):
        seen = []
        for true in (true_a, true_b):  # the true labels exist only here: the API has no way to pass them
            base = SmoothedBase(build_purifier(purifier, den, 0.25, label_policy=LabelPolicy(text),
                                               **_steps(purifier, 3)), clf)
            net.labels.clear()
            logits = base(x, torch.Generator().manual_seed(5))
            assert logits.shape == (8, 10) and logits.dtype == torch.float32
            seen.append(torch.stack(net.labels))
        assert torch.equal(seen[0], seen[1])  # same draws whatever the true labels were
        if text == "fixed:3":
            assert (seen[0] == 3).all()
        else:
            assert not torch.equal(seen[0][0], true_a) and not torch.equal(seen[0][0], true_b)
            assert (seen[0] == seen[0][0]).all()  # one label draw per call, reused on every ODE step
        assert base.purifier.describe()["label_policy"] == text


def test_conditional_diffusers_unet_receives_policy_labels(folders):
    den = load_denoiser(f"diffusers:{folders['cm_cond']}")
    assert den.meta["num_classes"] == 10
    got = []
    hook = den.module.unet.register_forward_pre_hook(lambda m, a, kw: got.append(kw["class_labels"].clone()),
                                                     with_kwargs=True)
    try:
        pur = build_purifier("consistency", den, 0.5, label_policy=LabelPolicy("random"))
        with torch.no_grad():
            pur(torch.rand(6, 3, 16, 16), torch.Generator().manual_seed(9))
            pur(torch.rand(6, 3, 16, 16), torch.Generator().manual_seed(9))
    finally:
        hook.remove()
    assert torch.equal(got[0], got[1]) and got[0].dtype == torch.int64
    assert torch.equal(got[0], torch.randint(10, (6,), generator=torch.Generator().manual_seed(9)))
    with pytest.raises(InputError, match="fixed:K"):
        build_purifier("consistency", den, 0.5, label_policy=LabelPolicy("fixed:12"))(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("name", ["none", "consistency", "pf-ode", "onestep-edm"])
def test_shapes_dtypes_and_range(name):
    den = load_denoiser("demo-random")
    den_edm = LoadedDenoiser(den.module, "edm", {"c_noise": "openai", "grid_steps": 18, "num_classes": None})
    pur = build_purifier(name, den_edm if name in ("pf-ode", "onestep-edm") else den, 0.5, **_steps(name, 2))
    x = torch.rand(5, 1, 16, 16) + 0.5 * torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        out = pur(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    if name == "none":
        assert torch.equal(out, x)
    else:
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("purifier, kind, meta", [
    ("consistency", "consistency", {"c_noise": "openai", "grid_steps": 18}),
    ("onestep-ddpm", "ddpm", {"betas": ddpm_betas("linear").tolist()}),
    ("pf-ode", "edm", {"c_noise": "edm", "grid_steps": 18}),
    ("onestep-edm", "edm", {"c_noise": "edm", "grid_steps": 18})])
def test_uses_generator_tells_the_truth(purifier, kind, meta):
    """The engine skips its probe forward when a purifier declares uses_generator; the flag must be right."""
    for classes in (None, 10):
        for text in ("fixed:1", "random"):
            den = LoadedDenoiser(LabelRecorder(), kind, {**meta, "num_classes": classes})
            pur = build_purifier(purifier, den, 0.5, label_policy=LabelPolicy(text), **_steps(purifier, 2))
            gen = torch.Generator().manual_seed(0)
            before = gen.get_state()
            pur(torch.rand(2, 3, 8, 8), gen)
            assert pur.uses_generator == (not torch.equal(before, gen.get_state()))
            assert pur.uses_generator == (text == "random" and classes == 10)
    assert build_purifier("none", None, 0.5).uses_generator is False


def test_optimize_for_inference_keeps_signature_dtype_and_results(tmp_path):
    from cpcluster.models.speed import cpu_has_native_bf16, optimize_for_inference, recommended_options

    den = load_denoiser("demo-random:conditional")
    clf = LoadedClassifier(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)), 10)
    base = SmoothedBase(build_purifier("consistency", den, 0.5, label_policy=LabelPolicy("random")), clf)
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        ref = base(x, torch.Generator().manual_seed(3))
    for options, tol in (({}, 0.0), ({"channels_last": True}, 1e-5), ({"autocast": "bf16"}, 0.1)):
        fast = optimize_for_inference(base, "cpu", **options)
        with torch.no_grad():
            out = fast(x, torch.Generator().manual_seed(3))  # the generator still reaches the label policy
        assert out.dtype == torch.float32 and out.shape == ref.shape and out.is_contiguous()
        assert torch.allclose(out, ref, atol=tol, rtol=0), options
        assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(ValueError, match="autocast"):
        optimize_for_inference(base, "cpu", autocast="int8")
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not cpu_has_native_bf16(str(tmp_path / "cpuinfo"))
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu avx512_bf16\n")
    assert cpu_has_native_bf16(str(tmp_path / "cpuinfo"))
    assert recommended_options("cpu") == {"channels_last": False, "autocast": None, "compile": False}
