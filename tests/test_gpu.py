"""CUDA checks: the same model code on a GPU, in bf16. Skipped without a CUDA device."""

import numpy as np
import pytest
import torch

import mmllm

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_tiny():
    return mmllm.load("tiny", device="cuda", dtype="bfloat16")


def test_generate_on_cuda_in_bf16(gpu_tiny):
    assert gpu_tiny.device.type == "cuda" and gpu_tiny.dtype == torch.bfloat16
    img = np.random.RandomState(0).randint(0, 255, (20, 20, 3), dtype=np.uint8)
    res = gpu_tiny.generate("What is this?", image=img, audio=np.zeros(16000, np.float32), max_new_tokens=5,
                            output_modalities=[])
    assert len(res.token_ids) == 5


def test_padded_batch_matches_alone_on_cuda(gpu_tiny):
    proc = gpu_tiny.processor
    convs = [[{"role": "user", "content": "<image>\nWhat colour?"}], [{"role": "user", "content": "A longer text only prompt here."}]]
    media = [{"image": [np.full((16, 16, 3), 200, np.uint8)]}, {}]
    with torch.no_grad():
        both = gpu_tiny.forward_batch(proc(convs, media).to("cuda")).logits.float()
        for i in range(2):
            one = gpu_tiny.forward_batch(proc([convs[i]], [media[i]]).to("cuda")).logits.float()
            assert torch.allclose(both[i, -one.shape[1]:], one[0], atol=3e-2, rtol=3e-2)


def test_forced_image_signal_renders_on_cuda(gpu_tiny, force_first_signal):
    res = gpu_tiny.generate("draw", max_new_tokens=8, logits_processor=[force_first_signal(gpu_tiny, "image")],
                            num_inference_steps=2)
    assert res.token_ids[:4] == gpu_tiny.signal_groups["image"] and len(res.images) == 1


def test_training_step_on_cuda_changes_only_projector():
    model = mmllm.load("tiny", device="cuda")
    model.requires_grad_(False)
    proj = model.input_projectors["image"]
    proj.requires_grad_(True)
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    batch = model.processor([[{"role": "user", "content": "<image>\nred"}]], [{"image": [np.zeros((16, 16, 3), np.uint8)]}])
    batch.labels = batch.input_ids.clone()
    batch = batch.to("cuda")
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.forward_batch(batch).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
