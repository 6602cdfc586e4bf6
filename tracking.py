"""
What a training run shows besides metrics.jsonl: the tracker (--report_to wandb or tensorboard) and the media files.
Imports common; matplotlib, imageio, and wandb or tensorboard only when asked (both optional: see INSTALL).

train.py calls these on rank 0; every other rank holds the no-op `Tracker`, so the loop never branches on logging.
    Tracker.log         the step's scalars (every step)
    Tracker.media       videos and images by file: the eval videos (out_dir/eval/step_N/) at each eval, the rollout
                        media (`rollout_media`, out_dir/media/step_N/) every --log_media_every steps
The rollout media show what the reward rewarded: a few videos of one group with their reward components (the group's
best and worst), for each the render from the novel "meta" view that Qwen3-VL graded (S_meta), and its camera path as
Depth Anything 3 estimated it beside the one the prompt requested (S_traj compares the two). They are written under
out_dir with or without a tracker. The tracker's own files live under out_dir too (wandb/, tensorboard/), and a
resumed run continues the same tracker run: its id is saved with every checkpoint (`Tracker.ref`).
"""
import io
import json
import math
import os

import torch

import common

INSTALL = "pip install wandb==0.31.0 tensorboard==2.21.0 -c constraints.txt (see README, Install)"
MEDIA_VIDEOS = 4  # rollout videos per media step: the group's best two and worst two
GIF_SIDE = 256  # TensorBoard plays videos as GIFs in its event file: longest side shrunk to this many pixels


class Tracker:
    """No tracker (--report_to=none, and every rank but 0): every call does nothing."""
    ref = None  # what a checkpoint saves to continue this tracker run on --resume: {"kind", "id"}

    def log(self, record, step):
        pass

    def media(self, step, files):
        pass

    def finish(self):
        pass


