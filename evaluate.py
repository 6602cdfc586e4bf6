"""
Evaluate Wan2.1 before and after World-R1 training: 3D consistency, camera control and quality, as tables and plots.
Imports common, models, standins, sample, reward, splat, noise_warp, toyworld (the judge) and checkpoint (to find a
run's latest checkpoint). Its commands: README.md.

Every prompt i is sampled with seed `--seed + i`, by the base model and by the checkpoint alike (a paired
comparison), on rank i % world; each rank fills its own rows of a (prompts, metrics) table and one all_reduce(SUM)
assembles it, so the numbers do not depend on the number of processes. Per video:
  3D consistency, novel view (NV-): Depth Anything 3 lifts the even frames video[0::2] alone to 3D Gaussians
      (reward.lift), which are rendered at the odd frames' cameras and compared with the held-out odd frames:
      PSNR, SSIM (torchmetrics), LPIPS (AlexNet, the lpips package) at DA3's processing resolution. The odd
      cameras come from the lift of the whole video, moved into the even lift's world by a similarity fitted on
      the even frames both lifts share (`novel_view_metrics`). DA3 therefore runs twice per video (all F frames,
      then the (F + 1) / 2 even ones).
  3D consistency, own view (OV-, the paper's Table 1 as we read it): the whole video's Gaussians re-rendered at
      every frame's own estimated camera, against that frame, as S_recon does. Every pixel was seen by its own
      camera, so this measures how well the Gaussians fit, not whether they hold from a new viewpoint.
  Camera control: RotErr (radians), TransErr, CamMC of the estimated camera path against the path the prompt's
      camera words request (noise_warp.camera_path), summed over frames as CamI2V computes them (`camera_metrics`).
  Quality: HPSv3 (mean mu over the first `gen_frames` frames, as R_gen); subject consistency (VBench: DINO ViT-B/16
      features, similarity to the first and to the previous frame); dynamic degree (VBench: RAFT optical flow,
      "moving" when enough frame pairs have a large top-5% flow).
  Reward components: reward.score with the checkpoint's reward settings (S_meta, S_recon, S_traj, R_3D, R_gen, total).
Outputs in --out: results.md, results.json, per_prompt.csv, bars.png, motions.png, frames.png, curves.png (--curves).

Real sizes download, besides Wan and the reward models: facebook/dino-vitb16 (transformers' conversion of the DINO
ViT-B/16 checkpoint VBench loads from torch hub; its layer-norm eps is 1e-12 where DINO's is 1e-6, a last-digits
difference) and torchvision's RAFT-large C_T_V1 weights (raft_large_C_T_V1-22a6c225.pth,
ported from the RAFT authors' raft-things.pth, which VBench uses) into the torch hub cache; seed those caches on
offline clusters. `--size=tiny` builds random DINO and RAFT-small models in code and downloads nothing.
MVCS (GeoVideo, arXiv 2512.03453) is not implemented: its exact definition is not known to us.
"""
import common  # noqa: F401  (first: the CPU torchvision fix, before transformers, lpips, torchvision)

import argparse
import csv
import io
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import models
import noise_warp
import reward
import sample
import splat
import standins
import toyworld

PRESETS = {size: {**config, "prompts": config["test_prompts"]} for size, config in models.SIZES.items()}  # defaults
FPS = 16  # Wan2.1 makes 16 fps video; VBench's dynamic degree samples frames at ~8 fps
# Settings a checkpoint's state.json fixes for the evaluation (an explicit flag still wins).
FROM_CKPT = ("model", "frames", "height", "width", "text_len", "guidance", "negative_prompt", "warp_mode",
             "warp_strength")

# Per-video metrics: key -> (table header with the better direction, number format). Order = column order; the
# novel-view PSNR comes first, the headline 3D number.
METRICS = {
    "Consistent": ("Consistent%↑", ".1f"), "ConsistentP": ("P(cons)%↑", ".1f"),  # the toy world's judge
    "CamFollow": ("CamFollow%↑", ".1f"),
    "NV_PSNR": ("NV-PSNR↑", ".2f"), "NV_SSIM": ("NV-SSIM↑", ".3f"), "NV_LPIPS": ("NV-LPIPS↓", ".3f"),
    "OV_PSNR": ("OV-PSNR↑", ".2f"), "OV_SSIM": ("OV-SSIM↑", ".3f"), "OV_LPIPS": ("OV-LPIPS↓", ".3f"),
    "RotErr": ("RotErr rad↓", ".3f"), "TransErr": ("TransErr↓", ".3f"), "CamMC": ("CamMC↓", ".3f"),
    "HPSv3": ("HPSv3↑", ".3f"), "SubjCons": ("SubjCons%↑", ".2f"), "DynDeg": ("DynDeg%", ".1f"),
    "Flow": ("Flow px", ".2f"),
    "S_meta": ("S_meta↑", ".3f"), "S_recon": ("S_recon↑", ".3f"), "S_traj": ("S_traj↑", ".3f"),
    "R_3D": ("R_3D↑", ".3f"), "R_gen": ("R_gen↑", ".4f"), "reward": ("reward↑", ".3f"),
}
KEYS = list(METRICS)
REWARD_KEYS = ["S_meta", "S_recon", "S_traj", "R_3D", "R_gen", "reward"]  # a table of their own in results.md
MAIN_KEYS = [k for k in KEYS if k not in REWARD_KEYS]
MOTION_KEYS = ("Consistent", "CamFollow", "NV_PSNR", "OV_PSNR", "RotErr", "TransErr", "SubjCons", "reward")  # first 6
# with a value
# The paper's own numbers (the World-R1 project page: Table 1 at 832x480 and the VBench Table 2), for scale only.
PAPER = [("Wan2.1-T2V-1.3B", 17.40, 0.550, 0.467, 96.34), ("World-R1-Small", 27.63, 0.858, 0.201, 97.58),
         ("Wan2.1-T2V-14B", 19.76, 0.629, 0.405, None), ("World-R1-Large", 27.67, 0.865, 0.162, None)]


