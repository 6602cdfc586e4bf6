"""
Flow-GRPO math as pure functions: the SDE step with its log-prob, group advantages, the clipped surrogate, the KL.
Imports torch only.

The policy is the denoiser run as a stochastic sampler: one "action" is one SDE step x_t -> x_{t-dt}, a Gaussian
whose mean the velocity sets (Flow-GRPO, Liu et al. 2025, §4.2). How we depart from vanilla GRPO (DeepSeekMath):
1. Actions are denoising steps, not tokens. Only `sde_window` consecutive steps per rollout are stochastic and
   trained (Flow-GRPO-Fast); the rest is a deterministic ODE, so a group shares one ODE prefix and branches at the
   window (sample.rollout).
2. Log-probs are means over all latent elements, not sums (as Flow-GRPO), so ratios move slowly and the clip
   range is small (1e-3).
3. Advantages are per-group z-scores with a 1e-4 floor on the std and a clip at ±5. A group lives on one rank,
   so they need no gather. A group whose rewards are all equal gets zero advantage, not NaN.
4. The KL term is the closed-form KL between the policy's and the reference's step Gaussians (same std), not a
   sampled estimator; the reference is the pre-trained model (LoRA disabled).
5. No value network, no length normalisation, no entropy bonus: one scalar reward per video, and the same
   advantage applies to every window step of that video.
6. Several optimizer steps per rollout batch (`updates_per_epoch`), so the ratio can leave 1 and the clip act
   (the release takes one step per epoch, where the clip is inert; microsoft/World-R1 scripts/train_world_r1.py).
   How far the ratio moves depends on the learning rate and the model: at the toy size and its learning rate the
   default's second update stays inside the clip; with more updates the clip acts, on more transitions the later the
   update (BENCHMARKS.md).
"""
import math

import torch


