"""The README's base install (`pip install -e .`, no test extra) can chat.

A fresh venv (no system site-packages) gets exactly the distributions in the requirement closure
of pyproject's base `dependencies`, linked file by file from the current environment (what pip
would install, without a download), plus the source tree on its path. In it, LLM.chat runs on
a small demo model and the servers import: a runtime import that only the test extra (or an
unlisted transitive dependency) provides fails here.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_closure() -> dict[str, md.Distribution]:
    """Normalised name -> installed distribution, for every base requirement and its own
    (non-extra, marker-true) requirements, recursively; requested extras are followed."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    seen: dict[str, md.Distribution] = {}
    stack = [Requirement(d) for d in deps]
    while stack:
        req = stack.pop()
        name = _norm(req.name)
        if name in seen:
            continue
        seen[name] = dist = md.distribution(req.name)  # PackageNotFoundError: not installed
        for raw in dist.requires or []:
            sub = Requirement(raw)
            extras = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                stack.append(sub)
    return seen


def _link_distribution(dist: md.Distribution, site: Path) -> int:
    """Symlink every file the distribution installed into its site dir under `site`."""
    files = dist.files
    assert files is not None, f"{dist.metadata['Name']} has no RECORD; cannot mirror it"
    base = Path(dist.locate_file("")).resolve()
    linked = 0
    for rel in files:
        src = Path(dist.locate_file(rel)).resolve()
        if not src.is_file() or not src.is_relative_to(base) or "__pycache__" in rel.parts:
            continue  # scripts in bin/, stale entries, byte-code
        dst = site / src.relative_to(base)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src)
            linked += 1
    return linked


_CHAT_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    for name in ("torch", "pytest", "openai", "httpx"):  # test extra only: must be absent
        assert importlib.util.find_spec(name) is None, name + " leaked into the base venv"
    from jaxserve import LLM, SamplingParams
    from jaxserve.demo import DemoShape, write_random_llama
    import jaxserve.serving.openai_app, jaxserve.serving.grpc_server  # the servers import
    shape = DemoShape(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_target=600)
    path = write_random_llama(sys.argv[1], shape)
    llm = LLM(path, max_model_len=64, max_num_seqs=1, max_num_batched_tokens=32,
              block_size=16, num_kv_blocks=8, show_progress=False)
    out = llm.chat([{"role": "user", "content": "Say hello."}],
                   SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                   use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2, out
    yes_no = SamplingParams(temperature=0.0, max_tokens=8,
                            structured_outputs={"choice": ["yes", "no"]})  # llguidance
    text = llm.generate(["Say hello."], yes_no, use_tqdm=False)[0].outputs[0].text
    assert text in ("yes", "no"), text
    print("CHAT_OK", repr(out[0].prompt))
""")


@pytest.mark.slow
def test_base_install_can_chat(tmp_path):
    closure = base_closure()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip())
    for dist in closure.values():
        _link_distribution(dist, site)
    (site / "jaxserve_src.pth").write_text(str(ROOT) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([py, "-c", _CHAT_SCRIPT, str(tmp_path / "model")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "CHAT_OK" in proc.stdout, proc.stderr[-3000:]