# -----------------------------------------------------------------------------
# Command line: everything is checked here, before any model loads

def build_parser():
    p = argparse.ArgumentParser(description="Evaluate Wan2.1, base vs a World-R1 checkpoint.",
                                formatter_class=common.HelpFormatter,
                                epilog="With --ckpt, the video size, text length, guidance, negative prompt and "
                                       "camera warp default to the checkpoint's training config; with a --lora that "
                                       "train.py exported, to its sampling.json (which also sets --sample_steps). "
                                       "Flags "
                                       "given here override them.")
    p.add_argument("--size", choices=list(models.SIZES), default=None,
                   help="preset: tiny (CPU), toy (the toy world, CPU), small, large; unset: the checkpoint's, "
                        "else tiny")
    # what to evaluate
    p.add_argument("--ckpt", default=None, help="checkpoint folder (out/ckpt_000100) or run folder (uses 'latest')")
    p.add_argument("--lora", default=None, help="a LoRA folder instead of --ckpt: train.py's export or peft's "
                                                "save_pretrained")
    p.add_argument("--model", default=None, help="the base model. " + models.SIZE_HELP["model"])
    p.add_argument("--prompts", default=None, help="one prompt per line; unset: the size's test_prompts ("
                                                   + models.SIZE_HELP["test_prompts"] + ")")
    p.add_argument("--limit", type=int, default=None, help="first N prompts only. " + models.SIZE_HELP["limit"])
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i, by every model")
    # sampling (defaults: the checkpoint's training config, else the size preset)
    p.add_argument("--sample_steps", type=int, default=None, help=models.SIZE_HELP["sample_steps"])
    p.add_argument("--sampler", choices=["unipc", "euler"], default="unipc",
                   help="unipc (the checkpoint's scheduler) or the Euler ODE")
    for name in ("frames", "height", "width", "text_len"):
        p.add_argument(f"--{name}", type=int, default=None, help=models.SIZE_HELP[name])
    p.add_argument("--guidance", type=float, default=sample.GUIDANCE, help="classifier-free guidance")
    p.add_argument("--negative_prompt", default="", help="negative prompt")
    p.add_argument("--warp_mode", choices=["init", "stepwise", "none"], default="init", help="camera noise")
    p.add_argument("--warp_strength", type=float, default=None, help="camera noise strength; unset: "
                                                                     + sample.WARP_STRENGTH)
    # metric models
    p.add_argument("--dtype", choices=list(models.DTYPES), default=None,
                   help="network weights; unset: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--renderer", choices=["auto", "gsplat", "torch"], default="auto",
                   help="Gaussian rasterizer: auto = gsplat on CUDA (checked at start-up), torch elsewhere")
    p.add_argument("--dino", default=None, help="DINO hub id or folder (facebook/dinov2-base also works). "
                                                + models.SIZE_HELP["dino"])
    common.add_dist_flags(p)  # --dist_timeout, --deterministic
    # output
    p.add_argument("--out", default="eval", help="output folder (created)")
    p.add_argument("--curves", default=None, help="run folder whose metrics.jsonl to plot as training curves")
    p.add_argument("--grid", type=int, default=4, help="prompts shown in frames.png")
    p.add_argument("--save_videos", action="store_true", help="also write every video to OUT/videos/MODEL/")
    return p


def resolve_checkpoint(path):
    """--ckpt -> (checkpoint folder, its state.json). A run folder is followed through its `latest` file; the
    checkpoint's LoRA file is opened and checked (sample.check_lora_file) before any model loads."""
    if not os.path.isdir(path):
        common.fail(f"--ckpt={path} {'is a file' if os.path.exists(path) else 'does not exist'}; pass a checkpoint "
                    "folder (out/ckpt_000100) or a run folder that has a 'latest' file")
    if os.path.lexists(os.path.join(path, "latest")):  # a run folder: its latest checkpoint, and only its own
        if not (named := checkpoint.read_latest(path)):
            common.fail(f"--ckpt={path}: its 'latest' file names no checkpoint folder of this run (ckpt_NNNNNN "
                        "inside it); pass the checkpoint folder itself")
        path = named
    state_file = os.path.join(path, "state.json")
    if not os.path.isfile(state_file):
        common.fail(f"--ckpt={path} has no state.json (and no 'latest' file); pass a complete checkpoint folder "
                    "written by train.py")
    if not os.path.isfile(os.path.join(path, "lora", sample.LORA_FILE)):
        common.fail(f"checkpoint {path} has no lora/{sample.LORA_FILE}; evaluate.py reads LoRA checkpoints "
                    "(a --full_finetune run has none)")
    sample.check_lora_file(os.path.join(path, "lora"), "--ckpt")
    try:
        with open(state_file, encoding="utf-8") as f:
            return path, json.load(f)
    except (ValueError, OSError) as e:
        common.fail(f"--ckpt: {state_file} is not readable JSON ({e}); the checkpoint is damaged, use another")


