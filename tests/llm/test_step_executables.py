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
    # a 1-row step only where the CPU kernel writes the cache (its copy-free program is checked
    # above); where XLA scatters, one token would copy the cache (see runtime/buckets.py)
    one_row = min(key[1] for key in keys) == 1
    assert one_row == (runner.attention_backend == "cpu"), runner.attention_backend


def test_folded_decode_steps_are_the_mixed_programs(make_llm):
    """Where the buckets give a decode-only step no program of its own, a decode-only and a mixed
    step of the same size lower to the same program (the attention ignores max_query_len)."""
    runner = make_llm(ARCH).engine.runner
    assert not runner.buckets.decode_programs  # blockwise attention on CPU
    s, w = runner.buckets.seqs[-1], runner.buckets.widths[-1]
    decode = runner._lower_step((s, s, w, True)).as_text()
    mixed = runner._lower_step((s, s, w, False)).as_text()
    assert decode == mixed
