"""GPU checks without a GPU: CUDA cross-lowering and a deviceless H100 compile (tiers 2 and 3).

cuda_lower(fn, *args): jit -> trace -> lower for CUDA under an abstract H100 mesh. Needs only jax;
  runs the Pallas -> Mosaic GPU lowering (layout inference, wgmma shape rules, SMEM budget).
h100_compile(fn, *args, num_gpus=1): XLA's real GPU compile (Mosaic GPU -> PTX -> ptxas sm_90a,
  XLA's own fusions) for compile-only H100 devices from `jax.experimental.topologies`. Needs the
  `jax-cuda13-plugin` / `jax-cuda13-pjrt` wheels (same version as jax, in the `test` extra) and a
  ptxas (the `nvidia-cuda-nvcc` wheel's, else one on PATH). Nothing is executed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import shutil

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# The fields of stream_executor.GpuTargetConfigProto that XLA and Mosaic read, from an H100
# SXM's public specifications.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_KIND = "NVIDIA H100 80GB HBM3"


def _abstract_mesh(num_gpus: int, axis: str):
  dev = jax.sharding.AbstractDevice(device_kind=H100_KIND, num_cores=132, platform="gpu")
  return jax.sharding.AbstractMesh((num_gpus,), (axis,), abstract_device=dev)


def cuda_lower(fn, *args):
  """StableHLO for CUDA (with the kernels' Mosaic GPU custom calls); raises on lowering errors."""
  with jax.sharding.use_abstract_mesh(_abstract_mesh(1, "x")):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def cuda_plugin_missing() -> str | None:
  """Why the compile tier cannot run here, or None when it can."""
  try:
    if importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
      return "jax-cuda13-plugin is not installed (pip install -e '.[test]')"
  except ModuleNotFoundError:
    return "jax-cuda13-plugin is not installed (pip install -e '.[test]')"
  if find_ptxas() is None:
    return "no ptxas: install nvidia-cuda-nvcc or a CUDA toolkit"
  return None


def find_ptxas() -> str | None:
  """The nvidia-cuda-nvcc wheel's ptxas, else the first on PATH."""
  spec = importlib.util.find_spec("nvidia")
  for root in (spec.submodule_search_locations if spec else []):
    for sub in ("cu13/bin", "cuda_nvcc/bin"):
      path = pathlib.Path(root) / sub / "ptxas"
      if path.is_file():
        return str(path)
  return shutil.which("ptxas")


@functools.cache
def h100_devices(num_gpus: int = 1):
  """Compile-only H100s (one host); ptxas's directory is put first on PATH for XLA."""
  ptxas = find_ptxas()
  if ptxas:
    os.environ["PATH"] = os.path.dirname(ptxas) + os.pathsep + os.environ.get("PATH", "")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(
      "h100", platform="cuda", target_config=H100_TARGET_CONFIG, topology=f"1x1x{num_gpus}")
  return topo.devices


def h100_mesh(num_gpus: int = 1, axis: str = "tp") -> jax.sharding.Mesh:
  import numpy as np
  return jax.sharding.Mesh(np.array(h100_devices(num_gpus)), (axis,))


def h100_compile(fn, *args, num_gpus: int = 1, in_specs=None):
  """Compiles fn for `num_gpus` H100s (cannot run); raises on lowering, XLA or ptxas errors.

  args: arrays or ShapeDtypeStructs; in_specs: a PartitionSpec per arg (default replicated).
  """
  mesh = h100_mesh(num_gpus)
  in_specs = in_specs or [P()] * len(args)
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
           for a, s in zip(args, in_specs)]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return jax.jit(fn).trace(*specs).lower().compile()


def h100_ptxas_info(fn, *args, num_gpus: int = 1, in_specs=None) -> str:
  """h100_compile, returning what ptxas reported for the Mosaic GPU kernels (registers, spills,
  target), from Mosaic GPU's dump (MOSAIC_GPU_DUMP_PTXAS, read at each compile)."""
  import glob
  import tempfile
  saved = {k: os.environ.get(k) for k in ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTXAS")}
  with tempfile.TemporaryDirectory() as dump:
    os.environ.update(MOSAIC_GPU_DUMP_TO=dump, MOSAIC_GPU_DUMP_PTXAS="1")
    try:
      h100_compile(fn, *args, num_gpus=num_gpus, in_specs=in_specs)
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
    return "\n".join(pathlib.Path(f).read_text() for f in sorted(glob.glob(dump + "/*.ptxas")))
