"""
Plain user mistakes: each must end in one line on stderr and a non-zero exit, before any model loads.

Each row of MISTAKES runs a script the way a user does (a subprocess from the repo root, HF_HUB_OFFLINE=1) and
checks: exit code != 0, stderr is exactly one non-empty line containing the fragment, no "Traceback", and
  when="load" (the default): it stopped before any model loaded: under 20 s and without the line the script
      prints once its checks have passed (AFTER_CHECKS);
  when="sample": it stopped after loading but before sampling: no mp4 was written.
To add a case, add a row (script, [args], fragment[, when]); "{name}" in an argument is replaced by the path of the
fixture file `name` (see `files`), and a bytes argument goes to the script as raw bytes.
The in-process tests below cover what the rows cannot see: the camera-word detector, the start-up warnings and the
LoRA landing check.

    python -m pytest -q tests/test_mistakes.py
"""
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import noise_warp
import sample
import standins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The first line each script prints once its own checks have passed (evaluate.py and train.py print it before
# loading models, sample.py and bench.py right after, noise_warp.py before the warp).
AFTER_CHECKS = {"sample.py": "loaded ", "evaluate.py": "evaluating ", "bench.py": "device ",
                "noise_warp.py": "motions:", "train.py": '"size":'}
P = "Camera pan left. A red house near a river."

MISTAKES = [
    # sample.py
    ("sample.py", ["--prompt", P, "--out", "/proc/x.mp4"], "cannot write --out=/proc/x.mp4"),  # root may, /proc not
    ("sample.py", ["--prompt", P, "--out", "{dir_mp4}"], "is an existing folder"),
    ("sample.py", ["--prompt", b"Camera pan left. A caf\xe9."], "--prompt holds bytes that are not UTF-8"),
    ("sample.py", ["--prompts", "{latin1}", "--out", "{tmp}/videos"], "line 2 is not UTF-8 (byte 0xe9"),
    ("sample.py", ["--prompt", P, "--text_len", "0"], "--text_len=0 must be a positive number"),
    ("sample.py", ["--prompt", P, "--warp_scale", "0"], "--warp_scale=0 must be a positive number"),
    ("sample.py", ["--prompt", P, "--guidance", "nan"], "--guidance=nan must be a number"),
    ("sample.py", ["--prompt", P, "--lora", "{lora_empty}"], "has no pytorch_lora_weights.safetensors"),
    ("sample.py", ["--prompt", P, "--lora", "{lora_garbage}"], "is not a readable safetensors file"),
    ("sample.py", ["--promt", P], "unknown argument --promt; did you mean --prompt"),
    ("sample.py", ["--prompt", P, "--lora", "{lora_nomatch}", "--out", "{tmp}/nomatch.mp4"],
     "none of its 2 LoRA layers exist in this model", "sample"),
    # evaluate.py
    ("evaluate.py", ["--ckpt", "{run_truncated}"], "may be truncated"),
    ("evaluate.py", ["--lora", "{lora_nan}"], "is not finite"),
    ("evaluate.py", ["--prompts", "{latin1}"], "line 2 is not UTF-8"),
    ("evaluate.py", ["--guidance", "nan"], "--guidance=nan must be a number"),
    ("evaluate.py", ["--text_len", "0"], "--text_len=0 must be a positive number"),
    ("evaluate.py", ["--ckpts", "out"], "did you mean --ckpt"),
    ("evaluate.py", ["--dist_timeout", "-5"], "--dist_timeout=-5.0 must be a positive number of minutes"),
    # noise_warp.py
    ("noise_warp.py", ["--out", "{tmp}/warp"], "--out={tmp}/warp must end in .mp4"),
    ("noise_warp.py", ["--prompt", "Camera zoom in on a lighthouse.", "--out", "{tmp}/w.mp4"],
     "'zoom in' not recognised"),
    ("noise_warp.py", ["--prompt", "The camera pans left, then a slow push-in.", "--out", "{tmp}/w.mp4"],
     "use one of: push in, pull out, move left, move right, orbit left, orbit right, pan left, pan right, fixed"),
    ("noise_warp.py", ["--degradation", "inf"], "--degradation=inf must be a number >= 0"),
    # bench.py
    ("bench.py", ["--stages", "bogus"], "--stages: unknown value 'bogus'"),
    ("bench.py", ["--stages", "step,lop"], "did you mean loop?"),
    ("bench.py", ["--repeats", "0"], "--repeats=0 must be a positive number"),
    ("bench.py", ["--depth", "1"], "--depth cuts the real architectures: use it with --random_weights"),
    ("bench.py", ["--rollout_group", "0"], "--rollout_group=0 must be a positive number"),
    ("bench.py", ["--frames", "10"], "--frames=10 must be 4k+1"),
]


def tiny_lora(keys, value=0.1):
    """A LoRA state dict in train.py's export format: rank 4 A (4, 32) and B (32, 4) per layer of the tiny model."""
    sd = {}
    for layer in keys:
        sd[f"transformer.{layer}.lora_A.weight"] = torch.full((4, 32), value)
        sd[f"transformer.{layer}.lora_B.weight"] = torch.full((32, 4), value)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "d.mp4").mkdir()
    (tmp / "latin1.txt").write_bytes(b"Camera pan left. A cup.\nCamera push in. Un caf\xe9.\n")
    for name in ("lora_empty", "lora_garbage", "lora_nomatch", "lora_nan"):
        (tmp / name).mkdir()
    (tmp / "lora_garbage" / sample.LORA_FILE).write_bytes(b"this is not a safetensors file")
    save_file(tiny_lora(["blokz.0.attn1.to_q", "blokz.0.attn1.to_k"]), str(tmp / "lora_nomatch" / sample.LORA_FILE))
    save_file(tiny_lora(["blocks.0.attn1.to_q"], float("nan")), str(tmp / "lora_nan" / sample.LORA_FILE))
    ckpt = tmp / "run" / "ckpt_000001"
    (ckpt / "lora").mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 1, "config": {"size": "tiny"}}')
    (tmp / "run" / "latest").write_text("ckpt_000001")
    save_file(tiny_lora(["blocks.0.attn1.to_q", "blocks.0.attn1.to_k"]), str(ckpt / "lora" / sample.LORA_FILE))
    data = (ckpt / "lora" / sample.LORA_FILE).read_bytes()
    (ckpt / "lora" / sample.LORA_FILE).write_bytes(data[:len(data) // 2])  # a copy that stopped half way
    names = {"tmp": tmp, "dir_mp4": tmp / "d.mp4", "latin1": tmp / "latin1.txt", "run_truncated": tmp / "run"}
    return {**{k: str(v) for k, v in names.items()}, **{k: str(tmp / k) for k in
                                                        ("lora_empty", "lora_garbage", "lora_nomatch", "lora_nan")}}


@pytest.mark.full
@pytest.mark.parametrize("row", MISTAKES, ids=lambda row: f"{row[0]}:{row[2][:40]}")
def test_mistake_is_one_line_before_loading(files, row):
    script, args, fragment, when = (*row, "load")[:4]
    args = [a if isinstance(a, bytes) else a.format(**files) for a in args]
    fragment = fragment.format(**files)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, timeout=120)
    seconds = time.time() - t0
    out, err = (b.decode("utf-8", "backslashreplace") for b in (proc.stdout, proc.stderr))
    assert proc.returncode != 0, out[-2000:]
    assert "Traceback" not in out + err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err[-3000:]
    assert fragment in lines[0], lines[0]
    if when == "load":
        assert seconds < 20, f"{seconds:.1f} s: did a model load?"
        assert AFTER_CHECKS[script] not in out, out
    else:
        assert not [f for f in os.listdir(files["tmp"]) if f.endswith(".mp4") and f != "d.mp4"], "sampled anyway"


# ---------------------------------------------------------------------------------------------------------------
# In process: the camera-word detector, start-up warnings, the LoRA landing check

@pytest.mark.parametrize("prompt, unknown", [
    ("Camera orbit left, then push in. A lighthouse.", []),
    ("Camera zoom in. A lighthouse.", ["zoom in"]),
    ("The camera pans left across a harbour.", ["pans left"]),
    ("Slow push-in on a house.", ["push-in"]),
    ("Dolly shot of a street, then tilt up.", ["dolly", "tilt up"]),
    ("Camera push in, then zoom out.", ["zoom out"]),  # a known phrase and an unknown one
    ("The camera slowly rises up over the forest.", ["rises up"]),
    ("Camera orbiting a tower.", ["orbiting"]),
    # scene text keeps its verbs: they count only right after "camera"
    ("Camera fixed. A canoe is pulled up on the shore; a chairlift moves up; a tilt-shift photograph.", []),
    ("A car turns left at the corner.", []),
])
def test_unknown_camera_words(prompt, unknown):
    assert noise_warp.unknown_camera_words(prompt) == unknown


def test_camera_warnings_count_and_name_the_valid_phrases():
    prompts = ["Camera pan left. A cup.", "Camera zoom in. A cup.", "A cup.", "A dog.", "Camera dolly in. A dog."]
    odd, plain = sample.camera_warnings(prompts)
    assert odd.startswith("2 of 5 prompt(s)") and "#1: 'zoom in'" in odd
    assert odd.endswith("push in, pull out, move left, move right, orbit left, orbit right, pan left, pan right, "
                        "fixed")
    assert plain.startswith("2 of 5 prompt(s) name no camera motion (e.g. #2:")
    assert sample.camera_warnings(prompts[2:4], warp_mode="none") == []  # plain noise asked for: nothing to say
    assert sample.camera_warnings(prompts[:1]) == []


def test_length_warning_counts_tokens_as_encode_does():
    """Every word here is one token of the tiny vocabulary, plus </s>: k words are k + 1 tokens, and encode keeps
    exactly text_len of them."""
    tok = standins.build_tiny().tokenizer
    prompts = ["camera " * 10, "camera " * 3, "camera " * 12]
    assert [len(tok(p).input_ids) for p in prompts] == [11, 4, 13]  # the premise
    assert sample.length_warning(tok, prompts, 13) is None
    assert sample.length_warning(tok, prompts, 11).startswith("1 of 3 prompt(s) are longer than --text_len=11 "
                                                              "tokens and are cut (longest: #2, 13 tokens)")
    assert "2 of 3" in sample.length_warning(tok, prompts, 10)


def write_lora(folder):
    """A LoRA of the tiny model as train.py exports it (peft's state dict, saved by diffusers), lora_B random so it
    changes the output. Returns the file's tensors by key."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    transformer = standins.build_tiny().transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    sd = get_peft_model_state_dict(transformer)
    WanPipeline.save_lora_weights(str(folder), transformer_lora_layers=sd)
    return {f"transformer.{k}": v for k, v in sd.items()}


def test_load_lora_proves_every_tensor_landed(tmp_path, capsys):
    """All tensors: each file tensor equals the model's parameter afterwards (read back through named_parameters),
    no warning, and the adapter changes the output; disabled, the model is the base model bit for bit (evaluate.py
    samples the base model that way)."""
    sd = write_lora(tmp_path / "all")
    wan = standins.build_tiny()
    x, cond = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 8, 32)
    with torch.no_grad():
        base = sample.velocity(wan.transformer, x, 0.5, cond, torch.zeros_like(cond), 5.0)
        adapter = sample.load_lora(wan.transformer, str(tmp_path / "all"))
        params = dict(wan.transformer.named_parameters())
        for key, value in sd.items():
            module, kind, leaf = key.removeprefix("transformer.").rsplit(".", 2)
            assert torch.equal(params[f"{module}.{kind}.{adapter}.{leaf}"], value), key
        with_lora = sample.velocity(wan.transformer, x, 0.5, cond, torch.zeros_like(cond), 5.0)
        wan.transformer.disable_lora()
        disabled = sample.velocity(wan.transformer, x, 0.5, cond, torch.zeros_like(cond), 5.0)
    assert capsys.readouterr().err == ""
    assert (with_lora - base).abs().max() > 1e-3 and torch.equal(disabled, base)


def test_load_lora_partial_warns_with_counts_and_foreign_stops(tmp_path, capsys):
    """Layers of block 1 renamed to ones the model lacks: 16 of 32 tensors land, a one-line warning says so.
    Every layer foreign: stop before loading, with one line."""
    from safetensors.torch import load_file
    sd = write_lora(tmp_path / "half")
    file = str(tmp_path / "half" / sample.LORA_FILE)
    renamed = {k.replace("blocks.1.", "blokz.1."): v for k, v in load_file(file).items()}
    save_file(renamed, file)
    sample.load_lora(standins.build_tiny().transformer, str(tmp_path / "half"))
    err = capsys.readouterr().err.strip()
    half = len(sd) // 2
    assert err.count("\n") == 0 and f"only {half} of {len(sd)} LoRA tensors match this model" in err
    assert "8 of 16 layers missing, e.g. blokz.1.attn1.to_k" in err
    save_file({k.replace("blocks.", "blokz."): v for k, v in renamed.items()}, file)
    with pytest.raises(SystemExit, match="none of its 16 LoRA layers exist in this model"):
        sample.load_lora(standins.build_tiny().transformer, str(tmp_path / "half"))
