"""
A toy 3D world in which World-R1 can be seen working on a laptop: procedural scenes, an exact renderer, the
inconsistent videos a text-to-video model makes, the held-out judge, the RL and test captions, and the one command
that trains it all (main; the training stages are toytrain.py). Imports common, noise_warp (camera words -> camera
path), models (the networks and their builders), standins (the writers of the released layouts) and toytrain.
Its commands: README.md.

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
# often) and 30% move the camera differently from their caption, independently, so that the data holds consistent,
# camera-following videos only about a third of the time, as a real base model's output often does, and leaves
# RL room to show itself. What the trained base model makes is another matter (BENCHMARKS.md): its camera follows
# the caption in 87-93% of its videos (likely because the caption's own camera is the one 70% of the data shows,
# against about 4% for each other one, and guidance sharpens toward it; not measured), and the judge calls 10% of
# them one rigid scene, since its objects swell and fade, whatever the mix (trained on the consistent half alone: 2%).
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


def to_unit(video_u8):
    """uint8 (..., 3, H, W) -> float in [0, 1]."""
    return video_u8.float() / 255


def fork_pool(jobs):
    """A pool of `jobs` forked processes, each on one torch thread: a process forked after torch has run on several
    OpenMP threads hangs in its first parallel region unless it runs on one (GNU OpenMP keeps the parent's pool)."""
    import multiprocessing
    return multiprocessing.get_context("fork").Pool(jobs, initializer=torch.set_num_threads, initargs=(1,))


def make_dataset_parallel(n, seed, jobs, chunk=250):
    """make_dataset in chunks of `chunk` videos (chunk i seeded seed * 1000 + i), `jobs` processes at a time: the
    same videos for any number of jobs."""
    sizes = [min(chunk, n - i) for i in range(0, n, chunk)]
    work = [(size, seed * 1000 + i) for i, size in enumerate(sizes)]
    if jobs > 1:
        with fork_pool(jobs) as pool:
            parts = pool.starmap(make_dataset, work)
    else:
        parts = [make_dataset(*w) for w in work]
    return {k: sum((p[k] for p in parts), []) if k == "caption" else parts[0][k] if k == "K"
            else torch.cat([p[k] for p in parts]) for k in parts[0]}


# -----------------------------------------------------------------------------
# The judge: used by evaluate.py only, never by a reward

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


def main(argv=None):
    import argparse
    import json
    import time
    import models
    import standins
    from safetensors.torch import save_model
    from toytrain import (build_hpsv3, calibrate_preference, encode_all, evaluate_stages, first_last, judge_report,
                          preference_data, train_da3, train_judge, train_preference, train_t2v, train_vae)
    p = argparse.ArgumentParser(description="Build the toy world's base model, critics and judge from nothing.")
    p.add_argument("--out", default=models.TOY, help="where the trained networks go (a fresh clone has them)")
    p.add_argument("--work", default="out/toyworld", help="data sets and resumable stage checkpoints")
    p.add_argument("--quick", action="store_true", help="a miniature of every stage (tests)")
    p.add_argument("--seed", type=int, default=0, help="every draw derives from it")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process; forked ones run on "
                   "one (these small networks gain little from a second thread), and the VAE, which trains alone, on "
                   "--jobs")
    p.add_argument("--jobs", type=int, default=2, help="processes: the data is rendered and encoded, and the base "
                   "model trained beside the critics, in this many (one per core)")
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
        enc = cached("encoded.pt", lambda: encode_all(vae, data, heldout, args.jobs))
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
    # (nothing else runs while the VAE trains, so it takes every core: on two its steps are about 1.2x as fast as on
    # one, BENCHMARKS.md; the processes forked from here on run on one thread, fork_pool says why)
    wan = models.build_toy(WORDS, seed=args.seed)
    torch.set_num_threads(max(args.threads, args.jobs))
    timed("vae", lambda: train_vae(wan.vae, data, work("vae.pt"), images=cfg["vae_images"], clips=cfg["vae_clips"],
                                   seed=args.seed))
    torch.set_num_threads(args.threads)

    enc = timed("encode", lambda: cached("encoded.pt", lambda: encode_all(wan.vae, data, heldout, args.jobs)))
    mean, std = enc["latents"].mean((0, 2, 3, 4)), enc["latents"].std((0, 2, 3, 4))
    wan.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())  # as sample.decode reads them
    latents = (enc["latents"] - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    # Two lanes of about equal length (BENCHMARKS.md), the first in a second process when there are two jobs:
    # 3. the base model (text encoder + transformer on the latents of the mixed videos), then 6. the preference model;
    # 4. the critic (Depth Anything 3 on the decoded videos with their true depth and cameras), then 5. the judge
    # (ground truth only, decoded by the VAE like everything it will judge). The first lane reports through a file.
    os.makedirs(args.out, exist_ok=True)

    def first_lane():
        timed("t2v", lambda: train_t2v(wan, latents, data["caption"], work("t2v.pt"), *cfg["t2v"],
                                       text_len=models.SIZES["toy"]["text_len"], seed=args.seed))
        report = timed("hps", lambda: preference(wan.vae))
        with open(work("first_lane.json"), "w") as f:
            json.dump(dict(seconds={k: seconds[k] for k in ("t2v", "hps")}, hps_report=report), f)
    side = side_job(first_lane) if args.jobs > 1 else first_lane()
    with torch.random.fork_rng(devices=[]):  # its initial weights depend on the seed, not on what ran before
        torch.manual_seed(args.seed)
        da3, _ = models.build_toy_da3()
    timed("da3", lambda: train_da3(da3, data["video"], enc["recon"], data["depth"], data["c2w"], work("da3.pt"),
                                   *cfg["da3"], seed=args.seed))
    judge = timed("judge", lambda: judged(data, enc))
    if args.jobs > 1:
        timed("wait for the first lane", lambda: side_job_done(side, "the base model or the preference model"))
    with open(work("first_lane.json")) as f:  # what the first lane measured
        first = json.load(f)
    seconds.update(first["seconds"])
    state = torch.load(work("t2v.pt"), weights_only=True)  # its last save (trained in the other process, or here)
    wan.transformer.load_state_dict(state["transformer"])
    wan.text_encoder.load_state_dict(state["text_encoder"])
    # 7. Export: the networks in their released layouts, the prompts, and what the build measured
    report = evaluate_stages(da3, judge, heldout, enc["heldout_recon"])
    report.update(first["hps_report"])
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


def side_job(fn):
    """Run fn() in a forked process on one torch thread (it inherits the data; fork_pool says why one); returns the
    process."""
    import multiprocessing
    proc = multiprocessing.get_context("fork").Process(target=lambda: (torch.set_num_threads(1), fn()))
    proc.start()
    return proc


def side_job_done(proc, what):
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"error: training {what} failed in its process (exit code {proc.exitcode}); run again to "
                         "resume, or with --jobs=1 to see the traceback here")


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
    import toyworld  # main of the importable module, not of this script's copy: toytrain imports that one
    toyworld.main()
