"""
What a checkpoint holds for the people who use it: the exported LoRA names its base model and carries sampling.json,
which sample.py and evaluate.py --lora follow unless a flag says otherwise; LoRAs in peft's layout (flow_grpo's and
the World-R1 release's) load in both scripts; state.json records the git commit and the library versions; the run
lock says in one line when the filesystem cannot lock.

    python -m pytest -q tests/test_checkpoint_files.py        # about a minute on 2 CPU cores
"""
import errno
import importlib.metadata
import json
import os
import subprocess

import pytest
import torch
from safetensors import safe_open

import checkpoint
import evaluate
import sample
import standins
from trainrun import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Camera pan left. A red house near a river."
# How the run below samples: none of it the scripts' defaults, so a script that ignores sampling.json shows.
TRAINED = dict(size="tiny", frames=9, height=64, width=64, text_len=64, sample_steps=6, guidance=4.0,
               negative_prompt="blurry, dark", warp_mode="stepwise", warp_strength=0.35)


@pytest.mark.full
def test_a_runs_lora_names_its_base_model_and_how_it_samples_and_state_json_its_provenance(tmp_path):
    """A one-step toy run on the tiny Wan saved as a diffusers folder (so that the base model has a name)."""
    standins.save_pretrained(standins.build_tiny(0), str(tmp_path / "tiny_wan"))
    base = str(tmp_path / "tiny_wan")
    run(["--size=tiny", "--reward=latent", "--eval_every=0", "--max_steps=1", f"--model={base}", "--sample_steps=6",
         "--guidance=4.0", "--negative_prompt=blurry, dark", "--warp_mode=stepwise"], tmp_path / "run")
    lora = tmp_path / "run" / "ckpt_000000" / "lora"
    with safe_open(str(lora / sample.LORA_FILE), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.base_model_name_or_path"] == base and metadata["transformer.r"] == 8
    assert json.loads((lora / sample.SAMPLING_FILE).read_text()) == {**TRAINED, "model": base}
    state = json.loads((tmp_path / "run" / "ckpt_000000" / "state.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert state["git_commit"].removesuffix("+modified") == (head or "unknown")
    assert state["versions"] == {name: importlib.metadata.version(name)
                                 for name in ("torch", "diffusers", "transformers", "peft", "gsplat")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """checkpoint.export_lora of a tiny LoRA (lora_B random, so that it changes the output) with the sampling
    settings TRAINED, as train.py exports it -> (its folder, the base model's name)."""
    from peft import LoraConfig
    folder, base = tmp_path_factory.mktemp("export") / "lora", "a/base_model"
    policy = standins.build_tiny(0).transformer
    policy.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    policy.peft_config["default"].base_model_name_or_path = base
    ema = {n: 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n)))
           for n, p in policy.named_parameters() if p.requires_grad}
    checkpoint.export_lora(str(folder), policy, ema, {**TRAINED, "model": None})
    return folder, base


def test_the_exported_lora_names_its_base_model_and_how_it_samples(exported):
    folder, base = exported
    with safe_open(str(folder / sample.LORA_FILE), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.base_model_name_or_path"] == base and metadata["transformer.r"] == 4
    assert json.loads((folder / sample.SAMPLING_FILE).read_text()) == {**TRAINED, "model": None}


def test_provenance_outside_git_and_without_a_package(monkeypatch):
    def no_git(*a, **k):
        raise FileNotFoundError("git")
    monkeypatch.setattr(subprocess, "run", no_git)
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)) if name == "gsplat" else version(name))
    info = checkpoint.provenance()
    assert info["git_commit"] == "unknown" and info["versions"]["gsplat"] is None and info["versions"]["torch"]


def generate_spy(monkeypatch):
    """sample.generate replaced by a recorder of its keyword arguments (a black video comes back)."""
    calls = []

    def generate(wan, prompt, seed, **kw):
        calls.append(kw)
        return torch.zeros(kw["frames"], 3, kw["height"], kw["width"])
    monkeypatch.setattr(sample, "generate", generate)
    return calls


