"""Structured output through the engine and gRPC: constrained streams produce text that parses and matches,
end when complete, share batches with free streams without changing them, and bad constraints are refused."""
import json
import re

import grpc
import jsonschema
import pytest

from hjcg.engine import Finish, GenerationRequest, RequestError
from hjcg.requests import Constraint
from hjcg.sampling import SamplingParams
from hjcg.v1 import hjcg_pb2 as pb

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def chat(engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def generate(engine, **kwargs) -> tuple[str, Finish]:
    events = list(engine.generate(GenerationRequest(**kwargs)))
    return "".join(e.text for e in events), events[-1]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, seed=5),
                                      SamplingParams(temperature=1.5, top_p=0.95, seed=11)])
def test_json_schema_output_validates_and_ends_as_stop(engine, sampling):
    text, finish = generate(engine, prompt_ids=chat(engine, "Describe a person as JSON."), max_new_tokens=64,
                            sampling=sampling, constraint=Constraint("json_schema", json.dumps(PERSON)))
    jsonschema.validate(json.loads(text), PERSON)
    assert finish.reason in ("stop", "eos")


def test_json_object_regex_and_grammar(engine):
    prompt = chat(engine, "Answer with yes or no and a word.")
    text, _ = generate(engine, prompt_ids=prompt, max_new_tokens=64, constraint=Constraint("json_object"))
    assert isinstance(json.loads(text), dict)
    text, _ = generate(engine, prompt_ids=prompt, max_new_tokens=32, constraint=Constraint("regex", r"(yes|no), [a-z]{1,12}"))
    assert re.fullmatch(r"(yes|no), [a-z]{1,12}", text)
    grammar = 'start: "sum(" NUMBER ("," NUMBER)* ")"\nNUMBER: /[0-9]{1,3}/\n'
    text, _ = generate(engine, prompt_ids=chat(engine, "Add some numbers."), max_new_tokens=48,
                       constraint=Constraint("grammar", grammar))
    assert re.fullmatch(r"sum\([0-9]{1,3}(,[0-9]{1,3})*\)", text)


def test_a_free_stream_is_unchanged_by_a_constrained_neighbour(engine):
    free = GenerationRequest(prompt_ids=engine.encode_text("The quick brown fox"), max_new_tokens=24, ignore_eos=True)
    solo, _ = generate(engine, **{f: getattr(free, f) for f in ("prompt_ids", "max_new_tokens", "ignore_eos")})
    constrained = GenerationRequest(prompt_ids=chat(engine, "A person as JSON."), max_new_tokens=48,
                                    constraint=Constraint("json_schema", json.dumps(PERSON)))
    events = {"free": [], "constrained": []}
    engine.submit(constrained, events["constrained"].append)
    engine.step()  # the constrained stream joins first; the free one joins a step later
    engine.submit(free, events["free"].append)
    while engine.has_work():
        engine.step()
    assert "".join(e.text for e in events["free"]) == solo
    jsonschema.validate(json.loads("".join(e.text for e in events["constrained"])), PERSON)


@pytest.mark.parametrize("constraint,message", [
    (Constraint("json_schema", "{not json"), "json"),
    (Constraint("regex", "(unclosed"), "regex"),
    (Constraint("grammar", "start: undefined_rule"), "grammar"),
    (Constraint("yaml", "a: 1"), "kind"),
])
def test_bad_constraints_are_request_errors(engine, constraint, message):
    with pytest.raises(RequestError, match=f"(?i){message}"):
        engine.validate(GenerationRequest(prompt_ids=[1, 2], max_new_tokens=4, constraint=constraint))


def test_ignore_eos_cannot_be_constrained(engine):
    with pytest.raises(RequestError, match="ignore_eos"):
        engine.validate(GenerationRequest(prompt_ids=[1, 2], max_new_tokens=4, ignore_eos=True,
                                          constraint=Constraint("json_object")))


def test_response_format_over_grpc(client):
    text, finish = client.complete(chat=[("user", "A person as JSON.")], max_new_tokens=64,
                                   response_format=("json_schema", json.dumps(PERSON)))
    jsonschema.validate(json.loads(text), PERSON)
    assert finish.reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_EOS)


@pytest.mark.parametrize("format_,message", [
    (pb.ResponseFormat(), "set one of"),
    (pb.ResponseFormat(json_object=False), "json_object must be true"),
    (pb.ResponseFormat(regex=""), "regex is empty"),
    (pb.ResponseFormat(json_schema="[1, 2"), "json"),
    (pb.ResponseFormat(grammar="start: ???"), "grammar"),
])
def test_bad_response_format_is_invalid_argument(client, format_, message):
    request = pb.GenerateRequest(text="x", response_format=format_)
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate_stream(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(f"(?i){message}", info.value.details())


def test_cli_generate_with_a_regex_and_logprobs(server):
    from conftest import cli

    result = cli("generate", "Say yes or no.", "--chat", "--regex", "(yes|no)", "--json", "--logprobs", "1",
                 target=server.tcp)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    text = "".join(m["token"]["text"] for m in lines if "token" in m)
    assert text in ("yes", "no") and all("logprob" in m["token"] for m in lines if "token" in m)
    bad = cli("generate", "x", "--logprobs", "2", target=server.tcp)
    assert bad.returncode != 0 and "--json" in bad.stderr
