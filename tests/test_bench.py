"""bench.py: its pass arithmetic against the real rollout, the real-size shapes it times on a GPU (built on the meta
device, so no memory and no download), and a tiny run.  Run: python -m pytest -q tests/test_bench.py"""
import json

import pytest
import torch

import bench
import models
import sample
import standins


def test_forward_pass_count_matches_the_rollout():
    """bench.forward_passes (per-sample forwards, CFG = 2) equals what sample.rollout actually runs."""
    wan = standins.build_tiny(0)
    seen = []
    real = wan.transformer.forward
    wan.transformer.forward = lambda hidden_states, **kw: (seen.append(hidden_states.shape[0]), real(
        hidden_states=hidden_states, **kw))[1]
    steps, group = 10, 8
    cond = sample.encode(wan, ["a cup"], 16)
    sample.rollout(wan.transformer, cond, sample.encode(wan, [""], 16), torch.randn(1, 16, 3, 8, 8),
                   sample.flow_sigmas(steps, 3.0), 5.0, group_size=group, window_start=steps // 4, window_size=2)
    rollout, train = bench.forward_passes(steps, group, 2)
    assert sum(seen) == rollout
    assert train == group * 2 * 2 * 2  # window steps x (policy + reference) x CFG
    assert bench.forward_passes(steps, 2, 24, release=True) == (2 * 50 * 2, 2 * 24 * 2 * 2)


def test_flop_formula_matches_torch_flop_counter():
    """bench.transformer_flops against FlopCounterMode over a real CFG forward (math attention, so the counter sees
    the attention matmuls), with a short prompt so the cross-attention the formula leaves out is negligible."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    transformer = standins.build_tiny(0).transformer
    for shape in ((16, 5, 32, 32), (16, 9, 32, 32)):  # 1280 and 2304 tokens: the quadratic term matters
        cond = torch.randn(1, 16, transformer.config.text_dim)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            sample.velocity(transformer, torch.randn(1, *shape), 0.5, cond, cond, 5.0)
        formula = bench.transformer_flops(transformer, bench.tokens_of(shape, transformer), 2)
        assert formula == pytest.approx(counter.get_total_flops(), rel=0.01)


def count(module):
    return sum(p.numel() for p in module.parameters()) / 1e9


def test_real_size_shapes_have_the_published_parameter_counts():
    """Random real-size models on the meta device: Wan2.1 1.3B / 14B, its VAE, UMT5-XXL, DA3-giant, Qwen3-VL-4B,
    HPSv3 (Qwen2-VL-7B + head). Ranges around the model cards' sizes catch a wrong config field."""
    small = standins.random_wan("small", "meta")
    assert 1.3 < count(small.transformer) < 1.5
    assert 0.1 < count(small.vae) < 0.15
    assert 5.5 < count(small.text_encoder) < 5.9
    assert 13.5 < count(standins.random_wan("large", "meta").transformer) < 15.0
    critics = standins.random_reward_models("meta")
    assert 1.1 < count(critics.da3) < 1.4  # with the Gaussian head
    assert 4.3 < count(critics.qwen) < 4.6  # 4.44B, input and output embeddings tied
    assert 7.6 < count(critics.hps) < 7.9  # Qwen2-VL-7B's 8.29B less its unused LM head (0.55B)


@pytest.mark.full
def test_tiny_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--stages", "step,rollout,passes", "--repeats", "1", "--release_config", "--json", str(out)])
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["forward passes per sample"] == {"stage": "forward passes per sample", "ours": 24.5, "release": 196.0}
    assert any(k.startswith("release group") for k in rows) and all(
        r["seconds"] > 0 for k, r in rows.items() if "seconds" in r)
    with pytest.raises(SystemExit, match="--size=small"):
        bench.main(["--random_weights"])


def test_passes_alone_writes_json(tmp_path):
    out = tmp_path / "passes.json"
    bench.main(["--stages", "passes", "--json", str(out)])
    assert json.loads(out.read_text())["rows"][0]["stage"] == "forward passes per sample"


def test_a_stage_that_raises_leaves_the_earlier_figures_in_the_json(tmp_path, monkeypatch):
    """The JSON is on disk after every stage (decode reads it when it fails: step's figures are there already); the
    failed stage is recorded with its error, the later stages still run, and the script then exits with one line."""
    out = tmp_path / "bench.json"
    on_disk = []

    def decode_fails(*a, **k):
        on_disk.append([r["stage"] for r in json.loads(out.read_text())["rows"]])
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(sample, "decode", decode_fails)
    with pytest.raises(SystemExit, match="stage decode failed"):
        bench.main(["--stages", "step,decode,warp", "--repeats", "1", "--json", str(out)])
    assert on_disk == [["transformer step (CFG)"]]
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == ["transformer step (CFG)", "decode", "camera noise warp"]
    assert rows[0]["seconds"] > 0 and rows[2]["seconds"] > 0
    assert rows[1]["error"] == "RuntimeError: CUDA out of memory (simulated)"


@pytest.mark.full
def test_rollout_on_a_smaller_group_is_scaled_by_forward_passes_and_labelled(tmp_path, monkeypatch):
    """--rollout_group=2 rolls out groups of 2 and reports the group of 8 as (forwards of 8) / (forwards of 2) times
    the measured time; at the real size (here: COLD_TOKENS lowered) there is no warm-up run."""
    groups = []
    real = sample.rollout
    monkeypatch.setattr(sample, "rollout", lambda *a, **k: (groups.append(k["group_size"]), real(*a, **k))[1])
    monkeypatch.setattr(bench, "COLD_TOKENS", 0)
    out = tmp_path / "bench.json"
    bench.main(["--stages", "rollout", "--rollout_group", "2", "--repeats", "2", "--json", str(out)])
    assert groups == [2, 2]  # two timed runs, no warm-up
    row = json.loads(out.read_text())["rows"][0]
    ratio = bench.forward_passes(10, 8, 2)[0] / bench.forward_passes(10, 2, 2)[0]
    assert row["stage"] == "rollout group of 8 (10 steps)" and row["measured_group"] == 2
    assert row["seconds"] == pytest.approx(row["measured_seconds"] * ratio)
    assert "measured on a group of 2" in row["note"] and "no warm-up run" in row["note"]


@pytest.mark.full
@pytest.mark.parametrize("flag, recomputed", [([], False), (["--grad_checkpointing"], True)])
def test_train_stage_checkpoints_where_train_py_does(tmp_path, monkeypatch, flag, recomputed):
    """bench's default per size is the size table's (tiny: off); with checkpointing on, every block runs twice per
    micro-step (forward, then recomputed in the backward; a pre-hook, since the recompute stops once it has what it
    needs)."""
    assert models.SIZES["tiny"]["grad_checkpointing"] is False
    calls = []
    real = standins.tiny_wan

    def tiny_wan(*a, **k):
        wan = real(*a, **k)
        wan.transformer.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        return wan
    monkeypatch.setattr(standins, "tiny_wan", tiny_wan)
    out = tmp_path / "bench.json"
    bench.main(["--stages", "train", "--repeats", "1", "--json", str(out)] + flag)
    assert json.loads(out.read_text())["rows"][0]["grad_checkpointing"] is recomputed
    assert len(calls) == (4 if recomputed else 2)  # warm-up + 1 timed micro-step


@pytest.mark.full
def test_toy_reward_stage_scores_toy_scenes(tmp_path):
    """On --size=toy the reward stage scores toy-world scenes with their own captions (the committed critics), not
    noise: the row names them and its time is positive."""
    out = tmp_path / "toy.json"
    bench.main(["--size=toy", "--stages", "reward", "--repeats", "1", "--group_size", "2", "--json", str(out)])
    row, = json.loads(out.read_text())["rows"]
    assert row["stage"] == "reward.score (2 toy scenes)" and row["seconds"] > 0


def test_toy_reward_stage_refuses_a_non_square_video():
    """The toy scenes are square: a toy reward stage asked for 32x64 stops before any work, naming both flags."""
    with pytest.raises(SystemExit, match="--height=32 --width=64"):
        bench.main(["--size=toy", "--stages", "reward", "--height", "32", "--width", "64"])
