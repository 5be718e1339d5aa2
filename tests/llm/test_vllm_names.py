"""vLLM's names for LLM(...) and LLM.chat(...) are accepted with vLLM's meaning, or refused
clearly where the meaning cannot hold (trust_remote_code=True: checkpoint code never runs)."""

from __future__ import annotations

import pytest

from tests.llm.conftest import BASE_ARGS, greedy

TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")


def test_vllm_engine_names(make_llm, tiny_checkpoints):
    path = tiny_checkpoints("LlamaForCausalLM")
    llm = make_llm(gpu_memory_utilization=0.5, tokenizer=path, trust_remote_code=False,
                   enforce_eager=True, max_logprobs=20)
    assert llm.engine_args.kv_cache_memory_fraction == 0.5
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], greedy(2, logprobs=20))
    assert len(out[0].outputs[0].logprobs[0]) >= 20
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], greedy(2, logprobs=21))


def test_chat_with_callers_template(make_llm):
    llm = make_llm()
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(2), chat_template=TEMPLATE)
    assert out[0].prompt == "<<user>>hi<<assistant>>"
    assert len(out[0].outputs[0].token_ids) == 2


def test_refused_names(tiny_checkpoints):
    from jaxserve.llm import LLM

    path = tiny_checkpoints("LlamaForCausalLM")
    with pytest.raises(ValueError, match="trust_remote_code: jaxserve never runs code"):
        LLM(path, trust_remote_code=True, **BASE_ARGS)
    with pytest.raises(ValueError, match="max_model_len: must be >= 1"):
        LLM(path, **{**BASE_ARGS, "max_model_len": 0})
    with pytest.raises(ValueError, match="num_kv_blocks: must be >= 2"):
        LLM(path, **{**BASE_ARGS, "num_kv_blocks": 1})
    with pytest.raises(ValueError, match="async_scheduling: not supported with num_processes"):
        LLM(path, async_scheduling=True, num_processes=2, **BASE_ARGS)
    with pytest.raises(ValueError, match="async_scheduling: not supported with speculative"):
        LLM(path, async_scheduling=True, **BASE_ARGS,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})
