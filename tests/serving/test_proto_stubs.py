"""The committed gRPC stubs are exactly what grpc_tools.protoc generates from the .proto."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = "jaxserve/serving/proto/jaxserve.proto"
STUBS = ("jaxserve_pb2.py", "jaxserve_pb2.pyi", "jaxserve_pb2_grpc.py")
# the grpcio-tools release that generated a stub is stamped into it; a newer patch release of the
# tools (the test extra is not pinned) generates the same code under another stamp
_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", re.M)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_committed_stubs_match_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(ROOT / PROTO)])
    assert rc == 0
    for name in STUBS:
        generated = (tmp_path / "jaxserve/serving/proto" / name).read_text()
        committed = (ROOT / "jaxserve/serving/proto" / name).read_text()
        assert _STAMP.sub("", generated) == _STAMP.sub("", committed), (
            f"{name} is stale: regenerate it (see the .proto header)")


def test_committed_stub_runs_on_the_installed_grpcio():
    import grpc

    text = (ROOT / "jaxserve/serving/proto/jaxserve_pb2_grpc.py").read_text()
    stamp = _STAMP.search(text)
    assert stamp is not None
    assert _version(stamp.group(1)) <= _version(grpc.__version__.split("rc")[0])


def test_optional_scalars_have_presence():
    from jaxserve.serving.proto import jaxserve_pb2 as pb

    params = pb.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")
