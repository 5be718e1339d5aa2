"""Greedy token ids and prompt logprobs of LLM.generate equal HF transformers, every family."""

from __future__ import annotations

import numpy as np
import pytest

from tests.checkpoints import TINY_ARCHS
from tests.llm._hf import NEW_TOKENS
from tests.llm.conftest import greedy, token_prompts

LOGPROB_TOL = 2e-3


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_greedy_and_prompt_logprobs_match_hf(arch, make_llm, hf_refs):
    ref = hf_refs(arch)
    llm = make_llm(arch)
    outs = llm.generate(token_prompts(ref.prompts), greedy(NEW_TOKENS, prompt_logprobs=0),
                        use_tqdm=False)
    for i, (out, prompt) in enumerate(zip(outs, ref.prompts)):
        assert out.prompt_token_ids == prompt
        comp = out.outputs[0]
        assert comp.finish_reason == "length"
        assert comp.token_ids == ref.greedy[i], f"prompt {i} ({len(prompt)} tokens)"
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        ours = np.array([plp[j][prompt[j]].logprob for j in range(1, len(prompt))])
        if len(prompt) > 1:
            err = np.abs(ours - ref.prompt_logprobs[i]).max()
            assert err < LOGPROB_TOL, f"prompt {i}: max |logprob diff| {err:.2e}"
