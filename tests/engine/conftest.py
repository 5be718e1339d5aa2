"""Shared fixtures for engine tests: a deterministic fake runner with a fake paged KV cache,
a tiny byte-level BPE tokenizer, and engine factories that check the pool is all free after."""

from __future__ import annotations

import numpy as np
import pytest

from dataclasses import dataclass, replace

from jaxserve.engine import EngineConfig, LLMEngine, SamplingParams, SchedulerOutput
from jaxserve.engine.scheduler_output import PLACEHOLDER_TOKEN_ID
from jaxserve.engine.sequence import RequestState, Sequence
from jaxserve.runtime.runner_output import LogprobsRow, ModelRunnerOutput

CORPUS = [
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "the quick brown fox jumps over the lazy dog. stop here please!",
    "héllo wörld, ça va? naïve café crème brûlée.",
    "日本語のテキスト、東京は大きい。日本語を話します。",
    "emoji time 😀😃🎉 and more 🚀 rockets 🚀🚀",
    "привет мир, как дела? всё хорошо.",
    "<tag> some text </tag> END of story. The end.",
] * 3


def next_token(context: list[int], seed: int | None, vocab_size: int, avoid) -> int:
    """The fake model: a deterministic hash of the context (and the seed)."""
    h = 17
    for t in context[-6:]:
        h = (h * 1000003 + int(t) + 1) % (1 << 31)
    h = (h + len(context) * 7919 + (seed or 0) * 104729) % (1 << 31)
    cand = h % vocab_size
    while cand in avoid:
        cand = (cand + 1) % vocab_size
    return cand


def reference_tokens(prompt: list[int], max_tokens: int, vocab_size: int, seed=None,
                     avoid=()) -> list[int]:
    """What the fake runner generates for one sequence, computed without the engine."""
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(tokens, seed, vocab_size, set(avoid))
        tokens.append(t)
        out.append(t)
    return out


@dataclass(eq=False)
class FakeHandle:
    """A step the fake runner has launched (async scheduling): computed at dispatch."""

    output: ModelRunnerOutput
    collected: bool = False


