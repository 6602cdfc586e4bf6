"""
HPSv3 scored as it was trained (MizzenAI/HPSv3): the upstream prompt text byte for byte, and upstream's forward
(image features scattered into the token embeddings, the language model run with position_ids=None, i.e. plain
sequential positions) re-stated here independently of models.HPSv3Reward.

    . .venv/bin/activate && python -m pytest tests/test_hpsv3.py -q

A few seconds on 2 CPU cores (tiny random Qwen2-VL, no files).
"""
import hashlib
import types

import pytest
import torch

import reward
import standins

PROMPTS = ["a cat", "a red fox jumping over a frozen river at dawn", "x"]  # different lengths: the batch pads


class Spy:
    """The processor, recording the batch it builds (text in, tensors out)."""

    def __init__(self, proc):
        self.proc, self.texts, self.batch = proc, None, None

    def __getattr__(self, name):
        return getattr(self.proc, name)

    def __call__(self, text, **kw):
        self.texts, self.batch = list(text), self.proc(text=text, **kw)
        return self.batch


@pytest.fixture(scope="module")
def tiny():
    """The tiny HPSv3 with its attention sharpened (q, k x10): at the random init's scale the attention is nearly
    uniform and positions barely move the score; sharpened, the old 3-D positions change it by ~1e-2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model, proc = standins.build_tiny_hpsv3()
    with torch.no_grad():
        for name, p in model.backbone.language_model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(10)
    return model, proc


def scorer(model, proc):
    # 112*112 px: a 64x96 image -> an 8x10 patch grid -> 20 image tokens, whose 3-D positions span 5 slots, not 20
    return types.SimpleNamespace(hps=model, hps_proc=Spy(proc), hps_pixels=112 * 112, device=torch.device("cpu"))


def images():
    return torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def upstream_mu(model, batch):
    """Qwen2VLRewardModelBT.forward (MizzenAI/HPSv3 hpsv3/model/qwen2vl_trainer.py) re-stated: embed the tokens,
    masked_scatter the vision tower's features into the image-pad slots, run the language model on the
    embeddings with input_ids=None and position_ids=None (no image_grid_thw), the fp32 head on every token, and
    read the row at the <|Reward|> token; mu is column 0."""
    ids, lm, visual = batch["input_ids"], model.backbone.language_model, model.backbone.visual
    embeds = lm.embed_tokens(ids)
    feats = visual(batch["pixel_values"].type(visual.dtype), grid_thw=batch["image_grid_thw"]).pooler_output
    mask = (ids == model.backbone.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    hidden = lm(input_ids=None, position_ids=None, attention_mask=batch["attention_mask"],
                inputs_embeds=embeds).last_hidden_state
    logits = model.rm_head(hidden.float())  # (B, T, 2)
    return logits[ids == model.reward_token_id].view(ids.shape[0], -1)[:, 0]


@torch.no_grad()
def multimodal_position_mu(model, batch):
    """The forward reward.py used before: Qwen2-VL's own model, i.e. its 3-D M-RoPE positions for the image."""
    ids = batch["input_ids"]
    hidden = model.backbone(input_ids=ids, attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                            mm_token_type_ids=(ids == model.backbone.config.image_token_id).long()).last_hidden_state
    return model.rm_head(hidden[ids == model.reward_token_id].float())[:, 0]


