"""
sample.py: our loop against diffusers' WanPipeline, determinism, save/load, the CLI and its input checks.

    python -m pytest tests/test_sample.py -v
"""
import os

import imageio
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import models
import sample
import standins

CPU = torch.device("cpu")
PROMPT = "A red house near a river, tall trees behind it."
KW = dict(frames=9, height=64, width=64, sample_steps=4, text_len=32)


@pytest.fixture(scope="module")
def wan():
    return standins.tiny_wan(CPU)


def _pipe(wan, scheduler):
    return WanPipeline(tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=wan.vae,
                       transformer=wan.transformer, scheduler=scheduler)


def _latents_and_embeds(wan, steps_seed=0):
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(steps_seed))
    cond, uncond = sample.encode(wan, [PROMPT, "blurry"], 32).chunk(2)
    return x, cond, uncond


def test_flow_sigmas_match_diffusers_shift():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, 21)[:-1].tolist())  # diffusers applies the shift itself
    torch.testing.assert_close(sample.flow_sigmas(20, 3.0), sched.sigmas.float(), rtol=0, atol=1e-6)


def test_euler_loop_matches_wan_pipeline(wan):
    """Parity: same initial latents, Euler at the same shift and steps, CFG 5: final latents equal to 1e-5."""
    steps = 6
    x, cond, uncond = _latents_and_embeds(wan)
    sigmas = sample.flow_sigmas(steps, 3.0)
    ours, _ = sample.denoise(wan.transformer, x, cond, uncond, sigmas, 5.0)

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    set_timesteps = sched.set_timesteps
    sched.set_timesteps = lambda n, device=None: set_timesteps(sigmas=torch.linspace(1, 0, n + 1)[:-1].tolist(),
                                                               device=device)
    ref = _pipe(wan, sched)(prompt=PROMPT, negative_prompt="blurry", height=64, width=64, num_frames=9,
                            num_inference_steps=steps, guidance_scale=5.0, latents=x.clone(),
                            max_sequence_length=32, output_type="latent").frames
    assert (ours - ref).abs().max().item() <= 1e-5


def test_unipc_loop_matches_wan_pipeline(wan):
    """The inference default: the checkpoint's UniPC scheduler driven by our loop equals WanPipeline's."""
    steps = 5
    x, cond, uncond = _latents_and_embeds(wan, 1)
    ours, _ = sample.denoise(wan.transformer, x, cond, uncond, sample.flow_sigmas(steps, 3.0), 5.0,
                             scheduler=wan.scheduler)
    ref = _pipe(wan, wan.scheduler)(prompt=PROMPT, negative_prompt="blurry", height=64, width=64, num_frames=9,
                                    num_inference_steps=steps, guidance_scale=5.0, latents=x.clone(),
                                    max_sequence_length=32, output_type="latent").frames
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.full
def test_decode_matches_wan_pipeline(wan):
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    ref = _pipe(wan, wan.scheduler)(prompt=PROMPT, height=64, width=64, num_frames=9, num_inference_steps=1,
                                    guidance_scale=1.0, latents=x.clone(), max_sequence_length=32,
                                    output_type="pt").frames
    # one UniPC step from x, then our decode of the same latents must equal the pipeline's video
    cond = sample.encode(wan, [PROMPT], 32)
    lat, _ = sample.denoise(wan.transformer, x, cond, cond, sample.flow_sigmas(1, 3.0), 1.0, scheduler=wan.scheduler)
    torch.testing.assert_close(sample.decode(wan.vae, lat), ref, rtol=0, atol=1e-5)


@pytest.mark.full
def test_tiny_vae_brightness_follows_latent_channel_0(wan):
    """What the world-reward learning test (tests/test_train.py) relies on, from standins.rewire_tiny_vae: the
    tiny VAE's mean colour rises with latent channel 0, at every step of a -2..2 sweep, and each frame keeps a
    spatial pattern. Without that path the sweep moves the colour by under 0.01 in all."""
    z = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    e0 = torch.zeros(1, 16, 1, 1, 1)
    e0[:, 0] = 1
    videos = sample.decode(wan.vae, torch.cat([z + a * e0 for a in (-2, -1, 0, 1, 2)]))  # (5, F, 3, H, W)
    brightness = videos.mean(dim=(1, 2, 3, 4))
    assert (brightness.diff() > 0.03).all(), brightness  # measured steps 0.04-0.13
    assert (videos[2].std(dim=(1, 2, 3)) > 0.05).all()


