"""
What the toy world's reward sees, against its held-out judge: the numbers behind BENCHMARKS.md, "What the toy
reward sees". Imports common, models, sample, reward, noise_warp, toyworld and toytrain.

    python tools/toy_reward_check.py --scenes 60 --groups 16      # about 10 minutes on one core
    python tools/toy_reward_check.py --novel_view                 # with the held-out-view terms: about 10 minutes
    python tools/toy_reward_check.py --scenes 0 --model FOLDER --balance 20,1 50,1   # another base model's groups,
                                                                  # and the total at other weights: about 4 minutes

1. Pairs (ground truth): per fresh scene and camera word, the consistent video and its corrupted versions (each
   corruption of toyworld.CORRUPTIONS, and a camera that moves another way), all decoded by the toy VAE as
   generated videos are. For each reward term and for the judge's P(consistent): how often the consistent video
   scores higher, per corruption, and each term's mean per kind.
2. Groups (the base model): groups of 8 rollouts of RL captions, sampled as train.py samples them (one ODE prefix,
   a 2-step SDE window, 10 steps). Per term: its spread within a group (GRPO's advantage standardises the sum of
   the terms, so a term moves the policy in proportion to that spread), and its within-group rank correlation with
   the judge's P(consistent) and agreement with the judge's camera verdict; and the judge's verdict on each
   group's best video by that term, beside each group's best by the judge itself (what any reward could pick).
   --model takes the groups from another base model (a diffusers folder, for example one trained longer).
--balance W_RECON,W_GEN ... adds the total at other weights of S_recon and R_gen (train.py's --w_recon, --w_gen),
recombined from the same scores: how a balance would rank the rollouts, before a run trains with it.
--novel_view adds two candidate terms that no reward uses: evaluate.py's held-out-view reconstruction (the even
frames lifted, their Gaussians rendered at the odd frames' cameras), as S_nv = 1 - NV_LPIPS (S_recon's form on
views no Gaussian was fitted to) and NV_PSNR.
--meta_grader N adds S_meta as a candidate: what a grader of the meta view could see, when the toy world has no VLM
to grade it (its w_meta is 0). A small CNN (MetaGrader) learns consistent-or-not from the meta views
(reward.meta_view) of N fresh ground-truth videos decoded by the VAE, half of them corrupted, and scores each video
as P(consistent) of its meta view; `total+S_meta` adds it to the total with weight 1, as the paper's R_3D does.

    python tools/toy_reward_check.py --meta_grader 8000          # about an hour on one core
"""
import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402  (first: the torchvision fix)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402
import noise_warp  # noqa: E402
import reward  # noqa: E402
import sample  # noqa: E402
import toyworld as tw  # noqa: E402
import toytrain as tt  # noqa: E402

TERMS = ("S_recon", "S_traj", "R_gen", "total")
NOVEL_VIEW = ("S_nv", "NV_PSNR")  # --novel_view's candidate terms (scored)
META = ("S_meta", "total+S_meta")  # --meta_grader's candidate terms
KINDS = (*tw.CORRUPTIONS, "camera")  # what a pair's second video has that the first has not


def scored(critics, judge, videos, captions, motions, novel_view=False, grader=None):
    """Reward terms (toy settings) and the judge's verdicts for float videos (N, F, 3, H, W) in [0, 1]; with
    novel_view, NOVEL_VIEW's terms too (evaluate.novel_view_metrics on the same lift the reward made); with a
    grader (MetaGrader), META's terms, from the meta view of that lift."""
    paths = [noise_warp.requested_path(m, videos.shape[1]) for m in motions]
    shared = novel_view or grader is not None
    lifts = [reward.lift(critics, v) for v in videos] if shared else None  # one lift for all terms
    scores, _ = reward.score(critics, videos, captions, paths, lifts=lifts, **reward.defaults("toy"))
    p, seen = tw.judge_videos(judge, videos)
    follows = [int(s) == tw.MOTIONS.index(m[0]) for s, m in zip(seen, motions)]
    rows = [dict({t: float(scores[t][i]) for t in TERMS}, judge_p=float(p[i]), follows=follows[i])
            for i in range(len(videos))]
    if novel_view:
        import evaluate
        for row, video, lift in zip(rows, videos, lifts):
            nv = evaluate.novel_view_metrics(critics, video, lift)
            row.update(S_nv=1 - nv["NV_LPIPS"], NV_PSNR=nv["NV_PSNR"])
    if grader is not None:
        p_meta = grader.p_consistent(torch.stack([reward.to_uint8(reward.meta_view(lf)) for lf in lifts]))
        for row, p in zip(rows, p_meta.tolist()):
            row.update({"S_meta": p, "total+S_meta": row["total"] + p})
    return rows


