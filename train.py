"""
World-R1: reinforcement learning that makes Wan2.1 produce 3D-consistent video (Flow-GRPO-Fast + 3D rewards).
Imports common, train_config, models, standins, sample, reward, splat, grpo, noise_warp, checkpoint and tracking;
nothing imports it. The commands that run it: README.md.

One step, per rank: for each of its prompts, camera words -> warped noise -> a group of G rollouts that share an
ODE prefix and branch through an SDE window (sample.rollout) -> decode -> rewards (reward.score: R_3D + R_gen, or
R_gen alone in the dynamic phase) -> group advantages -> `updates_per_epoch` optimizer steps over the window
transitions, each log-prob recomputed with CFG under the current weights (clipped surrogate + β·KL to the
LoRA-disabled model) -> EMA -> log -> eval -> checkpoint. Groups never leave their rank, so no gather is needed.
Where we depart from the paper and the release (and why): docs/DESIGN.md and the docstring of grpo.py.
"""
import common  # noqa: F401  (first: the CPU torchvision fix)

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import grpo
import models
import noise_warp
import reward
import sample
import splat
import standins
import tracking
import train_config

args = train_config.parse(sys.argv[1:])
rank, local_rank, world, device = common.setup_dist(args.dist_timeout, args.deterministic)
master = rank == 0


def print0(line):
    """Print on rank 0, above the progress bar once there is one (print would tear it)."""
    if master:
        tqdm.write(line)
        sys.stdout.flush()


dtype = models.resolve_dtype(args.dtype, device)

train_prompts, dynamic_prompts, test_prompts = train_config.read_prompts(args, world)  # checked, before any model
transitions_per_rank = args.prompts_per_rank * args.group_size * args.sde_window  # window transitions per step
micro_per_update = math.ceil(transitions_per_rank / args.updates_per_epoch / args.micro_batch)
for line in sample.camera_warnings(train_prompts, args.warp_mode):
    sample.warn(line)

# The run folder: one run owns it (the lock, held until this process exits), a fresh run never mixes into an old one,
# every rank sees the same folder, and a resumed run checks its checkpoint and config before any model loads.
config = {k: v for k, v in vars(args).items() if k not in train_config.META}  # saved with every checkpoint
lock, resume_from, saved = checkpoint.claim(args.out_dir, config, resume=args.resume, overwrite=args.overwrite,
                                            fixed=train_config.FIXED_ON_RESUME + (
                                                () if args.allow_config_change else train_config.OBJECTIVE_ON_RESUME))
common.catch_signals(lambda: checkpoint.last_words(args.out_dir))  # SIGTERM, SIGINT: save and stop at a safe point
print0(json.dumps(config, indent=1))
print0(f"{world} ranks x {args.prompts_per_rank} prompts x {args.group_size} videos = "
       f"{world * args.prompts_per_rank * args.group_size} videos per step; {transitions_per_rank} window transitions "
       f"per rank -> {args.updates_per_epoch} updates of {micro_per_update} micro-batches of <= {args.micro_batch}")

# The tracker (rank 0; a no-op elsewhere), started before any model loads so that a login problem costs nothing; a
# resumed run continues the tracker run its checkpoint names.
tracker, error = tracking.Tracker(), ""
if master:
    try:
        tracker = tracking.start(args.report_to, args.out_dir, config, project=args.tracker_project,
                                 saved=(saved or {}).get("tracker"), first_step=saved["step"] + 1 if saved else 0)
    except SystemExit as e:
        error = str(e.code)
common.stop_together(error)
provenance = checkpoint.provenance()  # state.json: the code's git commit and the library versions

# -----------------------------------------------------------------------------
# Models: Wan (frozen) + LoRA (trained), the reward models, optimizer, EMA

torch.manual_seed(args.seed)
wan = standins.wan_for_run(args.size, args.model, device, dtype, random_weights=args.random_weights, depth=args.depth)
policy = wan.transformer  # the unwrapped module; `model` below may wrap it in DDP
if args.full_finetune:
    ref_model = copy.deepcopy(policy).requires_grad_(False)  # the KL reference: the pre-trained weights, as loaded
    policy.requires_grad_(True)