def _per_sample(s, x):
    """A float, a 0-d tensor or a (B,) tensor -> float32 tensor of shape (B, 1, 1, ...) broadcastable to x."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s


SDE_NOISE = ("sd3", "wan")  # the two noise schedules of Flow-GRPO's trainers, see sde_step


def sde_step(x, v, sigma, sigma_next, noise_level=0.7, sigma_max=None, prev_sample=None, generator=None,
             schedule="sd3"):
    """One Flow-GRPO SDE step of the rectified flow x_σ = (1 − σ)·x0 + σ·ε, from σ to σ_next < σ.

        σ_t  = a·sqrt(σ / (1 − σ))    schedule "sd3": Flow-GRPO's SD3 trainer and paper (a = noise_level; at σ = 1
                                      the 1 − σ uses sigma_max, the largest σ below 1, so the first std is finite)
        σ_t  = σ                      schedule "wan": Flow-GRPO's Wan2.1 trainer, σ_min + (σ_max − σ_min)·σ with the
                                      schedule's ends 0 and 1 (noise_level unused)
        mean = x·(1 + σ_t²·dt/(2σ)) + v·(1 + σ_t²·(1 − σ)/(2σ))·dt,   dt = σ_next − σ < 0
        std  = σ_t·sqrt(−dt);  x_next = mean + std·ξ,  ξ ~ N(0, I)
        log p(x_next) = mean over non-batch dims of log N(x_next; mean, std²)

    Any σ_t gives an SDE with the ODE's marginals (the score is −(x + (1 − σ)·v)/σ); σ_t → 0 is the Euler step.
    On a 20-step shift-3 schedule the step std over the first half is 0.70 → 0.25 ("sd3") or 0.13 → 0.15 ("wan").
    x, v: (B, ...); sigma, sigma_next: floats or (B,) tensors. If prev_sample is given it is scored, not drawn.
    Returns x_next (B, ...), log_prob (B,), mean (B, ...), std (B, 1, ...), all float32: the quadratic term and
    std² lose most of their digits in bf16, and the ratio exp(logp − old_logp) needs them all.
    """
    x, v = x.float(), v.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    if schedule == "sd3":
        sigma_den = sigma if sigma_max is None else torch.clamp(sigma, max=sigma_max)
        std_t = noise_level * torch.sqrt(sigma / (1 - sigma_den))
    elif schedule == "wan":
        std_t = sigma
    else:
        raise ValueError(f"unknown SDE noise schedule {schedule!r}; choose one of {SDE_NOISE}")
    dt = sigma_next - sigma
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


def group_advantages(rewards, group_ids, adv_clip=5.0, eps=1e-4):
    """A_i = clip((R_i − mean_g) / (std_g + eps), ±adv_clip) over the group g of sample i (population std).

    rewards: (N,) float; group_ids: (N,) int, equal ids = same prompt's group. Returns (N,) float32.
    A group whose rewards are all equal gets exactly 0 (the float mean of equal values can differ from them in
    the last bit, which eps would blow up to a spurious ±1e-12..1e-4 advantage).
    """
    rewards = rewards.float()
    _, group = torch.unique(group_ids, return_inverse=True)
    n = torch.zeros(int(group.max()) + 1, device=rewards.device).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros_like(n).index_add_(0, group, rewards) / n
    var = torch.zeros_like(n).index_add_(0, group, (rewards - mean[group]) ** 2) / n
    adv = (rewards - mean[group]) / (var.sqrt()[group] + eps)
    hi = torch.full_like(n, -math.inf).scatter_reduce_(0, group, rewards, "amax")
    lo = torch.full_like(n, math.inf).scatter_reduce_(0, group, rewards, "amin")
    adv = torch.where((hi > lo)[group], adv, torch.zeros_like(adv))
    return adv.clamp(-adv_clip, adv_clip)


def fill_bad(rewards, bad, group_ids, margin_floor=1e-3):
    """Rewards with each unscorable video (bad: black, NaN, a critic failed) set below every real video of its
    group: min_real − max(std_real, margin_floor). A bad video must never outrank a real one, whatever the reward's
    sign (HPSv3's mu is often negative, so a bad video scored 0 would win the dynamic phase). A group with no real
    video gets equal rewards, i.e. zero advantage. rewards (N,) (NaN allowed where bad), bad (N,) bool,
    group_ids (N,). Returns (N,) float32."""
    rewards = torch.where(bad, torch.zeros_like(rewards), rewards.float())
    out = rewards.clone()
    for gid in torch.unique(group_ids):
        real, worse = (group_ids == gid) & ~bad, (group_ids == gid) & bad
        if real.any() and worse.any():
            r = rewards[real]
            margin = max(float(r.std(unbiased=False)), margin_floor)
            out[worse] = float(r.min()) - margin
    return out


def policy_loss(logp, old_logp, adv, clip_range):
    """PPO's clipped surrogate: mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))), r = exp(logp − old_logp).

    logp (with grad), old_logp, adv: (B,). Returns (loss, clip_frac, approx_kl); the last two are detached
    diagnostics: the fraction of ratios outside [1 − ε, 1 + ε] and 0.5·mean((logp − old_logp)²).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_frac = ((ratio - 1).abs() > clip_range).float().mean().detach()
    approx_kl = (0.5 * log_ratio**2).mean().detach()
    return loss, clip_frac, approx_kl


def kl_loss(mean, ref_mean, std):
    """KL(N(mean, std²) || N(ref_mean, std²)) per element = (mean − ref_mean)² / (2·std²), averaged.

    mean, ref_mean: (B, ...); std: (B, 1, ...) the step's own std σ_t·sqrt(−dt). Dividing by the full step
    variance (not σ_t² as Flow-GRPO does) makes this the KL of the very Gaussians whose log-probs the surrogate
    uses, so β weighs two quantities in the same units whatever the step size. Returns a scalar.
    """
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean()


@torch.no_grad()
def ema_update(ema, params, updates, decay):
    """One EMA step of the trained weights, in place: ema <- ema + (1 − d)(θ − ema) with
    d = min(decay, (1 + n) / (10 + n)) at the n-th update (n from 1), so the average forgets its start quickly while
    warming up. ema, params: {name: tensor} of the same shapes."""
    d = min(decay, (1 + updates) / (10 + updates))
    for name, p in params.items():
        ema[name].lerp_(p.detach(), 1 - d)
