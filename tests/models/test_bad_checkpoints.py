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