def parse_args(argv):
    """Flags -> resolved config. Precedence: explicit flag > the checkpoint's training config (a LoRA's
    sampling.json) > size preset. Every user mistake stops here with one line saying what to do."""
    p = build_parser()
    first = common.parse_flags(p, argv, PRESETS)  # what to evaluate
    if first.ckpt is not None and first.lora is not None:
        common.fail("give --ckpt or --lora, not both")
    ckpt, state, lora_dir, label, trained = None, None, None, None, {}
    if first.ckpt is not None:
        ckpt, state = resolve_checkpoint(first.ckpt)
        lora_dir, label = os.path.join(ckpt, "lora"), os.path.basename(os.path.normpath(ckpt))
        trained = {k: state.get("config", {}).get(k) for k in ("size", *FROM_CKPT)}
    elif first.lora is not None:
        sample.check_lora_file(first.lora, "--lora")
        lora_dir, label = first.lora, "lora:" + os.path.basename(os.path.normpath(first.lora))
        trained = sample.sampling_settings(first.lora)
    if first.size is not None and trained.get("size") not in (None, first.size):
        common.fail(f"--size={first.size} but the checkpoint was trained at --size={trained['size']}; drop --size")
    source = os.path.join(ckpt, "state.json") if ckpt else os.path.join(lora_dir or ".", sample.SAMPLING_FILE)
    words = common.config_argv(p, trained, source)
    args = common.parse_flags(p, words + list(argv), PRESETS)
    args.ckpt, args.ckpt_state, args.lora_dir, args.label = ckpt, state, lora_dir, label
    args.size = args.size or "tiny"
    cfg = (state or {}).get("config", {})
    args.warp_strength = sample.warp_strength(args.size, args.warp_mode, args.warp_strength)
    args.reward_kw = {k: cfg.get(k, v) for k, v in reward.defaults(args.size).items()}  # as the checkpoint trained
    args.dino_px, args.raft, args.flow_iters = (models.SIZES[args.size][k] for k in ("dino_px", "raft", "flow_iters"))

    sample.check_video_size(args.frames, args.height, args.width)
    if args.frames < reward.MIN_FRAMES:
        common.fail(f"--frames={args.frames}: the metrics need at least {reward.MIN_FRAMES} frames (the novel view "
                    "holds out frames between lifted ones; camera errors compare paths)")
    sample.check_text_len(args.text_len)
    sample.check_model_arg(args.model)
    common.check_numbers(args, positive=("sample_steps", "limit", "text_len"), nonnegative=("grid", "warp_strength"),
                         finite=("guidance",))
    common.check_text(args.negative_prompt, "--negative_prompt")
    args.prompt_list = common.read_lines(args.prompts, "--prompts")[:args.limit]
    if args.curves is not None and not os.path.isfile(os.path.join(args.curves, "metrics.jsonl")):
        common.fail(f"--curves={args.curves} has no metrics.jsonl; pass train.py's --out_dir")
    common.check_writable_dir(args.out, "--out")
    return args


# -----------------------------------------------------------------------------
# Metrics, one video at a time

def image_metrics(pred, target):
    """Per-frame PSNR and SSIM of pred against target, (F, 3, H, W) in [0, 1] -> two (F,) tensors.
    PSNR = 10 log10(1 / MSE) over all pixels and channels of a frame; SSIM (Wang et al. 2004) with an 11x11
    Gaussian window, sigma 1.5, K1 0.01, K2 0.03, averaged over the (reflect-padded) frame and channels. Both from
    torchmetrics at data range 1; the dtype of the inputs is kept."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    return psnr, ssim


@torch.no_grad()
def own_view_metrics(critics, lf):
    """3D consistency at the video's own cameras: all Gaussians rendered at each frame's estimated camera, compared
    with that frame. lf: reward.Lift (frames (F, 3, h, w) at DA3's resolution). -> {OV_PSNR, OV_SSIM, OV_LPIPS},
    means over frames. The Gaussians were built from these very frames at these cameras (and S_recon, which the
    policy is trained on, is 1 - OV_LPIPS), so a high score says they fit, not that they hold from a new view."""
    pred = reward.own_view_renders(lf).to(lf.frames.dtype)
    psnr, ssim = image_metrics(pred, lf.frames)
    lp = reward.lpips_distance(critics, pred, lf.frames)
    return dict(OV_PSNR=psnr.mean().item(), OV_SSIM=ssim.mean().item(), OV_LPIPS=lp.mean().item())


def umeyama(src, dst, with_scale=True):
    """Least-squares similarity dst ~ s R src + t (Umeyama 1991). src, dst (N, 3) -> (s, R (3,3), t (3,)).
    A degenerate src (all points equal) gives s = 1."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    U, D, Vt = torch.linalg.svd(xd.T @ xs / len(src))
    S = torch.ones(3, dtype=src.dtype, device=src.device)
    S[2] = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vt))  # a rotation, never a reflection
    R = U @ torch.diag(S) @ Vt
    var = (xs ** 2).sum(1).mean()
    s = (D * S).sum() / var if with_scale and var > 1e-12 else torch.ones((), dtype=src.dtype, device=src.device)
    return s, R, mu_d - s * R @ mu_s


def camera_points(c2w, rho):
    """Each camera as 4 points: its centre c and the tips c + rho R e_i of its three axes. (n, 4, 4) -> (4n, 3)."""
    c, R = c2w[:, :3, 3], c2w[:, :3, :3]
    return torch.cat([c, *(c + rho * R[:, :, i] for i in range(3))])


def sim3_between(src_c2w, src_depth, dst_c2w, dst_depth):
    """The similarity x_dst = s R x_src + t between the worlds of two reconstructions of the same frames, from their
    cameras (n, 4, 4) c2w and depth maps (n, h, w): Umeyama (`umeyama`) on camera_points at rho = each
    reconstruction's own median depth, in float64 -> (s, R (3, 3), t (3,)).
    Centres alone fail where the camera barely moves: a pan or a fixed shot puts every centre at one point (R and
    s undetermined), a push-in puts them on a line (the roll about it free). The axis tips fix R from the cameras'
    orientations whatever the centres do, and, drawn at each world's scene depth, fix s as the ratio of scene
    depths when the centres are static; when the centres move, their spread joins the fit. Exact (to rounding)
    when one reconstruction is a similarity transform of the other, depths included."""
    pts = [camera_points(c2w.double(), depth.double().median()) for c2w, depth in ((src_c2w, src_depth),
                                                                                (dst_c2w, dst_depth))]
    return umeyama(*pts)


