"""KV cache sizing from a stated memory budget (no model, no compile)."""

from __future__ import annotations

import argparse
import logging

import pytest

from jaxserve import llm
from jaxserve.engine_flags import parse_bytes
from jaxserve.llm import EngineArgs

BLOCK_BYTES = 1 << 20  # 1 MiB per block


def _blocks(caplog, max_useful=10_000, **kwargs):
    with caplog.at_level(logging.INFO, logger="jaxserve.llm"):
        return llm._num_kv_blocks(EngineArgs(model="m", **kwargs), BLOCK_BYTES, max_useful)


def test_explicit_budget_sets_blocks_and_is_logged(caplog):
    assert _blocks(caplog, kv_cache_memory_bytes=300 << 20) == 300
    assert "300 blocks x 16 tokens = 4784 tokens" in caplog.text
    assert "kv_cache_memory_bytes" in caplog.text


def test_cpu_default_is_4gib_capped_by_available_ram(caplog, monkeypatch):
    monkeypatch.setattr(llm, "_available_ram", lambda: 64 << 30)
    assert _blocks(caplog) == 4096  # 4 GiB of 1 MiB blocks
    monkeypatch.setattr(llm, "_available_ram", lambda: 1 << 30)
    assert _blocks(caplog, kv_cache_memory_fraction=0.5) == 512  # half of 1 GiB
    assert "0.5 of available RAM" in caplog.text


def test_budget_is_capped_by_what_requests_can_use(caplog):
    assert _blocks(caplog, max_useful=33, kv_cache_memory_bytes=1 << 30) == 33
    assert "capped at 33 blocks" in caplog.text


def test_num_kv_blocks_overrides_the_budget(caplog):
    assert _blocks(caplog, num_kv_blocks=7, kv_cache_memory_bytes=1 << 30) == 7


@pytest.mark.parametrize("field,kwargs", [
    ("kv_cache_memory_bytes", dict(kv_cache_memory_bytes=0)),
    ("kv_cache_memory_fraction", dict(kv_cache_memory_fraction=1.5)),
])
def test_bad_budget_names_the_field(caplog, field, kwargs):
    with pytest.raises(ValueError, match=field):
        _blocks(caplog, **kwargs)


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1073741824") == 1 << 30
    for bad in ("lots", "-1G", "3 parsecs"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)
