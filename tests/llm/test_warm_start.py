"""Start-up: one executable per distinct program, and a second start loads all of them from the
persistent compilation cache (no XLA compile) and then serves the same tokens."""

from __future__ import annotations

from jaxserve.llm import LLM
from jaxserve.runtime.buckets import MIN_LOGIT_ROWS
from tests.llm.conftest import BASE_ARGS, greedy, token_prompts

ARCH = "LlamaForCausalLM"


def test_one_executable_per_program(make_llm):
    runner = make_llm(ARCH).engine.runner
    shapes = runner.buckets.step_shapes()
    # the samplers run per logit-row count: a 1-row decode step gathers 2 rows (MIN_LOGIT_ROWS)
    rows = {max(MIN_LOGIT_ROWS, s) for _, s, _, _ in shapes}
    assert min(s for _, s, _, _ in shapes) == 1  # the cpu kernel's 1-row step (buckets.py)
    tokens = {t for t, _, _, _ in shapes}
    assert runner.executables.counts() == {
        "step": len(shapes), "sample": len(rows), "process": len(rows), "mask": len(rows),
        "prompt_logprobs": len(tokens),
    }
    assert runner.warmup_report.executables == sum(runner.executables.counts().values())


def test_second_start_loads_every_executable_from_the_cache(
    make_llm, tiny_checkpoints, compile_cache_dir
):
    first = make_llm(ARCH)
    second = LLM(tiny_checkpoints(ARCH), compilation_cache_dir=compile_cache_dir, **BASE_ARGS)
    report = second.engine.runner.warmup_report
    assert report.executables == first.engine.runner.warmup_report.executables
    # nothing compiled; the steps (their own closures) load from disk, the sampler programs may
    # also be found in this process's memory
    steps = len(second.engine.runner.buckets.step_shapes())
    assert report.compiled == 0 and report.from_cache >= steps
    prompts = token_prompts([[5, 6, 7, 8, 9], [11, 12]])
    want = [o.outputs[0].token_ids for o in first.generate(prompts, greedy(), use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in second.generate(prompts, greedy(), use_tqdm=False)]
    assert got == want


def test_prompt_logprob_programs_only_when_enabled(make_llm):
    runner = make_llm(ARCH, enable_prompt_logprobs=False).engine.runner
    assert "prompt_logprobs" not in runner.executables.counts()
    assert runner.executables.counts()["step"] == len(runner.buckets.step_shapes())