def test_prompt_strings_are_upstreams_byte_for_byte():
    """sha256 of INSTRUCTION and prompt_with_special_token as written in MizzenAI/HPSv3
    hpsv3/dataset/data_collator_qwen.py, plus the whitespace that is easy to lose."""
    ins, suf = reward.HPSV3_INSTRUCTION, reward.HPSV3_REWARD_SUFFIX
    assert hashlib.sha256(ins.encode()).hexdigest() == \
        "4b760179e6eeec994804cc37e30968d0132bedeea81989ca7b045f8a2051397d"
    assert hashlib.sha256(suf.encode()).hexdigest() == \
        "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
    assert len(ins) == 1317 and ins.startswith("\nYou are tasked") and ins.endswith("{text_prompt}\n\n\n")
    assert "the best. \n\n**Visual Quality:**  \nEvaluate" in ins and "lowest possible. \nTextual prompt - " in ins
    assert suf == "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def test_score_is_upstreams_forward_with_sequential_positions(tiny):
    model, proc = tiny
    m = scorer(model, proc)
    got = reward.hpsv3_score(m, images(), PROMPTS)
    batch = m.hps_proc.batch
    mask = batch["attention_mask"]
    assert proc.tokenizer.padding_side == "right" and (mask == 0).any()  # upstream's padding, exercised
    assert (batch["image_grid_thw"] == torch.tensor([1, 8, 10])).all()  # 20 image tokens
    # the text fed to the processor: chat template (generation prompt on), image first, then upstream's text
    for text, p in zip(m.hps_proc.texts, PROMPTS):
        user = reward.HPSV3_INSTRUCTION.format(text_prompt=p) + reward.HPSV3_REWARD_SUFFIX
        assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + user +
                        "<|im_end|>\n<|im_start|>assistant\n")
        assert "Textual prompt - " + p + "\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>" in text
    want = upstream_mu(model, batch)
    old = multimodal_position_mu(model, batch)
    print(f"\nHPSv3 tiny mu {got.tolist()}; |ours - upstream| {float((got - want).abs().max()):.2e}; "
          f"|3-D positions - upstream| {float((old - want).abs().max()):.2e}")
    assert float((got - want).abs().max()) < 1e-5
    assert float((old - want).abs().max()) > 1e-3  # the multimodal-position forward would fail the line above
    assert float(got.max() - got.min()) > 1e-3  # the three scores differ: the comparison is not of constants


def test_left_padding_gives_the_same_scores(tiny):
    """Positions count real tokens, so a left-padding processor (Qwen2-VL-7B-Instruct's tokenizer may default to
    it) scores as upstream's right-padded batch and as each image alone."""
    model, proc = tiny
    right = reward.hpsv3_score(scorer(model, proc), images(), PROMPTS)
    _, left_proc = standins.build_tiny_hpsv3()
    left_proc.tokenizer.padding_side = "left"
    m = scorer(model, left_proc)
    left = reward.hpsv3_score(m, images(), PROMPTS)
    assert (m.hps_proc.batch["attention_mask"][:, 0] == 0).any()
    alone = torch.cat([reward.hpsv3_score(scorer(model, proc), images()[i:i + 1], PROMPTS[i:i + 1])
                       for i in range(3)])
    assert float((left - right).abs().max()) < 1e-5 and float((alone - right).abs().max()) < 1e-5


def test_bf16_backbone_fp32_head(tiny):
    """As load_hpsv3 builds it for CUDA: backbone in bf16, the head in fp32. The bf16 score follows upstream's
    bf16 forward exactly, and stays within a few percent of fp32 (bf16 rounds every op to a relative 2^-8; the
    sharpened attention amplifies that)."""
    model, proc = tiny
    s32 = reward.hpsv3_score(scorer(model, proc), images(), PROMPTS)
    with torch.random.fork_rng(devices=[]):
        half, _ = standins.build_tiny_hpsv3()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16).rm_head.float()
    assert half.rm_head[0].weight.dtype == torch.float32
    assert half.backbone.language_model.embed_tokens.weight.dtype == torch.bfloat16
    m = scorer(half, proc)
    s16 = reward.hpsv3_score(m, images(), PROMPTS)
    want = upstream_mu(half, m.hps_proc.batch)
    print(f"\nHPSv3 tiny bf16 - fp32: {float((s16 - s32).abs().max()):.2e} (scores ~{float(s32.abs().max()):.3f})")
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()
    assert float((s16 - want).abs().max()) < 1e-5
    assert float((s16 - s32).abs().max()) < 0.05 * float(s32.abs().max())
