"""Run under torchrun by tests/test_real_config.py: the tiny Wan in bf16, sharded by common.shard_fsdp (train.py's
policy) on 2 gloo ranks, against the same model unsharded. Writes a JSON verdict to argv[1] on rank 0.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_forward.py OUT.json [--cast]

--cast shards with the policy train.py used to have (param_dtype=bf16), to show what it breaks."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import torch  # noqa: E402

import standins  # noqa: E402
import sample  # noqa: E402


def main(out, cast):
    rank, _, _, device = common.setup_dist()
    wan = standins.tiny_wan(device, torch.bfloat16)  # tiny, bf16 except Wan's fp32 modules
    transformer = wan.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 2, 16, 32, generator=g).to(torch.bfloat16)
    sigma = torch.tensor([0.9371, 0.5123])  # 1000 σ = 937.1 and 512.3: not representable in bf16
    ref = sample.velocity(transformer, x, sigma, cond, uncond, 5.0)

    seen = {}
    sharded = transformer
    if cast:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in transformer.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(transformer, mp_policy=mp)
    else:
        common.shard_fsdp(transformer, transformer.blocks)
    sharded.condition_embedder.timesteps_proj.register_forward_hook(
        lambda m, inp, out: seen.update(t=inp[0].detach().float().tolist(), dtype=str(inp[0].dtype)))
    sharded.condition_embedder.time_embedder.register_forward_pre_hook(
        lambda m, inp: seen.update(embedder_dtype=str(inp[0].dtype)))
    v = sample.velocity(sharded, x, sigma, cond, uncond, 5.0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(max_diff=float((v - ref).abs().max()), max_ref=float(ref.abs().max()), **seen), f)
    common.cleanup_dist()


if __name__ == "__main__":
    main(sys.argv[1], "--cast" in sys.argv)