class MetaGrader(nn.Module):
    """Consistent-or-not from one meta view (3, h, w): three blocks of two 3x3 convolutions (32, 64, 96 wide, group
    norm, SiLU, 2x2 max-pool), global average pool, one logit; 0.2M parameters. A CNN rather than a Qwen3-VL: it
    asks whether the meta view holds the evidence at all, at a fraction of a VLM's cost on one core."""

    def __init__(self, widths=(32, 64, 96)):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1),
                       nn.GroupNorm(8, w), nn.SiLU(), nn.MaxPool2d(2)]
            c = w
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1))

    def forward(self, x):
        """x float (N, 3, h, w) in [0, 1] -> logits (N,)."""
        return self.net(x).flatten()

    @torch.no_grad()
    def p_consistent(self, views, batch=250):
        """uint8 views (N, 3, h, w) -> P(consistent) (N,). (Group norm and no dropout: no train/eval difference.)"""
        return torch.cat([torch.sigmoid(self(v.float() / 255)) for v in views.split(batch)])


def meta_views(wan, critics, n, seed):
    """n fresh ground-truth videos (toyworld.make_dataset, half corrupted, every camera as its caption says), decoded
    by the VAE and lifted as the reward lifts them -> their meta views, uint8 (n, 3, h, w), and their corruption
    labels (n,) (0: none, else 1 + index into toyworld.CORRUPTIONS)."""
    data = tw.make_dataset(n, seed, mix=dict(corrupt=0.5, wrong_camera=0.0))
    with torch.no_grad():
        _, recon = tt.encode_videos(wan.vae, data["video"])
    views = []
    for i, video in enumerate(recon):
        views.append(reward.to_uint8(reward.meta_view(reward.lift(critics, tw.to_unit(video)))))
        if (i + 1) % 500 == 0:
            print(f"[meta_grader] meta view {i + 1}/{n}", flush=True)
    return torch.stack(views), data["corruption"]


