"""
Flow-GRPO math (grpo.py) against independent references, and the rollout/log-prob plumbing in sample.py.

    python -m pytest tests/test_grpo.py -v
"""
import math

import pytest
import torch

import common
import grpo
import sample
import standins


# ---------------------------------------------------------------- sde_step

def test_sde_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 16, 2, 4, 4, generator=g), torch.randn(3, 16, 2, 4, 4, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.1])
    x_next, logp, mean, std = grpo.sde_step(x, v, sigma, sigma_next, 0.7, generator=g)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(logp, ref, rtol=1e-6, atol=1e-6)
    # std from its definition a·sqrt(σ/(1−σ))·sqrt(σ − σ_next), computed in float64
    s, sn = sigma.double(), sigma_next.double()
    torch.testing.assert_close(std.flatten().double(), 0.7 * (s / (1 - s)).sqrt() * (s - sn).sqrt())


def test_sde_mean_is_euler_without_noise():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    _, _, mean, _ = grpo.sde_step(x, v, 0.7, 0.55, noise_level=1e-8)
    torch.testing.assert_close(mean, x + (0.55 - 0.7) * v, rtol=0, atol=1e-6)


def test_sde_first_step_guard_is_finite():
    x = torch.randn(1, 4)
    out, logp, mean, std = grpo.sde_step(x, torch.zeros_like(x), 1.0, 0.95, 0.7, sigma_max=0.95)
    assert torch.isfinite(out).all() and torch.isfinite(logp).all() and torch.isfinite(std).all()


@pytest.mark.full
@pytest.mark.parametrize("schedule", grpo.SDE_NOISE)
def test_sde_and_ode_share_the_marginal_on_a_gaussian_flow(schedule):
    """Data x0 ~ N(mu, s^2), x_σ = (1 − σ)·x0 + σ·ε. The exact velocity is affine in x:
    v(x, σ) = (x − m_σ)·(σ − (1 − σ)·s²)/var_σ − mu, m_σ = (1 − σ)·mu, var_σ = (1 − σ)²·s² + σ².
    Both the ODE and the Flow-GRPO SDE started at N(0, 1) must end at N(mu, s²)."""
    mu, s, n, steps = 1.5, 0.5, 200_000, 400
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)

    def v(x, sig):
        var = (1 - sig) ** 2 * s**2 + sig**2
        return (x - (1 - sig) * mu) * (sig - (1 - sig) * s**2) / var - mu

    g = torch.Generator().manual_seed(0)
    x_ode = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x_sde = x_ode.clone()
    for i in range(steps):
        sig, nxt = float(sigmas[i]), float(sigmas[i + 1])
        x_ode = x_ode + (nxt - sig) * v(x_ode, sig)
        x_sde, _, _, _ = grpo.sde_step(x_sde, v(x_sde, sig), sig, nxt, 0.7, sigma_max=float(sigmas[1]), generator=g,
                                       schedule=schedule)
        x_sde = x_sde.double()
    se_mean, se_std = s / math.sqrt(n), s / math.sqrt(2 * n)  # standard errors of the sample mean and std
    for x in (x_ode, x_sde):
        assert abs(x.mean().item() - mu) < 5 * se_mean + 2e-3
        assert abs(x.std().item() - s) < 5 * se_std + 2e-3
    assert abs(x_sde.mean().item() - x_ode.mean().item()) < 6 * se_mean + 2e-3