else:
    from peft import LoraConfig
    policy.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # the exported adapter names its base model (peft's adapter metadata; None would leave a LoRA nobody can place)
    policy.peft_config["default"].base_model_name_or_path = (args.model if args.model and not args.random_weights
                                                             else f"random {args.size} Wan2.1 (standins.py)")
if args.grad_checkpointing:
    policy.enable_gradient_checkpointing()
trainable = {n: prm for n, prm in policy.named_parameters() if prm.requires_grad}
for prm in trainable.values():
    prm.data = prm.data.float()  # master weights, updates and optimizer state in fp32, whatever the model's dtype
# A fully fine-tuned model now holds fp32 weights: it runs under autocast in `dtype`, as the release runs its fp32
# weights under accelerate's bf16 autocast. LoRA needs none: peft runs the fp32 adapters beside the bf16 base.
policy_precision = lambda: torch.autocast(device.type, dtype, enabled=args.full_finetune and dtype != torch.float32)
if args.fsdp:
    model = common.shard_fsdp(policy, policy.blocks)
    trainable = {n: prm for n, prm in policy.named_parameters() if prm.requires_grad}  # now DTensor shards
elif world > 1:
    model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[local_rank] if device.type == "cuda" else None)
else:
    model = policy
optimizer = torch.optim.AdamW(trainable.values(), lr=args.lr, weight_decay=args.weight_decay)
ema = {n: prm.detach().clone() for n, prm in trainable.items()}
ema_updates = 0
print0(f"trainable parameters: {sum(prm.numel() for prm in trainable.values()) * (world if args.fsdp else 1):,}")
# lora/sampling.json of every checkpoint: how the LoRA was trained to sample, for sample.py and evaluate.py --lora
sampling = {k: getattr(args, k) for k in sample.SAMPLING}

# Prompt embeddings: each prompt the run can draw is encoded once, here, and kept on the host; then UMT5 leaves the
# device (sample.encode_once)
all_prompts = train_prompts + dynamic_prompts + test_prompts
if line := sample.length_warning(wan.tokenizer, all_prompts, args.text_len):
    sample.warn(line)
embeddings = sample.encode_once(wan, all_prompts + [args.negative_prompt], args.text_len)
host_mib = sum(e.numel() * e.element_size() for e in embeddings.values()) / 2**20
print0(f"encoded {len(embeddings)} prompts once ({host_mib:.0f} MiB on the host); the text encoder is released")


def embed(prompts):
    """Cached UMT5 states of `prompts`, zero-padded back to text_len: (B, text_len, D) on the device."""
    return torch.stack([sample.pad_tokens(embeddings[q], args.text_len) for q in prompts]).to(device)


uncond = embed([args.negative_prompt])  # (1, L, D), the same every step

if args.reward == "world":
    critics = standins.critics_for_run(args.size, device, dtype, random_weights=args.random_weights, depth=args.depth,
                                       process_res=args.lift_res)
    splat.check_renderer_on_every_rank(device, args.renderer, rank, local_rank)
sigmas = sample.flow_sigmas(args.rollout_steps, wan.scheduler.config.flow_shift)  # the rollouts' (Euler + SDE window)
eval_sigmas = sample.flow_sigmas(args.sample_steps, wan.scheduler.config.flow_shift)  # the eval's (UniPC)
shape = sample.latent_shape(args.frames, args.height, args.width)


@contextlib.contextmanager
def reference_weights():
    """The pre-trained model for the KL term: the LoRA switched off (or the frozen copy when fully fine-tuning)."""
    if args.full_finetune:
        yield ref_model
    else:
        policy.disable_adapters()
        try:
            yield policy
        finally:
            policy.enable_adapters()


# -----------------------------------------------------------------------------
# Phases, prompts and randomness: pure functions of the step, so a resumed run draws exactly what it would have

def phase(step):
    """Main steps, then a dynamic phase of `dynamic_steps` after every `dynamic_every` main steps."""
    cycle = args.dynamic_every + args.dynamic_steps
    return "dynamic" if args.dynamic_every and step % cycle >= args.dynamic_every else "main"