def test_sample_lora_samples_as_trained_and_flags_override(exported, monkeypatch, capsys, tmp_path):
    lora = str(exported[0])
    calls = generate_spy(monkeypatch)
    sample.main(["--lora", lora, "--prompt", PROMPT, "--out", str(tmp_path / "a.mp4")])
    assert "--lora: sampling as trained" in capsys.readouterr().out
    sample.main(["--lora", lora, "--prompt", PROMPT, "--out", str(tmp_path / "b.mp4"), "--guidance=7",
                 "--sample_steps=3",
                 "--warp_mode=init"])
    keys = ("frames", "height", "width", "text_len", "sample_steps", "guidance", "negative_prompt", "warp_mode",
            "warp_strength")
    assert {k: calls[0][k] for k in keys} == {k: TRAINED[k] for k in keys}
    assert {k: calls[1][k] for k in keys} == {**{k: TRAINED[k] for k in keys}, "guidance": 7.0, "sample_steps": 3,
                                              "warp_mode": "init", "warp_strength": 0.35}


def test_evaluate_lora_samples_as_trained_and_flags_override(exported, tmp_path):
    lora = str(exported[0])
    args = evaluate.parse_args(["--lora", lora, "--out", str(tmp_path / "e")])
    assert {k: getattr(args, k) for k in TRAINED} == TRAINED and args.model is None
    args = evaluate.parse_args(["--lora", lora, "--out", str(tmp_path / "e"), "--negative_prompt=", "--sample_steps=4"])
    assert (args.negative_prompt, args.sample_steps, args.guidance) == ("", 4, 4.0)


# -----------------------------------------------------------------------------
# peft's layout

def peft_lora(folder):
    """A rank-4 LoRA of the tiny Wan saved by peft's own save_pretrained (adapter_model.safetensors +
    adapter_config.json), lora_B random so that it changes the output -> the transformer it lives in."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(standins.build_tiny(0).transformer, LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    model.save_pretrained(str(folder))
    assert sorted(os.listdir(folder)) == ["README.md", *sorted(sample.PEFT_FILES)]
    return model.base_model.model


def test_a_peft_lora_loads_and_gives_peft_models_output(tmp_path, capsys):
    trained = peft_lora(tmp_path / "peft")
    sample.check_lora_file(str(tmp_path / "peft"))
    wan = standins.build_tiny(0)
    x, cond = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 8, 32)
    with torch.no_grad():
        base = sample.velocity(wan.transformer, x, 0.5, cond, torch.zeros_like(cond), 5.0)
        sample.load_lora(wan.transformer, str(tmp_path / "peft"))
        ours = sample.velocity(wan.transformer, x, 0.5, cond, torch.zeros_like(cond), 5.0)
        theirs = sample.velocity(trained, x, 0.5, cond, torch.zeros_like(cond), 5.0)
    assert capsys.readouterr().err == ""  # every tensor landed
    assert (ours - base).abs().max() > 1e-3 and torch.allclose(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.full
def test_a_peft_lora_runs_in_sample_py_and_evaluate_py(tmp_path, capsys):
    peft_lora(tmp_path / "peft")
    sample.main(["--lora", str(tmp_path / "peft"), "--prompt", PROMPT, "--sample_steps=2", "--out",
                 str(tmp_path / "a.mp4")])
    assert os.path.getsize(tmp_path / "a.mp4") > 0
    evaluate.main(["--lora", str(tmp_path / "peft"), "--limit=1", "--sample_steps=2", "--out", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "lora:peft"]
    err = capsys.readouterr().err
    assert "base: 100%" in err and "lora:peft: 100%" in err  # the bar over prompts, per model


def test_a_peft_folder_without_its_config_is_one_line(tmp_path):
    peft_lora(tmp_path / "peft")
    os.remove(tmp_path / "peft" / "adapter_config.json")
    with pytest.raises(SystemExit, match="has adapter_model.safetensors but no adapter_config.json"):
        sample.check_lora_file(str(tmp_path / "peft"))


# -----------------------------------------------------------------------------
# The run lock on a filesystem without flock

def test_run_lock_without_flock_support_is_one_line(tmp_path, monkeypatch):
    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    with pytest.raises(SystemExit) as e:
        checkpoint.RunLock(str(tmp_path))
    message = str(e.value.code)
    assert message.startswith(f"error: --out_dir={tmp_path} is on a filesystem without file locking (flock: No locks "
                              "available)") and "\n" not in message
