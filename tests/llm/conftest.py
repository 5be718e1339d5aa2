"""Fixtures of the LLM tests: one compile cache per session, cached LLMs, an idle-pool check."""

from __future__ import annotations

import pytest

from jaxserve.engine import SamplingParams

# Small limits keep start-up compiles few; every engine below shares them unless a test
# needs otherwise (same shapes -> the session's persistent compile cache serves them).
BASE_ARGS = dict(
    dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
    block_size=8, num_kv_blocks=64, show_progress=False, seed=0,
)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def assert_idle(llm) -> None:
    """Nothing queued or running, and every block back in the free pool."""
    s = llm.stats()
    assert s.num_requests_running == 0 and s.num_requests_waiting == 0, s
    assert s.kv_blocks_free == s.kv_blocks_total, s
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="session")
def make_llm(tiny_checkpoints, compile_cache_dir):
    """make_llm(arch, **engine_overrides) -> LLM, built once per (arch, overrides) per session."""
    from jaxserve.llm import LLM

    cache: dict[str, object] = {}

    def get(arch: str = "LlamaForCausalLM", **overrides):
        key = arch + repr(sorted(overrides.items()))
        if key not in cache:
            args = {**BASE_ARGS, **overrides}
            cache[key] = LLM(tiny_checkpoints(arch), compilation_cache_dir=compile_cache_dir,
                             **args)
        return cache[key]

    get.created = cache
    return get


@pytest.fixture(autouse=True)
def _pools_free_after_each_test(request):
    """After every test, every LLM of the session is idle with all blocks free."""
    yield
    if "make_llm" not in request.fixturenames:
        return
    for llm in request.getfixturevalue("make_llm").created.values():
        assert_idle(llm)


@pytest.fixture(scope="session")
def hf_refs(tiny_checkpoints):
    """arch -> HFReference on the standard mixed-length prompts (computed once per arch)."""
    from tests.llm._hf import hf_reference, make_prompts
    from transformers import AutoConfig

    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            path = tiny_checkpoints(arch)
            vocab = AutoConfig.from_pretrained(path).vocab_size
            cache[arch] = hf_reference(path, make_prompts(vocab))
        return cache[arch]

    return get