def test_sde_noise_schedules_step_std_on_the_rollout_window():
    """On a 20-step shift-3 schedule, the first half's step std: sd3 a·sqrt(σ/(1−σ))·sqrt(−dt) runs 0.70 -> 0.25,
    wan σ·sqrt(−dt) about 0.13 -> 0.15 (float64 reference from the formulas)."""
    import sample
    sig = sample.flow_sigmas(20, 3.0).double()
    x = torch.zeros(1, 4)
    for schedule, first, last in (("sd3", 0.70, 0.25), ("wan", 0.128, 0.152)):
        stds = [float(grpo.sde_step(x, x, float(sig[i]), float(sig[i + 1]), 0.7, sigma_max=float(sig[1]),
                                    schedule=schedule, generator=torch.Generator().manual_seed(0))[3])
                for i in range(10)]
        ref = [(0.7 * math.sqrt(float(sig[i]) / (1 - min(float(sig[i]), float(sig[1])))) if schedule == "sd3"
                else float(sig[i])) * math.sqrt(float(sig[i] - sig[i + 1])) for i in range(10)]
        assert stds == pytest.approx(ref, rel=1e-5)
        assert stds[0] == pytest.approx(first, abs=0.01) and stds[-1] == pytest.approx(last, abs=0.01)
    with pytest.raises(ValueError, match="unknown SDE noise schedule"):
        grpo.sde_step(x, x, 0.5, 0.4, schedule="cps")


# ---------------------------------------------------------------- advantages

def test_group_advantages_zero_mean_unit_std_and_zero_for_flat_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 0.3, 0.3, 0.3, 0.3, 0.1, 0.9])
    groups = torch.tensor([7, 7, 7, 7, 2, 2, 2, 2, 9, 9])
    adv = grpo.group_advantages(rewards, groups)
    for gid in (7, 9):
        a = adv[groups == gid]
        assert abs(a.mean().item()) < 1e-6
        assert abs(a.std(unbiased=False).item() - 1) < 1e-3
    assert torch.equal(adv[groups == 2], torch.zeros(4))
    # reference for group 7, by hand
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    torch.testing.assert_close(adv[:4], (r - r.mean()) / (r.std(unbiased=False) + 1e-4))


def test_group_advantages_clip():
    rewards = torch.tensor([0.0] * 99 + [1.0])  # one outlier: z ≈ 9.9 before the clip
    adv = grpo.group_advantages(rewards, torch.zeros(100, dtype=torch.long), adv_clip=5.0)
    assert adv.max().item() == 5.0 and not torch.isnan(adv).any()


# ---------------------------------------------------------------- losses

def test_policy_loss_at_ratio_one_and_gradient_signs():
    adv = torch.tensor([1.5, -0.5, 2.0, -3.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -0.7])
    logp = old.clone().requires_grad_(True)
    loss, clip_frac, approx_kl = grpo.policy_loss(logp, old, adv, clip_range=1e-3)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-7)
    assert clip_frac.item() == 0 and approx_kl.item() == 0
    loss.backward()
    # descending the loss raises log p where A > 0 and lowers it where A < 0
    assert torch.equal(torch.sign(-logp.grad), torch.sign(adv))


def test_policy_loss_clipped_side_has_no_gradient():
    eps = 0.1
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)  # ratios 1.5, 0.5, 1.5, 0.5
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clip_frac, _ = grpo.policy_loss(logp, old, adv, eps)
    loss.backward()
    # A > 0 and r > 1 + ε, A < 0 and r < 1 − ε: clipped, no gradient; the other two keep their gradient
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    assert logp.grad[2] != 0 and logp.grad[3] != 0
    assert clip_frac.item() == 1.0


