"""
A toy 3D world in which World-R1 can be seen working on a laptop: procedural scenes, an exact renderer, the
inconsistent videos a text-to-video model makes, a preference model for R_gen, a held-out judge, and the one
command that trains it all. Imports common, noise_warp (camera words -> camera path), models (the networks and
their builders), reward (DA3's input and HPSv3's prompt as the reward prepares them) and standins (the byte
tokenizer and the writers of the released layouts). Its commands: README.md.

A scene is a textured ground plane under a sky dome with 1-3 primitives (box, ball, cylinder) in a few colours
and two sizes. Its caption is in the project's prompt format, "Camera orbit left. A red box and a blue ball on a
grey checkered floor.", and its camera path is noise_warp.camera_path of the caption's camera words, scaled so
the warp plane (1000 units) sits at the distance of the scene's centre: a camera word means the same motion of
the image here as in the noise warp and in S_traj. The renderer ray-casts the analytic surfaces in torch and
returns RGB, z-depth, intrinsics and camera-to-world per frame, exactly.

Corruptions are what a real text-to-video model gets wrong: an object that drifts, grows or changes colour over
the clip, a floor texture that swims, a camera that moves differently from its caption. The base model is
pretrained on a mix of consistent and corrupted videos (MIX), so, like a real base model, it makes both; the
RL run is then judged by a classifier trained on ground-truth videos only (`Judge`), which no reward ever sees.
"""
import common  # noqa: F401  (first: the CPU torchvision fix)

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import noise_warp

# -----------------------------------------------------------------------------
# The vocabulary: colours far apart in hue and far from the floor and sky (a small VAE blurs near hues together)

COLOURS = {"red": (0.86, 0.13, 0.10), "green": (0.13, 0.62, 0.16), "blue": (0.14, 0.28, 0.92),
           "yellow": (0.96, 0.82, 0.12)}
SHAPES = ("box", "ball", "cylinder")
SCALES = {"small": 0.42, "large": 0.62}  # half-height of the object, scene units
MOTIONS = noise_warp.MOTIONS  # the nine camera motions of the project's vocabulary
CORRUPTIONS = ("drift", "grow", "recolour", "swim")  # what can go wrong in the scene itself
FLOOR = "grey checkered floor"

# The camera: above the floor, looking down at the scene's centre. Its focal length is the noise warp's,
# 1.2 x the image width (noise_warp.plane_flow), so a camera word moves the image as the warp moves the noise.
CAM_HEIGHT = 1.5
TARGET_Z = 4.2
FOCAL = 1.2  # x image width
SKY_RADIUS = 30.0  # the sky is a dome at this distance: finite depth, so every pixel lifts to a 3D point
LIGHT = (-0.45, -0.8, -0.4)  # direction toward the sun (y is down)
CELL = 1.0  # floor checker size: cells large enough that the VAE keeps them at 32 px (and a swim shows)


@dataclass
class Thing:
    shape: str
    colour: str
    scale: str
    x: float
    z: float
    yaw: float  # radians, boxes only


@dataclass
class Scene:
    things: list = field(default_factory=list)


def sample_scene(gen, n=None):
    """1-3 non-overlapping objects around the scene's centre, each shape/colour/scale drawn uniformly."""
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=gen))]  # noqa: E731
    n = n or int(torch.randint(1, 4, (1,), generator=gen))
    things = []
    for _ in range(1000):  # rejection sampling; three large objects always fit
        if len(things) == n:
            break
        scale = pick(list(SCALES))
        x, z = (torch.rand(2, generator=gen) * torch.tensor([3.2, 2.4]) + torch.tensor([-1.6, TARGET_Z - 1.2])).tolist()
        r = SCALES[scale]
        if all(math.hypot(x - t.x, z - t.z) > 1.3 * (r + SCALES[t.scale]) + 0.1 for t in things):
            yaw = float(torch.rand(1, generator=gen)) * math.pi / 2
            things.append(Thing(pick(SHAPES), pick(list(COLOURS)), scale, x, z, yaw))
    return Scene(sorted(things, key=lambda t: t.x))  # left to right, as a caption reads


def caption(scene, motion):
    """'Camera orbit left. A red box and a blue ball on a grey checkered floor.' (objects left to right)."""
    names = [f"a {t.scale} {t.colour} {t.shape}" for t in scene.things]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"Camera {motion.replace('_', ' ')}. {listed[0].upper() + listed[1:]} on a {FLOOR}."


# -----------------------------------------------------------------------------
# Cameras

def look_at(eye, target):
    """c2w (4, 4) float64 of a camera at `eye` looking at `target`, OpenCV axes, world y pointing down."""
    eye, target = torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    z = F.normalize(target - eye, dim=0)
    x = F.normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), z), dim=0)
    y = torch.linalg.cross(z, x)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = torch.stack([x, y, z], 1)
    c2w[:3, 3] = eye
    return c2w


BASE = look_at((0.0, -CAM_HEIGHT, 0.0), (0.0, 0.0, TARGET_Z))
SCENE_DEPTH = math.hypot(CAM_HEIGHT, TARGET_Z)  # distance to the scene's centre: the warp plane's 1000 units


def camera_poses(motion, frames):
    """c2w (F, 4, 4) float64: noise_warp.camera_path for the motion, its translations scaled by
    SCENE_DEPTH / 1000 (the warp plane sits at the scene's centre), composed onto the base camera."""
    path = noise_warp.camera_path([motion], frames).clone()
    path[:, :3, 3] *= SCENE_DEPTH / 1000.0
    return BASE @ path


def intrinsics(height, width):
    """(3, 3) pinhole K with f = FOCAL x width, principal point at the image centre (pixel centres at +0.5)."""
    f = FOCAL * width
    return torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=torch.float64)


# -----------------------------------------------------------------------------
# The renderer: analytic ray casting, every frame and pixel at once

def _unit(v):
    """v / |v| over the last axis (torch's vector norm is slow in float64 on a CPU)."""
    return v * (v * v).sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()


def _hit_sphere(o, d, c, r):
    """Nearest t > 0 of o + t d on spheres; o (F,1,3), d (F,P,3), c (F,3), r (F,) -> t (F,P) (inf: miss)."""
    oc = o - c[:, None]
    a, b, cc = (d * d).sum(-1), 2 * (d * oc).sum(-1), (oc * oc).sum(-1) - r[:, None] ** 2
    disc = b * b - 4 * a * cc
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    return torch.where((disc > 0) & (t > 1e-6), t, torch.full_like(t, math.inf))


def _hit_box(o, d, c, h, yaw):
    """Cube of half-size h centred at c, turned by yaw about the vertical: (t (F,P), local hit normal (F,P,3))."""
    cs, sn = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    rot = lambda v: torch.stack([cs * v[..., 0] - sn * v[..., 2], v[..., 1], sn * v[..., 0] + cs * v[..., 2]], -1)  # noqa: E731
    lo, ld = rot(o - c[:, None]), rot(d)
    ld = torch.where(ld.abs() < 1e-12, torch.full_like(ld, 1e-12), ld)
    t1, t2 = (-h[:, None, None] - lo) / ld, (h[:, None, None] - lo) / ld
    tnear, tfar = torch.minimum(t1, t2).amax(-1), torch.maximum(t1, t2).amin(-1)
    t = torch.where((tnear < tfar) & (tnear > 1e-6), tnear, torch.full_like(tnear, math.inf))
    axis = torch.minimum(t1, t2).argmax(-1)  # the slab entered last is the face hit
    n_local = F.one_hot(axis, 3).to(d.dtype) * -torch.sign(ld.gather(-1, axis[..., None]))
    # back to world: the inverse of rot (rotation by -yaw)
    n = torch.stack([cs * n_local[..., 0] + sn * n_local[..., 2], n_local[..., 1],
                     -sn * n_local[..., 0] + cs * n_local[..., 2]], -1)
    return t, n


