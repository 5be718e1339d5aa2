"""Tier 3 for the whole engine step: the jitted forward (Mosaic GPU attention, under shard_map
for tp=2) plus the sampler, compiled by XLA for one and two deviceless H100s in bf16, with the
Qwen2.5-0.5B and Llama-3.1-8B layer shapes (2 layers each: every per-layer shape is the real
one; more layers only repeat them). Nothing runs; parameters are abstract (sharded as the
engine shards them)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.layers.attention import AttentionConfig, AttentionMetadata, check_pallas_supported
from jaxserve.runtime.mesh import partition_spec
from jaxserve.runtime.model_runner import _forward
from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata
from jaxserve.sample.sampler import sample_step
from jaxserve.weights.loader import abstract_model, read_model_config
from tests import gpu_aot

# Public config.json fields of the two checkpoints, num_hidden_layers cut to 2.
QWEN_05B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=151936, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                use_sliding_window=False, sliding_window=32768, torch_dtype="bfloat16")
LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                num_hidden_layers=2, vocab_size=128256, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192, rope_type="llama3"),
                torch_dtype="bfloat16")
BLOCK_SIZE, NUM_BLOCKS, TOKENS, SEQS, MAX_BLOCKS = 16, 512, 64, 16, 64


def _sds(shape, dtype, mesh, spec=P()):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _abstract_engine(tmp_path, raw, tp):
  """(config, graphdef, sharded abstract state, abstract kv cache, attention config)."""
  (tmp_path / "config.json").write_text(json.dumps(raw))
  config = read_model_config(str(tmp_path))
  mesh = gpu_aot.h100_mesh(tp)
  attn = AttentionConfig(backend="pallas", sliding_window=config.sliding_window,
                         mesh=mesh if tp > 1 else None)
  check_pallas_supported(attn, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                         head_dim=config.head_dim, block_size=BLOCK_SIZE, dtype="bfloat16", tp=tp)
  graphdef, state = abstract_model(config, attn, "bfloat16", None)
  for path, var in nnx.to_flat_state(state):
    a = var.get_value()
    var.set_value(_sds(a.shape, a.dtype, mesh,
                       partition_spec(path, a.ndim, config.num_kv_heads, tp)))
  kv_spec = P("tp") if tp > 1 and config.num_kv_heads % tp == 0 else P()
  page = _sds((config.num_kv_heads, NUM_BLOCKS, BLOCK_SIZE, config.head_dim), jnp.bfloat16,
              mesh, kv_spec)
  kv = tuple((page, page) for _ in range(config.num_layers))
  return graphdef, state, kv, mesh


def _step_args(mesh):
  i32 = jnp.int32
  md = AttentionMetadata(
      positions=_sds((TOKENS,), i32, mesh), slot_mapping=_sds((TOKENS,), i32, mesh),
      block_tables=_sds((SEQS, MAX_BLOCKS), i32, mesh), seq_lens=_sds((SEQS,), i32, mesh),
      query_start_loc=_sds((SEQS + 1,), i32, mesh))
  rows = [SamplingRow(temperature=0.7, top_p=0.9, seed=1)] * SEQS
  smd = jax.tree.map(lambda a: _sds(np.shape(a), np.asarray(a).dtype, mesh),
                     build_sampling_metadata(rows, SEQS, 0))
  return _sds((TOKENS,), i32, mesh), md, _sds((SEQS,), i32, mesh), smd


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("raw", [QWEN_05B, LLAMA_8B], ids=["qwen2.5-0.5b", "llama-3.1-8b"])
def test_engine_step_compiles_for_h100(tmp_path, raw, tp):
  missing = gpu_aot.cuda_plugin_missing()
  if missing:
    pytest.fail(f"tier 3 cannot run: {missing}")
  graphdef, state, kv, mesh = _abstract_engine(tmp_path, raw, tp)
  token_ids, md, logits_indices, smd = _step_args(mesh)

  # async scheduling's inputs: the previous step's sampled tokens and where they go
  prev_tokens, prev_rows = _sds((SEQS,), jnp.int32, mesh), _sds((TOKENS,), jnp.int32, mesh)

  def step(state, kv, token_ids, md, logits_indices, smd, prev_tokens, prev_rows):
    logits, _, kv = _forward(graphdef, state, kv, token_ids, md, logits_indices, prev_tokens,
                             prev_rows)
    return sample_step(logits, logits, smd, num_logprobs=0).token_ids, kv

  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    compiled = jax.jit(step, donate_argnums=(1,)).trace(
        state, kv, token_ids, md, logits_indices, smd, prev_tokens, prev_rows).lower().compile()
  text = compiled.as_text()
  assert "mosaic_gpu" in text  # the attention is the kernel, not an XLA fallback
  assert text.count("mosaic_gpu") >= raw["num_hidden_layers"]
