"""The gRPC request's sampling fields: every value outside its range is INVALID_ARGUMENT, and proto3's
"0 means unset" applies exactly where hjcg.sampling's table says (top_p, repetition_penalty)."""
import grpc
import pytest

from hjcg.engine import RequestError
from hjcg.sampling import SamplingParams
from hjcg.v1 import hjcg_pb2 as pb
from hjcg_server.convert import sampling_params

NAN, INF = float("nan"), float("inf")

BAD = [
    ("top_p", -0.5), ("top_p", -1e-30), ("top_p", 1.5), ("top_p", NAN), ("top_p", -INF),
    ("repetition_penalty", -0.5), ("repetition_penalty", -1e-30), ("repetition_penalty", 100.5),
    ("repetition_penalty", INF),
    ("min_p", -0.1), ("min_p", 1.01), ("min_p", NAN),
    ("temperature", -0.5), ("temperature", -1e-30), ("temperature", 101.0), ("temperature", INF),
    ("top_k", -1),
]


@pytest.mark.parametrize("field,value", BAD)
def test_out_of_range_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        sampling_params(pb.SamplingParams(**{field: value}))


def test_unset_fields_are_the_off_values():
    assert sampling_params(pb.SamplingParams()) == SamplingParams()
    assert sampling_params(pb.SamplingParams(top_p=1.0, repetition_penalty=1.0, seed=5)) == SamplingParams(seed=5)


def test_set_values_arrive_in_canonical_form():
    got = sampling_params(pb.SamplingParams(temperature=1e-7, top_k=7, top_p=0.5, min_p=0.25,
                                            repetition_penalty=1.25, seed=2**64 - 1))
    assert got == SamplingParams(temperature=0.0, top_k=7, top_p=0.5, min_p=0.25, repetition_penalty=1.25,
                                 seed=2**64 - 1)


def test_a_negative_top_p_is_invalid_argument_over_grpc(client):
    request = pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=-0.5))
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate_stream(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p" in info.value.details()