def prompts_for(step):
    """This rank's prompts at `step`: walk a fresh permutation of the phase's file per pass (seeded by the pass),
    every rank using the same permutation and taking its own slice."""
    is_dyn = phase(step) == "dynamic"
    pool = dynamic_prompts if is_dyn else train_prompts
    k = sum(phase(s) == phase(step) for s in range(step))  # earlier steps of this phase
    out = []
    for j in range(args.prompts_per_rank):
        idx = (k * world + rank) * args.prompts_per_rank + j
        rounds, pos = divmod(idx, len(pool))
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed * 1000 + rounds * 2 + is_dyn))
        out.append(pool[int(perm[pos])])
    return out


def rollout_generator(step, j):
    """The one generator of prompt j's rollout at `step` on this rank (noise, window start, SDE noise)."""
    return torch.Generator(device).manual_seed(hash((args.seed, step, rank, j)) % 2**62)


def score_videos(videos, prompts, paths, dynamic, latents, seen=None):
    """Rewards of one group -> (totals (G,) with NaN where bad, bad (G,) bool, components {name: (G,)}, reasons: a
    list of reward.Failure per video). seen: a list that receives what the 3D terms looked at, per video
    (reward.score; the media of this step)."""
    if args.reward == "latent":
        t = standins.latent_reward(latents)
        bad = ~torch.isfinite(t)
        reasons = [[reward.Failure(reward.Kind.NOT_FINITE, "latent reward")] if b else [] for b in bad]
        for i in bad.nonzero()[:, 0].tolist():
            print(f"[reward] video {i} ({prompts[i][:60]!r}): {reasons[i][0]}", flush=True)
        return t, bad, {}, reasons
    scores, reasons = reward.score(critics, videos, prompts, paths, dynamic, seen=seen,
                                   **{k: getattr(args, k) for k in (*reward.SETTINGS, *reward.WEIGHTS)})
    parts = {k: scores[k] for k in ("S_meta", "S_recon", "S_traj", "R_3D", "R_gen")}
    return scores["total"], scores["bad"], parts, reasons


@torch.no_grad()
def run_eval(step):
    """EMA weights, the inference sampler (UniPC, --sample_steps) on the first `eval_prompts` test prompts, videos
    saved. Every rank runs the same number of samples (FSDP's collectives need all ranks in every forward): a rank
    with no prompt left samples one anyway and discards it. Returns the mean reward over the scorable videos."""
    folder = os.path.join(args.out_dir, "eval", f"step_{step:06d}")
    os.makedirs(folder, exist_ok=True)
    total, count, error = 0.0, 0, ""
    with common.swapped(trainable, ema), policy_precision():
        for i in range(rank, world * math.ceil(len(test_prompts) / world), world):
            prompt = test_prompts[min(i, len(test_prompts) - 1)]
            gen = torch.Generator(device).manual_seed(args.seed + i)  # same noise at every eval: curves compare
            noise, inject, motions = sample.camera_noise(prompt, shape, gen, args.warp_mode, args.warp_strength,
                                                         device=device)
            lat, _ = sample.denoise(policy, noise, embed([prompt]), uncond, eval_sigmas, args.guidance,
                                    scheduler=wan.scheduler, inject=inject, progress=master, delay=sample.BAR_DELAY)
            if i >= len(test_prompts):
                continue
            video = sample.decode(wan.vae, lat)
            path = noise_warp.requested_path(motions, args.frames)
            t, bad, _, _ = score_videos(video, [prompt], [path], False, lat)
            if not bad.any():
                total, count = total + t.sum().item(), count + 1
            try:
                sample.save_video(os.path.join(folder, f"{i:04d}.mp4"), video[0])
            except OSError as e:
                error = error or f"cannot write the eval video {folder}/{i:04d}.mp4 ({common.why(e)})"
    common.stop_together(error and f"{error}; {checkpoint.last_words(args.out_dir)}")
    sums = common.all_mean({"total": total, "count": count}, device)  # every rank has written its videos now
    tracker.media(step, [("eval/video", os.path.join(folder, f"{i:04d}.mp4"), f"#{i} {prompt}")
                         for i, prompt in enumerate(test_prompts)])
    return sums["total"] / sums["count"] if sums["count"] else math.nan


