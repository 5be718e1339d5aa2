"""convert -> load gives the same logits as loading the HF directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from converters import convert
from jaxserve.weights.loader import is_converted, load_model
from tests.models.forward import paged_logits
from tests.models.test_hf_parity import make_prompts


def test_converted_checkpoint_gives_identical_logits(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("Qwen3ForCausalLM")
    out = str(tmp_path / "converted")
    info = convert(src, out)
    assert info["dtype"] == "float32" and is_converted(out)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name))
    hf, conv = load_model(src), load_model(out)
    prompts = make_prompts(hf.config.vocab_size)
    for a, b in zip(paged_logits(hf, prompts), paged_logits(conv, prompts)):
        np.testing.assert_array_equal(a, b)


def test_convert_cli_bfloat16(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("LlamaForCausalLM")
    out = str(tmp_path / "bf16")
    proc = subprocess.run(
        [sys.executable, "-m", "converters.hf_to_jaxserve", src, out, "--dtype", "bfloat16"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["dtype"] == "bfloat16"
    conv = load_model(out)  # auto -> the stored dtype
    assert conv.dtype == "bfloat16"
    direct = load_model(src, dtype="bfloat16")
    prompts = make_prompts(conv.config.vocab_size)[:2]
    for a, b in zip(paged_logits(direct, prompts), paged_logits(conv, prompts)):
        np.testing.assert_array_equal(a, b)


def test_converted_loads_in_the_other_dtype_and_layout(tiny_checkpoints, tmp_path):
    """f32 stores Linear `kernel` [in, out], bf16 `weight` [out, in]: a checkpoint converted in
    one dtype loads in the other with the same parameters as loading HF directly."""
    from flax import nnx

    src = tiny_checkpoints("LlamaForCausalLM")
    out = str(tmp_path / "f32")
    convert(src, out, dtype="float32")
    for dtype in ("bfloat16", "float32"):
        conv, direct = load_model(out, dtype=dtype), load_model(src, dtype=dtype)
        got = nnx.to_flat_state(nnx.state(conv.model, nnx.Param))
        want = nnx.to_flat_state(nnx.state(direct.model, nnx.Param))
        assert [p for p, _ in got] == [p for p, _ in want]
        for (path, a), (_, b) in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                          err_msg=str(path))


def test_old_converted_format_is_refused(tiny_checkpoints, tmp_path):
    import pytest

    from jaxserve.weights.safetensors_reader import CheckpointError

    out = str(tmp_path / "old")
    convert(tiny_checkpoints("LlamaForCausalLM"), out)
    marker = os.path.join(out, "jaxserve_checkpoint.json")
    with open(marker) as f:
        info = json.load(f)
    with open(marker, "w") as f:
        json.dump({**info, "version": 1}, f)
    with pytest.raises(CheckpointError, match="convert the HF checkpoint again"):
        load_model(out)