def _hit_cylinder(o, d, c, h, r):
    """Vertical cylinder (radius r, half-height h, centre c) with its top cap: (t (F,P), normal (F,P,3))."""
    oc = o - c[:, None]
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    b = 2 * (d[..., 0] * oc[..., 0] + d[..., 2] * oc[..., 2])
    cc = oc[..., 0] ** 2 + oc[..., 2] ** 2 - r[:, None] ** 2
    disc = b * b - 4 * a * cc
    ts = (-b - disc.clamp_min(0).sqrt()) / (2 * a.clamp_min(1e-12))
    ys = oc[..., 1] + ts * d[..., 1]
    side = (disc > 0) & (ts > 1e-6) & (ys.abs() <= h[:, None])
    tc = (-h[:, None] - oc[..., 1]) / torch.where(d[..., 1].abs() < 1e-12, torch.full_like(a, 1e-12), d[..., 1])
    pc = oc + tc[..., None] * d
    cap = (tc > 1e-6) & (pc[..., 0] ** 2 + pc[..., 2] ** 2 <= r[:, None] ** 2)
    ts, tc = torch.where(side, ts, math.inf), torch.where(cap, tc, math.inf)
    p = oc + ts[..., None] * d
    n_side = _unit(torch.stack([p[..., 0], torch.zeros_like(a), p[..., 2]], -1))
    n_cap = torch.tensor([0.0, -1.0, 0.0], dtype=d.dtype).expand_as(n_side)
    return torch.minimum(ts, tc), torch.where((tc < ts)[..., None], n_cap, n_side)


def render(params, c2w, K, height, width, supersample=2):
    """Ray-cast one video. params: per-frame scene (see `frame_params`); c2w (F, 4, 4), K (3, 3) -> rgb (F, 3, H, W)
    in [0, 1] and z-depth (F, H, W), both float32. Rays have camera z = 1, so the hit distance t is the z-depth.
    Each pixel averages supersample^2 rays (colour and depth)."""
    Fn, s = len(c2w), supersample
    Hs, Ws = height * s, width * s
    Ks = K.clone()
    Ks[:2] *= s
    v, u = torch.meshgrid(torch.arange(Hs, dtype=torch.float64) + 0.5, torch.arange(Ws, dtype=torch.float64) + 0.5,
                          indexing="ij")
    rays = torch.stack([(u - Ks[0, 2]) / Ks[0, 0], (v - Ks[1, 2]) / Ks[1, 1], torch.ones_like(u)], -1).view(-1, 3)
    d = torch.einsum("fij,pj->fpi", c2w[:, :3, :3], rays)  # (F, P, 3)
    o = c2w[:, None, :3, 3]  # (F, 1, 3)
    light = F.normalize(torch.tensor(LIGHT, dtype=torch.float64), dim=0)

    # the sky dome (centred on the base camera) and the floor (y = 0), the floor fading into the horizon haze
    oc = o - BASE[:3, 3]
    a, b, cc = (d * d).sum(-1), 2 * (d * oc).sum(-1), (oc * oc).sum(-1) - SKY_RADIUS ** 2
    t_sky = (-b + (b * b - 4 * a * cc).sqrt()) / (2 * a)
    dist = (d * d).sum(-1).sqrt()  # length of a z = 1 ray
    up = (-d[..., 1] / dist).clamp(0, 1)[..., None]
    horizon, zenith = torch.tensor([0.78, 0.86, 0.95], dtype=torch.float64), torch.tensor([0.32, 0.52, 0.88],
                                                                                           dtype=torch.float64)
    sky = horizon + (zenith - horizon) * up.sqrt()
    t_floor = torch.where(d[..., 1] > 1e-9, -o[..., 1] / d[..., 1].clamp_min(1e-9), torch.full_like(a, math.inf))
    floor_hit = t_floor < t_sky
    p = o + t_floor.clamp(max=1e4)[..., None] * d
    fx, fz = p[..., 0] - params["floor_shift"][:, None, 0], p[..., 2] - params["floor_shift"][:, None, 1]
    check = ((torch.floor(fx / CELL) + torch.floor(fz / CELL)) % 2)[..., None]
    floor = (0.36 + 0.28 * check) * (0.55 + 0.45 * light[1].neg())
    haze = 1 - torch.exp(-t_floor.clamp(max=1e4) * dist / 25)[..., None]
    floor = floor + (horizon - floor) * haze
    t_best = torch.where(floor_hit, t_floor, t_sky)
    rgb = torch.where(floor_hit[..., None], floor.expand_as(sky), sky)

    # the objects: the nearest hit wins; Lambertian shading under one sun and an ambient term
    for i, shape in enumerate(params["shapes"]):
        c, h = params["centre"][:, i], params["half"][:, i]
        if shape == "ball":
            t = _hit_sphere(o, d, c, h)
            n = _unit(o + t.clamp(max=1e4)[..., None] * d - c[:, None])
        elif shape == "box":
            t, n = _hit_box(o, d, c, h, params["yaw"][:, i])
        else:
            t, n = _hit_cylinder(o, d, c, h, 0.8 * h)
        shade = 0.5 + 0.5 * (n * light).sum(-1, keepdim=True).clamp_min(0)
        colour = params["colour"][:, i, None] * shade
        nearer = t < t_best
        t_best = torch.where(nearer, t, t_best)
        rgb = torch.where(nearer[..., None], colour, rgb)

    rgb = rgb.view(Fn, Hs, Ws, 3).permute(0, 3, 1, 2)
    depth = t_best.view(Fn, 1, Hs, Ws)
    if s > 1:
        rgb, depth = F.avg_pool2d(rgb, s), F.avg_pool2d(depth, s)
    return rgb.clamp(0, 1).float(), depth[:, 0].float()


# -----------------------------------------------------------------------------
# Videos: a scene over time, consistent or corrupted

def in_view(centre, c2w, K, width, margin=0.1):
    """(F, n) bool: object centres (F, n, 3) in front of the camera and inside the image, `margin` x width in."""
    w2c = torch.linalg.inv(c2w)  # (F, 4, 4)
    cam = torch.einsum("fij,fnj->fni", w2c[:, :3, :3], centre) + w2c[:, None, :3, 3]
    u = K[0, 0] * cam[..., 0] / cam[..., 2].clamp_min(1e-6) + K[0, 2]
    v = K[1, 1] * cam[..., 1] / cam[..., 2].clamp_min(1e-6) + K[1, 2]
    lo, hi = margin * width, (1 - margin) * width
    return (cam[..., 2] > 0.1) & (u > lo) & (u < hi) & (v > lo) & (v < hi)