def transform_cameras(c2w, s, R, t):
    """c2w (n, 4, 4) in one world -> the same cameras in the world x' = s R x + t: [R R_j | s R c_j + t]."""
    out = c2w.double().clone()
    out[:, :3, :3] = R @ out[:, :3, :3]
    out[:, :3, 3] = s * out[:, :3, 3] @ R.T + t
    return out


def odd_cameras(full, even):
    """The odd frames' cameras in the even-frame lift's world -> (c2w (n, 4, 4) float64, K (n, 3, 3)), n = F // 2.
    full: Lift of all F frames; even: Lift of frames 0, 2, 4, ... Extrinsics: the full lift's, moved by
    sim3_between(full's even frames, even). Intrinsics: the even lift's, the mean of the two even frames around
    each odd one (the focal length the even lift's geometry goes with; DA3 estimates it per run)."""
    s, R, t = sim3_between(full.c2w[0::2], full.depth[0::2], even.c2w, even.depth)
    j = torch.arange(1, len(full.c2w), 2)
    K = 0.5 * (even.K[(j - 1) // 2] + even.K[((j + 1) // 2).clamp_max(len(even.K) - 1)])
    return transform_cameras(full.c2w[1::2], s, R, t), K


@torch.no_grad()
def novel_view_metrics(critics, video, full, lift=reward.lift):
    """3D consistency from held-out views. video (F, 3, H, W), F >= 3; full: its Lift (all frames). The even frames
    alone are lifted (`lift(critics, video[0::2])`, injectable for tests), their Gaussians rendered at the odd
    frames' cameras (`odd_cameras`) and compared with the odd frames at the lift resolution, full.frames[1::2]
    -> {NV_PSNR, NV_SSIM, NV_LPIPS}, means over the F // 2 odd frames. F = 4k + 1, so every odd frame lies between
    two even ones: an interpolated view, as close as the frame rate allows, that no Gaussian was fitted to."""
    if len(video) < 3:
        raise ValueError(f"novel view needs 3 frames or more, got {len(video)}")
    even = lift(critics, video[0::2])
    c2w, K = odd_cameras(full, even)
    target = full.frames[1::2]
    rgb, _ = splat.render(even.gaussians, torch.linalg.inv(c2w), K, *target.shape[-2:])  # (n, h, w, 3)
    pred = rgb.clamp(0, 1).permute(0, 3, 1, 2).to(target.dtype)
    psnr, ssim = image_metrics(pred, target)
    lp = reward.lpips_distance(critics, pred, target)
    return dict(NV_PSNR=psnr.mean().item(), NV_SSIM=ssim.mean().item(), NV_LPIPS=lp.mean().item())


def normalize_translation(c2w, eps=1e-9):
    """CamI2V's normalize_t: t_j / (max_k |t_k| + eps), rotations kept. (F, 4, 4) relative to frame 0 -> same.
    A path whose camera never moves (pan, fixed) stays at t = 0; any other path ends with its farthest camera at
    distance 1, which removes the unknown scale of a monocular reconstruction."""
    out = c2w.clone()
    out[:, :3, 3] = c2w[:, :3, 3] / (c2w[:, :3, 3].norm(dim=-1).max() + eps)
    return out


def camera_metrics(est_c2w, req_c2w):
    """Camera control of an estimated path against the requested one, both c2w (F, 4, 4), as CamI2V computes them
    (ZGCTroy/CamI2V evaluation/glomap_evaluation.py: RotErr from CameraCtrl, CamMC from CamI2V):
        P_j <- P_0^-1 P_j                                     (relative to the first frame, both paths)
        t_j <- t_j / max_k |t_k|                              (each path by its own scale: normalize_translation)
        RotErr   = sum_j arccos((tr(R^_j R_j^T) - 1) / 2)     radians, as CamI2V's calc_roterr (atan2 form here)
        TransErr = sum_j |t^_j - t_j|_2
        CamMC    = sum_j |[R^|t^]_j - [R|t]_j|_F              over the 3x4 matrices
    Sums over all F frames (frame 0 contributes 0), so they grow with the frame count, as in the papers; World-R1's
    camera table (RotErr 1.50 / 1.21) is on this scale."""
    est, req = est_c2w.double(), req_c2w.to(est_c2w.device).double()
    est, req = (normalize_translation(torch.linalg.inv(P[0]) @ P) for P in (est, req))
    rot = torch.deg2rad(noise_warp.geodesic_deg(est[:, :3, :3], req[:, :3, :3])).sum()
    trans = (est[:, :3, 3] - req[:, :3, 3]).norm(dim=-1).sum()
    cammc = (est[:, :3, :4] - req[:, :3, :4]).flatten(1).norm(dim=-1).sum()
    return dict(RotErr=rot.item(), TransErr=trans.item(), CamMC=cammc.item())


@torch.no_grad()
def subject_consistency(dino, video, n_px=224):
    """VBench subject consistency, in percent. video (F, 3, H, W) in [0, 1], F >= 2. Frames are resized
    (shorter side n_px, bilinear, no antialias, on uint8 as VBench) and ImageNet-normalised; f_k is the
    L2-normalised CLS feature of frame k;
        S = 100 / (F - 1) * sum_{k>=1} (max(0, <f_k, f_{k-1}>) + max(0, <f_k, f_0>)) / 2."""
    from torchvision.transforms.functional import normalize, resize
    x = resize(reward.to_uint8(video), n_px, antialias=False).float() / 255
    x = normalize(x, reward.IMAGENET_MEAN, reward.IMAGENET_STD)
    kw = dict(interpolate_pos_encoding=True) if dino.config.model_type == "vit" else {}  # DINOv2 always interpolates
    f = F.normalize(dino(pixel_values=x.to(dino.device, dino.dtype), **kw).last_hidden_state[:, 0].float(), dim=-1)
    prev, first = (f[1:] * f[:-1]).sum(-1).clamp_min(0), (f[1:] * f[:1]).sum(-1).clamp_min(0)
    return 100 * ((prev + first) / 2).mean().item()


@torch.no_grad()
def dynamic_degree(raft, video, fps=FPS, iters=20, chunk=8):
    """VBench dynamic degree of one video -> (moving 0 or 100, mean top-5% flow magnitude in px).
    Frames at ~8 fps (every round(fps / 8)-th), uint8 levels; RAFT flow between consecutive frames (padded to a
    multiple of 8 as RAFT's InputPadder); per pair s = mean of the largest 5% of |flow|; the video moves when at
    least round(4 n / 16) of its n frames' pairs have s > 6 min(H, W) / 256. RAFT needs sides >= 128 px, so a
    smaller video (tiny) is upsampled first and the threshold is taken at the size RAFT sees."""
    x = reward.to_uint8(video[::max(1, round(fps / 8))]).float()  # (n, 3, H, W) in 0..255
    if min(x.shape[-2:]) < 128:
        x = F.interpolate(x, scale_factor=128 / min(x.shape[-2:]), mode="bilinear", align_corners=False)
    n, (H, W) = len(x), x.shape[-2:]
    thres, count = 6.0 * min(H, W) / 256, round(4 * n / 16)
    ph, pw = -H % 8, -W % 8
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate") / 127.5 - 1  # RAFT wants [-1, 1]
    dev = next(raft.parameters()).device
    scores = []
    for i in range(0, n - 1, chunk):
        a, b = x[i:min(i + chunk, n - 1)], x[i + 1:min(i + chunk, n - 1) + 1]
        flow = raft(a.to(dev), b.to(dev), num_flow_updates=iters)[-1].float()  # (c, 2, H', W')
        mag = flow.norm(dim=1).flatten(1)
        scores.append(mag.topk(int(mag.shape[1] * 0.05), dim=1).values.mean(1).cpu())
    scores = torch.cat(scores)
    return 100.0 * float((scores > thres).sum() >= count), scores.mean().item()


def judged(judge, video, prompt):
    """The toy world's judge on one video (F, 3, H, W) in [0, 1] -> its columns in percent: Consistent (100 when it
    calls the video one rigid scene), ConsistentP (its probability of that) and CamFollow (100 when the camera motion
    it sees is the prompt's; "fixed" for a prompt that names none)."""
    p, consistent, follows = toyworld.judge_rates(judge, video[None].cpu(), noise_warp.parse_camera(prompt)[:1]
                                                   or ["fixed"])
    return dict(Consistent=100 * float(consistent), ConsistentP=100 * float(p), CamFollow=100 * float(follows))


def generate(wan, args, prompt, seed, embeddings, progress=False):
    """One video (F, 3, H, W) in [0, 1] of `prompt` with `seed`, sampled with the flags' sampler, steps, guidance,
    negative prompt and camera warp: every model of an evaluation is sampled through here."""
    return sample.generate(wan, prompt, seed, frames=args.frames, height=args.height, width=args.width,
                           sample_steps=args.sample_steps, guidance=args.guidance, sampler=args.sampler,
                           text_len=args.text_len, negative_prompt=args.negative_prompt, warp_mode=args.warp_mode,
                           warp_strength=args.warp_strength, embeddings=embeddings, progress=progress,
                           delay=sample.BAR_DELAY)


def load_models(args, device, dtype):
    """The base model of `--size`/`--model` and, with --ckpt or --lora, its LoRA: loaded (and proven to fit) before
    any sampling, and switched off for the base model's pass (enable_lora() switches it on)."""
    wan = standins.wan_for_run(args.size, args.model, device, dtype)
    if args.lora_dir:
        sample.load_lora(wan.transformer, args.lora_dir, "--ckpt" if args.ckpt else "--lora")
        wan.transformer.disable_lora()
    return wan


def evaluate_video(video, prompt, path, critics, dino, raft, args, judge=None):
    """Every metric of one video (F, 3, H, W) -> ({key: float, NaN when undefined}, the reasons as one string).
    path: the requested c2w path (F, 4, 4), or None when the prompt names no camera motion. judge: the toy world's
    (toyworld.Judge): Consistent = 100 when it sees a consistent rigid scene, ConsistentP its probability of that in
    percent (a finer reading of the same verdict), CamFollow = 100 when the camera motion it sees is the prompt's."""
    row, reasons = dict.fromkeys(KEYS, math.nan), []
    if judge is not None:
        row.update(judged(judge, video, prompt))
    guard = lambda what, fn, *a: reward.guard(reasons, what, fn, *a, failed={})  # noqa: E731  (a failed group: NaN)
    lf = reward.guard(reasons, "lift", reward.lift, critics, video, failed=None)
    if lf is not None:
        row.update(guard("novel view", novel_view_metrics, critics, video, lf))
        row.update(guard("own view", own_view_metrics, critics, lf))
        if path is not None:
            row.update(guard("camera", camera_metrics, lf.c2w, path))
    row.update(guard("subject consistency", lambda: dict(SubjCons=subject_consistency(dino, video, args.dino_px))))
    row.update(guard("dynamic degree", lambda: dict(zip(("DynDeg", "Flow"), dynamic_degree(
        raft, video, iters=args.flow_iters)))))
    scores, why = reward.score(critics, video[None], [prompt], [path], **args.reward_kw,  # a bad video: NaN, a reason
                               lifts=[lf] if lf is not None else None)
    row.update({k: scores[k].item() for k in ("S_meta", "S_recon", "S_traj", "R_3D", "R_gen")},
               reward=scores["total"].item())
    gen_scale = args.reward_kw["gen_scale"]  # R_gen = gen_scale * mean HPSv3 mu over the first gen_frames frames
    row["HPSv3"] = row["R_gen"] / gen_scale if gen_scale and args.reward_kw["w_gen"] else math.nan
    for key, weight in (("S_meta", "w_meta"), ("R_gen", "w_gen")):
        if not args.reward_kw[weight]:  # not computed (the toy world has no VLM and no HPSv3)
            row[key] = math.nan
    return row, "; ".join(map(str, reasons + why[0]))


GRID_COLS = 5  # frames per video in frames.png


def thumb_size(height, width, max_side=128, min_side=96):
    """Thumbnails at most max_side; a video smaller than min_side is enlarged by a whole factor (the toy world's 32 px)."""
    s = min(1.0, max_side / max(height, width))
    if max(height, width) < min_side:
        s = float(min_side // max(height, width))
    return max(1, round(height * s)), max(1, round(width * s))


def grid_frames(video, cols=GRID_COLS):
    """`cols` evenly spaced frames of a video (F, 3, H, W), shrunk by thumb_size -> (cols, 3, h, w) float32."""
    idx = torch.linspace(0, len(video) - 1, cols).round().long()
    size = thumb_size(*video.shape[-2:])
    if size[0] > video.shape[-2]:  # enlarged: whole pixels, not a blur
        return F.interpolate(video[idx].float(), size=size, mode="nearest")
    return F.interpolate(video[idx].float(), size=size, mode="bilinear", antialias=True, align_corners=False)


# -----------------------------------------------------------------------------
# Aggregation (rank 0): means, deltas, per-motion breakdown

def nanmean(values):
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def summarize(names, tables, prompts):
    """tables: (M, N, K) -> per-model means {name: {key: mean}} (NaN skipped), the last model minus the first,
    and per-motion means {name: {motion: {key: mean}}} (a composite prompt counts toward each of its motions)."""
    means = {name: {k: nanmean(t[:, j].tolist()) for j, k in enumerate(KEYS)} for name, t in zip(names, tables)}
    delta = {k: means[names[-1]][k] - means[names[0]][k] for k in KEYS} if len(names) > 1 else {}
    motions = [sorted(set(noise_warp.parse_camera(p)) or {"(none)"}) for p in prompts]
    order = [m for m in (*noise_warp.MOTIONS, "(none)") if any(m in ms for ms in motions)]
    per_motion = {name: {m: {k: nanmean([t[i, j].item() for i in range(len(prompts)) if m in motions[i]])
                             for j, k in enumerate(KEYS)} for m in order} for name, t in zip(names, tables)}
    return means, delta, per_motion


def shown(keys, means):
    """The keys with a value for some model (the judge's columns exist at the toy size only)."""
    return [k for k in keys if any(not math.isnan(m[k]) for m in means.values())]


def fmt(value, spec):
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def markdown_table(rows, keys, delta=None):
    """rows: [(label, {key: value})] -> markdown lines, one row per model (+ a Δ row)."""
    lines = ["| model | " + " | ".join(METRICS[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt(v[k], METRICS[k][1]) for k in keys) + " |" for label, v in rows]
    if delta:
        lines.append("| Δ (ckpt − base) | " + " | ".join(
            ("+" if delta[k] >= 0 else "") + fmt(delta[k], METRICS[k][1]) for k in keys) + " |")
    return lines


def write_markdown(path, args, names, means, delta, per_motion, n):
    rows = [(name, means[name]) for name in names]
    lines = [f"# Evaluation: {' vs '.join(names)}", "",
             f"{n} prompts from `{args.prompts}`, size `{args.size}`, {args.frames}x{args.height}x{args.width}, "
             f"{args.sample_steps} {args.sampler} steps, guidance {args.guidance}, seed {args.seed} + prompt index.",
             "",
             "NV-PSNR/SSIM/LPIPS (novel view, 3D consistency): DA3 Gaussians of the even frames alone, rendered at "
             "the odd frames' cameras (estimated from the whole video, moved into the even frames' reconstruction by "
             "a similarity fit) vs the held-out odd frames. OV-PSNR/SSIM/LPIPS (own view): the whole video's "
             "Gaussians re-rendered at each frame's own camera vs that frame (how well they fit; S_recon = "
             "1 - LPIPS of the same renders). RotErr (rad, Σ over frames) / TransErr / CamMC (Σ over frames): "
             "estimated vs requested camera path, relative to the first frame, translation scale-normalised, as "
             "CamI2V. SubjCons and DynDeg: VBench definitions, in percent; Flow: mean top-5% RAFT flow magnitude. "
             "Means over prompts; n/a where undefined.", ""]
    if shown(["Consistent"], means):
        lines += ["Consistent% and CamFollow% (the toy world's judge, a classifier trained on ground-truth toy videos "
                  "that no reward uses): the share of videos it sees as one consistent rigid scene (P(cons)%: its mean "
                  "probability of that), and the share whose camera motion it sees as the prompt's.", ""]
    lines += markdown_table(rows, shown(MAIN_KEYS, means), delta)
    lines += ["", "## Reward components (reward.score, as in training)", ""]
    lines += markdown_table(rows, shown(REWARD_KEYS, means), delta)
    lines += ["", "## Per camera motion (a composite prompt counts toward each of its motions)", ""]
    keys = shown(MOTION_KEYS, means)[:6]
    head = "| motion | " + " | ".join(f"{METRICS[k][0]} {name}" for k in keys for name in names) + " |"
    lines += [head, "|---" * (len(keys) * len(names) + 1) + "|"]
    for m in per_motion[names[0]]:
        lines.append(f"| {m} | " + " | ".join(fmt(per_motion[name][m][k], METRICS[k][1])
                                               for k in keys for name in names) + " |")
    lines += ["", "## The paper's numbers, for scale (832x480, 81 frames; the World-R1 project page; the paper does not "
              "state its reconstruction protocol, so neither NV- nor OV- is its exact counterpart)", "",
              "| model | PSNR↑ | SSIM↑ | LPIPS↓ | SubjCons%↑ |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {a:.2f} | {b:.3f} | {c:.3f} | {fmt(d, '.2f') if d else 'n/a'} |" for m, a, b, c, d in PAPER]
    common.write_atomic(path, "\n".join(lines) + "\n")


def clean(x):
    """NaN -> None, recursively, so results.json is strict JSON."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def per_prompt_rows(names, tables, prompts, seed):
    return [dict(index=i, model=name, seed=seed + i, motions=" ".join(noise_warp.parse_camera(p)), prompt=p,
                 **{k: t[i, j].item() for j, k in enumerate(KEYS)})
            for name, t in zip(names, tables) for i, p in enumerate(prompts)]


def write_json(path, args, names, means, delta, per_motion, rows):
    config = {k: getattr(args, k) for k in ("size", "model", "ckpt", "lora_dir", "prompts", "limit", "seed",
                                            "sample_steps",
                                            "sampler", "frames", "height", "width", "text_len", "guidance",
                                            "negative_prompt", "warp_mode", "warp_strength", "dino",
                                            "dino_px", "raft", "flow_iters", "reward_kw")}
    config["ckpt_step"] = (args.ckpt_state or {}).get("step")
    out = dict(config=config, models=[dict(name=name, n=len(rows) // len(names), means=means[name]) for name in names],
               delta=delta, per_motion=per_motion, per_prompt=rows)
    common.write_atomic(path, json.dumps(clean(out), indent=1))


def write_csv(path, rows):
    """rows -> CSV. A text cell that starts with = + - @ (or a tab or carriage return) gets a leading ', so a
    spreadsheet shows a prompt such as "=HYPERLINK(...)" as text instead of evaluating it (OWASP's CSV injection
    rule)."""
    text = lambda v: "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v  # noqa: E731
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows({k: text(v) for k, v in row.items()} for row in rows)
    common.write_atomic(path, buf.getvalue())


# -----------------------------------------------------------------------------
# Plots (matplotlib, headless)

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path):
    """A figure -> png at `path`, written atomically (common.write_atomic), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    common.write_atomic(path, buf.getvalue())


COLORS = ["tab:gray", "tab:blue"]  # base, checkpoint


def plot_bars(path, names, means):
    """One panel per metric, one bar per model."""
    plt = _plt()
    cols, keys = 4, shown(KEYS, means)
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(3.2 * cols, 2.4 * math.ceil(len(keys) / cols)))
    for ax, k in zip(axes.flat, keys):
        vals = [means[n][k] for n in names]
        ax.bar(range(len(names)), [0 if math.isnan(v) else v for v in vals], color=COLORS[:len(names)])
        for x, v in enumerate(vals):
            ax.text(x, 0 if math.isnan(v) else v, fmt(v, METRICS[k][1]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(METRICS[k][0], fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)


def plot_motions(path, names, per_motion, means):
    """Grouped bars: x = camera motion, one bar per model, one panel per metric (the first 6 of MOTION_KEYS with a
    value)."""
    plt = _plt()
    motions = list(per_motion[names[0]])
    fig, axes = plt.subplots(2, 3, figsize=(13, 6))
    width = 0.8 / len(names)
    for ax, k in zip(axes.flat, shown(MOTION_KEYS, means)[:6]):
        for j, name in enumerate(names):
            vals = [per_motion[name][m][k] for m in motions]
            ax.bar([i + j * width for i in range(len(motions))], [0 if math.isnan(v) else v for v in vals],
                   width, label=name, color=COLORS[j % len(COLORS)])
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(motions))], motions, rotation=40,
                      fontsize=7, ha="right")
        ax.set_title(METRICS[k][0], fontsize=9)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_png(fig, path)


def plot_frames(path, names, thumbs, prompts):
    """thumbs (M, P, cols, 3, h, w): one row per (prompt, model), the frames side by side."""
    plt = _plt()
    M, P = thumbs.shape[:2]
    fig, axes = plt.subplots(M * P, 1, figsize=(2 * thumbs.shape[2], 1.9 * M * P), squeeze=False)
    for p in range(P):
        for m in range(M):
            ax = axes[p * M + m, 0]
            ax.imshow(torch.cat(list(thumbs[m, p]), dim=-1).permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(f"#{p} {names[m]}: {prompts[p][:90]}", fontsize=7, loc="left")
            ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)


CURVE_FIRST = ("reward", "R_3D", "S_meta", "S_recon", "S_traj", "R_gen", "eval_reward", "kl", "loss", "approx_kl",
               "clip_frac_0", "grad_norm")


def plot_curves(path, run_dir, max_panels=16):
    """Training curves from run_dir/metrics.jsonl: every numeric key against step (reward, its components, KL and
    loss first); dynamic-phase steps drawn as dots. Returns the keys plotted."""
    plt = _plt()
    records = [r for _, r in common.jsonl_lines(os.path.join(run_dir, "metrics.jsonl")) if r is not None]
    numeric = {k for r in records for k, v in r.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    keys = ([k for k in CURVE_FIRST if k in numeric] + sorted(numeric - set(CURVE_FIRST)))[:max_panels]
    cols = 4
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[k], r.get("phase")) for i, r in enumerate(records)
               if isinstance(r.get(k), (int, float))]
        ax.plot([s for s, _, _ in pts], [v for _, v, _ in pts], lw=1)
        dyn = [(s, v) for s, v, ph in pts if ph == "dynamic"]
        if dyn:
            ax.plot(*zip(*dyn), ".", ms=3, color="tab:orange", label="dynamic phase")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)
    return keys