class FakeRunner:
    """Stateless w.r.t. requests; keeps a fake KV cache (token id per slot) written through the
    block tables and samples from what it reads back, so wrong block tables change the output.

    As a PipelinedRunner (async scheduling) it runs a step when it is dispatched, in order, a
    placeholder taking the token the previous step sampled for the request, as a device
    would; collect hands the results over once, in launch order."""

    def __init__(self, config: EngineConfig, avoid=(), script: list[int] | None = None):
        self.config = config
        self.cache = np.full((config.num_kv_blocks, config.block_size), -1, dtype=np.int64)
        self.avoid = set(avoid)
        self.script = script
        self.fail_next = False
        self.num_compilations = 3
        self.steps: list[SchedulerOutput] = []
        self._launched: list[FakeHandle] = []  # not collected yet, oldest first
        self.num_placeholders_filled = 0

    def _slot(self, table: list[int], pos: int) -> tuple[int, int]:
        bs = self.config.block_size
        return table[pos // bs], pos % bs

    def dispatch(self, so: SchedulerOutput, previous: FakeHandle | None) -> FakeHandle:
        if previous is None:
            self._launched.clear()  # the engine dropped them (a runner failure)
        assert previous is (self._launched[-1] if self._launched else None), \
            "previous is not the step launched last"
        filled = sum(PLACEHOLDER_TOKEN_ID in c.token_ids for c in so.chunks)
        if filled:
            assert previous is not None, "a placeholder without a step in flight"
            so = replace(so, chunks=[_fill(c, previous.output) for c in so.chunks])
        self.num_placeholders_filled += filled
        handle = FakeHandle(self.execute(so))
        self._launched.append(handle)
        return handle

    def collect(self, handle: FakeHandle) -> ModelRunnerOutput:
        assert self._launched and handle is self._launched[0], "collected out of launch order"
        self._launched.pop(0)
        return handle.output

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(so)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device on fire")
        assert so.num_batched_tokens == sum(len(c.token_ids) for c in so.chunks)
        assert so.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len(so.chunks) <= self.config.max_num_seqs
        assert len({c.request_id for c in so.chunks}) == len(so.chunks)
        out = ModelRunnerOutput()
        for c in so.chunks:
            self._run_chunk(c, out)
        return out

    def _run_chunk(self, c, out: ModelRunnerOutput) -> None:
        bs = self.config.block_size
        known = c.prompt_token_ids + c.output_token_ids
        end = c.start_pos + len(c.token_ids)
        assert c.token_ids == known[c.start_pos:end], "chunk tokens do not match the sequence"
        assert len(c.block_table) >= -(-end // bs), "block table too short"
        assert 0 not in c.block_table, "null block handed out"
        assert len(c.block_table) <= self.config.max_blocks_per_seq
        assert c.sample == (end == len(known))
        for pos, tok in zip(range(c.start_pos, end), c.token_ids):  # write KV
            b, o = self._slot(c.block_table, pos)
            self.cache[b, o] = tok
        context = [int(self.cache[self._slot(c.block_table, p)]) for p in range(end)]
        assert context == known[:end], "KV read through the block table is wrong"
        params = c.sampling_params
        if params.prompt_logprobs is not None:
            rows = [self._row(c.prompt_token_ids[p + 1], p, params.prompt_logprobs)
                    for p in range(c.start_pos, end) if p + 1 < len(c.prompt_token_ids)]
            out.prompt_logprobs[c.request_id] = rows
        if not c.sample:
            return
        if self.script is not None:
            tok = self.script[len(c.output_token_ids) % len(self.script)]
        else:
            tok = next_token(context, c.seed, self.config.vocab_size,
                             self.avoid | set(c.banned_token_ids))
        out.sampled[c.request_id] = tok
        if params.logprobs is not None:
            out.logprobs[c.request_id] = self._row(tok, end, params.logprobs)

    def _row(self, token: int, pos: int, k: int) -> LogprobsRow:
        v = self.config.vocab_size
        top = [(pos * 31 + j) % v for j in range(k)]
        return LogprobsRow(
            token_ids=[token] + top,
            logprobs=[-0.25 - (token % 5) * 0.1] + [-0.1 * (j + 1) for j in range(k)],
            ranks=[2 + token % 3] + [j + 1 for j in range(k)],
        )


def _fill(chunk, previous: ModelRunnerOutput):
    """The chunk with its placeholder replaced by the token `previous` sampled for it."""
    if PLACEHOLDER_TOKEN_ID not in chunk.token_ids:
        return chunk
    assert chunk.token_ids == [PLACEHOLDER_TOKEN_ID], "a placeholder outside a decode"
    assert chunk.output_token_ids[-1] == PLACEHOLDER_TOKEN_ID
    assert PLACEHOLDER_TOKEN_ID not in chunk.output_token_ids[:-1]
    token = previous.sampled[chunk.request_id]
    return replace(chunk, token_ids=[token], output_token_ids=chunk.output_token_ids[:-1] + [token])


def assert_all_free(engine: LLMEngine) -> None:
    kv = engine.scheduler.kv
    kv.pool.check_consistency()
    stats = engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total == engine.config.num_kv_blocks - 1
    assert kv.num_tracked_sequences == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, object]:
    """Step until done; returns the final RequestOutput per request id."""
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final
                final[out.request_id] = out
        engine.scheduler.kv.pool.check_consistency()
    else:
        raise AssertionError("engine did not finish")
    return final


@pytest.fixture
def async_scheduling() -> bool:
    """The engines' default scheduling mode (modules that test both override this)."""
    return False


@pytest.fixture
def make_engine(async_scheduling):
    """Factory for engines with a FakeRunner; after the test every pool must be all free."""
    engines: list[LLMEngine] = []

    def factory(tokenizer=None, avoid=(), script=None, **overrides) -> LLMEngine:
        cfg = dict(block_size=4, num_kv_blocks=64, max_model_len=64, vocab_size=1000,
                   max_num_seqs=8, max_num_batched_tokens=32, enable_prefix_caching=True,
                   async_scheduling=async_scheduling)
        cfg.update(overrides)
        config = EngineConfig(**cfg)
        engine = LLMEngine(FakeRunner(config, avoid=avoid, script=script), tokenizer, config)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        if engine.has_unfinished_requests():
            engine.abort_request(list(engine.requests))
            engine.step()
        assert_all_free(engine)


@pytest.fixture(scope="session")
def tokenizer():
    """A real byte-level BPE tokenizer trained on a small multi-lingual corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def make_seq(seq_id: str, prompt: list[int], max_tokens: int = 8, arrival: int = 0,
             params: SamplingParams | None = None) -> Sequence:
    """A bare Sequence (for scheduler / KV cache manager tests)."""
    params = params or SamplingParams(max_tokens=max_tokens)
    req = RequestState(seq_id, None, list(prompt), params, 0.0)
    seq = Sequence(seq_id, req, 0, params, params.seed, max_tokens, arrival)
    req.seqs.append(seq)
    return seq