def test_kl_zero_at_reference_and_gradient_points_to_it():
    ref = torch.randn(2, 16, 3, 4, 4)
    std = torch.full((2, 1, 1, 1, 1), 0.3)
    assert grpo.kl_loss(ref, ref, std).item() == 0
    mean = (ref + 0.1 * torch.randn_like(ref)).requires_grad_(True)
    kl = grpo.kl_loss(mean, ref, std)
    kl.backward()
    step = mean - 1e-2 * mean.grad / mean.grad.norm()
    assert grpo.kl_loss(step, ref, std) < kl
    # closed form against torch.distributions
    ref_kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, 0.3), torch.distributions.Normal(ref, 0.3))
    torch.testing.assert_close(kl, ref_kl.mean(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- rollouts on the tiny Wan

@pytest.fixture(scope="module")
def tiny():
    wan = standins.tiny_wan(torch.device("cpu"))
    cond, uncond = sample.encode(wan, ["Camera orbit left. A red house near a river.", ""], 32).chunk(2)
    return wan, cond, uncond


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, args, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                          with_kwargs=True)
    return calls, handle


def test_rollout_branches_at_the_window_and_shares_the_prefix(tiny):
    wan, cond, uncond = tiny
    G, steps, start, width = 4, 8, 3, 2
    sigmas = sample.flow_sigmas(steps, 3.0)
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls, handle = _count_calls(wan.transformer)
    latents, window = sample.rollout(wan.transformer, cond, uncond, noise, sigmas, 5.0, group_size=G,
                                     window_start=start, window_size=width, generator=torch.Generator().manual_seed(1))
    handle.remove()
    # prefix: one batched cond+uncond call per step at batch 2; after the branch: batch 2G
    assert calls == [2] * start + [2 * G] * (steps - start)
    assert window["step"].tolist() == [start, start + 1]
    assert window["x"].shape == window["x_next"].shape == (width, G, 16, 3, 8, 8)
    assert window["log_prob"].shape == (width, G)
    x0 = window["x"][0]
    assert all(torch.equal(x0[0], x0[k]) for k in range(G))  # identical before the window
    x1 = window["x_next"][0]
    assert all(not torch.allclose(x1[0], x1[k]) for k in range(1, G))  # different after it
    assert latents.shape == (G, 16, 3, 8, 8)
    assert not torch.allclose(latents[0], latents[1])


def test_recomputed_log_probs_match_the_rollout(tiny):
    """On-policy check: unchanged weights reproduce the stored log-probs (ratio = 1 within 1e-5, fp32)."""
    wan, cond, uncond = tiny
    sigmas = sample.flow_sigmas(6, 3.0)
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    _, window = sample.rollout(wan.transformer, cond, uncond, noise, sigmas, 5.0, group_size=3, window_start=0,
                               window_size=2, generator=torch.Generator().manual_seed(3))
    G = 3
    for i, x, x_next, old_logp in zip(window["step"].tolist(), window["x"], window["x_next"], window["log_prob"]):
        logp, _, _ = sample.step_log_prob(wan.transformer, x, x_next, float(sigmas[i]),
                                          float(sigmas[i + 1]), cond.expand(G, -1, -1), uncond.expand(G, -1, -1),
                                          5.0, noise_level=0.7, sigma_max=float(sigmas[1]))
        ratio = torch.exp(logp - old_logp)
        torch.testing.assert_close(ratio, torch.ones(G), rtol=0, atol=1e-5)


def test_ema_update_is_the_warming_up_average_in_float64():
    """grpo.ema_update against the recurrence written out in float64: e_n = d_n e_{n-1} + (1 - d_n) θ_n with
    d_n = min(decay, (1 + n) / (10 + n)); its first step keeps 2/11 of the start, a late one `decay`."""
    gen = torch.Generator().manual_seed(0)
    thetas = [torch.randn(3, 4, generator=gen) for _ in range(30)]
    ema = {"w": torch.zeros(3, 4)}
    ref = torch.zeros(3, 4, dtype=torch.float64)
    for n, theta in enumerate(thetas, 1):
        grpo.ema_update(ema, {"w": theta}, n, 0.9)
        d = min(0.9, (1 + n) / (10 + n))
        ref = d * ref + (1 - d) * theta.double()
    assert torch.allclose(ema["w"].double(), ref, atol=1e-6)
    first = {"w": torch.zeros(2)}
    grpo.ema_update(first, {"w": torch.ones(2)}, 1, 0.9)
    assert torch.allclose(first["w"], torch.full((2,), 9 / 11))


def test_swapped_puts_the_values_in_and_the_originals_back_even_on_an_error():
    p = torch.nn.Parameter(torch.arange(4.0))
    with common.swapped({"p": p}, {"p": torch.full((4,), 7.0)}):
        assert torch.equal(p.detach(), torch.full((4,), 7.0))
    assert torch.equal(p.detach(), torch.arange(4.0))
    with pytest.raises(RuntimeError, match="inside"):
        with common.swapped({"p": p}, {"p": torch.zeros(4)}):
            raise RuntimeError("inside")
    assert torch.equal(p.detach(), torch.arange(4.0))
