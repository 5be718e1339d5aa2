"""The committed gRPC stubs are exactly what grpc_tools.protoc generates from the .proto."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = "jaxserve/serving/proto/jaxserve.proto"
STUBS = ("jaxserve_pb2.py", "jaxserve_pb2.pyi", "jaxserve_pb2_grpc.py")


def test_committed_stubs_match_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(ROOT / PROTO)])
    assert rc == 0
    for name in STUBS:
        generated = (tmp_path / "jaxserve/serving/proto" / name).read_text()
        committed = (ROOT / "jaxserve/serving/proto" / name).read_text()
        assert generated == committed, f"{name} is stale: regenerate it (see the .proto header)"


def test_optional_scalars_have_presence():
    from jaxserve.serving.proto import jaxserve_pb2 as pb

    params = pb.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")
