"""The configuration users run, on the CPU: bf16 models, FSDP2 on 2 gloo ranks, the renderer check and the reward's
failure policy. Each test here failed on the code before the fix it guards.

    python -m pytest -q tests/test_real_config.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import grpo
import models
import reward
import sample
import splat
import standins
from trainrun import records, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# bf16

def test_compute_dtype_is_the_patch_embedding_not_the_first_parameter():
    """Diffusers keeps scale_shift_table (the first parameter) in fp32 in a bf16 Wan: reading the dtype from it fed
    fp32 latents to the bf16 patch embedding (RuntimeError: Input type (float) and bias type (c10::BFloat16))."""
    wan = standins.tiny_wan(torch.device("cpu"), torch.bfloat16)
    transformer = wan.transformer
    assert next(transformer.parameters()).dtype == torch.float32  # the trap
    assert models.compute_dtype(transformer) == torch.bfloat16
    x = torch.randn(1, 16, 3, 8, 8)
    cond, uncond = sample.encode(wan, ["Camera pan left. a red car", ""], 16).float().chunk(2)  # fp32 text in
    v = sample.velocity(transformer, x, 0.9, cond, uncond, 5.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.full
def test_bf16_sample_is_finite_and_close_to_fp32():
    kw = dict(frames=9, height=64, width=64, sample_steps=4, text_len=16, sampler="unipc")
    videos = {}
    for dt in (torch.float32, torch.bfloat16):
        wan = standins.tiny_wan(torch.device("cpu"), dt)
        videos[dt] = sample.generate(wan, "Camera orbit left. a stone lighthouse", 0, **kw)
    assert torch.isfinite(videos[torch.bfloat16]).all()
    assert (videos[torch.bfloat16] - videos[torch.float32]).abs().mean() < 0.05


@pytest.mark.full
@pytest.mark.parametrize("extra", [[], ["--full_finetune", "--lr=1e-4"]], ids=["lora", "full_finetune"])
def test_bf16_train_step_keeps_sde_math_and_optimizer_in_fp32(tmp_path, extra):
    """One tiny step in bf16, the world reward and an eval included. The fully fine-tuned copy used to be cast to
    fp32 while its reference stayed bf16 (a dtype crash); now it keeps fp32 master weights and runs under autocast."""
    out = tmp_path / "run"
    run(["--size=tiny", "--dtype=bf16", "--max_steps=1", "--eval_every=1", "--eval_prompts=1"] + extra, out)
    rec = records(out)[0]
    for key in ("reward", "loss", "kl", "approx_kl", "grad_norm", "eval_reward"):
        assert rec[key] is not None and rec[key] == rec[key], key
    ckpt = out / "ckpt_000000"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    moments = [t for s in state["state"].values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
    assert moments and all(t.dtype == torch.float32 for t in moments)  # optimizer state in fp32
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(ckpt / "trainable.safetensors").values())


def test_sde_step_is_fp32_for_bf16_inputs():
    x, v = torch.randn(2, 4, 3, 3).bfloat16(), torch.randn(2, 4, 3, 3).bfloat16()
    x_next, logp, mean, std = grpo.sde_step(x, v, 0.8, 0.75, sigma_max=0.98, generator=torch.Generator().manual_seed(0))
    assert x_next.dtype == logp.dtype == mean.dtype == std.dtype == torch.float32


# -----------------------------------------------------------------------------
# FSDP2

@pytest.mark.full
@pytest.mark.parametrize("cast", [False, True], ids=["ours", "param_dtype_bf16"])
def test_fsdp_forward_equals_unsharded_bf16_and_keeps_the_timestep(tmp_path, cast):
    """train.py's FSDP2 policy: the sharded bf16 forward equals the unsharded one and the timestep reaches the time
    embedder in fp32, unrounded. The policy it replaced (param_dtype=bf16) rounds 937.1 to 936 (checked too)."""
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/fsdp_forward.py",
           str(out)] + (["--cast"] if cast else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    if cast:
        assert res["t"][0] == 936.0 and res["max_diff"] > 0.05  # what the old policy did
    else:
        assert res["dtype"] == "torch.float32" and res["embedder_dtype"] == "torch.float32"
        assert res["t"][:2] == pytest.approx([937.1, 512.3], abs=1e-4)
        assert res["max_diff"] <= 1e-2 * res["max_ref"]  # bf16 tolerance (measured: exactly equal)


@pytest.mark.full
@pytest.mark.parametrize("eval_prompts", [1, 3])
@pytest.mark.parametrize("extra", [["--fsdp"], []], ids=["fsdp", "ddp"])
def test_eval_on_two_ranks_for_any_number_of_prompts(tmp_path, eval_prompts, extra):
    """Under FSDP every rank must join every forward; eval used to run only on ranks < eval_prompts and hung."""
    out = tmp_path / "run"
    run(["--size=tiny", "--max_steps=1", "--reward=latent", "--eval_every=1", f"--eval_prompts={eval_prompts}",
         "--save_every=100", "--prompts_per_rank=1"] + extra, out, nproc=2)
    rec = records(out)[0]
    assert rec["eval_reward"] is not None
    assert len(os.listdir(out / "eval" / "step_000000")) == eval_prompts


# -----------------------------------------------------------------------------
# Renderer and reward failures

def test_renderer_check_passes_on_cpu():
    assert "torch rasterizer" in splat.check_renderer(torch.device("cpu"))
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        splat.check_renderer(torch.device("cpu"), "gsplat")


BROKEN_RENDERER = ("import splat\n"
                   "def broken(*a, **k):\n"
                   "    raise RuntimeError('rasterizer exploded')\n"
                   "splat._render_torch = broken\n")
BROKEN_S_RECON = ("import reward, splat\n"
                  "real = splat.check_renderer\n"
                  "def check(*a, **k):\n"
                  "    out = real(*a, **k)\n"
                  "    def broken(*a, **k):\n"
                  "        raise ValueError('renders went wrong')\n"
                  "    reward.s_recon = broken\n"
                  "    return out\n"
                  "splat.check_renderer = check\n")


@pytest.mark.parametrize("wrapper, message", [
    (BROKEN_RENDERER, "rasterizer failed on a synthetic scene"),
    (BROKEN_S_RECON, "S_recon failed on every video of step 0"),
], ids=["at_start_up", "mid_run"])
@pytest.mark.full
def test_a_broken_renderer_stops_training_instead_of_scoring_zero(tmp_path, wrapper, message):
    out = tmp_path / "run"
    proc = run(["--size=tiny", "--max_steps=2", "--eval_every=0", "--group_size=2", "--prompts_per_rank=1"], out,
               check=False, wrapper=wrapper)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "latest").exists() and not (out / "metrics.jsonl").exists()  # nothing learnt, nothing saved


def test_a_black_video_scores_below_real_videos_with_negative_scores():
    """A video the critics cannot score gets min(real) − std(real) in its group, whatever the rewards' sign (in the
    dynamic phase, HPSv3's mu is often negative: a black video scored 0 used to win the group)."""
    rewards = torch.tensor([-0.3, -0.5, float("nan"), -0.4, 2.0, 1.0, 3.0, float("nan")])
    bad = ~torch.isfinite(rewards)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    filled = grpo.fill_bad(rewards, bad, groups)
    assert filled[2] == pytest.approx(-0.5 - torch.tensor([-0.3, -0.5, -0.4]).std(unbiased=False).item())
    assert filled[7] < 1.0
    adv = grpo.group_advantages(filled, groups)
    assert adv[2] == adv[:4].min() and adv[7] == adv[4:].min()
    assert (adv[[0, 1, 3]] != 0).all()  # the NaN did not zero its group
    all_bad = grpo.fill_bad(torch.full((4,), float("nan")), torch.ones(4, dtype=torch.bool), torch.zeros(4).long())
    assert grpo.group_advantages(all_bad, torch.zeros(4).long()).abs().max() == 0


