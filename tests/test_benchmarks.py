"""The benchmark scripts run on CPU at tiny shapes (one step each) and return sane result dicts;
the optimised paths they time give the same losses, tokens and media as the plain ones."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, decoders, infer, scaling, train  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sh():
    return common.shapes("tiny")


@pytest.fixture(scope="module")
def tok_dir(sh, tmp_path_factory):
    return common.synthetic_tokenizer(sh.image_token_id, tmp_path_factory.mktemp("bench-tok"))


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_shapes_match_presets():
    big = common.shapes("llava-1.5-7b")
    assert big.image_tokens == 576 and big.llm["hidden_size"] == 4096 and big.vision["hidden_size"] == 1024
    # Vicuna-7B decoder layers: 32 x (4 d^2 + 3 d ff) + norms = 6.48e9
    assert abs(common.llm_block_params(big.llm) - 6.476e9) / 6.476e9 < 1e-3
    tiny = common.shapes("tiny")
    assert tiny.image_tokens == 16 and tiny.image_token_id < tiny.llm["vocab_size"]


def test_train_flops_formula(sh):
    live = common.train_flops_per_sample(sh, 49, 32, True, 100)
    cached = common.train_flops_per_sample(sh, 49, 32, False, 100)
    # The live encoder adds exactly the vision tower's forward.
    assert live - cached == 2 * common.vision_params(sh.vision) * (sh.image_tokens + 1)


def test_train_benchmark_one_step(sh, tok_dir):
    res = train.run("tiny", CPU, torch.float32, batch=2, text_len=8, warmup=0, steps=1, stages=(1, 2),
                    tokenizer_dir=tok_dir)
    rows = {(r["stage"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {(1, "mmllm"), (1, "mmllm-cached"), (1, "peer"), (2, "mmllm"), (2, "peer")}
    for r in rows.values():
        assert _finite_positive(r["samples_s"]) and _finite_positive(r["tokens_s"]) and _finite_positive(r["vs_peer"])
        assert r["seq_len"] == 1 + sh.image_tokens + 8 and math.isfinite(r["loss_first"])
    # Same trainable parameters on both sides: the projector, plus LoRA in stage 2.
    assert rows[(1, "mmllm")]["trainable_params"] == rows[(1, "peer")]["trainable_params"]
    assert rows[(2, "mmllm")]["trainable_params"] == rows[(2, "peer")]["trainable_params"]
    assert rows[(2, "mmllm")]["trainable_params"] > rows[(1, "mmllm")]["trainable_params"]
    # The first step's loss (before any update) is the same with the encoder live or cached.
    assert rows[(1, "mmllm")]["loss_first"] == pytest.approx(rows[(1, "mmllm-cached")]["loss_first"], abs=1e-6)
    assert res["env"]["device"] == "cpu" and res["flops_formula"]


def test_feature_cache_same_loss_and_grads(sh, tok_dir):
    """The cached-feature path the benchmark times computes the live path's loss and gradients."""
    model = common.build_mmllm(sh, CPU, torch.float32, tok_dir)
    train.set_trainable(model, ("input_projectors.",))
    ids, mask, labels, pixels = train.make_batch(sh, 2, 8, CPU, torch.float32)
    live = model(ids, mask, media={"image": pixels}, labels=labels).loss
    live.backward()
    g_live = [p.grad.clone() for p in model.input_projectors.parameters()]
    model.zero_grad()
    with torch.no_grad():
        feats = {"image": model.encoders["image"](pixels)}
    cached = model(ids, mask, labels=labels, features=feats).loss
    cached.backward()
    assert torch.equal(live, cached)
    for a, p in zip(g_live, model.input_projectors.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_supervised_logits_loss_equals_full_logits(sh, tok_dir):
    """mmllm's loss (logits at supervised positions only) equals the full-logit loss the peer computes."""
    model = common.build_mmllm(sh, CPU, torch.float32, tok_dir)
    ids, mask, labels, pixels = train.make_batch(sh, 2, 8, CPU, torch.float32)
    with torch.no_grad():
        ours = model(ids, mask, media={"image": pixels}, labels=labels).loss
        logits = model(ids, mask, media={"image": pixels}).logits  # (B, T, V)
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(ours, full)


def test_infer_benchmark_and_static_cache_same_tokens():
    res = infer.run("tiny", CPU, torch.float32, batches=(1, 2), new_tokens=4,
                    impls=("mmllm", "mmllm-static", "mmllm-compiled", "peer"), warmup=0, repeats=1)
    impls = {(r["impl"], r["batch"]) for r in res["rows"]}
    # transformers compiles decode only on GPUs, so the compiled row is skipped on the CPU.
    assert impls == {(i, b) for i in ("mmllm", "mmllm-static", "peer") for b in (1, 2)}
    for r in res["rows"]:
        assert _finite_positive(r["ttft_s"]) and _finite_positive(r["decode_tok_s"])
        assert _finite_positive(r["decode_vs_peer"])
    # The static KV cache decodes exactly the plain path's greedy tokens (fp32).
    assert res["same_tokens_as_plain"] == {"mmllm-static-b1": True, "mmllm-static-b2": True}
    assert res["same_prefix_fraction"] == {"mmllm-static-b1": 1.0, "mmllm-static-b2": 1.0}


def test_decoders_benchmark_same_media():
    res = decoders.run("tiny", CPU, torch.float32, modalities=("image", "audio"), repeats=1, warmup=0)
    assert [r["modality"] for r in res["rows"]] == ["image", "audio"]
    for r in res["rows"]:
        assert r["same_output"] is True  # the wrapper renders exactly what diffusers renders
        assert _finite_positive(r["direct_s"]) and _finite_positive(r["mmllm_s"])
        assert 0 <= r["wrapper_s"] < r["mmllm_s"] and math.isfinite(r["overhead"])


def test_scaling_benchmark_grid():
    res = scaling.run("tiny", CPU, torch.float32, text_lens=(4, 8), batches=(1, 2), warmup=0, steps=1)
    assert [(r["seq_len"], r["batch"]) for r in res["rows"]] == [(21, 1), (21, 2), (25, 1), (25, 2)]
    assert all(_finite_positive(r["tokens_s"]) for r in res["rows"])


@pytest.mark.gpu
def test_compiled_layers_same_loss_gpu(sh, tok_dir):
    """The compiled-layer training row computes the eager loss (bf16 tolerance)."""
    dev = torch.device("cuda")
    model = common.build_mmllm(sh, dev, torch.bfloat16, tok_dir)
    ids, mask, labels, pixels = train.make_batch(sh, 2, 8, dev, torch.bfloat16)
    with torch.no_grad():
        eager = model(ids, mask, media={"image": pixels}, labels=labels).loss
        for layer in model.llm.model.layers:
            layer.compile()
        compiled = model(ids, mask, media={"image": pixels}, labels=labels).loss
    torch.testing.assert_close(eager, compiled, rtol=2e-2, atol=2e-2)
