"""GPU suite for the paged-attention kernels: the kernel tests on the chip, then the benchmark.

  python benchmarks/gpu_suite.py           # on a GPU machine
  python benchmarks/gpu_suite.py --small   # CPU smoke test (interpreter, tiny sizes)

Writes benchmarks/results/gpu_suite_<device>.json (test outcome + benchmark rows) on a GPU;
with --small it writes to the temp dir, since CPU figures are not results.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_kernel_tests(on_chip: bool) -> dict:
  """pytest tests/pallas_kernels; on a GPU with the real lowering (no interpreter)."""
  env = dict(os.environ, PALLAS_KERNELS_INTERPRET="0" if on_chip else "1")
  cmd = [sys.executable, "-m", "pytest", "tests/pallas_kernels", "-q"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-500:]]
  print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
  return dict(on_chip=on_chip, returncode=proc.returncode, summary=tail[0])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="CPU smoke test")
  parser.add_argument("--skip-tests", action="store_true")
  args = parser.parse_args(argv)
  import jax  # after argparse so --help is fast
  import kernels
  device = jax.devices()[0]
  on_chip = device.platform == "gpu" and not args.small
  tests = None if args.skip_tests else run_kernel_tests(on_chip)
  out_dir = pathlib.Path(tempfile.gettempdir()) if args.small else kernels.RESULTS
  name = device.device_kind.replace(" ", "_")
  rows = kernels.main((["--small"] if args.small else [])
                      + ["--out", str(out_dir / f"kernels_{name}.json")])
  report = dict(device=device.device_kind, jax=jax.__version__, small=args.small,
                kernel_tests=tests, benchmark=rows)
  out = out_dir / f"gpu_suite_{name}.json"
  out.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {out}")
  if tests is not None and tests["returncode"] != 0:
    sys.exit(1)


if __name__ == "__main__":
  main()
