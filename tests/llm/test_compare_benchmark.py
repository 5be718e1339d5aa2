"""benchmarks/compare.py: checkpoints vs transformers, seeded workloads, floor and ratios, one
end-to-end run with the HF engine (vLLM lives in its own venv and is not exercised here)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.llm.test_throughput_benchmark import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import compare_report, compare_workloads  # noqa: E402
from benchmarks.compare_models import MODELS, build_tokenizer, ensure_checkpoint  # noqa: E402


def test_tokenizer_has_the_model_vocab_and_round_trips(tmp_path):
    tok = build_tokenizer(str(tmp_path), 400)
    assert len(tok) == 400
    ids = tok("hello, wörld", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "hello, wörld"
    assert isinstance(tok.decode(list(range(7, 400))), str)  # every id decodes


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_count_matches_transformers(name):
    import torch
    import transformers

    shape = MODELS[name]
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert model.num_parameters() == shape.num_params()
    if name == "small":
        assert 207e6 < shape.num_params() < 208e6


def test_checkpoint_loads_in_transformers(tmp_path):
    import torch
    import transformers

    path = ensure_checkpoint(str(tmp_path), "tiny", "bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.num_parameters() == MODELS["tiny"].num_params()
    assert ensure_checkpoint(str(tmp_path), "tiny", "bfloat16") == path  # reused, not rewritten


def test_workloads_are_seeded_and_fresh_per_repeat():
    cfg = compare_workloads.WorkloadConfig(repeats=2, decode_repeats=2, mixed_num_prompts=5,
                                           prefix_num_prompts=3, prefix_len=40)
    names = list(compare_workloads.WORKLOADS)
    a = compare_workloads.build(names, cfg, 500, seed=1)
    assert a == compare_workloads.build(names, cfg, 500, seed=1)
    assert a != compare_workloads.build(names, cfg, 500, seed=2)
    decode, mixed, prefix = a
    assert decode["repeats"][0] != decode["repeats"][1]
    assert len(decode["prefill_probe"][0][0]["prompt_token_ids"]) == cfg.decode_input
    for req in mixed["repeats"][0]:
        assert 32 <= len(req["prompt_token_ids"]) <= 256 and 16 <= req["max_tokens"] <= 128
        assert min(req["prompt_token_ids"]) >= 16 and max(req["prompt_token_ids"]) < 500
    heads = {tuple(r["prompt_token_ids"][:40]) for r in prefix["repeats"][0]}
    assert len(heads) == 1 and len(prefix["repeats"][0][0]["prompt_token_ids"]) == 56
    assert prefix["repeats"][0][0]["prompt_token_ids"][:40] != \
        prefix["repeats"][1][0]["prompt_token_ids"][:40]


def test_floor_and_ratios():
    floor = compare_report.decode_floor("small", "bfloat16", {"input": 128, "output": 256}, 70.0)
    # tied: every parameter read once; KV: 2 (k, v) x 12 layers x 2 heads x 64 x 2 bytes x 256
    assert floor["weight_bytes_per_step"] == MODELS["small"].num_params() * 2
    assert floor["kv_bytes_per_step"] == 2 * 12 * 2 * 64 * 2 * 256
    assert floor["floor_ms"] == pytest.approx(
        1e3 * (floor["weight_bytes_per_step"] + floor["kv_bytes_per_step"]) / 70e9, abs=1e-3)
    rows = [
        {"engine": "jaxserve", "model": "m", "dtype": "d", "workload": "decode",
         "output_tokens_per_s": 100.0, "decode_ms_per_token": 10.0},
        {"engine": "vllm", "model": "m", "dtype": "d", "workload": "decode",
         "output_tokens_per_s": 50.0, "decode_ms_per_token": 20.0},
        {"engine": "vllm", "model": "m", "dtype": "d", "workload": "mixed",
         "output_tokens_per_s": 50.0},
    ]
    compare_report.add_ratios(rows)
    assert rows[0]["output_tps_ratio_vs"] == {"vllm": 2.0}
    assert rows[0]["decode_speedup_vs"] == {"vllm": 2.0}
    assert rows[1]["decode_speedup_vs"] == {"jaxserve": 0.5}
    assert rows[2]["output_tps_ratio_vs"] == {}


def test_compare_runs_end_to_end_with_hf(tmp_path, capsys):
    import importlib

    compare = importlib.import_module("benchmarks.compare")
    out = tmp_path / "r.json"
    report = compare.main([
        "--models", "tiny", "--dtypes", "float32", "--engines", "hf", "--workloads",
        "decode,mixed", "--decode-input", "8", "--decode-output", "4", "--decode-repeats", "1",
        "--mixed-num-prompts", "3", "--mixed-input", "4..9", "--mixed-output", "2..5",
        "--checkpoint-dir", str(tmp_path / "ck"), "--probe-mib", "64", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"].endswith(f"--out {out}") and saved["git_commit"]
    rows = {r["workload"]: r for r in saved["rows"]}
    assert set(rows) == {"decode", "mixed"} and report["rows"] == saved["rows"]
    assert rows["decode"]["num_output_tokens"] == 4 and rows["decode"]["floor_ms"] > 0
    assert rows["mixed"]["num_prompts"] == 3 and rows["mixed"]["output_tokens_per_s"] > 0
    assert saved["runs"][0]["bandwidth"]["read_gbs_best"] > 0
    assert saved["matmul"]["jax_bf16_gflops"] > 0
    printed = capsys.readouterr().out
    assert "decode ms/token" in printed and '"engine": "hf"' in printed