def frame_params(scene, frames, corruption=None, gen=None, c2w=None, K=None, width=32):
    """Per-frame scene parameters for `render`: centre (F, n, 3), half (F, n), yaw (F, n), colour (F, n, 3),
    floor_shift (F, 2), shapes. A corruption changes one object (or the floor) linearly over the clip:
      drift     the object slides 0.8-1.1 units along the floor in a random direction
      grow      it grows to 1.8x or shrinks to 0.55x, standing on the floor
      recolour  its colour blends into another palette colour
      swim      the floor texture slides 1-1.5 checker cells under everything
    The changed object is one whose centre stays in view (c2w, K) in at least 7 of 9 frames, so that the label
    is visible; when no object is, the floor swims instead.
    """
    n = len(scene.things)
    p = torch.linspace(0, 1, frames, dtype=torch.float64)[:, None]  # (F, 1)
    half = torch.tensor([SCALES[t.scale] for t in scene.things], dtype=torch.float64).expand(frames, n).clone()
    xz = torch.tensor([[t.x, t.z] for t in scene.things], dtype=torch.float64).expand(frames, n, 2).clone()
    colour = torch.tensor([COLOURS[t.colour] for t in scene.things], dtype=torch.float64).expand(frames, n, 3).clone()
    shift = torch.zeros(frames, 2, dtype=torch.float64)
    if corruption not in (None, *CORRUPTIONS):
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if corruption is not None:
        rand = lambda: float(torch.rand(1, generator=gen))  # noqa: E731
        i = int(torch.randint(n, (1,), generator=gen))
        angle, dist = 2 * math.pi * rand(), 0.8 + 0.3 * rand()
        if corruption == "drift":
            xz[:, i] += p * dist * torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        if corruption != "swim" and c2w is not None:  # the changed object must stay in view, or the label is a lie
            centre = torch.stack([xz[..., 0], -half, xz[..., 1]], -1)
            seen = in_view(centre, c2w, K, width).float().mean(0) >= 7 / 9  # (n,)
            if not seen[i]:
                xz[:, i] = xz[0, i]
                candidates = seen.nonzero()[:, 0].tolist()
                if not candidates:
                    corruption = "swim"
                else:
                    i = candidates[int(torch.randint(len(candidates), (1,), generator=gen))]
                    if corruption == "drift":
                        xz[:, i] += p * dist * torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
                        centre = torch.stack([xz[..., 0], -half, xz[..., 1]], -1)
                        if not bool(in_view(centre, c2w, K, width)[:, i].float().mean() >= 7 / 9):
                            xz[:, i] = xz[0, i]  # it drifts out of view: drift another way, back across the scene
                            xz[:, i] -= p * dist * torch.tensor([math.cos(angle), math.sin(angle)],
                                                                dtype=torch.float64)
        if corruption == "grow":
            half[:, i] *= 1 + p[:, 0] * (0.8 if rand() < 0.5 else -0.45)
        elif corruption == "recolour":
            others = [c for c in COLOURS if c != scene.things[i].colour]
            target = torch.tensor(COLOURS[others[int(torch.randint(len(others), (1,), generator=gen))]],
                                  dtype=torch.float64)
            colour[:, i] += p * (target - colour[:, i])
        elif corruption == "swim":
            shift += p * CELL * (0.6 + 0.6 * rand()) * torch.tensor([math.cos(angle), math.sin(angle)],
                                                                     dtype=torch.float64)
    centre = torch.stack([xz[..., 0], -half, xz[..., 1]], -1)  # resting on the floor (y = 0, y pointing down)
    yaw = torch.tensor([t.yaw for t in scene.things], dtype=torch.float64).expand(frames, n)
    return dict(shapes=[t.shape for t in scene.things], centre=centre, half=half, yaw=yaw, colour=colour,
                floor_shift=shift, corruption=corruption)


def make_video(scene, motion, *, frames=9, height=32, width=32, corruption=None, camera=None, gen=None):
    """One toy video. motion: the caption's camera motion; camera: the motion the camera really makes (default:
    the caption's; another one is the 'camera does not follow the caption' corruption). Returns a dict: video
    (F, 3, H, W) in [0, 1], depth (F, H, W), K (3, 3), c2w (F, 4, 4), caption, and the labels motion, camera,
    corruption ("none" or one of CORRUPTIONS)."""
    camera = camera or motion
    c2w = camera_poses(camera, frames)
    K = intrinsics(height, width)
    params = frame_params(scene, frames, corruption, gen, c2w, K, width)
    video, depth = render(params, c2w, K, height, width)
    return dict(video=video, depth=depth, K=K.float(), c2w=c2w.float(), caption=caption(scene, motion),
                motion=motion, camera=camera, corruption=params["corruption"] or "none")


# -----------------------------------------------------------------------------
# Data sets: many videos, with the pretraining mix

# The base model's pretraining mix. Half the videos carry one scene corruption (drift, grow, recolour, swim, equally
# often) and 30% move the camera differently from their caption, independently, so the base model makes
# consistent, camera-following videos only about a third of the time, as a real base model often does. These
# values leave room for RL to show itself: the consistent-scene rate can rise by ~50 points and the
# camera-follows-caption rate by ~30 before either saturates.
MIX = dict(corrupt=0.5, wrong_camera=0.3)


def draw_spec(gen, mix=MIX):
    """(caption motion, camera motion, corruption or None) for one pretraining video, drawn per `mix`."""
    r = torch.rand(3, generator=gen).tolist()
    motion = MOTIONS[int(torch.randint(len(MOTIONS), (1,), generator=gen))]
    corruption = CORRUPTIONS[int(r[0] * len(CORRUPTIONS))] if r[1] < mix["corrupt"] else None
    camera = motion
    if r[2] < mix["wrong_camera"]:
        others = [m for m in MOTIONS if m != motion]
        camera = others[int(torch.randint(len(others), (1,), generator=gen))]
    return motion, camera, corruption