def save(step):
    """Checkpoint the state after `step` (checkpoint.save: atomic, validated, rotated)."""
    checkpoint.save(args.out_dir, step, dict(ema_updates=ema_updates, world=world, config=config, tracker=tracker.ref,
                                             **provenance), policy, trainable, ema, optimizer, fsdp=args.fsdp,
                    lora=None if args.full_finetune else sampling, keep_last=args.keep_last, device=device)


def stop_if_signalled(done):
    """Collective, at a safe point where the weights are as step `done` left them: after SIGTERM or SIGINT on any
    rank, checkpoint step `done` if it has no checkpoint yet (unless --no-save_on_signal), say in one line where the
    run stands, and stop with a non-zero exit."""
    name = common.signal_received()
    if not name:
        return
    if args.save_on_signal and done >= start and (done + 1) % args.save_every:  # a due step was saved already
        save(done)
    common.stop(f"{name}: stopped " + (f"after step {done}" if done >= 0 else "before the first step") + "; "
                + checkpoint.last_words(args.out_dir))


# -----------------------------------------------------------------------------
# The loop

start = 0
if args.resume:
    settings = {k: getattr(args, k) for k in train_config.OPTIMIZER_ON_RESUME}
    ema_updates = checkpoint.load(resume_from, policy, trainable, ema, optimizer, fsdp=args.fsdp, device=device,
                                  optimizer_settings=settings)["ema_updates"]
    if master:
        checkpoint.drop_metrics_after(args.out_dir, saved["step"])
    print0(f"resumed from {resume_from} (step {saved['step']})")
    start = saved["step"] + 1
bad_steps = 0
bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, unit="step", disable=not master,
           dynamic_ncols=True)  # the stage in its description, the last step's reward and time in its postfix
