"""LLM(quantization=...) end to end: batched greedy generation through the engine equals HF
transformers' greedy generate on the float model holding the dequantized weights."""

from __future__ import annotations

import pytest

from tests.llm._hf import NEW_TOKENS, hf_reference, make_prompts
from tests.llm.conftest import assert_idle, greedy, token_prompts
from tests.quant_checkpoints import write_dequantized_copy


def _assert_greedy_matches(llm, dequantized_path: str, seed: int, num_prompts: int) -> None:
    """The engine's batched greedy tokens equal HF's on the dequantized checkpoint; the block
    pool is back to empty."""
    prompts = make_prompts(llm.engine.runner.model_config.vocab_size, seed=seed)[:num_prompts]
    ref = hf_reference(dequantized_path, prompts)
    outs = llm.generate(token_prompts(prompts), greedy(NEW_TOKENS), use_tqdm=False)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == ref.greedy[i], f"prompt {i} ({len(prompts[i])} tokens)"
    assert_idle(llm)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_llm_greedy_matches_hf_on_dequantized_weights(method, make_llm,
                                                               tiny_checkpoints, tmp_path):
    llm = make_llm("Qwen2ForCausalLM", quantization=method)
    deq = write_dequantized_copy(tiny_checkpoints("Qwen2ForCausalLM"), str(tmp_path / "deq"),
                                 method)
    _assert_greedy_matches(llm, deq, seed=5, num_prompts=4)


def test_unknown_quantization_is_refused_at_engine_args():
    from jaxserve.llm import EngineArgs

    with pytest.raises(ValueError, match="quantization: unknown method 'gguf'"):
        EngineArgs(model="unused", quantization="gguf")


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])  # tied, untied
def test_quantized_lm_head_greedy_matches_hf_on_dequantized_weights(arch, make_llm,
                                                                    tiny_checkpoints, tmp_path):
    llm = make_llm(arch, quantization="int8", quantize_lm_head=True)
    deq = write_dequantized_copy(tiny_checkpoints(arch), str(tmp_path / "deq"), "int8",
                                 lm_head=True)
    _assert_greedy_matches(llm, deq, seed=6, num_prompts=3)


def test_quantize_lm_head_without_quantization_is_refused_at_engine_args():
    from jaxserve.llm import EngineArgs

    with pytest.raises(ValueError, match="quantize_lm_head: needs quantization set"):
        EngineArgs(model="unused", quantize_lm_head=True)
