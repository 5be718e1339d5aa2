"""Quantized models against oracles we did not write.

Online PTQ: ours (quantized weights in the matmul) equals HF transformers run in float32 on a
copy of the checkpoint whose projections hold the dequantized weights. compressed-tensors:
checkpoints written by that library's own compressors; HF transformers loads them
(decompressing through compressed-tensors) and its float32 logits are the oracle. Both sides
multiply by the same dequantized float32 weights, so only summation order differs: the float
parity bound (1e-4 of the largest logit) applies, and the greedy token at every position agrees.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flax import nnx

from jaxserve.config import ConfigError
from jaxserve.cpu_kernels import packed_matmul
from jaxserve.layers.linear import PackedGateUp, PackedProjections
from jaxserve.layers.quant_scheme import QuantizationError
from jaxserve.layers.quantized_linear import QuantizedLinear
from jaxserve.weights.loader import load_model
from jaxserve.weights.safetensors_reader import CheckpointError
from tests.models.forward import paged_logits
from tests.models.test_hf_parity import assert_close, hf_logits, make_prompts
from tests.quant_checkpoints import (
    drop_tensor,
    edit_quant_config,
    write_compressed,
    write_dequantized_copy,
)

RTOL = 1e-4


def _same_greedy(ours, theirs):
    for a, b in zip(ours, theirs):
        top2 = np.sort(b, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-3 * np.abs(b).max()  # skip exact near-ties
        assert np.array_equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_online_ptq_equals_float_model_on_dequantized_weights(arch, method, tiny_checkpoints,
                                                              tmp_path):
    path = tiny_checkpoints(arch)
    loaded = load_model(path, dtype="float32", quantization=method)
    assert loaded.quant.method == method
    assert type(loaded.model.layers[0].up_proj).__name__ == "QuantizedLinear"
    prompts = make_prompts(loaded.config.vocab_size)
    ours = paged_logits(loaded, prompts)
    oracle = hf_logits(write_dequantized_copy(path, str(tmp_path / "deq"), method), prompts)
    assert_close(ours, oracle, RTOL)
    _same_greedy(ours, oracle)
    # The test has teeth: quantization moved the logits well past that bound.
    float_logits = hf_logits(path, prompts[:1])[0]
    assert np.abs(ours[0] - float_logits).max() / np.abs(float_logits).max() > 10 * RTOL


def test_w8a8_model_stays_near_the_float_model_on_dequantized_weights(tiny_checkpoints,
                                                                       tmp_path):
    """Per-token int8 activations add a rounding error of at most max|x| / 254 per input:
    logits move by ~1e-2 of their range, clearly more than the W8A16 bound (so activations
    really were quantized) and clearly less than a broken model would."""
    path = tiny_checkpoints("LlamaForCausalLM")
    loaded = load_model(path, dtype="float32", quantization="w8a8")
    prompts = make_prompts(loaded.config.vocab_size)[:3]
    ours = paged_logits(loaded, prompts)
    oracle = hf_logits(write_dequantized_copy(path, str(tmp_path / "deq"), "int8"), prompts)
    errs = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, oracle)]
    assert RTOL < max(errs) < 5e-2, errs


def test_weight_bytes_are_reported(tiny_checkpoints):
    path = tiny_checkpoints("LlamaForCausalLM")
    for method, bound in (("int8", 0.53), ("int4", 0.30)):  # in=64 rows: scale overhead 1/32
        report = load_model(path, dtype="float32", quantization=method).weight_report
        assert report["layer_ratio"] <= bound, report


# (library arguments, whether HF transformers can load the checkpoint). transformers 5 cannot
# load pack-quantized asymmetric zero points (it allocates them unpacked): there the oracle is
# the library's in-memory compressed model, whose forward decompresses with its own code.
CT_CASES = {
    "int4-group-pack": (dict(num_bits=4, type="int", strategy="group", group_size=32,
                             fmt="pack-quantized"), True),
    "int8-channel-int": (dict(num_bits=8, type="int", strategy="channel",
                              fmt="int-quantized"), True),
    "fp8-channel-float": (dict(num_bits=8, type="float", strategy="channel",
                               fmt="float-quantized"), True),
    "int8-channel-int-asym": (dict(num_bits=8, type="int", strategy="channel",
                                   fmt="int-quantized", symmetric=False), True),
    "int4-channel-pack-asym": (dict(num_bits=4, type="int", strategy="channel",
                                    fmt="pack-quantized", symmetric=False), False),
    "int8-group-pack-asym": (dict(num_bits=8, type="int", strategy="group", group_size=32,
                                  fmt="pack-quantized", symmetric=False), False),
    "int4-group-pack-asym": (dict(num_bits=4, type="int", strategy="group", group_size=32,
                                  fmt="pack-quantized", symmetric=False), False),
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    cache = {}

    def get(case, arch="LlamaForCausalLM"):
        if (case, arch) not in cache:
            from tests.checkpoints import write_tiny_checkpoint

            src = write_tiny_checkpoint(arch, str(tmp_path_factory.mktemp("src")))
            kwargs, _ = CT_CASES[case]
            cache[case, arch] = write_compressed(src, str(tmp_path_factory.mktemp(case)),
                                                 **kwargs)
        return cache[case, arch]

    return get


@pytest.mark.parametrize("case", sorted(CT_CASES))
def test_compressed_tensors_checkpoint_matches_its_decompression(case, compressed):
    path, memory_model = compressed(case)
    loaded = load_model(path, dtype="float32")
    assert loaded.quant is not None and loaded.quant.source.startswith("compressed-tensors")
    prompts = make_prompts(loaded.config.vocab_size, seed=1)
    if CT_CASES[case][1]:
        oracle = hf_logits(path, prompts)  # HF + compressed-tensors decompress on load
    else:
        with torch.no_grad():
            oracle = [memory_model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]
    ours = paged_logits(loaded, prompts)
    assert_close(ours, oracle, RTOL)
    _same_greedy(ours, oracle)


def test_compressed_tensors_refusals_name_the_field(compressed, tmp_path):
    import shutil

    path, _ = compressed("int4-group-pack")

    def copy(name):
        out = str(tmp_path / name)
        shutil.copytree(path, out)
        return out

    bad = copy("w8a8")
    edit_quant_config(bad, **{"config_groups.group_0.input_activations": {
        "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}})
    with pytest.raises(QuantizationError, match="input_activations"):
        load_model(bad, dtype="float32")
    bad = copy("fmt")
    edit_quant_config(bad, format="nvfp4-pack-quantized")
    with pytest.raises(QuantizationError, match="format.*'nvfp4-pack-quantized'"):
        load_model(bad, dtype="float32")
    bad = copy("group")  # the scales hold groups of 32; the config claims 16
    edit_quant_config(bad, **{"config_groups.group_0.weights.group_size": 16})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\..*weight_scale.*group size 16"):
        load_model(bad, dtype="float32")
    bad = copy("scales")
    drop_tensor(bad, "model.layers.1.mlp.up_proj.weight_scale")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight_scale' "
                                              "is missing"):
        load_model(bad, dtype="float32")
    bad = copy("ignore")
    edit_quant_config(bad, ignore=["lm_head", "re:.*down_proj"])
    with pytest.raises(QuantizationError, match=r"ignore.*down_proj"):
        load_model(bad, dtype="float32")
    with pytest.raises(QuantizationError, match="already quantized"):
        load_model(path, dtype="float32", quantization="int8")


def test_unknown_methods_are_refused(tiny_checkpoints):
    path = tiny_checkpoints("LlamaForCausalLM")
    with pytest.raises(QuantizationError, match="unknown method 'awq'"):
        load_model(path, dtype="float32", quantization="awq")
    with pytest.raises(QuantizationError, match="no quantization_config"):
        load_model(path, dtype="float32", quantization="compressed-tensors")
    assert issubclass(QuantizationError, ValueError) and issubclass(ConfigError, ValueError)


def test_convert_with_quantization_loads_without_requantizing(tiny_checkpoints, tmp_path):
    from converters.hf_to_jaxserve import convert

    path = tiny_checkpoints("Qwen2ForCausalLM")
    info = convert(path, str(tmp_path / "conv"), "float32", quantization="int4")
    assert info["quantization"]["method"] == "int4"
    converted = load_model(str(tmp_path / "conv"))
    direct = load_model(path, dtype="float32", quantization="int4")
    assert converted.quant == direct.quant
    layer_c, layer_d = converted.model.layers[1].down_proj, direct.model.layers[1].down_proj
    assert layer_c.qweight[...].dtype == np.uint8  # stored packed, not re-quantized
    assert np.array_equal(np.asarray(layer_c.qweight[...]), np.asarray(layer_d.qweight[...]))
    prompts = make_prompts(direct.config.vocab_size)[:2]
    for a, b in zip(paged_logits(converted, prompts), paged_logits(direct, prompts)):
        assert np.array_equal(a, b)
    with pytest.raises(ConfigError, match="holds int4 weights"):
        load_model(str(tmp_path / "conv"), quantization="int8")


@pytest.mark.skipif(not packed_matmul.available(), reason="no packed-weight kernel on this CPU")
@pytest.mark.parametrize("method,arch,lm_head", [
    ("int8", "LlamaForCausalLM", False), ("int8", "LlamaForCausalLM", True),
    ("int8", "MistralForCausalLM", False), ("int8", "MistralForCausalLM", True),
    ("int8", "Qwen2ForCausalLM", False), ("int8", "Qwen2ForCausalLM", True),
    ("fp8", "Qwen2ForCausalLM", True), ("fp8", "LlamaForCausalLM", False),
    ("int4", "Qwen2ForCausalLM", True), ("int4", "MistralForCausalLM", False)])
def test_packed_quantized_bfloat16_error_is_like_hf_bfloat16(method, arch, lm_head,
                                                             tiny_checkpoints, tmp_path):
    """bf16 int8 / fp8 / int4 with the CPU kernels: every projection (and the quantized
    lm_head, or the tied table that doubles as it) is packed once at load, q, k and v fused
    and gate and up under silu with their scales, and every step runs the packed-weight kernel. Against HF on
    the dequantized weights, our bf16 error is within 2x HF's own bf16 error (+ 1e-2 of the
    logit range), the bound of the float bf16 models (test_bf16_and_shards)."""
    path = tiny_checkpoints(arch)
    loaded = load_model(path, dtype="bfloat16", quantization=method, quantize_lm_head=lm_head,
                        cpu_matvec=True)
    nodes = [m for _, m in nnx.iter_graph(loaded.model)]
    quantized = [m for m in nodes if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.packed for m in quantized)
    fused = [m for m in nodes if isinstance(m, PackedGateUp)]
    fusable = loaded.config.hidden_act in ("silu", "swish") and not loaded.config.mlp_bias
    assert len(fused) == (loaded.config.num_layers if fusable else 0)
    assert all(m.scales is not None for m in fused)
    qkv = [m for m in nodes if isinstance(m, PackedProjections)]
    assert len(qkv) == loaded.config.num_layers and all(m.scales is not None for m in qkv)
    model = loaded.model
    head = model.embed_tokens if loaded.config.tie_word_embeddings else model.lm_head
    assert isinstance(head, QuantizedLinear) == lm_head
    if lm_head:
        assert head.packed and head.f32_out
    prompts = make_prompts(500, seed=7)[:3]
    deq = write_dequantized_copy(path, str(tmp_path / "deq"), method, lm_head=lm_head)
    ref = hf_logits(deq, prompts)
    hf_bf16 = hf_logits(deq, prompts, dtype=torch.bfloat16)
    ours = paged_logits(loaded, prompts)
    err = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, ref))
    hf_err = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(hf_bf16, ref))
    assert err <= 2 * hf_err + 1e-2, (err, hf_err)


@pytest.mark.skipif(not packed_matmul.available(), reason="no packed-weight kernel on this CPU")
@pytest.mark.parametrize("case,arch", [("int8-channel-int-asym", "Qwen2ForCausalLM"),
                                       ("int4-group-pack-asym", "Qwen2ForCausalLM"),
                                       ("int4-channel-pack-asym", "LlamaForCausalLM")])
def test_packed_asymmetric_checkpoint_error_is_like_the_oracles_bfloat16(case, arch, compressed):
    """Asymmetric compressed-tensors checkpoints in bf16 with the CPU kernels: every projection
    is packed with its zero points (gate and up fused where fusable), and against the float32 oracle (HF, or
    the library's own decompressing model where HF cannot load the format) our error is within
    2x the oracle's own bf16 error (+ 1e-2 of the logit range), as for symmetric weights."""
    path, memory_model = compressed(case, arch)
    loaded = load_model(path, dtype="bfloat16", cpu_matvec=True)
    nodes = [m for _, m in nnx.iter_graph(loaded.model)]
    quantized = [m for m in nodes if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.packed and m.zeros is not None for m in quantized)
    fused = [m for m in nodes if isinstance(m, PackedGateUp)]
    fusable = loaded.config.hidden_act in ("silu", "swish") and not loaded.config.mlp_bias
    assert len(fused) == (loaded.config.num_layers if fusable else 0)
    assert all(m.zeros is not None for m in fused)
    qkv = [m for m in nodes if isinstance(m, PackedProjections)]
    assert len(qkv) == loaded.config.num_layers and all(m.zeros is not None for m in qkv)
    prompts = make_prompts(500, seed=7)[:3]
    if CT_CASES[case][1]:
        ref, ref_bf16 = hf_logits(path, prompts), hf_logits(path, prompts, dtype=torch.bfloat16)
    else:
        bf16_model = copy.deepcopy(memory_model).to(torch.bfloat16)
        with torch.no_grad():
            ref = [memory_model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]
            ref_bf16 = [bf16_model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]
    ours = paged_logits(loaded, prompts)
    err = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, ref))
    ref_err = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ref_bf16, ref))
    assert err <= 2 * ref_err + 1e-2, (err, ref_err)
