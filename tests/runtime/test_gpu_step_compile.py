"""Tier 3 for the whole engine step: the jitted model forward + sampler with the Mosaic GPU
attention compiles for one and two H100s (deviceless, ptxas), for Qwen2.5-0.5B and Llama-3.1-8B
shapes in bf16. Two decoder layers of each (every layer has the same shapes)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.layers.attention import AttentionConfig, AttentionMetadata
from jaxserve.runtime.mesh import partition_spec
from jaxserve.runtime.sampling_rows import build_metadata
from jaxserve.sample.sampler import sample_step
from jaxserve.weights.loader import abstract_model
from tests import gpu_aot

pytestmark = pytest.mark.skipif(gpu_aot.cuda_plugin_missing() is not None,
                                reason=str(gpu_aot.cuda_plugin_missing()))

SHAPES = {  # public config.json shapes (num_hidden_layers cut to 2)
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                         vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1000000.0),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                         vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


def _step_fn(graphdef):
  def step(state, kv_cache, token_ids, md, logits_indices, sampling_md):
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(token_ids, md, kv_cache)
    logits = model.compute_logits(hidden[logits_indices])
    return sample_step(logits, logits, sampling_md, num_logprobs=1), kv_cache
  return step


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_engine_step_compiles_for_h100(name, tp):
  cfg = ModelConfig.from_dict({**SHAPES[name], "num_hidden_layers": 2,
                               "max_position_embeddings": 4096, "rms_norm_eps": 1e-6})
  mesh = gpu_aot.h100_mesh(tp)
  attn = AttentionConfig(backend="pallas", mesh=mesh if tp > 1 else None)
  graphdef, state = abstract_model(cfg, attn, "bfloat16")
  t, s, w, block_size, num_blocks = 64, 16, 8, 16, 256
  kv_spec = P("tp", None, None, None) if tp > 1 and cfg.num_kv_heads % tp == 0 else P()
  page = jax.ShapeDtypeStruct((cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim),
                              jnp.bfloat16)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  md = AttentionMetadata(positions=i32(t), slot_mapping=i32(t), block_tables=i32(s, w),
                         seq_lens=i32(s), query_start_loc=i32(s + 1))
  sampling_md = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                             build_metadata([], s, 0, False, 4096))
  leaves = dict(state=state, kv=tuple((page, page) for _ in range(cfg.num_layers)),
                tokens=i32(t), md=md, rows=i32(s), sampling=sampling_md)
  specs = dict(
      state=jax.tree_util.tree_map_with_path(
          lambda path, a: partition_spec(tuple(getattr(p, "key", p) for p in path), a.ndim,
                                         cfg.num_kv_heads, tp), state),
      kv=jax.tree.map(lambda _: kv_spec, leaves["kv"]),
      tokens=P(), md=jax.tree.map(lambda _: P(), md), rows=P(),
      sampling=jax.tree.map(lambda _: P(), sampling_md))
  flat, treedef = jax.tree.flatten(leaves)
  flat_specs = treedef.flatten_up_to(specs)
  order = ("state", "kv", "tokens", "md", "rows", "sampling")
  fn = lambda *xs: _step_fn(graphdef)(*(jax.tree.unflatten(treedef, xs)[k] for k in order))
  compiled = gpu_aot.h100_compile(fn, *flat, num_gpus=tp, in_specs=flat_specs)
  assert "mosaic" in compiled.as_text().lower()