for step in bar:
    stop_if_signalled(step - 1)
    t0 = time.time()
    ph = phase(step)
    show = args.log_media_every and (step + 1) % args.log_media_every == 0  # rollout media of this step (rank 0)

    # 1. Rollouts: one group per prompt, all on this rank
    batch = []  # one dict per group
    model.eval()
    with policy_precision():
        for j, prompt in enumerate(prompts := prompts_for(step)):
            bar.set_description(f"step {step} rollout {j + 1}/{len(prompts)}")
            gen = rollout_generator(step, j)
            noise, inject, motions = sample.camera_noise(prompt, shape, gen, args.warp_mode, args.warp_strength,
                                                         device=device)
            cond = embed([prompt])
            window_start = int(torch.randint(0, args.rollout_steps // 2 - args.sde_window + 1, (1,), generator=gen,
                                             device=device))
            latents, window = sample.rollout(policy, cond, uncond, noise, sigmas, args.guidance,
                                             group_size=args.group_size, window_start=window_start,
                                             window_size=args.sde_window, noise_level=args.noise_level,
                                             sde_noise=args.sde_noise, generator=gen, inject=inject,
                                             progress=master, delay=sample.BAR_DELAY)
            batch.append(dict(prompt=prompt, cond=cond, window=window, latents=latents,
                              videos=sample.decode(wan.vae, latents),
                              path=noise_warp.requested_path(motions, args.frames)))
    t1 = time.time()
    stop_if_signalled(step - 1)  # abandon this step before it changes anything: the weights are still step - 1's

    # 2. Rewards -> advantages, per group (groups are rank-local). A video that cannot be scored gets a score below
    # every real video of its group; a systemic failure (out of memory, CUDA, a critic failing on every video)
    # stops all ranks together, with the last checkpoint intact.
    bar.set_description(f"step {step} reward")
    error, totals, bads, parts, reasons, seen = "", [], [], [], [], []
    try:
        for k, b in enumerate(batch):
            t, bad, part, why = score_videos(b["videos"], [b["prompt"]] * args.group_size,
                                             [b["path"]] * args.group_size, ph == "dynamic", b["latents"],
                                             seen if master and show and k == 0 else None)
            totals.append(t), bads.append(bad), parts.append(part), reasons.extend(why)
    except Exception as e:  # is_systemic: every later video would fail the same way
        error = f"the reward failed at step {step} ({type(e).__name__}: {str(e)[:300]})"
    failures = [f for why in reasons for f in why]
    counts = Counter(f.key for f in failures)  # logged per step
    crashed = Counter(f.what for f in failures if f.kind is reward.Kind.CRITIC_FAILED)
    failing = [what for what, n in crashed.items() if n == len(reasons) > 1]
    if failing and not error:
        example = next(f for f in failures if f.kind is reward.Kind.CRITIC_FAILED)
        error = (f"{', '.join(w + ' failed' for w in failing)} on every video of step {step} "
                 f"(e.g. {str(example)[:300]})")
    common.stop_together(error and error + f"; stopping. The last checkpoint in {args.out_dir} is intact")
    rewards, bad = torch.cat(totals).to(device), torch.cat(bads).to(device)
    unusable = bool(bad.all()) or any(f.kind is reward.Kind.NOT_FINITE for f in failures)  # toward --max_bad_steps
    group_ids = torch.arange(len(batch), device=device).repeat_interleave(args.group_size)
    filled = grpo.fill_bad(rewards, bad, group_ids)
    adv = torch.zeros_like(filled) if args.zero_advantages else grpo.group_advantages(filled, group_ids, args.adv_clip)
    t2 = time.time()

    # 3. Updates. One flat batch of this rank's window transitions, N = groups x window steps x G of them in that
    # order, each with its video's advantage; shuffled once and dealt into `updates_per_epoch` optimizer steps of
    # micro-batches. The first update is exactly on-policy (ratio 1); later ones see weights the earlier ones moved,
    # where the clip acts.
    flat = lambda key: torch.cat([b["window"][key].flatten(0, 1) for b in batch])  # noqa: E731  (W, G) -> W·G
    x, x_next, old_logp = flat("x"), flat("x_next"), flat("log_prob")  # (N, 16, T, h, w) twice, (N,)
    step_of = torch.cat([b["window"]["step"].repeat_interleave(args.group_size) for b in batch])  # (N,)
    sig, sig_next = sigmas[step_of].to(device), sigmas[step_of + 1].to(device)
    cond = torch.cat([b["cond"].expand(args.sde_window * args.group_size, -1, -1) for b in batch])  # (N, L, D)
    a = adv.view(len(batch), 1, args.group_size).expand(-1, args.sde_window, -1).flatten()  # (N,)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(hash((args.seed, step, rank)) % 2**62))
    bar.set_description(f"step {step} update")
    model.train()
    stats = []
    for u in range(args.updates_per_epoch):
        chunk = order[u::args.updates_per_epoch]
        micro = chunk.split(args.micro_batch)
        for m, ids in enumerate(micro):
            if args.fsdp:
                model.set_requires_gradient_sync(m == len(micro) - 1)
            elif world > 1:  # all-reduce gradients only on the update's last micro-batch
                model.require_backward_grad_sync = m == len(micro) - 1
            ids = ids.to(device)
            kw = dict(noise_level=args.noise_level, sigma_max=float(sigmas[1]), sde_noise=args.sde_noise)
            c, uc = cond[ids], uncond.expand(len(ids), -1, -1)
            with policy_precision():
                logp, mean, std = sample.step_log_prob(model, x[ids], x_next[ids], sig[ids], sig_next[ids], c, uc,
                                                       args.guidance, **kw)
            loss, clip_frac, approx_kl = grpo.policy_loss(logp, old_logp[ids], a[ids], args.clip_range)
            kl = torch.zeros((), device=device)
            if args.beta > 0:
                with torch.no_grad(), reference_weights() as ref:
                    _, ref_mean, _ = sample.step_log_prob(ref, x[ids], x_next[ids], sig[ids], sig_next[ids], c, uc,
                                                          args.guidance, **kw)
                kl = grpo.kl_loss(mean, ref_mean, std)
            ((loss + args.beta * kl) / len(micro)).backward()
            stats.append(dict(loss=loss.item(), clip_frac=clip_frac.item(), approx_kl=approx_kl.item(),
                              kl=kl.item(), update=u))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), args.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(grad_norm):  # the norm is taken after the all-reduce: every rank decides alike
            optimizer.step()
            bad_steps = bad_steps if unusable else 0
            if (step * args.updates_per_epoch + u + 1) % args.ema_every == 0:  # counts optimizer steps
                ema_updates += 1
                grpo.ema_update(ema, trainable, ema_updates, args.ema_decay)
        else:
            bad_steps += 1
            print0(f"step {step} update {u}: non-finite gradient norm, update skipped ({bad_steps} in a row)")
        optimizer.zero_grad(set_to_none=True)
    if unusable:  # a NaN/inf reward (named by reward.score, scored as a bad video) or no video to learn from
        bad_steps += 1
    common.stop_together(f"{bad_steps} steps in a row with non-finite gradients or rewards or no scorable video; "
                         f"stopping. The last checkpoint in {args.out_dir} is intact (lower --lr or check the rewards)"
                         if bad_steps >= args.max_bad_steps else "")
    t3 = time.time()

    # 4. Log (means over ranks), eval, checkpoint
    record = {k: sum(s[k] for s in stats) / len(stats) for k in ("loss", "approx_kl", "kl")}
    for u in range(args.updates_per_epoch):  # the on-policy check: update 0's clip fraction must be 0
        record[f"clip_frac_{u}"] = sum(s["clip_frac"] for s in stats if s["update"] == u) / max(1, sum(
            s["update"] == u for s in stats))
    good = ~bad.cpu()
    record["reward"] = rewards.cpu()[good].mean().item() if good.any() else math.nan
    for key in parts[0]:
        record[key] = torch.cat([pt[key] for pt in parts])[good].float().mean().item() if good.any() else math.nan
    record.update(adv_abs=adv.abs().mean().item(), adv_max=adv.max().item(), grad_norm=grad_norm,
                  bad_videos=float(bad.sum()), lr=optimizer.param_groups[0]["lr"])
    if device.type == "cuda":  # this step's peak device memory (averaged over ranks like the rest)
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    record = common.all_mean(record, device)
    gathered = [([b["prompt"] for b in batch], counts)]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, ([b["prompt"] for b in batch], counts))
    record.update(step=step, phase=ph, t_rollout=t1 - t0, t_reward=t2 - t1, t_train=t3 - t2,
                  prompts=[q for qs, _ in gathered for q in qs], reasons=dict(sum((c for _, c in gathered), Counter())))
    print0(f"step {step:5d} {ph:7s} reward {record['reward']:.4f} "
           + " ".join(f"{k} {record[k]:.3f}" for k in ("S_meta", "S_recon", "S_traj", "R_gen") if k in record)
           + f" | adv {record['adv_abs']:.2f} clip {record['clip_frac_0']:.2f}/{record[f'clip_frac_{args.updates_per_epoch - 1}']:.2f}"
           f" approx_kl {record['approx_kl']:.2e} kl {record['kl']:.2e} loss {record['loss']:.4f}"
           f" gnorm {grad_norm:.3f} | rollout {t1 - t0:.1f}s reward {t2 - t1:.1f}s train {t3 - t2:.1f}s"
           + (f" | {int(record['bad_videos'] * world)} bad videos" if record["bad_videos"] else ""))
    error = ""
    if master and show:  # what the reward rewarded: rank 0's first group, under out_dir/media/step_N/
        b, folder = batch[0], os.path.join(args.out_dir, "media", f"step_{step:06d}")
        try:
            tracker.media(step, tracking.rollout_media(folder, b["videos"], b["prompt"], totals[0], parts[0],
                                                       reasons[:args.group_size], seen, b["path"],
                                                       noise_warp.PLANE_DEPTH, sample.save_video))
        except OSError as e:  # a full disk
            error = f"cannot write the media of step {step} in {folder} ({common.why(e)}); " \
                    + checkpoint.last_words(args.out_dir)
    common.stop_together(error)
    if args.eval_every and (step + 1) % args.eval_every == 0:
        bar.set_description(f"step {step} eval")
        record["eval_reward"] = run_eval(step)
        print0(f"step {step:5d} eval reward {record['eval_reward']:.4f}")
    tracking.log_step(tracker, record, os.path.join(args.out_dir, "metrics.jsonl"), master,
                      lambda: checkpoint.last_words(args.out_dir))
    if (step + 1) % args.save_every == 0 or step == args.max_steps - 1:
        bar.set_description(f"step {step} save")
        save(step)
    bar.set_postfix_str(f"reward {record['reward']:.4f}, last step {time.time() - t0:.1f} s")

bar.close()
tracker.finish()
common.cleanup_dist()
