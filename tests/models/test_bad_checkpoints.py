"""Bad checkpoints are refused with messages that name what is wrong."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxserve.config import ConfigError
from jaxserve.models import UnsupportedArchitectureError
from jaxserve.weights.loader import load_model
from jaxserve.weights.safetensors_reader import CheckpointError


@pytest.fixture
def llama_copy(tiny_checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints("LlamaForCausalLM"), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_names_itself_and_lists_supported(llama_copy):
    _edit_config(llama_copy, architectures=["FalconForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(str(llama_copy))
    assert "FalconForCausalLM" in str(e.value)
    assert "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_remote_code_is_never_executed(llama_copy, tmp_path):
    marker = tmp_path / "executed"
    (llama_copy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(
        llama_copy,
        architectures=["EvilForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    )
    with pytest.raises(UnsupportedArchitectureError, match="EvilForCausalLM"):
        load_model(str(llama_copy))
    assert not marker.exists()


def test_missing_tensor_is_named(llama_copy):
    f = llama_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(llama_copy))


def test_shape_mismatch_names_tensor_and_file(llama_copy):
    f = llama_copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError) as e:
        load_model(str(llama_copy))
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "model.safetensors" in msg


def test_missing_shard_is_named(llama_copy):
    f = llama_copy / "model.safetensors"
    tensors = load_file(str(f))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(llama_copy / "model-00001-of-00002.safetensors"))
    os.remove(f)
    weight_map = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(str(llama_copy))


def test_pickled_weights_are_refused(llama_copy):
    os.remove(llama_copy / "model.safetensors")
    (llama_copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors") as e:
        load_model(str(llama_copy))
    assert "pytorch_model.bin" in str(e.value)


def test_bad_dtype_and_missing_config(llama_copy, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(llama_copy), dtype="int3")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(str(tmp_path))


def _write_index(path, weight_map: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors",
                                   "ABSOLUTE"])
def test_index_shards_are_confined_to_the_checkpoint(llama_copy, tmp_path, shard):
    """An index may not point at files outside the directory (not even real safetensors)."""
    outside = tmp_path / "outside.safetensors"
    shutil.copy(llama_copy / "model.safetensors", outside)
    os.remove(llama_copy / "model.safetensors")
    name = str(outside) if shard == "ABSOLUTE" else shard
    tensors = load_file(str(outside))
    _write_index(llama_copy, {k: name for k in tensors})
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_model(str(llama_copy))


def test_index_shard_in_a_subdirectory_still_loads(llama_copy):
    (llama_copy / "shards").mkdir()
    shutil.move(llama_copy / "model.safetensors", llama_copy / "shards" / "a.safetensors")
    tensors = load_file(str(llama_copy / "shards" / "a.safetensors"))
    _write_index(llama_copy, {k: "shards/a.safetensors" for k in tensors})
    assert load_model(str(llama_copy)).config.architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("quant, method", [
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
    ({"quant_method": "gptq", "bits": 4}, "gptq"),
    ({"quant_method": "awq", "bits": 4}, "awq"),
])
def test_quantization_config_is_refused_naming_the_method(llama_copy, quant, method):
    _edit_config(llama_copy, quantization_config=quant)
    with pytest.raises(ConfigError, match=f"quantization method '{method}' is not supported"):
        load_model(str(llama_copy))


def test_compressed_tensors_without_a_scheme_is_refused(llama_copy):
    """compressed-tensors is read, field by field: a config without config_groups is refused."""
    _edit_config(llama_copy, quantization_config={"quant_method": "compressed-tensors",
                                                  "format": "float-quantized"})
    with pytest.raises(ValueError, match="quantization_config.config_groups: missing"):
        load_model(str(llama_copy))


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_fp8_or_int_tensors_are_refused(llama_copy, dtype):
    """Without a quantization_config, fp8 / int weights would be cast without their scales."""
    import ml_dtypes

    f = llama_copy / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.0.self_attn.q_proj.weight"
    np_dtype = getattr(ml_dtypes, dtype, None) or np.dtype(dtype)
    tensors[name] = tensors[name].astype(np_dtype)
    tensors[name.replace("weight", "weight_scale")] = np.ones((1,), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=rf"{name}.*quantized weights"):
        load_model(str(llama_copy))
