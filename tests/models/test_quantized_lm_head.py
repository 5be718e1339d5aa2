"""quantize_lm_head: the quantized lm_head (and tied table) against the float model holding the
dequantized weights (HF transformers, float32), its decode kernel path, bytes and refusals."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.layers.quant_scheme import QuantizationError, dequantize
from jaxserve.weights.loader import load_model
from tests.models.forward import paged_logits
from tests.models.test_hf_parity import assert_close, hf_logits, make_prompts
from tests.quant_checkpoints import edit_quant_config, write_compressed, write_dequantized_copy

RTOL = 1e-4


# Qwen2's and Gemma's (scaled embeddings) tiny checkpoints tie their embeddings, Llama's not.
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "GemmaForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_quantized_lm_head_equals_float_model_on_dequantized_lm_head(arch, method,
                                                                    tiny_checkpoints, tmp_path):
    path = tiny_checkpoints(arch)
    loaded = load_model(path, dtype="float32", quantization=method, quantize_lm_head=True)
    model = loaded.model
    if loaded.config.tie_word_embeddings:
        assert type(model.embed_tokens).__name__ == "QuantizedEmbedding"
        assert "embedding" not in vars(model.embed_tokens)  # no float copy of the table
    else:
        assert type(model.lm_head).__name__ == "QuantizedLinear"
        assert type(model.embed_tokens).__name__ == "Embedding"
    prompts = make_prompts(loaded.config.vocab_size)[:3]
    ours = paged_logits(loaded, prompts)
    oracle = hf_logits(write_dequantized_copy(path, str(tmp_path / "deq"), method, lm_head=True),
                       prompts)
    assert_close(ours, oracle, RTOL)
    # Teeth: the float lm_head (only the projections dequantized) is well past that bound.
    float_head = hf_logits(write_dequantized_copy(path, str(tmp_path / "deq0"), method),
                           prompts[:1])[0]
    assert np.abs(ours[0] - float_head).max() / np.abs(float_head).max() > 10 * RTOL


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_decode_logits_run_the_quantized_kernel(arch, method, tiny_checkpoints):
    """bf16 with the CPU kernels: a decode step's logits come from the C++ kernel (on a CPU that
    takes the packed-weight kernel: that one, on the packed head; else matvec_quant.cc) and
    equal the dequantized weight's float product."""
    from jaxserve.cpu_kernels import packed_matmul
    from jaxserve.layers.linear import select_cpu_matvec

    if not select_cpu_matvec("auto"):
        pytest.skip("the CPU kernels do not build here")
    loaded = load_model(tiny_checkpoints(arch), dtype="bfloat16", quantization=method,
                        quantize_lm_head=True, cpu_matvec=True)
    model = loaded.model
    head = model.embed_tokens if loaded.config.tie_word_embeddings else model.lm_head
    hidden = jax.random.normal(jax.random.key(0), (3, loaded.config.hidden_size), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(model.compute_logits)(hidden))
    packed = packed_matmul.available()
    assert head.packed == packed
    assert ("jaxserve_cpu_packed_matmul" if packed else "jaxserve_cpu_matvec_quant") in jaxpr
    logits = np.asarray(jax.jit(model.compute_logits)(hidden))  # [3, vocab] f32
    vocab, dim = loaded.config.vocab_size, loaded.config.hidden_size
    if packed:
        width = dim // 2 if method == "int4" else dim  # int4: two inputs per byte
        q = packed_matmul.unpack(np.asarray(head.qweight[...]), vocab, width)  # [vocab, width]
        scales = packed_matmul.unpack_scales(np.asarray(head.scales[...]), vocab)
        scales = scales.reshape(vocab, -1)  # [vocab, G]
    else:
        q, scales = np.asarray(head.qweight[...]), np.asarray(head.scales[...])
    w = dequantize(method, q, scales)
    want = np.asarray(hidden, np.float32) @ w.T  # [3, vocab]
    assert logits.shape == want.shape
    # packed: exact products of the bf16 hidden state and the integers, f32 sums scaled once
    # (int4: once per group), never rounded, so only summation order differs
    bound = 1e-5 if packed else 1e-2
    assert np.abs(logits - want).max() <= bound * np.abs(want).max()


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_packed_tied_table_looks_up_the_dequantized_rows(method, tiny_checkpoints):
    """The tied table packed for the kernel (vocab 500: 32 panels, stored in groups of 8)
    serves token lookups: each row is its dequantized weight row, rounded once to bf16."""
    import ml_dtypes

    from jaxserve.cpu_kernels import packed_matmul
    from jaxserve.layers.linear import select_cpu_matvec

    if not (select_cpu_matvec("auto") and packed_matmul.available()):
        pytest.skip("this CPU does not take the packed-weight kernel")
    loaded = load_model(tiny_checkpoints("Qwen2ForCausalLM"), dtype="bfloat16",
                        quantization=method, quantize_lm_head=True, cpu_matvec=True)
    table = loaded.model.embed_tokens
    assert table.packed and table.qweight[...].ndim == 4  # grouped panels
    vocab, dim = loaded.config.vocab_size, loaded.config.hidden_size
    width = dim // 2 if method == "int4" else dim
    q = packed_matmul.unpack(np.asarray(table.qweight[...]), vocab, width)
    scales = packed_matmul.unpack_scales(np.asarray(table.scales[...]), vocab).reshape(vocab, -1)
    want = dequantize(method, q, scales).astype(ml_dtypes.bfloat16)  # [vocab, dim]
    ids = np.array([0, 1, 15, 16, 127, 128, 255, 256, 383, 499])  # across panels and groups
    got = np.asarray(jax.jit(table)(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_array_equal(got, want[ids])


def test_weight_bytes_include_the_quantized_lm_head(tiny_checkpoints, caplog):
    """A model where the tied table is ~10% of the weights: int8 with the lm_head is at most
    0.52x bf16 (one table, no float copy); without it, above."""
    path = tiny_checkpoints("Qwen2ForCausalLM", hidden_size=256, intermediate_size=512)
    with caplog.at_level(logging.INFO, logger="jaxserve.weights.quant_loading"):
        head = load_model(path, dtype="bfloat16", quantization="int8", quantize_lm_head=True)
    assert "lm_head quantized, tied" in caplog.text
    plain = load_model(path, dtype="bfloat16", quantization="int8").weight_report
    float_bytes = load_model(path, dtype="bfloat16").weight_report["weight_bytes"]
    report = head.weight_report
    assert report["lm_head_quantized"] and not plain["lm_head_quantized"]
    assert report["weight_bytes"] <= 0.52 * float_bytes, report
    assert plain["weight_bytes"] > 0.52 * float_bytes, plain
    assert report["model_ratio"] == pytest.approx(report["weight_bytes"] / float_bytes)


def test_quantize_lm_head_needs_an_at_load_method(tiny_checkpoints):
    from jaxserve.llm import EngineArgs

    for quantization in (None, "compressed-tensors"):
        with pytest.raises(ValueError, match="quantize_lm_head: needs quantization"):
            EngineArgs(model="unused", quantization=quantization, quantize_lm_head=True)
    with pytest.raises(QuantizationError, match="quantize_lm_head"):
        load_model(tiny_checkpoints("LlamaForCausalLM"), dtype="float32", quantize_lm_head=True)


def test_w8a8_quantizes_the_lm_head_with_int8_activations(tiny_checkpoints, tmp_path):
    """w8a8 lm_head: int8 weights, per-token int8 activations; near (not equal to) the float
    model on the dequantized weights, as for the projections."""
    path = tiny_checkpoints("LlamaForCausalLM")
    loaded = load_model(path, dtype="float32", quantization="w8a8", quantize_lm_head=True)
    assert loaded.model.lm_head.int8_activations
    prompts = make_prompts(loaded.config.vocab_size)[:2]
    ours = paged_logits(loaded, prompts)
    oracle = hf_logits(write_dequantized_copy(path, str(tmp_path / "deq"), "int8", lm_head=True),
                       prompts)
    errs = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, oracle)]
    assert RTOL < max(errs) < 5e-2, errs