def scalars(record):
    """The numbers of a metrics.jsonl record (strings, lists, null and the step itself left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class WandbTracker(Tracker):
    """Weights & Biases, its files in out_dir/wandb/. WANDB_MODE=offline works without an account
    (`wandb sync out_dir/wandb/offline-run-*` uploads later). After a resume, a step the run redoes that wandb
    already holds keeps its first values: wandb takes no step twice (its warning says so)."""

    def __init__(self, out_dir, config, project, run_id=None):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=project, config=config, dir=out_dir, id=run_id, resume="allow")
        self.ref = {"kind": "wandb", "id": self.run.id}

    def log(self, record, step):
        self.run.log(scalars(record), step=step)

    def media(self, step, files):
        """files: [(key, path to an .mp4 or .png, caption)]; one panel per key holding its files."""
        panels = {}
        for key, path, caption in files:
            kind = self.wandb.Video if path.endswith(".mp4") else self.wandb.Image
            panels.setdefault(key, []).append(kind(path, caption=caption))
        self.run.log(panels, step=step)

    def finish(self):
        self.run.finish()


class TensorBoardTracker(Tracker):
    """TensorBoard event files in out_dir/tensorboard/. On resume, events from the resumed step on are purged (the
    run redoes those steps), so the curves have no doubled points."""

    def __init__(self, out_dir, first_step=0):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=first_step or None)
        self.ref = {"kind": "tensorboard", "id": "tensorboard"}

    def log(self, record, step):
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def media(self, step, files):
        """files: [(key, path, caption)]: a .png as an image, an .mp4 as a GIF (TensorBoard's video panel), the
        caption as text; key/i for the i-th file of a key."""
        import imageio.v3 as iio
        from tensorboard.compat.proto.summary_pb2 import Summary
        count = {}
        for key, path, caption in files:
            count[key] = count.get(key, -1) + 1
            tag = f"{key}/{count[key]}"
            if path.endswith(".png"):
                self.writer.add_image(tag, iio.imread(path)[..., :3], step, dataformats="HWC")
            else:
                frames = torch.from_numpy(iio.imread(path))  # (F, H, W, 3) uint8
                gif, (h, w) = gif_bytes(frames)
                image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
                self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
            self.writer.add_text(tag, caption, step)
        self.writer.flush()

    def finish(self):
        self.writer.close()


def log_step(tracker, record, metrics_file, master, last_words):
    """One step's record to the tracker and, on rank 0, one strict-JSON line of `metrics_file`: a non-finite number
    becomes null and its key is listed under "nonfinite". A full disk stops every rank (collective) with one line
    ending in last_words(), where the run stands."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    record = {k: (None if k in bad else v) for k, v in record.items()} | ({"nonfinite": bad} if bad else {})
    tracker.log(record, record["step"])
    error = ""
    if master:
        try:  # a line and its newline, or nothing (a full disk): never half a line
            common.append_line(metrics_file, json.dumps(record, allow_nan=False))
        except OSError as e:
            error = f"cannot append step {record['step']} to metrics.jsonl ({common.why(e)}); {last_words()}"
    common.stop_together(error)


def gif_bytes(frames, fps=16, side=GIF_SIDE):
    """(F, H, W, 3) uint8 -> (GIF bytes at `fps`, looping, longest side at most `side` px, (h, w))."""
    import imageio.v3 as iio
    x = frames.permute(0, 3, 1, 2).float()
    s = min(1.0, side / max(x.shape[-2:]))
    if s < 1:
        x = torch.nn.functional.interpolate(x, scale_factor=s, mode="area")
    x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return iio.imwrite("<bytes>", x, extension=".gif", duration=1000 / fps, loop=0), x.shape[1:3]


def start(kind, out_dir, config, *, project, saved=None, first_step=0):
    """The tracker of --report_to `kind` (rank 0). saved: the checkpoint's Tracker.ref when resuming; the same kind
    continues that run. A tracker that cannot start stops the run with one line."""
    run_id = saved["id"] if saved and saved.get("kind") == kind else None
    try:
        if kind == "wandb":
            return WandbTracker(out_dir, config, project, run_id)
        if kind == "tensorboard":
            return TensorBoardTracker(out_dir, first_step)
    except Exception as e:  # wandb: no login, no network, a bad project name; we cannot list them all
        common.fail(f"--report_to={kind} could not start ({type(e).__name__}: {str(e).splitlines()[0][:200]}); for "
                    "wandb run `wandb login`, or set WANDB_MODE=offline to log into out_dir/wandb without an account")
    return Tracker()


# -----------------------------------------------------------------------------
# Rollout media, written under out_dir/media/step_N/

def pick(rewards, n=MEDIA_VIDEOS):
    """Indices of the n videos to show from a group's rewards (G,), NaN = bad: the best n/2 and the worst n/2 of the
    scored ones, best first; a group of n or fewer shows all of them."""
    order = torch.argsort(torch.nan_to_num(rewards, nan=-math.inf), descending=True, stable=True).tolist()
    return order if len(order) <= n else order[:n // 2] + order[len(order) - (n - n // 2):]


def camera_plot(path, est_c2w, req_c2w, scene_depth, req_depth, title):
    """Top view (x right, z forward) of the estimated and the requested camera path, each relative to its first
    camera and in scene depths (the estimate / its median depth of frame 0, the request / the warp plane's depth),
    as S_traj compares them (reward.s_traj); arrows show where each camera looks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for c2w, depth, label, color in ((req_c2w, req_depth, "requested", "tab:gray"),
                                     (est_c2w, scene_depth, "estimated (DA3)", "tab:blue")):
        if c2w is not None:
            rel = torch.linalg.inv(c2w[0].double()) @ c2w.double()
            paths.append(((rel[:, :3, 3] / depth).numpy(), rel[:, :3, 2].numpy(), label, color))
    span = max([0.1] + [float(abs(pos[:, [0, 2]]).max()) for pos, _, _, _ in paths])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for pos, fwd, label, color in paths:
        ax.plot(pos[:, 0], pos[:, 2], "-o", ms=2, color=color, label=label)
        every = max(1, len(pos) // 8)
        ax.quiver(pos[::every, 0], pos[::every, 2], fwd[::every, 0], fwd[::every, 2], color=color, width=0.005,
                  angles="xy", scale_units="xy", scale=1 / (0.15 * span))
    ax.set(xlabel="x (right), scene depths", ylabel="z (forward), scene depths", aspect="equal", title=title,
           xlim=(-1.3 * span, 1.3 * span), ylim=(-1.3 * span, 1.3 * span))
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    common.write_atomic(path, buf.getvalue())


def rollout_media(folder, videos, prompt, rewards, parts, reasons, seen, req_path, req_depth, save_video):
    """Write one group's media into `folder` (created) and return them for Tracker.media. videos (G, F, 3, H, W);
    rewards (G,) with NaN where bad; parts {name: (G,)} reward components; reasons: per video a list of
    reward.Failure; seen: per video what reward.score kept ({"meta_view": (3, h, w), "c2w": (F, 4, 4),
    "scene_depth": float}, or empty where it did not get that far; [] for the latent reward); req_path (F, 4, 4) or
    None; save_video(path, video) writes an mp4.
    Files: rollout_<i>.mp4, rollout_<i>_meta_view.png, rollout_<i>_camera.png (i: the video's index in its group)
    and rewards.json (the prompt; every reward component of every video shown, and why a bad one is bad). Each file
    is whole or absent (common.write_atomic; the mp4 through save_video's frame count); a full disk raises OSError."""
    import imageio.v3 as iio
    os.makedirs(folder, exist_ok=True)
    files, table = [], []
    for i in pick(rewards.float().cpu()):
        values = {"reward": rewards[i].item(), **{k: v[i].item() for k, v in parts.items()}}
        values = {k: (None if not math.isfinite(v) else round(v, 4)) for k, v in values.items()}
        why = "; ".join(map(str, reasons[i]))
        caption = f"#{i} " + " ".join(f"{k} {v}" for k, v in values.items()) + (f" ({why})" if why else "") \
            + f" | {prompt[:120]}"
        table.append(dict(index=i, reason=why, **values))
        name = os.path.join(folder, f"rollout_{i}")
        save_video(name + ".mp4", videos[i])
        files.append(("rollout/video", name + ".mp4", caption))
        kept = seen[i] if i < len(seen) else {}
        if kept.get("meta_view") is not None:
            image = (kept["meta_view"].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            common.write_atomic(name + "_meta_view.png", iio.imwrite("<bytes>", image, extension=".png"))
            files.append(("rollout/meta_view", name + "_meta_view.png", f"#{i} S_meta {values.get('S_meta')}"))
        if kept.get("c2w") is not None:
            camera_plot(name + "_camera.png", kept["c2w"].cpu(), req_path, kept["scene_depth"], req_depth,
                        f"#{i} S_traj {values.get('S_traj')}")
            files.append(("rollout/camera_path", name + "_camera.png", f"#{i} S_traj {values.get('S_traj')}"))
    common.write_atomic(os.path.join(folder, "rewards.json"), json.dumps(dict(prompt=prompt, videos=table), indent=1))
    return files
