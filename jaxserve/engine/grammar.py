"""Grammar backend (llguidance): compile constraints once per key, match tokens, fill bitmasks.

Compiled grammars are cached by (kind, canonical text). Compiling runs on this module's own
worker threads with llguidance's fuel limits and a wall-clock bound, so a hostile schema is
refused with an error naming the field instead of stalling the caller.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidRequestError
from .structured_outputs import StructuredOutputsParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrammarConfig:
    """Bounds of the grammar compiler."""

    compile_timeout_s: float = 10.0  # wall clock per compile
    cache_size: int = 256  # compiled grammars kept (LRU)
    compile_threads: int = 2
    mask_threads: int = 2  # llguidance executor threads filling a batch's masks
    max_grammar_size: int = 200_000  # llguidance grammar symbols
    initial_lexer_fuel: int = 2_000_000  # ~50k / ms: bounds lexer construction


def bitmask_width(vocab_size: int) -> int:
    """int32 words of one row of the packed allowed-token bitmask."""
    return (vocab_size + 31) // 32


def _grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar of one constraint."""
    import llguidance

    m = llguidance.LLMatcher
    kind = so.kind
    compact = {"whitespace_flexible": False}
    if kind == "json":
        return m.grammar_from_json_schema(so.schema_text(), defaults=compact)
    if kind == "json_object":
        return m.grammar_from_json_schema({"type": "object"}, defaults=compact)
    if kind == "regex":
        return m.grammar_from_regex(so.regex)
    if kind == "choice":
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice)
        return m.grammar_from_lark(f"start: {alternatives}")
    return m.grammar_from_lark(so.grammar)


class CompiledGrammar:
    """A compiled constraint; new_matcher() gives each sequence its own matcher state."""

    def __init__(self, backend: GrammarBackend, template: Any, key: tuple[str, str]):
        self.backend = backend
        self._template = template  # an llguidance LLMatcher at the start state
        self.key = key

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.backend, self._template.deep_copy())


class GrammarMatcher:
    """One sequence's position in its grammar; advanced with each accepted token."""

    def __init__(self, backend: GrammarBackend, matcher: Any):
        self.backend = backend
        self.matcher = matcher  # llguidance LLMatcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar refuses it (an error state)."""
        return bool(self.matcher.consume_token(int(token_id)))

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and admits no further token."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class GrammarBackend:
    """llguidance over one tokenizer and vocabulary: compile (cached) and fill bitmasks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...],
                 config: GrammarConfig | None = None):
        self.config = config or GrammarConfig()
        self.vocab_size = vocab_size
        self._hf_tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.config.compile_threads, thread_name_prefix="jaxserve-grammar")
        self._executor: Any = None

    # ------------------------------------------------------------------ compiling
    def compile(self, so: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of `so`, from the cache or compiled now (bounded in time).

        Raises InvalidRequestError naming the constraint's field when it does not compile."""
        key = so.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        future = self._pool.submit(self._compile, so, key)
        try:
            compiled = future.result(timeout=self.config.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise InvalidRequestError(so.field, f"took longer than "
                                      f"{self.config.compile_timeout_s}s to compile") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, so: StructuredOutputsParams, key: tuple[str, str]) -> CompiledGrammar:
        import llguidance

        try:
            grammar = _grammar_text(so)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(so.field, f"invalid: {exc}") from None
        limits = llguidance.LLParserLimits(max_grammar_size=self.config.max_grammar_size,
                                           initial_lexer_fuel=self.config.initial_lexer_fuel,
                                           verbose_errors=False)
        tok = self.llg_tokenizer()
        err = llguidance.LLMatcher.validate_grammar(grammar, tok, limits=limits)
        if err:
            raise InvalidRequestError(so.field, f"invalid: {_first_line(err)}")
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise InvalidRequestError(so.field, f"invalid: {_first_line(matcher.get_error())}")
        return CompiledGrammar(self, matcher, key)

    def llg_tokenizer(self) -> Any:
        """The llguidance view of the tokenizer (built once: about a second for a large vocab)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                n = len(self._hf_tokenizer)
                if n > self.vocab_size:
                    raise ValueError(f"the tokenizer has {n} tokens, more than the model's "
                                     f"vocab_size {self.vocab_size}")
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._tokenizer

    # ------------------------------------------------------------------ masks
    def fill_bitmasks(self, items: list[tuple[GrammarMatcher, int, list[int]]],
                      bitmask: np.ndarray) -> None:
        """Write each matcher's allowed tokens into its rows of `bitmask` (int32 [R, W], bit
        t % 32 of word t // 32 set = token t allowed), in parallel on llguidance's threads.

        items: (matcher, row, drafts): with d drafts, rows row .. row + d get the masks after
        each draft prefix (speculative decoding); the matcher's state is left unchanged."""
        import llguidance
        import llguidance.numpy as lnp

        if self._executor is None:
            self._executor = llguidance.LLExecutor(self.config.mask_threads)
        plain = [(m.matcher, row) for m, row, drafts in items if not drafts]
        spec = [(m.matcher, row, list(drafts)) for m, row, drafts in items if drafts]
        if plain:
            lnp.fill_next_token_bitmask_par(self._executor, plain, bitmask)
        if spec:
            lnp.fill_next_token_bitmask_par_with_draft_tokens(self._executor, spec, bitmask)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:500] if message.strip() else "rejected"