def test_score_marks_black_and_failing_videos_bad_and_raises_systemic_failures(monkeypatch):
    critics = standins.tiny_reward_models()
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(3, 5, 3, 32, 32, generator=g)
    videos[1] = 0  # black
    out, why = reward.score(critics, videos, ["a cat"] * 3, [None] * 3, dynamic=True)
    assert out["bad"].tolist() == [False, True, False]
    assert torch.isnan(out["total"][1]) and torch.isfinite(out["total"][[0, 2]]).all()
    assert why[1] == [reward.Failure(reward.Kind.BAD_VIDEO, "video", "black")]

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(reward, "hpsv3_score", oom)
    with pytest.raises(torch.OutOfMemoryError):
        reward.score(critics, videos[:1], ["a cat"], [None], dynamic=True)


@pytest.mark.full
def test_a_rank_that_sees_another_out_dir_stops_every_rank(tmp_path):
    """Node-local disks: rank 1 writing elsewhere than rank 0 would lose its checkpoint shards mid-run. Simulated by
    giving rank 1 another folder; both ranks stop at start-up with one line, before any model loads."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text("import os, runpy, sys\n"
                       "if os.environ['RANK'] == '1':\n"
                       "    sys.argv = [a.replace('/run', '/elsewhere') for a in sys.argv]\n"
                       f"sys.argv[0] = 'train.py'\nos.chdir({ROOT!r})\nsys.path.insert(0, {ROOT!r})\n"
                       "runpy.run_path('train.py', run_name='__main__')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           "--size=tiny", "--reward=latent", "--max_steps=1", f"--out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "rank 1 sees no token in --out_dir" in proc.stderr and "filesystem all nodes share" in proc.stderr
    assert "trainable parameters" not in proc.stdout  # stopped before the models


@pytest.mark.full
def test_bf16_evaluation_is_finite(tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "evaluate.py", "--size=tiny", "--dtype=bf16", "--limit=2", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    means = json.loads((out / "results.json").read_text())["models"][0]["means"]
    for key in ("NV_PSNR", "OV_PSNR", "RotErr", "HPSv3", "reward"):
        assert means[key] is not None and means[key] == means[key], key
