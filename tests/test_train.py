"""train.py end to end on the tiny models, as a user runs it: `python train.py ...` and `torchrun ... train.py` in
subprocesses, then checks on what it wrote (metrics.jsonl, checkpoints, the exported LoRA)."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
import models
import standins
from trainrun import records, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT = ["--reward=latent", "--eval_every=0", "--save_every=100"]  # fast runs that test the RL machinery, not rewards
TIMING = ("t_rollout", "t_reward", "t_train")


def without_timing(rec):
    return {k: v for k, v in rec.items() if k not in TIMING}


@pytest.mark.full
def test_tiny_default_run_writes_checkpoints_metrics_eval_and_a_loadable_lora(tmp_path):
    out = tmp_path / "run"
    run(["--size=tiny", "--max_steps=3"], out)
    recs = records(out)
    assert [r["step"] for r in recs] == [0, 1, 2]
    for key in ("reward", "S_meta", "S_recon", "S_traj", "R_gen", "R_3D", "adv_abs", "clip_frac_0", "clip_frac_1",
                "approx_kl", "kl", "loss", "grad_norm", "t_rollout", "t_reward", "t_train", "prompts"):
        assert key in recs[0], key
    assert "eval_reward" in recs[2] and len(os.listdir(out / "eval" / "step_000002")) == 2  # eval_every=3: videos
    assert (out / "latest").read_text() == "ckpt_000002"
    ckpt = out / "ckpt_000002"
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.pt", "rng_rank0.pt", "state.json", "lora"):
        assert (ckpt / name).exists(), name
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert sorted(os.listdir(out)) == [".lock", ".run_token", "ckpt_000000", "ckpt_000001", "ckpt_000002", "eval",
                                       "latest", "media", "metrics.jsonl"]

    # the exported EMA LoRA loads into the tiny pipeline through diffusers and sample.py --lora and changes output
    import sample
    wan = standins.build_tiny(0)
    kw = dict(frames=9, height=64, width=64, sample_steps=4, text_len=16, sampler="euler", warp_mode="none")
    base = sample.generate(wan, "a red car", 0, **kw)
    wan.transformer.load_lora_adapter(str(ckpt / "lora"), prefix="transformer", weight_name=sample.LORA_FILE)
    lora = sample.generate(wan, "a red car", 0, **kw)
    assert (base - lora).abs().max() > 0
    ema = load_file(ckpt / "ema.safetensors")
    assert all(v.dtype == torch.float32 for v in ema.values())


@pytest.mark.full
def test_learning_with_latent_reward_and_zero_advantage_control(tmp_path):
    """30 steps on the latent reward (mean of latent channel 0) raise it; forcing advantages to 0 leaves it flat.
    Also the on-policy check: update 0 of every epoch has ratio 1 (clip fraction 0), update 1 does not."""
    run(["--size=tiny", "--max_steps=30", "--seed=1"] + LATENT, tmp_path / "learn")
    run(["--size=tiny", "--max_steps=30", "--seed=1", "--zero_advantages"] + LATENT, tmp_path / "control")
    learn = [r["reward"] for r in records(tmp_path / "learn")]
    control = [r["reward"] for r in records(tmp_path / "control")]
    first, last = sum(learn[:5]) / 5, sum(learn[-5:]) / 5
    c_first, c_last = sum(control[:5]) / 5, sum(control[-5:]) / 5
    assert learn[:1] == control[:1]  # same seed, same first rollouts
    assert last - first > 1.0, learn  # measured +2.49 (control: -0.01); step-to-step noise is about 0.1
    assert abs(c_last - c_first) < 0.2, control
    recs = records(tmp_path / "learn")
    assert all(r["clip_frac_0"] == 0 for r in recs)
    assert sum(r["clip_frac_1"] > 0 for r in recs) >= 5  # measured 8 of 30 (seed 1)


@pytest.mark.full
def test_learning_with_the_world_reward_and_zero_advantage_control(tmp_path):
    """30 steps with the real reward.score (R_3D + R_gen from the random tiny critics, decoded through the tiny VAE)
    raise the reward above the same run with advantages forced to 0. The two runs draw the same prompts and noise,
    so their step-by-step difference removes what the prompts add (S_traj jumps by ~0.4 on some); the policy's
    gain shows in S_recon, the critic that responds most to the video's brightness and contrast."""
    args = ["--size=tiny", "--max_steps=30", "--seed=1", "--eval_every=0", "--save_every=100"]
    run(args, tmp_path / "learn")
    run(args + ["--zero_advantages"], tmp_path / "control")
    learn, ctrl = records(tmp_path / "learn"), records(tmp_path / "control")
    assert learn[0]["reward"] == ctrl[0]["reward"]  # same seed, same first rollouts
    gain = [a["reward"] - b["reward"] for a, b in zip(learn, ctrl)]
    assert sum(gain[-10:]) / 10 > 0.005, gain  # measured +0.020 (seed 1), +0.011 (seed 0); noise ~0.003 per step
    recon = [r["S_recon"] for r in learn]
    c_recon = [r["S_recon"] for r in ctrl]
    assert sum(recon[-5:]) / 5 - sum(recon[:5]) / 5 > 0.01, recon  # measured +0.024
    assert abs(sum(c_recon[-5:]) / 5 - sum(c_recon[:5]) / 5) < 0.005, c_recon  # measured -0.0003


