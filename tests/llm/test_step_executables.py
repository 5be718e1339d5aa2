"""Every compiled step writes the KV cache in place: no executable copies a whole cache array."""

from __future__ import annotations

import re

ARCH = "LlamaForCausalLM"


def test_no_step_copies_the_kv_cache(make_llm):
    runner = make_llm(ARCH).engine.runner
    k_pages = runner.kv_cache[0][0]  # [num_kv_heads, num_blocks, block_size, head_dim]
    kvh, nb, bs, d = k_pages.shape
    shapes = {f"{kvh},{nb},{bs},{d}", f"{kvh},{nb * bs},{d}"}  # paged and flat views
    copy = re.compile(r"= \w+\[([\d,]+)\]\S* copy\(")
    keys = set(runner.buckets.step_shapes())
    assert keys
    texts = {key: runner.executables.get("step", key).as_text() for key in keys}
    bad = {key: n for key, text in texts.items()
           if (n := sum(m in shapes for m in copy.findall(text)))}
    assert not bad, f"steps that copy a whole KV cache array (shape key: copies): {bad}"
    assert min(key[1] for key in keys) >= 2  # no 1-row step (see runtime/buckets.py)