# -----------------------------------------------------------------------------
# Main: shard prompts, evaluate each model, all_reduce, write

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank, local_rank, world, device = common.setup_dist(args.dist_timeout, args.deterministic)
    lock = checkpoint.lock_folder(args.out, "evaluation", "--out")  # noqa: F841  (held while this runs)
    prompts, t_start = args.prompt_list, time.time()
    mine = list(range(rank, len(prompts), world))  # prompt i on rank i % world, always with seed + i
    common.print0(f"evaluating {len(prompts)} prompts on {world} rank(s): base"
                  + (f" vs {args.label} ({args.lora_dir})" if args.lora_dir else ""))

    for line in sample.camera_warnings(prompts, args.warp_mode):
        sample.warn(line)
    dtype = models.resolve_dtype(args.dtype, device)
    wan = load_models(args, device, dtype)
    if line := sample.length_warning(wan.tokenizer, prompts, args.text_len):
        sample.warn(line)
    # Both models see the same prompts: encode this rank's once, then free the text encoder
    embeddings = sample.encode_once(wan, [prompts[i] for i in mine] + [args.negative_prompt], args.text_len)
    critics = standins.critics_for_run(args.size, device, dtype)
    splat.check_renderer_on_every_rank(device, args.renderer, rank, local_rank)
    dino = (standins.build_tiny_dino().requires_grad_(False).to(device) if args.dino is None
            else models.load_dino(args.dino, device))
    raft = models.load_raft(args.raft, device)
    judge = toyworld.load_judge() if args.size == "toy" else None
    names = ["base"] + ([args.label] if args.lora_dir else [])
    n_grid = min(args.grid, len(prompts))
    tables = torch.zeros(len(names), len(prompts), len(KEYS), dtype=torch.float64)  # (M, N, K), own rows filled
    thumbs = torch.zeros(len(names), n_grid, GRID_COLS, 3, *thumb_size(args.height, args.width))  # own videos
    for m, name in enumerate(names):
        if m == 1:
            wan.transformer.enable_lora()
        for i in tqdm(mine, desc=name, unit="prompt", disable=rank != 0, dynamic_ncols=True):  # rank 0's bar
            t0 = time.time()
            video = generate(wan, args, prompts[i], args.seed + i, embeddings, progress=rank == 0)  # (F, 3, H, W)
            t1 = time.time()
            path = noise_warp.requested_path(noise_warp.parse_camera(prompts[i]), args.frames)
            row, why = evaluate_video(video, prompts[i], path, critics, dino, raft, args, judge)
            tables[m, i] = torch.tensor([row[k] for k in KEYS], dtype=torch.float64)
            if i < n_grid:
                thumbs[m, i] = grid_frames(video.cpu())
            if args.save_videos:
                os.makedirs(os.path.join(args.out, "videos", name), exist_ok=True)
                try:
                    sample.save_video(os.path.join(args.out, "videos", name, f"{i:04d}.mp4"), video)
                except OSError as e:
                    common.fail(f"cannot write a video in --out={args.out} ({common.why(e)})")
            line = (f"[rank {rank}] {name} #{i}: NV-PSNR {row['NV_PSNR']:.2f} RotErr {row['RotErr']:.3f} reward "
                    f"{row['reward']:.3f} | sample {t1 - t0:.1f}s metrics {time.time() - t1:.1f}s"
                    + (f" | {why}" if why else ""))
            if rank == 0:
                tqdm.write(line)  # above the bar
                sys.stdout.flush()
            else:
                print(line, flush=True)

    # Each row was filled by exactly one rank (zeros elsewhere), so the sum is the table, exactly.
    if dist.is_initialized():
        for t in (tables, thumbs) if n_grid else (tables,):
            buf = t.to(device)
            dist.all_reduce(buf)
            t.copy_(buf.cpu())
    error = ""
    if common.is_main():
        means, delta, per_motion = summarize(names, tables, prompts)
        rows = per_prompt_rows(names, tables, prompts, args.seed)
        print("\n".join(markdown_table([(n, means[n]) for n in names], shown(MAIN_KEYS, means), delta)))  # first: a full disk
        try:  # each file is whole or absent (common.write_atomic)
            write_markdown(os.path.join(args.out, "results.md"), args, names, means, delta, per_motion,
                           len(prompts))
            write_json(os.path.join(args.out, "results.json"), args, names, means, delta, per_motion, rows)
            write_csv(os.path.join(args.out, "per_prompt.csv"), rows)
            plot_bars(os.path.join(args.out, "bars.png"), names, means)
            plot_motions(os.path.join(args.out, "motions.png"), names, per_motion, means)
            if n_grid:
                plot_frames(os.path.join(args.out, "frames.png"), names, thumbs, prompts)
            if args.curves:
                plot_curves(os.path.join(args.out, "curves.png"), args.curves)
            print(f"wrote {args.out}/ (results.md, results.json, per_prompt.csv, plots) in "
                  f"{time.time() - t_start:.1f}s")
        except OSError as e:
            error = f"cannot write the results in --out={args.out} ({common.why(e)}); the table above is the result"
    common.stop_together(error)
    common.cleanup_dist()


if __name__ == "__main__":
    common.exit_on_signal("stopped before the evaluation finished")
    main()