def make_dataset(n, seed, frames=9, size=32, mix=MIX, scenes=None):
    """n videos drawn with `mix` -> a dict of tensors: video uint8 (n, F, 3, H, W), depth float16 (n, F, H, W),
    c2w float32 (n, F, 4, 4), labels motion / camera (indices into MOTIONS) and corruption (0 none, 1 + index
    into CORRUPTIONS), and the captions. Same seed, same videos. scenes: a list of Scene to use (else drawn)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(video=[], depth=[], c2w=[], motion=[], camera=[], corruption=[], caption=[])
    for i in range(n):
        scene = scenes[i] if scenes is not None else sample_scene(gen)
        motion, camera, corruption = draw_spec(gen, mix)
        v = make_video(scene, motion, frames=frames, height=size, width=size, corruption=corruption, camera=camera,
                       gen=gen)
        out["video"].append((v["video"] * 255).round().to(torch.uint8))
        out["depth"].append(v["depth"].half())
        out["c2w"].append(v["c2w"])
        out["motion"].append(MOTIONS.index(motion))
        out["camera"].append(MOTIONS.index(camera))
        out["corruption"].append(0 if v["corruption"] == "none" else 1 + CORRUPTIONS.index(v["corruption"]))
        out["caption"].append(v["caption"])
    data = {k: torch.stack(v) if torch.is_tensor(v[0]) else (v if k == "caption" else torch.tensor(v))
            for k, v in out.items()}
    data["K"] = intrinsics(size, size).float()
    return data


# -----------------------------------------------------------------------------
# Training: plain PyTorch loops, each a resumable stage

def resumable(path, modules, optimizer, steps, step_fn, *, lr, warmup=100, save_every=250, log_every=100, name=""):
    """Run step_fn(step) -> loss (a scalar tensor) for `steps` AdamW steps, warm-up then cosine decay to 10% of lr.
    Every `save_every` steps the modules, the optimizer and the loss of every step so far go to `path` (written to a
    temporary name, then renamed), and a run killed at any point resumes from there; batches are drawn from
    step-seeded generators, so a resumed stage trains on the same batches as an uninterrupted one."""
    import time
    start, losses = 0, []
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), state["losses"].tolist()
        print(f"[{name}] resumed at step {start}", flush=True)
    t0, recent = time.time(), []
    for step in range(start, steps):
        scale = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        recent.append(loss.item())
        losses.append(recent[-1])
        if (step + 1) % log_every == 0 or step == steps - 1:
            print(f"[{name}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({(time.time() - t0) / (step + 1 - start):.3f} s/step)", flush=True)
            recent = []
        if (step + 1) % save_every == 0 or step == steps - 1:
            state = {k: m.state_dict() for k, m in modules.items()}
            torch.save({**state, "optimizer": optimizer.state_dict(), "step": step + 1, "losses": torch.tensor(losses)},
                       path + ".tmp")
            os.replace(path + ".tmp", path)


def batch_ids(n, size, seed, step):
    """`size` indices into n examples for one step: a pure function of (seed, step), so resumes draw the same."""
    return torch.randint(n, (size,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def to_unit(video_u8):
    """uint8 (..., 3, H, W) -> float in [0, 1]."""
    return video_u8.float() / 255


def vae_loss(vae, x):
    """x (B, 3, F, H, W) in [-1, 1]: MSE + 0.5 L1 + 10 x chroma MSE + 1e-6 KL. The chroma term (each pixel minus
    its grey level) keeps a small VAE from trading colour for brightness: without it red, yellow and blue objects
    decode as similar browns."""
    post = vae.encode(x).latent_dist
    y = vae.decode(post.sample()).sample
    chroma = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
    kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).mean()
    return F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x) + 10 * F.mse_loss(chroma(y), chroma(x)) + 1e-6 * kl


def train_vae(vae, data, path, *, images, clips, seed=0):
    """The VAE: single frames first (a 1-frame clip costs a ninth of a 9-frame one and carries most of what the
    VAE must learn), then whole clips (the causal temporal layers). images, clips: (steps, batch)."""
    videos = data["video"]  # (N, F, 3, H, W) uint8
    n, frames = videos.shape[:2]
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def step_fn(step):
        if step < images[0]:
            ids = batch_ids(n, images[1], seed, step)
            k = batch_ids(frames, images[1], seed + 1, step)
            x = to_unit(videos[ids, k])[:, :, None]  # (B, 3, 1, H, W)
        else:
            x = to_unit(videos[batch_ids(n, clips[1], seed, step)]).transpose(1, 2)  # (B, 3, F, H, W)
        return vae_loss(vae, x * 2 - 1)
    vae.train()
    resumable(path, {"vae": vae}, opt, images[0] + clips[0], step_fn, lr=1e-3, name="vae")
    vae.eval()


@torch.no_grad()
def encode_videos(vae, videos, batch=32):
    """uint8 videos (N, F, 3, H, W) -> the VAE posterior means (N, 16, T, h, w) and the decoded reconstructions
    (uint8, same shape as the input): the latents the base model learns, the videos its critics and judge see."""
    latents, recons = [], []
    for chunk in videos.split(batch):
        x = to_unit(chunk).transpose(1, 2) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample.clamp(-1, 1)
        latents.append(z)
        recons.append(((y.transpose(1, 2) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(latents), torch.cat(recons)


def psnr(a, b):
    """PSNR in dB of float images in [0, 1] (mean over everything)."""
    return float(10 * torch.log10(1 / F.mse_loss(a.float(), b.float()).clamp_min(1e-10)))


def tokenize(tokenizer, captions, text_len):
    """Captions -> (ids, mask), each (N, text_len), as sample.encode tokenizes them."""
    tok = tokenizer(captions, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def train_t2v(wan, latents, captions, path, steps, batch, *, text_len, drop=0.1, seed=0):
    """The base model: rectified flow on normalised VAE latents, the text encoder trained with the transformer.
        x_sigma = (1 - sigma) x_0 + sigma eps, v_target = eps - x_0,  loss = |v(x_sigma, 1000 sigma, text) - v_target|^2
    sigma = shift s / (1 + (shift - 1) s), s ~ U(0, 1): the noise levels of the sampler's shifted grid
    (sample.flow_sigmas). A `drop` share of captions is replaced by the empty prompt, the unconditional input of
    classifier-free guidance (train.py's negative prompt is empty too). Peak learning rate 1e-3 for 4,000 steps
    (BUILD): 2,000 steps at 5e-4 gave a base model whose videos follow their camera words 25% of the time (the
    judge, 60 held-out captions), 4,000 at 1e-3 one that follows them 90% of the time (BENCHMARKS.md)."""
    ids, mask = tokenize(wan.tokenizer, list(captions), text_len)
    empty_ids, empty_mask = tokenize(wan.tokenizer, [""], text_len)
    shift = wan.scheduler.config.flow_shift
    params = list(wan.transformer.parameters()) + list(wan.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def step_fn(step):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
        idx = batch_ids(len(latents), batch, seed, step)
        x0 = latents[idx]
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.rand(batch, generator=gen)
        sigma = (shift * s / (1 + (shift - 1) * s)).view(-1, 1, 1, 1, 1)
        keep = (torch.rand(batch, generator=gen) >= drop)[:, None]
        tok_ids, tok_mask = torch.where(keep, ids[idx], empty_ids), torch.where(keep, mask[idx], empty_mask)
        states = wan.text_encoder(tok_ids, tok_mask).last_hidden_state * tok_mask[..., None]
        v = wan.transformer(hidden_states=(1 - sigma) * x0 + sigma * eps, timestep=1000 * sigma.flatten(),
                            encoder_hidden_states=states, return_dict=False)[0]
        return F.mse_loss(v, eps - x0)
    wan.transformer.train(), wan.text_encoder.train()
    resumable(path, {"transformer": wan.transformer, "text_encoder": wan.text_encoder}, opt, steps, step_fn,
              lr=1e-3, warmup=200, name="t2v")
    wan.transformer.eval(), wan.text_encoder.eval()


def da3_input(frames):
    """Frames (B, F, 3, h, w) in [0, 1] -> Depth Anything 3's input, exactly as reward.lift prepares it: resized to
    the lift size (bilinear, antialiased), ImageNet-normalised."""
    import models
    import reward
    B, Fn = frames.shape[:2]
    h, w = reward.lift_size(*frames.shape[-2:], models.SIZES["toy"]["lift_res"])
    x = F.interpolate(frames.flatten(0, 1), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(t)[:, None, None] for t in (reward.IMAGENET_MEAN, reward.IMAGENET_STD))
    return ((x.clamp(0, 1) - mean) / std).view(B, Fn, 3, h, w)


def relative(c2w):
    """Poses relative to the first: inv(c2w_0) c2w_k, (B, F, 4, 4)."""
    return torch.linalg.inv(c2w[:, :1]) @ c2w


def geodesic(Ra, Rb):
    """Angle (radians) of the rotation between Ra and Rb (..., 3, 3): acos((tr(Ra^T Rb) - 1) / 2). A training loss,
    so not noise_warp.geodesic_deg: its atan2 form takes the norm of a vector that is 0 where the rotations agree,
    whose gradient is undefined there; the clamped acos has a finite one."""
    cos = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))


def da3_losses(net, frames, depth, c2w):
    """Depth Anything 3 against the truth of toy videos, frames (B, F, 3, h, w) in [0, 1], depth (B, F, h, w),
    c2w (B, F, 4, 4): |log depth error| (depth resized to the lift size); for frames 1.. the geodesic angle
    (radians) between predicted and true rotations relative to frame 0 and the distance between relative
    translations (in scene depths; DA3's world frame is its reference view's, so only relative poses are
    defined); |log focal error|. Returns the four terms."""
    x = da3_input(frames)
    out = net(x)  # the reference view chosen as reward.lift has it chosen
    size = x.shape[-2:]
    d_true = F.interpolate(depth.float(), size=size, mode="bilinear", align_corners=False)
    l_depth = (out["depth"].clamp_min(1e-4).log() - d_true.log()).abs().mean()
    w2c = torch.eye(4).repeat(*out["extrinsics"].shape[:2], 1, 1)
    w2c[..., :3, :] = out["extrinsics"]
    rel, rel_true = relative(torch.linalg.inv(w2c))[:, 1:], relative(c2w.float())[:, 1:]
    l_rot = geodesic(rel[..., :3, :3], rel_true[..., :3, :3]).mean()
    l_trans = (rel[..., :3, 3] - rel_true[..., :3, 3]).norm(dim=-1).mean() / SCENE_DEPTH
    focal = FOCAL * size[1]
    l_focal = (out["intrinsics"][..., 0, 0].log() - math.log(focal)).abs().mean()
    return l_depth, l_rot, l_trans, l_focal


def train_da3(net, videos, recon, depth, c2w, path, steps, batch, *, seed=0):
    """Depth Anything 3 on toy videos with their true depth and cameras, half of each batch as rendered and half as
    the reward sees them (decoded by the VAE, which blurs the floor's texture in every frame after the first).
    The rendered half teaches features that track texture between frames; from decoded videos alone the camera
    decoder stays at the mean pose (measured: no fall of the rotation error in 500 steps). Corrupted videos are
    included: their cameras and per-frame depths are exact all the same."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    half = (torch.arange(batch) < batch // 2)[:, None, None, None, None]

    def step_fn(step):
        idx = batch_ids(len(videos), batch, seed, step)
        frames = to_unit(torch.where(half, videos[idx], recon[idx]))
        l_depth, l_rot, l_trans, l_focal = da3_losses(net, frames, depth[idx], c2w[idx])
        return l_depth + 10 * l_rot + 10 * l_trans + l_focal
    net.train()
    resumable(path, {"da3": net}, opt, steps, step_fn, lr=1e-3, warmup=100, name="da3")
    net.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# The judge: used by evaluate.py only, never by a reward

MIRROR = {"move_left": "move_right", "move_right": "move_left", "orbit_left": "orbit_right",
          "orbit_right": "orbit_left", "pan_left": "pan_right", "pan_right": "pan_left"}  # a video seen in a mirror


class Judge(torch.nn.Module):
    """A small video classifier for toy videos (B, F, 3, H, W) in [0, 1] -> (consistent logit (B,), camera-motion
    logits (B, 9) over MOTIONS). 3-D convolutions over the frames and their differences from the first frame (what
    moved, and how), pooled to a 3x2x2 grid that keeps where things moved (a pan and a move differ in parallax)."""

    def __init__(self, width=32):
        super().__init__()
        c = width
        block = lambda i, o, stride: [torch.nn.Conv3d(i, o, 3, stride=stride, padding=1), torch.nn.GroupNorm(8, o),  # noqa: E731
                                      torch.nn.GELU()]
        self.features = torch.nn.Sequential(*block(6, c, 1), *block(c, c, (1, 2, 2)), *block(c, 2 * c, (1, 2, 2)),
                                            *block(2 * c, 2 * c, (2, 2, 2)), *block(2 * c, 4 * c, 1),
                                            torch.nn.AdaptiveAvgPool3d((3, 2, 2)), torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(4 * c * 12, 256), torch.nn.GELU(),
                                        torch.nn.Linear(256, 1 + len(MOTIONS)))

    def forward(self, video):
        x = video.transpose(1, 2) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
        out = self.head(self.features(torch.cat([x, x - x[:, :, :1]], 1)))
        return out[:, 0], out[:, 1:]


def build_judge(seed=0):
    """The judge, untrained; its initial weights depend on `seed` only (not on what ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Judge()


def mirror(video, camera):
    """The video flipped left-right and its camera-motion labels swapped to match (an orbit left seen in a mirror is
    an orbit right); doubles the judge's data."""
    swap = torch.tensor([MOTIONS.index(MIRROR.get(m, m)) for m in MOTIONS])
    return video.flip(-1), swap[camera]


def jitter(video, gen, pixels=3):
    """Augmentation for the judge that keeps both labels: each video (B, F, 3, H, W) shifted by up to `pixels` in
    x and y, the same shift in every frame with the edges repeated (a framing, not a motion)."""
    b, f, c, h, w = video.shape
    padded = F.pad(video.reshape(b, f * c, h, w), (pixels,) * 4, mode="replicate")
    dy, dx = torch.randint(2 * pixels + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)]).view(b, f, c, h, w)