def test_convert_keeps_the_quantized_lm_head(tiny_checkpoints, tmp_path):
    from converters.hf_to_jaxserve import convert

    path = tiny_checkpoints("Qwen2ForCausalLM")
    info = convert(path, str(tmp_path / "conv"), "float32", quantization="int8",
                   quantize_lm_head=True)
    assert info["quantization"]["lm_head"] is True
    converted = load_model(str(tmp_path / "conv"), quantize_lm_head=True)
    direct = load_model(path, dtype="float32", quantization="int8", quantize_lm_head=True)
    assert converted.quant == direct.quant
    prompts = make_prompts(direct.config.vocab_size)[:2]
    for a, b in zip(paged_logits(converted, prompts), paged_logits(direct, prompts)):
        assert np.array_equal(a, b)
    convert(path, str(tmp_path / "plain"), "float32", quantization="int8")
    with pytest.raises(ValueError, match="quantize_lm_head: this converted checkpoint"):
        load_model(str(tmp_path / "plain"), quantize_lm_head=True)


def test_compressed_tensors_checkpoint_with_quantized_lm_head(tmp_path):
    """ignore without lm_head: the library quantizes lm_head too; HF transformers loads it
    (decompressing) as the oracle. Tied embeddings with a stored quantized lm_head: refused."""
    pytest.importorskip("compressed_tensors")
    from tests.checkpoints import write_tiny_checkpoint

    src = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "src"))
    path, _ = write_compressed(src, str(tmp_path / "ct"), num_bits=8, type="int",
                               strategy="channel", fmt="int-quantized", ignore=())
    loaded = load_model(path, dtype="float32")
    assert loaded.quant.lm_head and type(loaded.model.lm_head).__name__ == "QuantizedLinear"
    prompts = make_prompts(loaded.config.vocab_size, seed=1)[:3]
    assert_close(paged_logits(loaded, prompts), hf_logits(path, prompts), RTOL)

    tied = write_tiny_checkpoint("Qwen2ForCausalLM", str(tmp_path / "tied-src"))
    tied_ct, _ = write_compressed(tied, str(tmp_path / "tied-ct"), num_bits=8, type="int",
                                  strategy="channel", fmt="int-quantized")
    edit_quant_config(tied_ct, ignore=[])
    with pytest.raises(QuantizationError, match="tie_word_embeddings"):
        load_model(tied_ct, dtype="float32")
