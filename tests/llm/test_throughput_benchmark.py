"""benchmarks/throughput.py: KV-waste arithmetic, and one small run of jaxserve and HF."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from types import SimpleNamespace

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kv_usage_counts_partial_and_shared_blocks():
    probe = _load("throughput_probe")
    a = SimpleNamespace(seq_id="a", num_computed_tokens=20)  # 20 tokens in 2 blocks of 16
    b = SimpleNamespace(seq_id="b", num_computed_tokens=0)  # being prefilled: 33 tokens
    c = SimpleNamespace(seq_id="c", num_computed_tokens=17)  # shares a's first block
    tables = {"a": [1, 2], "b": [3, 4, 5], "c": [1, 6]}
    kv = SimpleNamespace(block_size=16, get_block_ids=lambda s: tables[s.seq_id])
    sched = SimpleNamespace(kv=kv, running=[a, b, c])
    out = SimpleNamespace(chunks=[SimpleNamespace(request_id="b", start_pos=0,
                                                  token_ids=[0] * 33)])
    usage = probe.KVUsage()
    probe.sample_kv_usage(sched, out, usage)
    assert usage.allocated_slots == 6 * 16  # blocks 1..6, block 1 once
    assert usage.filled_slots == 16 + 4 + 33 + 1
    assert usage.peak_blocks == 6
    assert abs(usage.waste_pct - 100 * (1 - 54 / 96)) < 1e-9


def test_hf_static_batch_waste():
    bench = _load("throughput")
    reqs = [bench.Request([1] * 4, 2), bench.Request([1] * 2, 1)]
    batches = bench.hf_batches(reqs, 2)
    assert batches == [[1, 0]]
    waste, peak = bench.hf_kv_usage(reqs, batches, n=1)
    # t=0: 2 rows x 4 slots, filled 4 + 2; t=1: 2 x 5 slots, filled 5 + 3.
    assert abs(waste - 100 * (1 - 14 / 18)) < 1e-9 and peak == 12


def test_hf_output_tokens_are_counted_from_what_was_generated():
    """Rows that end early (EOS, then pads) or that generate fewer tokens than asked count what
    they generated; a row past its request's length counts only the request's tokens."""
    bench = _load("throughput")
    eos, pad = 2, 0
    rows = [[5, 6, 7, 8], [5, eos, pad, pad], [9, 9, 9, 9]]
    assert bench.count_generated(rows, [4, 4, 2], {eos}) == 4 + 2 + 2
    assert bench.count_generated([[5, 6]], [4], {eos}) == 2  # generated fewer than asked
    assert bench.count_generated([[5, 6]], [4], set()) == 2


def test_benchmark_runs_both_backends(demo_model_path, compile_cache_dir, tmp_path, capsys):
    bench = _load("throughput")
    out_json = tmp_path / "result.json"
    rows = bench.main([
        "--model", demo_model_path, "--dataset", "rand-var", "--num-prompts", "6",
        "--min-input-len", "5", "--input-len", "40", "--min-output-len", "2",
        "--output-len", "9", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
        "--block-size", "8", "--compare", "hf", "--hf-max-batch-size", "4",
        "--compilation-cache-dir", compile_cache_dir, "--output-json", str(out_json)])
    assert [r["backend"] for r in rows] == ["jaxserve", "hf"]
    for row in rows:
        assert row["num_output_tokens"] == row["expected_output_tokens"]
        assert row["output_tokens_per_s"] > 0 and 0 <= row["kv_waste_pct"] < 100
    assert 0 < rows[0]["peak_kv_usage"] <= 1
    printed = capsys.readouterr().out
    assert printed.count('"backend": ') == 2 and "jaxserve / hf:" in printed
    assert len(json.loads(out_json.read_text())["results"]) == 2
