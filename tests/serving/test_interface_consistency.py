"""gRPC and HTTP agree on meanings: Detokenize keeps special tokens by default; logprobs `top`
lists the k most likely tokens by rank (the sampled one only when it ranks within k)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from jaxserve.engine.outputs import Logprob
from jaxserve.serving import grpc_convert
from jaxserve.serving.openai_format import TokenText, chat_logprobs
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import API_KEY

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def stub(fake_server):
    with grpc.insecure_channel(fake_server.grpc_target) as channel:
        yield pb_grpc.JaxServeStub(channel)


def test_detokenize_keeps_special_tokens_by_default_in_both(fake_server, stub, demo_tokenizer):
    ids = ([demo_tokenizer.convert_tokens_to_ids("<|user|>")]
           + demo_tokenizer.encode("Hello world", add_special_tokens=False))
    http = httpx.post(f"{fake_server.http_url}/detokenize", json={"tokens": ids},
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert http.status_code == 200, http.text
    rpc = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), metadata=AUTH, timeout=5)
    assert rpc.text == http.json()["prompt"] == "<|user|>Hello world"
    skipped = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=True),
                              metadata=AUTH, timeout=5)
    assert skipped.text == "Hello world"


def _position(sampled: int, sampled_rank: int, k: int) -> dict[int, Logprob]:
    """The engine's dict: the sampled token first, then the top k (ids 100.., ranks 1..k)."""
    pos = {sampled: Logprob(-0.5 * sampled_rank, sampled_rank, f"s{sampled}")}
    for r in range(1, k + 1):
        tid = sampled if r == sampled_rank else 100 + r
        pos.setdefault(tid, Logprob(-0.5 * r, r, f"t{tid}"))
    return pos


@pytest.mark.parametrize("sampled_rank", [1, 2, 5])
def test_grpc_top_is_the_top_k_by_rank_like_http(sampled_rank):
    k = 2
    positions = [_position(7, sampled_rank, k)]
    msg = grpc_convert.logprobs_to_proto(positions, [7], num_top=k)[0]
    assert msg.sampled.token_id == 7 and msg.sampled.rank == sampled_rank
    assert [t.rank for t in msg.top] == [1, 2]
    assert (7 in [t.token_id for t in msg.top]) == (sampled_rank <= k)
    http = chat_logprobs([7], positions, k, TokenText(tokenizer=None))["content"][0]
    assert [(e["token"], e["logprob"]) for e in http["top_logprobs"]] == [
        (t.decoded_token, t.logprob) for t in msg.top]