def train_meta_grader(views, corruption, steps=3000, batch=64, lr=1e-3, seed=0, held_out=None):
    """MetaGrader on uint8 views (N, 3, h, w) labelled consistent where corruption == 0: AdamW (a 5% warm-up, then a
    cosine), binary cross-entropy, each batch mirrored at random; the last `held_out` (default N // 8) views are
    kept out. -> (grader, report): held-out accuracy and the share accepted (P > 0.5) per corruption kind."""
    gen = torch.Generator().manual_seed(seed)
    held_out = held_out or len(views) // 8
    x, y = views[:-held_out], (corruption[:-held_out] == 0).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grader = MetaGrader()
    opt = torch.optim.AdamW(grader.parameters(), lr, weight_decay=0.01)
    warm = max(1, steps // 20)  # a linear warm-up over the first 5%, then a cosine to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        xb = x[idx].float() / 255
        flip = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.binary_cross_entropy_with_logits(grader(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0:
            print(f"[meta_grader] step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    p, kinds = grader.p_consistent(views[-held_out:]), corruption[-held_out:]
    accepted = {k: float((p[kinds == i] > 0.5).float().mean()) for i, k in enumerate(("none", *tw.CORRUPTIONS))
                if (kinds == i).any()}
    report = dict(accuracy=float(((p > 0.5) == (kinds == 0)).float().mean()), videos=len(views), held_out=held_out,
                  accepted=accepted)
    return grader.eval().requires_grad_(False), report


def pairs(wan, critics, judge, n, seed, novel_view=False, grader=None):
    """Per scene: the consistent video, then one per KINDS; rows of scores."""
    gen, rows = torch.Generator().manual_seed(seed), []
    for s in range(n):
        scene = tw.sample_scene(gen)
        motion = tw.MOTIONS[int(torch.randint(len(tw.MOTIONS), (1,), generator=gen))]
        others = [m for m in tw.MOTIONS if m != motion]
        videos = [tw.make_video(scene, motion, gen=torch.Generator().manual_seed(seed + s))]
        videos += [tw.make_video(scene, motion, corruption=c, gen=torch.Generator().manual_seed(seed + s))
                   for c in tw.CORRUPTIONS]
        videos.append(tw.make_video(scene, motion, camera=others[s % len(others)]))
        _, recon = tt.encode_videos(wan.vae, torch.stack([(v["video"] * 255).round().to(torch.uint8) for v in videos]))
        out = scored(critics, judge, tw.to_unit(recon), [v["caption"] for v in videos], [[motion]] * len(videos),
                     novel_view, grader)
        rows.append(dict(zip(("none", *KINDS), out)))
        print(f"[pairs] scene {s + 1}/{n}", flush=True)
    return rows


def groups(wan, critics, judge, n, group_size=8, steps=10, window=2, guidance=5.0, novel_view=False, grader=None):
    """n groups of base-model rollouts of the first n RL captions (seeded by group index, the SDE window starting
    anywhere in the first half, as train.py draws it); rows of scores per group."""
    with open(os.path.join(ROOT, models.SIZES["toy"]["train_prompts"])) as f:
        captions = [line.strip() for line in f][:n]
    shape = sample.latent_shape(9, 32, 32)
    sigmas = sample.flow_sigmas(steps, wan.scheduler.config.flow_shift)
    text_len = models.SIZES["toy"]["text_len"]
    out = []
    with torch.no_grad():
        uncond = sample.encode(wan, [""], text_len)
        for j, caption in enumerate(captions):
            gen = torch.Generator().manual_seed(j)
            noise, inject, motions = sample.camera_noise(caption, shape, gen)
            latents, _ = sample.rollout(wan.transformer, sample.encode(wan, [caption], text_len), uncond, noise,
                                        sigmas, guidance, group_size=group_size, window_size=window,
                                        window_start=j % (steps // 2 - window + 1),
                                        generator=gen, inject=inject)
            videos = sample.decode(wan.vae, latents).float().clamp(0, 1)
            out.append(scored(critics, judge, videos, [caption] * group_size, [motions or ["fixed"]] * group_size,
                              novel_view, grader))
            print(f"[groups] group {j + 1}/{n}", flush=True)
    return out


def rank(x):
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for k, i in enumerate(order):
        r[i] = float(k)
    return r


def corr(a, b):
    """Pearson correlation; NaN when either side is constant."""
    try:
        return statistics.correlation(a, b)
    except statistics.StatisticsError:
        return math.nan


def mean_se(xs):
    """Mean, standard error and count of the defined values (a group where the judge agrees on all is undefined)."""
    xs = [x for x in xs if x == x]
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan, len(xs)
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs)), len(xs)


def report(pair_rows, group_rows):
    lines = []
    if pair_rows:
        lines += pair_report(pair_rows)
    if group_rows:
        lines += group_report(group_rows)
    return "\n".join(lines)


def terms(row):
    """The terms a row holds: TERMS, NOVEL_VIEW's and META's when it was scored with them, and --balance's totals."""
    return [t for t in (*TERMS, *NOVEL_VIEW, *META) if t in row] + [t for t in row if t.startswith("total at")]


def rebalance(rows, balances):
    """Add to each row (a dict of terms) the total reward.score gives at other weights, from the terms it gave at
    the toy ones (reward.combine: R = w_3d (w_recon S_recon + S_traj) + w_gen R_gen, the toy world's w_meta being
    0), one key per (w_recon, w_gen) of `balances`. A look at how a balance ranks the same rollouts before a run
    trains with it."""
    toy = reward.defaults("toy")
    for row in rows:
        for w_recon, w_gen in balances:
            _, row[f"total at w_recon={w_recon:g}, w_gen={w_gen:g}"] = reward.combine(
                {"S_meta": 0.0, **row}, w_3d=toy["w_3d"], w_meta=toy["w_meta"], w_recon=w_recon, w_gen=w_gen)


def pair_report(pair_rows):
    lines = ["Pairs: P(the consistent video scores higher) per corruption, ground truth decoded by the VAE "
             f"({len(pair_rows)} scenes)", "", "| term | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for t in (*terms(pair_rows[0]["none"]), "judge_p"):
        wins = [statistics.fmean(1.0 if r["none"][t] > r[k][t] else 0.5 if r["none"][t] == r[k][t] else 0.0
                                 for r in pair_rows) for k in KINDS]
        lines.append(f"| {t} | " + " | ".join(f"{w:.2f}" for w in wins) + " |")
    lines += ["", "Means per kind", "", "| term | none | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 2) + "|"]
    for t in (*terms(pair_rows[0]["none"]), "judge_p"):
        lines.append(f"| {t} | " + " | ".join(f"{statistics.fmean(r[k][t] for r in pair_rows):.3f}"
                                               for k in ("none", *KINDS)) + " |")
    return lines + [""]


def group_report(group_rows):
    """Per term: its spread within a group, its within-group agreement with the judge, and what the judge says of
    each group's best video by that term (the most one GRPO step's reweighting toward the term can reach on these
    samples; the judge_p row, each group's best by the judge itself, is the ceiling for any reward)."""
    n, judged = sum(len(g) for g in group_rows), [r for g in group_rows for r in g]
    lines = [f"Groups: {len(group_rows)} groups of {len(group_rows[0])} base-model rollouts; the judge accepts "
             f"{sum(r['judge_p'] > 0.5 for r in judged) / n:.1%} as consistent (mean P "
             f"{statistics.fmean(r['judge_p'] for r in judged):.3f}) and sees "
             f"{sum(r['follows'] for r in judged) / n:.1%} follow their caption's camera", "",
             "| term | sd within a group | Spearman with the judge's P(consistent) (groups) | correlation with the "
             "judge's camera verdict (groups) | each group's best by the term: judge accepts / mean P / follows |",
             "|---|---|---|---|---|"]
    def best(t):  # what the judge says of each group's best video by t
        top = [max(g, key=lambda r: r[t]) for g in group_rows]
        return (f"{sum(r['judge_p'] > 0.5 for r in top) / len(top):.1%} / "
                f"{statistics.fmean(r['judge_p'] for r in top):.3f} / {sum(r['follows'] for r in top) / len(top):.1%}")
    for t in terms(group_rows[0][0]):
        sd = statistics.fmean(statistics.pstdev([r[t] for r in g]) for g in group_rows)
        cp = mean_se([corr(rank([r[t] for r in g]), rank([r["judge_p"] for r in g])) for g in group_rows])
        cf = mean_se([corr([r[t] for r in g], [float(r["follows"]) for r in g]) for g in group_rows])
        lines.append(f"| {t} | {sd:.4f} | {cp[0]:+.3f} ± {cp[1]:.3f} ({cp[2]}) "
                     f"| {cf[0]:+.3f} ± {cf[1]:.3f} ({cf[2]}) | {best(t)} |")
    lines.append(f"| judge_p (the judge itself) | | | | {best('judge_p')} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="What the toy reward sees, against the held-out judge.")
    p.add_argument("--scenes", type=int, default=60, help="ground-truth scenes for the pairs (0: none)")
    p.add_argument("--groups", type=int, default=16, help="groups of base-model rollouts (0: none)")
    p.add_argument("--seed", type=int, default=123, help="scene draws (a seed no build uses)")
    p.add_argument("--out", default="out/toy_reward_check.json", help="every row, as JSON")
    p.add_argument("--novel_view", action="store_true", help="also score the held-out-view terms S_nv and NV_PSNR "
                   "(evaluate.py's novel view), as candidates no reward uses")
    p.add_argument("--meta_grader", type=int, default=0, help="train a grader of the meta view on this many fresh "
                   "ground-truth videos and score S_meta with it, as a candidate no reward uses (0: none)")
    p.add_argument("--meta_grader_steps", type=int, default=3000, help="its training steps (batches of 64)")
    p.add_argument("--meta_grader_seed", type=int, default=777, help="its videos' draws (a seed no build uses)")
    p.add_argument("--model", default=models.SIZES["toy"]["model"], help="the base model whose rollouts make the "
                   "groups (a diffusers folder; its VAE decodes the pairs too)")
    p.add_argument("--balance", nargs="*", default=[], metavar="W_RECON,W_GEN", help="also report the total at these "
                   "weights of S_recon and R_gen (train.py's --w_recon and --w_gen), from the same scores")
    args = common.parse_flags(p, argv)
    balances = []
    for text in args.balance:
        try:
            weights = tuple(float(w) for w in text.split(","))
        except ValueError:
            weights = ()
        if len(weights) != 2 or min(weights) < 0:
            raise SystemExit(f"error: --balance {text}: W_RECON,W_GEN, two weights >= 0 (for example 50,1)")
        balances.append(weights)
    common.check_numbers(args, nonnegative=("scenes", "groups", "meta_grader"), positive=("meta_grader_steps",))
    if 0 < args.meta_grader < 16:
        raise SystemExit(f"--meta_grader={args.meta_grader}: at least 16 videos (an eighth is held out)")
    torch.set_num_threads(1)
    wan = models.load_wan(args.model, "cpu")
    critics, judge = models.load_reward_models("toy"), tw.load_judge()
    grader, grader_report = None, None
    if args.meta_grader:
        views, corruption = meta_views(wan, critics, args.meta_grader, args.meta_grader_seed)
        grader, grader_report = train_meta_grader(views, corruption, args.meta_grader_steps)
        print(f"[meta_grader] {json.dumps(grader_report)}", flush=True)
    pair_rows = pairs(wan, critics, judge, args.scenes, args.seed, args.novel_view, grader)
    group_rows = groups(wan, critics, judge, args.groups, novel_view=args.novel_view, grader=grader)
    rebalance([row for r in pair_rows for row in r.values()] + [row for g in group_rows for row in g], balances)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(pairs=pair_rows, groups=group_rows, meta_grader=grader_report), f)
    if grader_report:
        print(f"Meta-view grader: {grader_report['accuracy']:.1%} right on {grader_report['held_out']} held-out meta "
              "views; accepted: " + ", ".join(f"{k} {v:.0%}" for k, v in grader_report["accepted"].items()) + "\n")
    print(report(pair_rows, group_rows))


if __name__ == "__main__":
    main()
