"""
What the toy world's reward sees, against its held-out judge: the numbers behind BENCHMARKS.md, "What the toy
reward sees". Imports common, models, sample, reward, noise_warp, toyworld and toytrain.

    python tools/toy_reward_check.py --scenes 60 --groups 16      # about 10 minutes on one core
    python tools/toy_reward_check.py --novel_view                 # with the held-out-view terms: about 10 minutes

1. Pairs (ground truth): per fresh scene and camera word, the consistent video and its corrupted versions (each
   corruption of toyworld.CORRUPTIONS, and a camera that moves another way), all decoded by the toy VAE as
   generated videos are. For each reward term and for the judge's P(consistent): how often the consistent video
   scores higher, per corruption, and each term's mean per kind.
2. Groups (the base model): groups of 8 rollouts of RL captions, sampled as train.py samples them (one ODE prefix,
   a 2-step SDE window, 10 steps). Per term: its spread within a group (GRPO's advantage standardises the sum of
   the terms, so a term moves the policy in proportion to that spread), and its within-group rank correlation with
   the judge's P(consistent) and agreement with the judge's camera verdict; and the judge's verdict on each
   group's best video by that term, beside each group's best by the judge itself (what any reward could pick).
--novel_view adds two candidate terms that no reward uses: evaluate.py's held-out-view reconstruction (the even
frames lifted, their Gaussians rendered at the odd frames' cameras), as S_nv = 1 - NV_LPIPS (S_recon's form on
views no Gaussian was fitted to) and NV_PSNR.
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

import models  # noqa: E402
import noise_warp  # noqa: E402
import reward  # noqa: E402
import sample  # noqa: E402
import toyworld as tw  # noqa: E402
import toytrain as tt  # noqa: E402

TERMS = ("S_recon", "S_traj", "R_gen", "total")
NOVEL_VIEW = ("S_nv", "NV_PSNR")  # --novel_view's candidate terms (scored)
KINDS = (*tw.CORRUPTIONS, "camera")  # what a pair's second video has that the first has not


def scored(critics, judge, videos, captions, motions, novel_view=False):
    """Reward terms (toy settings) and the judge's verdicts for float videos (N, F, 3, H, W) in [0, 1]; with
    novel_view, NOVEL_VIEW's terms too (evaluate.novel_view_metrics on the same lift the reward made)."""
    paths = [noise_warp.requested_path(m, videos.shape[1]) for m in motions]
    lifts = [reward.lift(critics, v) for v in videos] if novel_view else None  # one lift for both
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
    return rows


def pairs(wan, critics, judge, n, seed, novel_view=False):
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
                     novel_view)
        rows.append(dict(zip(("none", *KINDS), out)))
        print(f"[pairs] scene {s + 1}/{n}", flush=True)
    return rows


def groups(wan, critics, judge, n, group_size=8, steps=10, window=2, guidance=5.0, novel_view=False):
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
                              novel_view))
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
    """The terms a row holds: TERMS, and NOVEL_VIEW's when it was scored with them."""
    return [t for t in (*TERMS, *NOVEL_VIEW) if t in row]


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
    args = common.parse_flags(p, argv)
    torch.set_num_threads(1)
    wan = models.load_wan(models.SIZES["toy"]["model"], "cpu")
    critics, judge = models.load_reward_models("toy"), tw.load_judge()
    pair_rows = pairs(wan, critics, judge, args.scenes, args.seed, args.novel_view)
    group_rows = groups(wan, critics, judge, args.groups, novel_view=args.novel_view)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(pairs=pair_rows, groups=group_rows), f)
    print(report(pair_rows, group_rows))


if __name__ == "__main__":
    main()