def train_judge(judge, videos, consistent, camera, path, steps, batch, *, seed=0, bf16=None):
    """The judge on ground-truth toy videos (decoded by the VAE, as generated videos are), half of them mirrored, all
    shifted a little (jitter): binary cross-entropy for 'consistent rigid scene', cross-entropy over the 9 camera
    motions. `bf16` (default: whether the CPU has AMX units) runs the forward pass under bf16 autocast: 2-3x faster
    per step than float32 with AMX, at the same held-out accuracy; without AMX, oneDNN emulates bf16 and a step is
    2x (AVX-512) to 9x (AVX2) slower than float32 (BENCHMARKS.md). The judge is used in float32 (judge_videos)."""
    bf16 = torch.cpu._is_amx_tile_supported() if bf16 is None else bf16  # torch has no public query for this
    print(f"[judge] forward pass in {'bf16' if bf16 else 'float32'}", flush=True)
    opt = torch.optim.AdamW(judge.parameters(), lr=1e-3, weight_decay=0.01)

    def step_fn(step):
        idx = batch_ids(len(videos), batch, seed, step)
        x, cam = to_unit(videos[idx]), camera[idx]
        flip = torch.rand(batch, generator=torch.Generator().manual_seed(seed + step)) < 0.5
        xf, camf = mirror(x, cam)
        x, cam = torch.where(flip[:, None, None, None, None], xf, x), torch.where(flip, camf, cam)
        x = jitter(x, torch.Generator().manual_seed(seed * 1_000_003 + step + 7))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logit, motion = judge(x)
        return (F.binary_cross_entropy_with_logits(logit.float(), consistent[idx].float())
                + F.cross_entropy(motion.float(), cam))
    judge.train()
    resumable(path, {"judge": judge}, opt, steps, step_fn, lr=1e-3, warmup=100, name="judge")
    judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_videos(judge, videos, batch=64):
    """Float videos (N, F, 3, H, W) in [0, 1] -> (P(consistent) (N,), camera motion index (N,))."""
    probs, motions = [], []
    for chunk in videos.split(batch):
        logit, motion = judge(chunk.float())
        probs.append(logit.sigmoid())
        motions.append(motion.argmax(-1))
    return torch.cat(probs), torch.cat(motions)


def load_judge(folder=None):
    """The trained judge from `folder`/judge.safetensors (default: the committed toy weights)."""
    from safetensors.torch import load_model
    import models
    judge = Judge()
    load_model(judge, os.path.join(folder or models.TOY, "judge.safetensors"))
    return judge.eval().requires_grad_(False)


def judge_rates(judge, videos, motions):
    """The judge's verdicts on videos (N, F, 3, H, W) in [0, 1] whose captions name `motions` (motion ids): per
    video, P(consistent rigid scene), consistent (P > 0.5) and follows (the camera motion it sees is the caption's),
    as floats (the last two 0/1)."""
    p, seen = judge_videos(judge, videos)
    follows = seen == torch.tensor([MOTIONS.index(m) for m in motions])
    return p, (p > 0.5).float(), follows.float()


# -----------------------------------------------------------------------------
# The preference model: HPSv3's architecture trained on toy pairs, so R_gen has something to grade at the toy size

