"""benchmarks/gpu_suite.py refuses to measure anything without a GPU (it would time the CPU
interpreter), saying so and exiting non-zero."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_suite_fails_loudly_without_a_gpu(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py")], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "gpu_suite: no GPU (jax platform 'cpu')" in proc.stderr
  assert not (ROOT / "benchmarks" / "results" / "gpu_suite_cpu.json").exists()