@pytest.mark.full
def test_same_seed_same_video_different_seed_differs(wan):
    a = sample.generate(wan, "Camera pan left. " + PROMPT, 3, **KW)
    b = sample.generate(wan, "Camera pan left. " + PROMPT, 3, **KW)
    c = sample.generate(wan, "Camera pan left. " + PROMPT, 4, **KW)
    assert a.shape == (9, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.full
def test_save_load_roundtrip(wan, tmp_path):
    standins.save_pretrained(wan, tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model_index.json").exists()
    loaded = models.load_wan(str(tmp_path / "tiny"), CPU)
    assert torch.equal(sample.generate(wan, PROMPT, 7, **KW), sample.generate(loaded, PROMPT, 7, **KW))


def test_cli_writes_mp4(tmp_path):
    out = tmp_path / "new_folder" / "v.mp4"  # the folder is created
    sample.main(["--prompt", "Camera orbit left. " + PROMPT, "--out", str(out), "--sample_steps", "3"])
    frames = imageio.mimread(out)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)


@pytest.mark.full
def test_cli_prompt_file_writes_one_video_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Camera push in. A cup on a table.\n\nA dog in a field.\n")
    sample.main(["--prompts", str(f), "--out", str(tmp_path / "vids"), "--sample_steps", "2", "--sampler", "euler"])
    assert sorted(os.listdir(tmp_path / "vids")) == ["0000.mp4", "0001.mp4"]


@pytest.mark.parametrize("argv, message", [
    (["--frames", "10"], "4k+1"),
    (["--height", "60"], "multiple of 16"),
    (["--width", "100"], "multiple of 16"),
    (["--prompt", "   "], "empty"),
    (["--size", "huge"], "invalid choice: 'huge'"),  # argparse's message, in one line
    (["--out", os.path.join(os.path.abspath(__file__), "x.mp4")], "cannot create the folder"),  # under a file
    (["--out", "video.gif"], ".mp4"),
    (["--sample_steps", "0"], "--sample_steps=0 must be a positive number"),
    (["--model", "./no_such_folder"], "diffusers folder"),
])
def test_bad_input_stops_before_loading(monkeypatch, argv, message):
    for module, name in ((models, "load_wan"), (standins, "tiny_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("model loaded despite bad input"))
    if "--prompt" not in argv:
        argv = ["--prompt", PROMPT] + argv
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_bad_prompt_files(monkeypatch, tmp_path):
    for module, name in ((models, "load_wan"), (standins, "tiny_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("model loaded despite bad input"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="has no lines"):
        sample.main(["--prompts", str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="does not exist"):
        sample.main(["--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="exactly one"):
        sample.main(["--out", str(tmp_path / "o.mp4")])


class LinearFlow(torch.nn.Module):
    """A stand-in transformer with a linear velocity field v = x − 0.3·t/1000 (Wan's call signature)."""

    def __init__(self):
        super().__init__()
        self.patch_embedding = torch.nn.Conv3d(1, 1, 1)  # only its dtype is read (models.compute_dtype)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        return (hidden_states - 0.3 * timestep.view(-1, 1, 1, 1, 1) / 1000,)


def test_stepwise_injection_survives_unipc_as_it_does_euler():
    """The release's stepwise camera guidance adds a delta after each of the first 8 steps. UniPC's corrector rebuilds
    each step's result from the sample before it, which undid the injection (0.55% of Euler's effect); with the
    corrector off after injected steps its effect on the final latent is the same order as Euler's. Also: the default
    strength (warp_strength=None) works."""
    wan = standins.build_tiny(0)
    shape = (16, 3, 8, 8)
    base, inject, motions = sample.camera_noise("Camera pan left. a harbour", shape, torch.Generator().manual_seed(0),
                                                "stepwise", None)
    assert motions == ["pan_left"] and inject.steps == 8
    cond = uncond = torch.zeros(1, 4, 32)
    sigmas = sample.flow_sigmas(20, 3.0)
    toy = LinearFlow()
    effect = {}
    for name, sched, inj in (("euler", None, inject), ("unipc", wan.scheduler, inject),
                             ("unipc_with_corrector", wan.scheduler, lambda i, x: inject(i, x))):
        plain, _ = sample.denoise(toy, base, cond, uncond, sigmas, 1.0, scheduler=sched)
        steered, _ = sample.denoise(toy, base, cond, uncond, sigmas, 1.0, scheduler=sched, inject=inj)
        effect[name] = float((steered - plain).norm())
    assert 0.3 < effect["unipc"] / effect["euler"] < 3, effect
    assert effect["unipc_with_corrector"] < 0.1 * effect["euler"], effect  # what the corrector did before