@pytest.mark.full
def test_dynamic_phase_every_third_step_scores_r_gen_only(tmp_path):
    out = tmp_path / "dyn"
    run(["--size=tiny", "--max_steps=6", "--dynamic_every=2", "--dynamic_steps=1", "--eval_every=0",
         "--save_every=100", "--prompts_per_rank=1", "--group_size=2", "--updates_per_epoch=1"], out)
    with open(os.path.join(ROOT, "prompts", "dynamic.txt")) as f:
        dynamic = set(line.strip() for line in f)
    with open(os.path.join(ROOT, "prompts", "train.txt")) as f:
        train = set(line.strip() for line in f)
    for r in records(out):
        is_dyn = r["step"] % 3 == 2
        assert r["phase"] == ("dynamic" if is_dyn else "main")
        assert all(p in (dynamic if is_dyn else train) for p in r["prompts"]), r["prompts"]
        if is_dyn:
            assert r["R_3D"] == 0 and r["reward"] == pytest.approx(r["R_gen"])
        else:
            assert r["R_3D"] > 0


@pytest.mark.full
def test_resume_is_bitwise_and_a_crash_while_saving_keeps_the_last_checkpoint(tmp_path):
    args = ["--size=tiny", "--max_steps=5", "--save_every=1", "--reward=latent", "--eval_every=0"]
    run(args, tmp_path / "full")

    # stopped after step 2 (the step-3 checkpoint write dies half-way), then resumed to step 4
    crash = (tmp_path / "crash").as_posix()
    wrapper = (
        "import runpy, sys, safetensors.torch as st\n"
        "real, calls = st.save_file, []\n"
        "def save_file(tensors, path, *a, **k):\n"
        "    calls.append(path)\n"
        "    if 'ckpt_000003' in path and path.endswith('ema.safetensors'):\n"
        "        raise RuntimeError('simulated crash while writing a checkpoint')\n"
        "    return real(tensors, path, *a, **k)\n"
        "st.save_file = save_file\n"
        f"sys.argv = ['train.py'] + {args!r} + ['--out_dir={crash}']\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr
    assert (tmp_path / "crash" / "latest").read_text() == "ckpt_000002"
    assert load_file(tmp_path / "crash" / "ckpt_000002" / "trainable.safetensors")  # intact and readable
    run(args + ["--resume"], tmp_path / "crash")

    full, resumed = records(tmp_path / "full"), records(tmp_path / "crash")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # the crashed run's line for step 3 was dropped
    by_step = {r["step"]: without_timing(r) for r in resumed}
    for step in (3, 4):
        assert by_step[step] == without_timing(full[step]), step
    a = load_file(tmp_path / "full" / "ckpt_000004" / "trainable.safetensors")
    b = load_file(tmp_path / "crash" / "ckpt_000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(tmp_path / "full" / "ckpt_000004" / "ema.safetensors")
    eb = load_file(tmp_path / "crash" / "ckpt_000004" / "ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.full
def test_full_finetune_trains_every_weight_against_a_frozen_copy(tmp_path):
    out = tmp_path / "full"
    run(["--size=tiny", "--max_steps=1", "--full_finetune", "--lr=1e-4"] + LATENT, out)
    saved = load_file(out / "ckpt_000000" / "trainable.safetensors")
    assert saved.keys() == dict(standins.build_tiny(0).transformer.named_parameters()).keys()
    assert not (out / "ckpt_000000" / "lora").exists()
    assert records(out)[0]["kl"] > 0  # the second update moved away from the frozen reference


# Each rank also writes its own trained weights at every checkpoint (train.py saves rank 0's only), for the DDP check.
EVERY_RANK_SAVES = (
    "import os, torch, checkpoint\n"
    "from safetensors.torch import save_file\n"
    "real_save = checkpoint.save\n"
    "def save(out_dir, step, state, policy, trainable, *a, **k):\n"
    "    real_save(out_dir, step, state, policy, trainable, *a, **k)\n"
    "    save_file({n: p.detach().contiguous() for n, p in trainable.items()},\n"
    "              os.path.join(out_dir, f'weights_{step}_rank{torch.distributed.get_rank()}.safetensors'))\n"
    "checkpoint.save = save\n")


@pytest.mark.full
@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_torchrun_two_cpu_processes(tmp_path, extra):
    """Two gloo ranks: DDP keeps parameters identical on both after every step (each rank's weights, saved at every
    step, are bitwise equal); FSDP2 runs, saves with torch.distributed.checkpoint and resumes from it."""
    out = tmp_path / "run"
    reward = ["--reward=latent"] if extra else []  # DDP: the acceptance command itself (world reward); FSDP2: toy
    run(["--size=tiny", "--max_steps=2", "--eval_every=0"] + reward + extra, out, nproc=2,
        wrapper=None if extra else EVERY_RANK_SAVES)
    recs = records(out)
    assert [r["step"] for r in recs] == [0, 1]
    assert len(recs[0]["prompts"]) == 4 and len(set(recs[0]["prompts"])) == 4  # 2 ranks x 2 prompts, all distinct
    if extra:
        assert os.path.isdir(out / "ckpt_000001" / "dcp")
        run(["--size=tiny", "--max_steps=3", "--reward=latent", "--eval_every=0", "--resume"] + extra, out, nproc=2)
        assert [r["step"] for r in records(out)] == [0, 1, 2]
    else:
        for step in (0, 1):  # tiny saves every step
            a, b = (load_file(out / f"weights_{step}_rank{r}.safetensors") for r in (0, 1))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


@pytest.mark.parametrize("args, message", [
    (["--grup_size=4"], "unknown argument --grup_size=4; did you mean --group_size"),
    (["--group_size=1"], "at least 2 videos"),
    (["--prompts_per_rank=4", "--train_prompts=PROMPTS3"], "fewer than 1 ranks x 4 prompts per rank"),
    (["--train_prompts=/nonexistent/train.txt"], "does not exist"),
    (["--resume"], "no complete checkpoint"),
    (["--sde_window=9"], "must fit in the first half"),
    (["--frames=10"], "4k+1"),
    (["--dist_timeout=0"], "--dist_timeout=0.0 must be a positive number of minutes"),
    (["--report_to=mlflow"], "argument --report_to: invalid choice: 'mlflow'"),  # a missing package: test_tracking
    (["--out_dir=" + os.path.abspath(__file__)], "cannot create the folder --out_dir"),  # a file, not a folder
])
def test_bad_config_stops_before_loading_models(tmp_path, monkeypatch, capsys, args, message):
    """In-process (runpy), so the cases share one import of torch and diffusers."""
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    args = [a.replace("PROMPTS3", str(three)) for a in args]
    if not any(a.startswith("--out_dir=") for a in args):
        args.append(f"--out_dir={tmp_path / 'out'}")
    for module, name in ((models, "load_wan"), (standins, "tiny_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("model loaded despite a bad config"))
    monkeypatch.setattr(sys, "argv", ["train.py", "--size=tiny"] + args)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    assert message in str(e.value.code), str(e.value.code)
