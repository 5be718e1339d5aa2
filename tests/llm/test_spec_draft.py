"""Draft-model speculative decoding on the real runner: greedy output equals HF transformers and
the same engine without speculation token for token (preemption, chunked prefill, prefix
caching); seeded sampling reproducible; nothing compiles while serving; a draft with another
vocabulary is refused."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine import SamplingParams
from jaxserve.runtime import spec_decode
from jaxserve.runtime.draft_model import with_drafts
from tests.checkpoints import write_tiny_checkpoint, write_truncated_draft
from tests.llm.conftest import BASE_ARGS, greedy, token_prompts
from tests.llm.test_no_recompile import _varied_params, count_backend_compiles
from tests.llm.test_spec_decode import _copy_heavy_prompts, check_pressure_workload


@pytest.fixture(scope="module")
def draft_spec(tiny_checkpoints, tmp_path_factory):
    """arch -> speculative_config of a 1-layer draft cut from the tiny target (same tokenizer,
    embeddings and lm_head: it agrees with its target often, not always)."""
    cache: dict[str, dict] = {}

    def get(arch: str = "LlamaForCausalLM", k: int = 3) -> dict:
        if arch not in cache:
            out = str(tmp_path_factory.mktemp(f"draft-{arch}"))
            cache[arch] = write_truncated_draft(tiny_checkpoints(arch), out)
        return {"method": "draft_model", "model": cache[arch], "num_speculative_tokens": k}

    return get


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_greedy_equals_hf(arch, make_llm, hf_refs, draft_spec):
    ref = hf_refs(arch)
    blocks = {"num_kv_blocks": 33} if arch == "LlamaForCausalLM" else {}  # one engine less
    llm = make_llm(arch, speculative_config=draft_spec(arch), **blocks)
    outs = llm.generate(token_prompts(ref.prompts), greedy(12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref.greedy
    s = llm.stats().spec_decoding
    assert s.num_drafts > 0 and 0 < s.num_accepted_tokens < s.num_draft_tokens


def test_greedy_equals_plain_engine_under_pressure(make_llm, draft_spec):
    """6 requests on 4 seats and 32 blocks: preemption (the draft's cache is rebuilt with the
    target's), chunked prefill (the draft runs the same chunks) and prefix hits (blocks the
    draft filled when they were first computed); penalties, logprobs, n > 1, a stop token."""
    plain = make_llm()
    spec = make_llm(speculative_config=draft_spec(), num_kv_blocks=33)
    after = check_pressure_workload(plain, spec)
    s = after.spec_decoding
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    assert len(s.num_accepted_tokens_per_pos) == 3


def test_a_draft_equal_to_its_target_is_always_accepted(make_llm, tiny_checkpoints):
    """The target as its own draft: q == p, so every draft is accepted, sampled or greedy
    (min(1, p/q) = 1), and greedy output is unchanged."""
    path = tiny_checkpoints("LlamaForCausalLM")
    spec = make_llm(speculative_config={"method": "draft_model", "model": path,
                                        "num_speculative_tokens": 3})
    prompts = token_prompts([list(range(4, 30)), list(range(50, 61))])
    sampled = SamplingParams(temperature=0.9, top_k=50, max_tokens=16, ignore_eos=True, seed=3)
    before = spec.stats().spec_decoding
    got = spec.generate(prompts, [greedy(16), sampled], use_tqdm=False)
    after = spec.stats().spec_decoding
    drafted = after.num_draft_tokens - before.num_draft_tokens
    assert drafted > 0 and after.num_accepted_tokens - before.num_accepted_tokens == drafted
    want = make_llm().generate(prompts[0], greedy(16), use_tqdm=False)[0].outputs[0].token_ids
    assert got[0].outputs[0].token_ids == want


def test_seeded_sampling_is_reproducible(make_llm, draft_spec):
    """Alone, again, and in a batch (no block pressure, decodes first: the seeded request gets
    the same number of drafts at every step, and its draws are keyed by seed and position)."""
    spec = make_llm(speculative_config=draft_spec(), num_kv_blocks=33)
    rng = np.random.default_rng(1)
    prompts = token_prompts([rng.integers(4, 400, n).tolist() for n in (20, 17, 9)])
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7, max_tokens=24,
                        ignore_eos=True)
    alone = spec.generate(prompts[0], sp, use_tqdm=False)[0].outputs[0].token_ids
    again = spec.generate(prompts[0], sp, use_tqdm=False)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batch = spec.generate(prompts, [sp, noisy, noisy], use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again == batch


def test_serving_compiles_nothing(make_llm, draft_spec):
    spec = make_llm(speculative_config=draft_spec(), num_kv_blocks=33)
    rng = np.random.default_rng(3)
    params = _varied_params(rng)
    vocab = spec.engine.config.vocab_size
    lens = [1, 2, 7, 8, 9, 16, 17, 31, 33, 64, 100, 107, 3]
    prompts = token_prompts([rng.integers(4, 400, n).tolist() for n in lens[:6]]
                            + _copy_heavy_prompts(vocab, len(lens) - 6, seed=2))
    with count_backend_compiles() as seen:
        spec.generate(prompts, params, use_tqdm=False)
        for p, sp in zip(prompts, params):
            spec.generate(p, sp, use_tqdm=False)
    assert seen == [], f"{len(seen)} backend compiles after start-up"
    assert spec.stats().spec_decoding.num_accepted_tokens > 0


def test_mismatched_draft_is_refused(tiny_checkpoints, tmp_path):
    from jaxserve.llm import LLM

    other = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "other"),
                                  vocab_size=600, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"speculative_config.model: the draft's vocab_size "
                                         r"600 differs from the target's \d+"):
        LLM(tiny_checkpoints("LlamaForCausalLM"), **BASE_ARGS,
            speculative_config={"method": "draft_model", "model": other,
                                "num_speculative_tokens": 2})


def test_draft_with_another_tokenizer_is_refused():
    from types import SimpleNamespace

    from jaxserve.runtime.draft_model import check_draft_compatible

    cfg = SimpleNamespace(vocab_size=4, max_position_embeddings=64)
    same = {"a": 0, "b": 1, "c": 2, "d": 3}
    check_draft_compatible(cfg, cfg, 64, same, dict(same))
    check_draft_compatible(cfg, cfg, 64, same, None)  # a draft without tokenizer: size only
    with pytest.raises(ValueError,
                       match="the draft.s tokenizer differs .*2 tokens with another id"):
        check_draft_compatible(cfg, cfg, 64, same, {"a": 0, "b": 1, "c": 3, "d": 2})
    with pytest.raises(ValueError, match="max_position_embeddings 64 is below max_model_len"):
        check_draft_compatible(cfg, cfg, 128)


def test_the_proposal_places_its_drafts_on_device_as_the_host_would(make_llm, draft_spec):
    """The verification step takes the step's tokens and each logit row's draft straight from
    the proposal (no host round trip): both equal what the host builds from the drafts, the
    placeholders replaced in order and one draft per row after each chunk's first."""
    spec = make_llm(speculative_config=draft_spec(k=3), num_kv_blocks=33)
    draft = spec.engine.runner.draft
    run, checked = draft.run, []

    def checking_run(executable, token_ids, md, layout, chunks, smd):
        drafts, q_rows, filled, draft_ids = run(executable, token_ids, md, layout, chunks, smd)
        host_drafts = np.asarray(drafts)
        want = np.array(token_ids)
        qsl = np.asarray(md.query_start_loc)
        for i, c in enumerate(chunks):
            d = len(c.spec_token_ids)
            want[qsl[i + 1] - d: qsl[i + 1]] = host_drafts[i, :d]
        np.testing.assert_array_equal(np.asarray(filled), want)
        host_layout = spec_decode.build_layout(with_drafts(chunks, host_drafts), qsl,
                                               len(layout.logits_indices))
        np.testing.assert_array_equal(np.asarray(draft_ids), host_layout.draft_ids)
        checked.append(sum(len(c.spec_token_ids) for c in chunks))
        return drafts, q_rows, filled, draft_ids

    draft.run = checking_run
    try:
        prompts = token_prompts([[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [7, 8, 9], [11, 12, 13, 14, 15]])
        spec.generate(prompts, greedy(10), use_tqdm=False)
    finally:
        del draft.run
    assert any(n > 3 for n in checked)  # steps where several requests drafted
    stats = spec.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
