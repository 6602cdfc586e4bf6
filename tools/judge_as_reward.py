"""
What the RL loop can reach with a perfect reward: `python train.py --size=toy --reward=latent` with the latent
stand-in reward replaced by the held-out judge's P(consistent) of each rollout. The numbers behind BENCHMARKS.md,
"The judge itself as the reward" and "What the RL loop can reach with a perfect reward". Imports common, evaluate,
models, sample, standins and toyworld; runs train.py.

    python tools/judge_as_reward.py --seed=0 --sde_window=4 --max_steps=120 --out_dir=judge_s0   # about 6 minutes
    python evaluate.py --size=toy --ckpt=judge_s0 --seed=0 --limit=60                              # about 5 minutes
    python tools/judge_as_reward.py --model=FOLDER --seed=0 ...   # from a base model trained further on the same VAE

A diagnostic of the RL loop, not a method: no reward of train.py ever sees the judge (evaluate.py's Consistent% and
CamFollow% would mean nothing if one did). Here the judge stands in for a reward that agrees with it perfectly, so a
run measures what the loop itself (sampler, group advantages, LoRA updates) can reach in a given number of steps,
and, beside the same settings under the real reward, how much of a missing gain is the reward's and how much the
loop's. Every flag is train.py's; this tool sets --size=toy and --reward=latent itself, and takes a --model
(another toy base model, for example one trained longer) only if its VAE is the committed one. train.py calls
standins.latent_reward on each group's final latents; here that becomes: decode them with the committed toy VAE, as
train.py decodes its rollouts (sample.decode), and score the videos with the committed judge (toyworld.judge_videos).

    python tools/judge_as_reward.py score --ckpt=judge_s0 --seed=0 --limit=60                   # about 1 minute

`score` takes evaluate.py's flags and prints only its judge columns (Consistent%, P(cons)%, CamFollow%) for the base
model and the checkpoint: the same videos, sampled as evaluate.py samples them, without the 3D metrics that take
most of evaluate.py's time.
"""
import argparse
import os
import runpy
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402,F401  (first: the torchvision fix)
import torch  # noqa: E402

import evaluate  # noqa: E402
import models  # noqa: E402
import sample  # noqa: E402
import standins  # noqa: E402
import toyworld  # noqa: E402

SET_HERE = ("--size", "--reward")


def committed_vae():
    """The committed toy VAE, whose decodes are what the judge learnt."""
    return models.load_wan(models.SIZES["toy"]["model"], "cpu", torch.float32).vae.eval().requires_grad_(False)


def same_vae(folder, vae):
    """Refuse a --model whose VAE is not `vae`, the committed toy one: the judge learnt that VAE's decodes, and only
    those (a base model trained further on the same latents keeps it)."""
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --model={folder}: no such folder")
    mine = models.load_wan(folder, "cpu", torch.float32).vae.state_dict()
    committed = vae.state_dict()
    if mine.keys() != committed.keys() or any(not torch.equal(mine[k], committed[k]) for k in mine):
        raise SystemExit(f"error: --model={folder}: its VAE is not the committed toy VAE, whose decodes are what the "
                         "judge learnt; train the base model on that VAE's latents")


def judge_reward(vae, judge):
    """The reward train.py's --reward=latent calls: final latents (B, 16, T, h, w), normalised as the base model
    makes them -> the judge's P(consistent) of each decoded video (B,) in [0, 1], float32 on the CPU."""
    @torch.no_grad()
    def reward(latents):
        return toyworld.judge_videos(judge, sample.decode(vae, latents.float().cpu()))[0].float()
    return reward


@torch.no_grad()
def judge_columns(eval_argv):
    """evaluate.py's judge columns for its flags `eval_argv`: each prompt i sampled with seed + i by the base model
    and by the checkpoint, as evaluate.main samples it -> {"base" / the checkpoint's label: (Consistent%, P(cons)%,
    CamFollow%)}, means over the prompts."""
    args = evaluate.parse_args(eval_argv)
    if args.size != "toy":
        raise SystemExit("error: the judge knows the toy world only: score a --size=toy checkpoint")
    wan = evaluate.load_models(args, "cpu", models.resolve_dtype(args.dtype, "cpu"))
    prompts, judge = args.prompt_list, toyworld.load_judge()
    embeddings = sample.encode_once(wan, prompts + [args.negative_prompt], args.text_len)
    columns = {}
    for name in ["base"] + ([args.label] if args.lora_dir else []):
        if name != "base":
            wan.transformer.enable_lora()
        rows = [evaluate.judged(judge, evaluate.generate(wan, args, prompt, args.seed + i, embeddings), prompt)
                for i, prompt in enumerate(prompts)]
        columns[name] = tuple(round(sum(r[k] for r in rows) / len(rows), 1)
                              for k in ("Consistent", "ConsistentP", "CamFollow"))
    return columns


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        with tempfile.TemporaryDirectory() as unused:  # evaluate.py's checks make --out; nothing is written there
            columns = judge_columns([f"--out={unused}", *argv[1:]])
        for name, (consistent, p, follows) in columns.items():
            print(f"{name}: Consistent {consistent:.1f}%  P(cons) {p:.1f}%  CamFollow {follows:.1f}%")
        return
    for flag in SET_HERE:
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise SystemExit(f"error: {flag} is set by this tool (--size=toy --reward=latent); pass train.py's other "
                             "flags")
    model = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    model.add_argument("--model")
    folder = model.parse_known_args(argv)[0].model
    vae = committed_vae()
    if folder is not None:
        same_vae(folder, vae)
    standins.latent_reward = judge_reward(vae, toyworld.load_judge())  # train.py looks it up on every call
    sys.argv = ["train.py", "--size=toy", "--reward=latent", *argv]
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