def build_hpsv3(seed=0):
    """The toy world's HPSv3, untrained: models.HPSv3Reward on a Qwen2-VL whose language model is 4 layers 128 wide
    and whose vision tower is 4 blocks 64 wide (patch 14, merge 2: a 32x32 frame resized to the toy hps_pixels,
    112x112, is 16 tokens); 1.1M parameters. The tokenizer is byte-level (standins.byte_tokenizer) plus one token
    per caption word and one per constant piece of HPSv3's prompt: byte by byte, the instruction alone is ~1,900
    tokens that tell a toy model nothing and would be most of its cost. -> (model, processor)."""
    import reward
    import standins
    from tokenizers import AddedToken
    tok = standins.byte_tokenizer(extra=("<|Reward|>",))
    head, tail = reward.HPSV3_INSTRUCTION.split("{text_prompt}")
    before, after = reward.HPSV3_REWARD_SUFFIX.split("<|Reward|>")
    tok.add_tokens([AddedToken(t, normalized=False) for t in (head, tail + before, after)]
                   + [AddedToken(w, single_word=True, normalized=False) for w in WORDS + ["user", "assistant"]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return standins.small_hpsv3(tok, 128, 4, 64, 4, [8, 4, 4])


def edit_scene(scene, gen):
    """The scene with one thing changed, as a text-to-video model misreads a caption: one object's colour, shape or
    size, or (in a scene of two or three) one object left out."""
    from dataclasses import replace
    things = list(scene.things)
    i = int(torch.randint(len(things), (1,), generator=gen))
    what = int(torch.randint(4 if len(things) > 1 else 3, (1,), generator=gen))
    if what == 3:
        del things[i]
    else:
        key, pool = (("colour", list(COLOURS)), ("shape", list(SHAPES)), ("scale", list(SCALES)))[what]
        others = [v for v in pool if v != getattr(things[i], key)]
        things[i] = replace(things[i], **{key: others[int(torch.randint(len(others), (1,), generator=gen))]})
    return Scene(things)


def preference_data(vae, n, seed):
    """n consistent, camera-following ground-truth videos and, with the same camera, each one's edited scene
    (edit_scene), both decoded by the VAE as generated videos are: uint8 'video' and 'edited' (n, F, 3, H, W),
    and the captions of the unedited scenes."""
    gen = torch.Generator().manual_seed(seed)
    scenes = [sample_scene(gen) for _ in range(n)]
    clean = dict(corrupt=0.0, wrong_camera=0.0)
    true = make_dataset(n, seed, mix=clean, scenes=scenes)  # same seed: the same motions for both
    edited = make_dataset(n, seed, mix=clean, scenes=[edit_scene(s, gen) for s in scenes])
    return dict(video=encode_videos(vae, true["video"])[1], edited=encode_videos(vae, edited["video"])[1],
                caption=true["caption"])


# What a preferred frame is preferred to, for the same caption: the frame of the edited scene (the caption is
# misread), a frame of another scene (the caption is ignored), the frame blurred (detail lost), and the frame
# smeared into a colour field (what an RL policy found when nothing graded quality: DA3 reconstructs a smooth
# field well and S_recon rose while the scene dissolved). One kind per pair, each equally often.
NEGATIVES = ("edited", "other", "blurred", "smeared")


def blur(frames, sigma):
    """Gaussian blur of frames (N, 3, H, W), one sigma (pixels) per frame, reflecting at the border."""
    r = 9
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (N, 2r + 1)
    n, c, h, w = frames.shape
    y = F.pad(frames.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    kk = k.repeat_interleave(c, 0)  # (N * 3, 2r + 1)
    y = F.conv2d(y, kk[:, None, None, :], groups=n * c)
    return F.conv2d(y, kk[:, None, :, None], groups=n * c).reshape(n, c, h, w)


def negatives(data, ids, frame, kinds, gen):
    """The dispreferred frame of each pair (ids, frame, kinds: (B,) indices) -> floats (B, 3, H, W) in [0, 1]."""
    pos = to_unit(data["video"][ids, frame])
    other = (ids + 1 + torch.randint(len(data["video"]) - 1, ids.shape, generator=gen)) % len(data["video"])
    weak = blur(pos, 0.8 + 1.2 * torch.rand(len(ids), generator=gen))
    gain = 0.6 + 0.8 * torch.rand(len(ids), 3, 1, 1, generator=gen)
    smear = (blur(pos, 2.5 + 3.5 * torch.rand(len(ids), generator=gen)) * gain).clamp(0, 1)
    choices = torch.stack([to_unit(data["edited"][ids, frame]), to_unit(data["video"][other, frame]), weak, smear])
    return choices[kinds, torch.arange(len(ids))]


def preference_loss(hps, proc, pos, neg, captions, pixels):
    """Bradley-Terry on HPSv3's mu: -log sigmoid(mu(pos) - mu(neg)), mean over the pairs (B, 3, H, W) each."""
    import reward
    inp = reward.hpsv3_inputs(proc, torch.cat([pos, neg]), captions * 2, pixels)
    mu = hps(**inp)[:, 0]
    return -F.logsigmoid(mu[:len(pos)] - mu[len(pos):]).mean()


def train_preference(hps, proc, data, path, steps, batch, *, pixels, seed=0):
    """The preference model on pairs of frames for one caption: its own scene's frame over one of NEGATIVES."""
    opt = torch.optim.AdamW(hps.parameters(), lr=5e-4, weight_decay=0.01)
    n, frames = data["video"].shape[:2]

    def step_fn(step):
        ids, frame = batch_ids(n, batch, seed, step), batch_ids(frames, batch, seed + 1, step)
        kinds = batch_ids(len(NEGATIVES), batch, seed + 2, step)
        neg = negatives(data, ids, frame, kinds, torch.Generator().manual_seed(seed + step))
        return preference_loss(hps, proc, to_unit(data["video"][ids, frame]), neg,
                               [data["caption"][i] for i in ids], pixels)
    hps.train()
    resumable(path, {"hps": hps}, opt, steps, step_fn, lr=5e-4, warmup=100, name="hps")
    hps.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_preference(hps, proc, data, pixels, top=10.0, seed=0):
    """Score every held-out frame 4 against each kind of negative; report the pairwise accuracy per kind; then fold
    an affine map into the head's last layer so the held-out preferred frames average `top` and the dispreferred
    ones 0: HPSv3's own range, so R_gen = gen_scale * mu sits beside R_3D as it does in the real run."""
    import reward
    n, frame = len(data["video"]), torch.full((len(data["video"]),), 4)
    ids, gen = torch.arange(n), torch.Generator().manual_seed(seed)
    score = lambda x: torch.cat([hps(**reward.hpsv3_inputs(proc, x[i:i + 64], data["caption"][i:i + 64], pixels))  # noqa: E731
                                 [:, 0] for i in range(0, n, 64)])
    pos = score(to_unit(data["video"][ids, frame]))
    report, negs = {}, []
    for k, kind in enumerate(NEGATIVES):
        neg = score(negatives(data, ids, frame, torch.full((n,), k), gen))
        report[f"hps_pair_acc_{kind}"] = float((pos > neg).float().mean())
        negs.append(neg)
    lo, hi = float(torch.cat(negs).mean()), float(pos.mean())
    a = top / (hi - lo)
    last = hps.rm_head[-1]
    last.weight[0] *= a
    last.bias[0] = a * (last.bias[0] - lo)
    report["hps_calibration"] = dict(preferred=hi, dispreferred=lo, scale=a)
    return report


# -----------------------------------------------------------------------------
# Prompts: RL captions and held-out evaluation captions with combinations no RL caption has

WORDS = sorted({w for m in MOTIONS for w in m.split("_")} | set(COLOURS) | set(SHAPES) | set(SCALES)
               | {"Camera", "A", "a", "and", "on"} | set(FLOOR.split()))  # every word of every caption


def held_out_combinations(seed=0, per_motion=2):
    """(motion, colour, shape) triples kept out of the RL prompts: `per_motion` (colour, shape) pairs per motion."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return {(m, *pairs[int(i)]) for m in MOTIONS for i in torch.randperm(len(pairs), generator=gen)[:per_motion]}


def make_prompts(n_train, n_test, seed=0):
    """Two disjoint caption lists: RL captions, none of which puts a held-out (colour, shape) under its motion, and
    test captions, each of which has at least one held-out triple. Motions equally often in both."""
    held = held_out_combinations(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out = {}
    for unseen, n in ((False, n_train), (True, n_test)):
        pool = out[unseen] = []
        while len(pool) < n:
            motion = MOTIONS[len(pool) % len(MOTIONS)]
            scene = sample_scene(gen)
            text = caption(scene, motion)
            if any((motion, t.colour, t.shape) in held for t in scene.things) == unseen and text not in pool:
                pool.append(text)
    return out[False], out[True]


# -----------------------------------------------------------------------------
# The build: python toyworld.py

# Stage sizes. "full" is what weights/toy holds; "quick" is a miniature of every stage for the tests (seconds).
# Each training stage is (steps, batch).
BUILD = {
    "full": dict(videos=10000, heldout=1000, vae_images=(2500, 32), vae_clips=(1500, 6), t2v=(4000, 64),
                 da3=(2000, 8), judge=(9000, 32), hps_scenes=(2000, 300), hps=(3000, 16), prompts=(2000, 200)),
    "quick": dict(videos=48, heldout=24, vae_images=(30, 4), vae_clips=(20, 2), t2v=(40, 8), da3=(20, 2),
                  judge=(30, 8), hps_scenes=(24, 8), hps=(30, 4), prompts=(40, 10)),
}


def evaluate_stages(wan, da3, judge, heldout, recon):
    """What the build measured on held-out ground-truth videos: VAE PSNR (all pixels and object pixels, where
    depth is nearer than the floor behind the objects), Depth Anything 3's depth AbsRel and relative-pose errors,
    and the judge's accuracy on both heads (judge_report), on raw renders and on VAE reconstructions."""
    truth = raw = to_unit(heldout["video"])
    rec = to_unit(recon)
    near = (heldout["depth"].float() < TARGET_Z + 1.5)[:, :, None].expand_as(truth)  # objects and the near floor
    report = dict(vae_psnr=psnr(rec, truth), vae_psnr_near=psnr(rec[near], truth[near]))
    true_rel = relative(heldout["c2w"])[:, -1]
    report.update(mean_last_frame_rotation_deg=float(geodesic(true_rel[:, :3, :3], torch.eye(3)).rad2deg().mean()),
                  mean_last_frame_translation=float(true_rel[:, :3, 3].norm(dim=-1).mean() / SCENE_DEPTH))
    for name, videos in (("raw", raw), ("vae", rec)):
        errs = []
        with torch.no_grad():
            for i in range(0, len(videos), 16):
                sl = slice(i, i + 16)
                out = da3(da3_input(videos[sl]))
                d_true = F.interpolate(heldout["depth"][sl].float(), size=out["depth"].shape[-2:], mode="bilinear")
                w2c = torch.eye(4).repeat(*out["extrinsics"].shape[:2], 1, 1)
                w2c[..., :3, :] = out["extrinsics"]
                rel = relative(torch.linalg.inv(w2c))[:, -1]
                errs.append(torch.stack([((out["depth"] - d_true).abs() / d_true).mean((1, 2, 3)),
                                         geodesic(rel[:, :3, :3], true_rel[sl, :3, :3]).rad2deg(),
                                         (rel[:, :3, 3] - true_rel[sl, :3, 3]).norm(dim=-1) / SCENE_DEPTH], 1))
        absrel, rot, trans = torch.cat(errs).mean(0).tolist()
        report.update({f"da3_depth_absrel_{name}": absrel, f"da3_last_frame_rot_err_deg_{name}": rot,
                       f"da3_last_frame_trans_err_{name}": trans})
    return {**report, **judge_report(judge, heldout, recon)}


def judge_report(judge, heldout, recon):
    """The judge's accuracy on both heads, on held-out raw renders and on their VAE reconstructions `recon`."""
    report, consistent = {}, heldout["corruption"] == 0
    for name, videos in (("raw", heldout["video"]), ("vae", recon)):
        p, seen = judge_videos(judge, to_unit(videos))
        report[f"judge_consistent_acc_{name}"] = float(((p > 0.5) == consistent).float().mean())
        report[f"judge_motion_acc_{name}"] = float((seen == heldout["camera"]).float().mean())
    return report


def main(argv=None):
    import argparse
    import json
    import time
    import models
    import standins
    from safetensors.torch import save_model
    p = argparse.ArgumentParser(description="Build the toy world's base model, critics and judge from nothing.")
    p.add_argument("--out", default=models.TOY, help="where the trained networks go (a fresh clone has them)")
    p.add_argument("--work", default="out/toyworld", help="data sets and resumable stage checkpoints")
    p.add_argument("--quick", action="store_true", help="a miniature of every stage (tests)")
    p.add_argument("--seed", type=int, default=0, help="every draw derives from it")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (these small networks run "
                   "fastest on one; a second thread mostly waits)")
    p.add_argument("--jobs", type=int, default=2, help="processes: the data is rendered, and the base model trained "
                   "beside the critics, in this many (one per core)")
    p.add_argument("--prompts", default="prompts", help="folder for toy_train.txt and toy_test.txt")
    p.add_argument("--show", default=None, help="only write a sheet of ground-truth videos to this PNG")
    p.add_argument("--only_preference", action="store_true", help="train only the preference model, on the VAE "
                   "already in --out, and add it and its report to what is there")
    p.add_argument("--only_judge", action="store_true", help="train only the judge, on the videos as the VAE already "
                   "in --out decodes them, and replace it and its report in what is there (a finished judge.pt in "
                   "--work is loaded, not trained again: delete it first)")
    args = common.parse_flags(p, argv)
    torch.set_num_threads(args.threads)
    if args.show:
        return show(args.show, args.seed)
    cfg = BUILD["quick" if args.quick else "full"]
    os.makedirs(args.work, exist_ok=True)
    work = lambda name: os.path.join(args.work, name)  # noqa: E731
    t_start, seconds = time.time(), {}
    pixels = models.SIZES["toy"]["hps_pixels"]

    def cached(name, build):
        path = work(name)
        if not os.path.exists(path):
            torch.save(build(), path + ".tmp")
            os.replace(path + ".tmp", path)
        return torch.load(path, weights_only=True)  # tensors and a list of captions

    def timed(stage, fn):
        t0 = time.time()
        out = fn()
        seconds[stage] = round(time.time() - t0, 1)
        print(f"[build] {stage} done in {seconds[stage]:.0f} s", flush=True)
        return out

    def preference(vae):  # 6. the preference model, on frames the VAE decoded
        data = cached("hps_data.pt", lambda: preference_data(vae, cfg["hps_scenes"][0], args.seed + 2))
        held = cached("hps_heldout.pt", lambda: preference_data(vae, cfg["hps_scenes"][1], args.seed + 3))
        hps, proc = build_hpsv3(seed=args.seed)
        train_preference(hps, proc, data, work("hps.pt"), *cfg["hps"], pixels=pixels, seed=args.seed)
        report = calibrate_preference(hps, proc, held, pixels, seed=args.seed)
        standins.save_hpsv3(hps, proc, os.path.join(args.out, "hps"), os.path.join(args.out, "hps_backbone"))
        return report

    def judged(data, enc):  # 5. the judge, on ground truth decoded by the VAE; resumes a finished stage at once
        judge = build_judge(args.seed)
        train_judge(judge, enc["recon"], data["corruption"] == 0, data["camera"], work("judge.pt"), *cfg["judge"],
                    seed=args.seed)
        return judge

    def only_judge(vae):
        data = cached("data.pt", lambda: make_dataset_parallel(cfg["videos"], args.seed, args.jobs))
        heldout = cached("heldout.pt", lambda: make_dataset_parallel(cfg["heldout"], args.seed + 1, args.jobs))
        enc = cached("encoded.pt", lambda: encode_all(vae, data, heldout))
        judge = judged(data, enc)
        save_model(judge, os.path.join(args.out, "judge.safetensors"))
        return judge_report(judge, heldout, enc["heldout_recon"])

    if args.only_preference or args.only_judge:  # one stage again, on the VAE in --out: update its files and report
        with open(os.path.join(args.out, "build.json")) as f:
            report = json.load(f)
        stage, build_keys = ("hps", ("hps_scenes", "hps")) if args.only_preference else ("judge", ("judge",))
        run = preference if args.only_preference else only_judge
        report.update(timed(stage, lambda: run(models.load_wan(os.path.join(args.out, "wan"), "cpu").vae)))
        report["total_seconds"] = round(report["total_seconds"] + seconds[stage] - report["seconds"].get(stage, 0), 1)
        report["seconds"][stage] = seconds[stage]
        report["loss_first_last"][stage] = first_last(torch.load(work(f"{stage}.pt"), weights_only=True)["losses"])
        report["build"].update({k: cfg[k] for k in build_keys})
        with open(os.path.join(args.out, "build.json"), "w") as f:
            json.dump(report, f, indent=1)
        return print(json.dumps(report, indent=1))
    # 1. Data: pretraining videos with the mix; held-out ground truth (fresh scenes, another seed) for the reports
    data = timed("data", lambda: cached("data.pt", lambda: make_dataset_parallel(cfg["videos"], args.seed, args.jobs)))
    heldout = timed("heldout", lambda: cached("heldout.pt", lambda: make_dataset_parallel(
        cfg["heldout"], args.seed + 1, args.jobs)))
    # 2. The VAE, then every video's latents and its reconstruction
    wan = models.build_toy(WORDS, seed=args.seed)
    timed("vae", lambda: train_vae(wan.vae, data, work("vae.pt"), images=cfg["vae_images"], clips=cfg["vae_clips"],
                                   seed=args.seed))

    enc = timed("encode", lambda: cached("encoded.pt", lambda: encode_all(wan.vae, data, heldout)))
    mean, std = enc["latents"].mean((0, 2, 3, 4)), enc["latents"].std((0, 2, 3, 4))
    wan.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())  # as sample.decode reads them
    latents = (enc["latents"] - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    # 3. The base model (text encoder + transformer on the latents of the mixed videos), then 5. the judge (ground
    # truth only, decoded by the VAE like everything it will judge), in a second process, while this one trains
    # 4. the critic (Depth Anything 3 on the decoded videos with their true depth and cameras) and 6. the preference
    # model (about 59 and 44 minutes: BENCHMARKS.md)
    t2v = lambda: train_t2v(wan, latents, data["caption"], work("t2v.pt"), *cfg["t2v"],  # noqa: E731
                            text_len=models.SIZES["toy"]["text_len"], seed=args.seed)
    if args.jobs > 1:
        side = side_job(lambda: (t2v(), judged(data, enc)))
    else:
        timed("t2v", t2v)
        timed("judge", lambda: judged(data, enc))
    da3, _ = models.build_toy_da3()
    timed("da3", lambda: train_da3(da3, data["video"], enc["recon"], data["depth"], data["c2w"], work("da3.pt"),
                                   *cfg["da3"], seed=args.seed))
    os.makedirs(args.out, exist_ok=True)
    hps_report = timed("hps", lambda: preference(wan.vae))
    if args.jobs > 1:
        timed("t2v and judge (rest)", lambda: side_job_done(side, "the base model and the judge"))
    state = torch.load(work("t2v.pt"), weights_only=True)  # its last save (trained in the other process, or here)
    wan.transformer.load_state_dict(state["transformer"])
    wan.text_encoder.load_state_dict(state["text_encoder"])
    judge = judged(data, enc)  # the finished stage's checkpoint, loaded
    # 7. Export: the networks in their released layouts, the prompts, and what the build measured
    report = evaluate_stages(wan, da3, judge, heldout, enc["heldout_recon"])
    report.update(hps_report)
    for m in (wan.transformer, wan.text_encoder, wan.vae):
        m.requires_grad_(False)
    standins.save_pretrained(wan, os.path.join(args.out, "wan"))
    standins.save_da3(da3, os.path.join(args.out, "da3"), preset="toy")
    save_model(judge, os.path.join(args.out, "judge.safetensors"))
    train_prompts, test_prompts = make_prompts(*cfg["prompts"], seed=args.seed)
    os.makedirs(args.prompts, exist_ok=True)
    for name, lines in (("toy_train.txt", train_prompts), ("toy_test.txt", test_prompts)):
        with open(os.path.join(args.prompts, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    report["loss_first_last"] = {}  # each stage's mean loss over its first and its last tenth of steps
    for stage in ("vae", "t2v", "da3", "judge", "hps"):
        losses = torch.load(work(f"{stage}.pt"), weights_only=True)["losses"]
        if stage == "vae":  # its clip phase: a clip's loss and an image's are not on one scale
            losses = losses[cfg["vae_images"][0]:]
        report["loss_first_last"][stage] = first_last(losses)
    report.update(seconds=seconds, total_seconds=round(time.time() - t_start, 1), build=cfg, seed=args.seed,
                  threads=args.threads, jobs=args.jobs, mix=MIX)
    with open(os.path.join(args.out, "build.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


def encode_all(vae, data, heldout):
    """The training videos' latents and reconstructions, and the held-out videos' reconstructions."""
    latents, recon = encode_videos(vae, data["video"])
    return dict(latents=latents, recon=recon, heldout_recon=encode_videos(vae, heldout["video"])[1])


def first_last(losses):
    """A stage's mean loss over its first and its last tenth of steps."""
    k = max(1, len(losses) // 10)
    return [float(losses[:k].mean()), float(losses[-k:].mean())]


def side_job(fn):
    """Run fn() in a forked process (it inherits the data, and one torch thread); returns the process."""
    import multiprocessing
    proc = multiprocessing.get_context("fork").Process(target=fn)
    proc.start()
    return proc


def side_job_done(proc, what):
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"error: training {what} failed in its process (exit code {proc.exitcode}); run again to "
                         "resume, or with --jobs=1 to see the traceback here")


def make_dataset_parallel(n, seed, jobs, chunk=250):
    """make_dataset in chunks of `chunk` videos (chunk i seeded seed * 1000 + i), `jobs` processes at a time: the
    same videos for any number of jobs."""
    import multiprocessing
    sizes = [min(chunk, n - i) for i in range(0, n, chunk)]
    work = [(size, seed * 1000 + i) for i, size in enumerate(sizes)]
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = pool.starmap(make_dataset, work)
    else:
        parts = [make_dataset(*w) for w in work]
    return {k: sum((p[k] for p in parts), []) if k == "caption" else parts[0][k] if k == "K"
            else torch.cat([p[k] for p in parts]) for k in parts[0]}


def show(path, seed=0, size=32):
    """A sheet of ground-truth videos: every camera motion, then every corruption (frames left to right)."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    rows = [(m, None, None) for m in MOTIONS] + [("orbit_left", c, None) for c in CORRUPTIONS]
    rows.append(("push_in", None, "pan_left"))
    strips = []
    for motion, corruption, camera in rows:
        v = make_video(sample_scene(gen), motion, corruption=corruption, camera=camera, gen=gen, height=size,
                       width=size)
        strips.append(F.pad(torch.cat(list(v["video"]), 2), (0, 0, 0, 2), value=1.0))
        print(f"row {len(strips)}: {v['caption']} (camera {v['camera']}, corruption {v['corruption']})")
    img = (torch.cat(strips, 1).permute(1, 2, 0) * 255).round().byte().numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
