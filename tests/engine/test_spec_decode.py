"""Speculative decoding in the engine layer (no jax): n-gram proposer, config parsing, and the
scheduler's draft slots and rollback, checked against a run without speculation."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine import EngineConfig, LLMEngine, SamplingParams
from jaxserve.engine.proposers import DRAFT_PLACEHOLDER, NgramProposer, make_proposer
from jaxserve.engine.spec_config import SpeculativeConfig, parse_speculative_config
from jaxserve.runtime.runner_output import ModelRunnerOutput

from tests.engine.conftest import FakeRunner, assert_all_free, next_token, run_to_completion


# ---------------------------------------------------------------- config and proposer
def test_parse_vllm_dict_and_json():
    cfg = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 4, '
                                   '"prompt_lookup_max": 3, "prompt_lookup_min": 2}')
    assert cfg == SpeculativeConfig("ngram", 4, 3, 2)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2,
                                     "prompt_lookup_max": 4}) == SpeculativeConfig("ngram", 2, 4, 4)
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize("value, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tp": 1}, "unknown key"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"num_speculative_tokens": 2}, "method"),
    ("{not json", "JSON"),
    ([1, 2], "dict"),
])
def test_bad_config_names_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        parse_speculative_config(value)


def test_draft_model_config():
    with pytest.raises(ValueError, match="speculative_config.model: required"):
        SpeculativeConfig(method="draft_model")
    cfg = parse_speculative_config('{"method": "draft_model", "model": "/d", '
                                   '"num_speculative_tokens": 4}')
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("draft_model", "/d", 4)


def test_draft_model_proposer_reserves_placeholders():
    prop = make_proposer(SpeculativeConfig("draft_model", 3, model="/d"))
    assert prop.propose([1, 2, 3], 5) == [DRAFT_PLACEHOLDER] * 3  # the runner drafts them
    assert prop.propose([1], 2) == [DRAFT_PLACEHOLDER] * 2


def test_ngram_proposer():
    prop = NgramProposer(SpeculativeConfig("ngram", 3, 3, 1))
    #        0  1  2  3  4  5  6  7  8
    seq = [5, 6, 7, 8, 9, 5, 6, 7]
    assert prop.propose(seq, 3) == [8, 9, 5]  # "5 6 7" matched at 0
    assert prop.propose(seq, 2) == [8, 9]
    assert prop.propose(seq + [1], 3) == []  # "1" occurs nowhere before
    assert prop.propose([1, 2, 1, 3, 1], 3) == [2, 1, 3]  # no match with 3 after: earliest
    assert prop.propose([4, 4, 4, 4], 2) == [4]  # the longest n-gram (3) wins
    assert prop.propose([1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2], 1) == [5]  # most recent
    assert prop.propose([7], 3) == []
    long_only = NgramProposer(SpeculativeConfig("ngram", 2, 3, 3))
    assert long_only.propose([1, 2, 9, 1, 2], 2) == []  # no 3-gram match, min 3


def _lookup_by_definition(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup spelled out: for n from n_max down, every earlier window equal to the
    last n tokens; the most recent with k tokens after it, else the earliest."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n:]
        starts = [s for s in range(len(tokens) - n) if tokens[s: s + n] == suffix]
        if starts:
            full = [s for s in starts if s + n + k <= len(tokens)]
            after = (full[-1] if full else starts[0]) + n
            return tokens[after: after + k]
    return []


@pytest.mark.parametrize("n_max,n_min", [(4, 1), (3, 2), (5, 5), (2, 1)])
def test_ngram_proposer_matches_the_definition(n_max, n_min):
    rng = np.random.default_rng(n_max * 10 + n_min)
    prop = NgramProposer(SpeculativeConfig("ngram", 6, n_max, n_min))
    for _ in range(2000):
        vocab = int(rng.integers(2, 6))  # small vocabularies: many, and long, matches
        tokens = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        k = int(rng.integers(1, 7))
        assert prop.propose(tokens, k) == _lookup_by_definition(tokens, k, n_max, n_min), tokens


# ---------------------------------------------------------------- engine with a fake model
def copy_model(context: list[int], seed, vocab_size: int, avoid) -> int:
    """A fake model that mostly repeats the token 5 back (n-gram drafts then often match) and
    sometimes says a hash of the context (drafts get rejected); depends on the context only."""
    h = next_token(context, seed, vocab_size, avoid)
    if len(context) >= 5 and h % 4 != 0 and context[-5] not in avoid:
        return context[-5]
    return h


class FakeSpecRunner(FakeRunner):
    """The fake runner, verifying draft tokens greedily against copy_model. KV of every
    scheduled position, drafts included, is written through the block table and read back."""

    def _run_chunk(self, c, out: ModelRunnerOutput) -> None:
        if not c.spec_token_ids:
            return self._plain_chunk(c, out)
        bs = self.config.block_size
        known = c.prompt_token_ids + c.output_token_ids
        assert c.sample and c.start_pos == len(known) - 1
        assert c.token_ids == [known[-1]] + c.spec_token_ids
        end = c.start_pos + len(c.token_ids)
        assert len(c.block_table) >= -(-end // bs), "no slots for the drafts"
        for pos, tok in zip(range(c.start_pos, end), c.token_ids):
            b, o = self._slot(c.block_table, pos)
            self.cache[b, o] = tok
        context = [int(self.cache[self._slot(c.block_table, p)]) for p in range(end)]
        assert context == known + c.spec_token_ids, "KV read through the block table is wrong"
        avoid = self.avoid | set(c.banned_token_ids)
        tokens = []
        for j, draft in enumerate(c.spec_token_ids + [None]):
            target = copy_model(context[: len(known) + j], c.seed, self.config.vocab_size, avoid)
            tokens.append(target)
            if target != draft:
                break
        out.sampled[c.request_id] = tokens[0]
        out.spec_tokens[c.request_id] = tokens
        if c.sampling_params.logprobs is not None:
            k = c.sampling_params.logprobs
            out.spec_logprobs[c.request_id] = [
                self._row(t, len(known) + j, k) for j, t in enumerate(tokens)]

    def _plain_chunk(self, c, out: ModelRunnerOutput) -> None:
        super()._run_chunk(c, out)
        if c.sample and self.script is None:
            end = c.start_pos + len(c.token_ids)
            context = c.prompt_token_ids + c.output_token_ids
            tok = copy_model(context[:end], c.seed, self.config.vocab_size,
                             self.avoid | set(c.banned_token_ids))
            out.sampled[c.request_id] = tok
            if c.sampling_params.logprobs is not None:
                out.logprobs[c.request_id] = self._row(tok, end, c.sampling_params.logprobs)


@pytest.fixture
def engine_pair():
    """factory(**overrides) -> (engine without speculation, engine with n-gram k=4)."""
    engines = []

    def factory(**overrides):
        cfg = dict(block_size=4, num_kv_blocks=64, max_model_len=64, vocab_size=1000,
                   max_num_seqs=8, max_num_batched_tokens=32, enable_prefix_caching=True)
        cfg.update(overrides)
        pair = []
        for spec in (None, SpeculativeConfig("ngram", 4, 3, 1)):
            config = EngineConfig(**cfg, speculative=spec)
            pair.append(LLMEngine(FakeSpecRunner(config), None, config))
        engines.extend(pair)
        return pair

    yield factory
    for engine in engines:
        assert_all_free(engine)


PROMPTS = [[(i * 7 + j * 3) % 50 + 10 for j in range(5 + 4 * i)] for i in range(6)]


def _outputs(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params[i % len(params)])
    final = run_to_completion(engine)
    return {rid: [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
                  for c in out.outputs] for rid, out in final.items()}


@pytest.mark.parametrize("overrides", [
    {},
    dict(num_kv_blocks=17, max_model_len=64, max_num_seqs=4),  # 16 blocks of 4: preemption
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=6),  # chunked prefill; drafts squeezed by the budget
    dict(max_num_seqs=1),
])
def test_same_tokens_as_without_speculation(engine_pair, overrides):
    plain, spec = engine_pair(**overrides)
    prompts = PROMPTS + [PROMPTS[3][:9] + [7, 7], PROMPTS[3]]  # shared prefixes too
    params = [SamplingParams(max_tokens=30, ignore_eos=True),
              SamplingParams(max_tokens=17, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=25, n=2, seed=3, ignore_eos=True)]
    assert _outputs(spec, prompts, params) == _outputs(plain, prompts, params)
    s = spec.get_stats().spec_decoding
    assert s.num_drafts > 0 and 0 < s.num_accepted_tokens < s.num_draft_tokens
    assert s.num_accepted_tokens_per_pos[0] >= s.num_accepted_tokens_per_pos[-1] > 0
    assert plain.get_stats().spec_decoding is None
    if overrides.get("num_kv_blocks") == 17:
        assert spec.get_stats().num_preemptions > 0
    budget = spec.config.max_num_batched_tokens
    assert all(so.num_batched_tokens <= budget for so in spec.runner.steps)


def test_stops_inside_accepted_drafts(engine_pair):
    """A stop id, EOS, a min_tokens ban and max_tokens landing among accepted tokens end the
    output exactly where the plain engine ends it."""
    plain, spec = engine_pair(eos_token_ids=(13,))
    ref = _outputs(plain, [PROMPTS[2]], [SamplingParams(max_tokens=40, ignore_eos=True)])
    tokens = ref["r0"][0][0]
    stop_id = tokens[20]
    params = [SamplingParams(max_tokens=40, stop_token_ids=[stop_id], ignore_eos=True),
              SamplingParams(max_tokens=40, stop_token_ids=[stop_id], min_tokens=25,
                             ignore_eos=True),
              SamplingParams(max_tokens=23, ignore_eos=True),
              SamplingParams(max_tokens=40)]
    prompts = [PROMPTS[2]] * 4
    assert _outputs(spec, prompts, params) == _outputs(plain, prompts, params)
    assert spec.get_stats().spec_decoding.num_accepted_tokens > 0


def test_rejected_blocks_return_to_the_pool(engine_pair):
    """While running, a sequence holds only the blocks its tokens need (no draft slots)."""
    _, spec = engine_pair()
    spec.add_request("a", PROMPTS[4], SamplingParams(max_tokens=30, ignore_eos=True))
    kv = spec.scheduler.kv
    while spec.has_unfinished_requests():
        spec.step()
        for seq in spec.scheduler.running:
            held = kv.num_blocks_of(seq)
            assert -(-seq.num_computed_tokens // kv.block_size) <= held
            assert held <= -(-seq.num_tokens // kv.block_size)
            assert seq.num_computed_tokens == seq.num_tokens - 1
    assert spec.get_stats().spec_decoding.num_drafts > 0


def test_abort_mid_speculation(engine_pair):
    _, spec = engine_pair()
    for i in range(3):
        spec.add_request(f"r{i}", PROMPTS[i + 1], SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(6):
        spec.step()
    spec.abort_request(["r0", "r2"])
    final = run_to_completion(spec)
    assert final["r0"].outputs[0].finish_reason == "abort"
    assert final["r1"].outputs[0].finish_reason == "length"
    assert len(final["r1"].outputs[0].token_ids) == 40


def test_engine_args_and_cli_flag():
    import argparse

    from jaxserve.engine_flags import add_engine_args, engine_args_from
    from jaxserve.llm import EngineArgs

    parser = add_engine_args(argparse.ArgumentParser())
    parser.add_argument("model")
    ns = parser.parse_args(["m", "--speculative-config",
                            '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert engine_args_from(ns).speculative_config == SpeculativeConfig("ngram", 3, 5, 5)
    assert engine_args_from(parser.parse_args(["m"])).speculative_config is None
    with pytest.raises(ValueError, match="speculative_config.method"):
        EngineArgs(model="m", speculative_config={"method": "medusa", "num_speculative_tokens": 2})
