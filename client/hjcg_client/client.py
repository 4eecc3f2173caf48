"""A Python client for the hjcg.v1 gRPC API."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hjcg.v1 import hjcg_pb2 as pb
from hjcg.v1 import hjcg_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"  # where `hjcg serve` listens by default
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),          # the server permits pings every 10 s
    ("grpc.keepalive_timeout_ms", 10_000),
]


class HjcgClient:
    """Connects to an hjcg server at `target` (host:port or unix:/path; default $HJCG_TARGET, else
    127.0.0.1:50051)."""

    def __init__(self, target: str | None = None, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        target = target or os.environ.get("HJCG_TARGET") or DEFAULT_TARGET
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
            self.channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.target = target
        self.stub = pb_grpc.HjcgStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def __enter__(self) -> "HjcgClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def request(*, text: str | None = None, chat: Sequence[tuple[str, str]] | None = None,
                token_ids: Sequence[int] | None = None, max_new_tokens: int = 0, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 0.0, min_p: float = 0.0, repetition_penalty: float = 0.0,
                seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                ignore_eos: bool = False, request_id: str = "", logprobs: int | None = None,
                response_format: tuple[str, str] | None = None) -> pb.GenerateRequest:
        """Builds a GenerateRequest from exactly one of text, chat ((role, content) pairs) or token_ids.
        logprobs: None (off) or how many alternatives each token's logprob comes with (0-20);
        response_format: (kind, value) with kind json_object (value ignored), json_schema, regex or grammar."""
        if sum(x is not None for x in (text, chat, token_ids)) != 1:
            raise ValueError("give exactly one of text, chat or token_ids")
        sampling = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repetition_penalty=repetition_penalty)
        if seed is not None:
            sampling.seed = seed
        request = pb.GenerateRequest(max_new_tokens=max_new_tokens, sampling=sampling, stop=list(stop),
                                     stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                                     request_id=request_id)
        if logprobs is not None:
            request.logprobs, request.top_logprobs = True, logprobs
        if response_format is not None:
            kind, value = response_format
            setattr(request.response_format, kind, True if kind == "json_object" else value)
        if text is not None:
            request.text = text
        elif chat is not None:
            request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in chat)
        else:
            request.token_ids.ids.extend(token_ids)
        return request

    def generate_stream(self, request: pb.GenerateRequest, timeout: float | None = None):
        """The raw response stream (a grpc call object: iterate it, or cancel() it)."""
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def generate(self, timeout: float | None = None, **kwargs) -> Iterator[pb.GenerateResponse]:
        """Streams GenerateResponses; kwargs as for request()."""
        return self.generate_stream(self.request(**kwargs), timeout=timeout)

    def complete(self, timeout: float | None = None, **kwargs) -> tuple[str, pb.GenerateFinish]:
        """Runs a generation to the end; returns (text, finish)."""
        parts, finish = [], None
        for response in self.generate(timeout=timeout, **kwargs):
            if response.HasField("token"):
                parts.append(response.token.text)
            else:
                finish = response.finish
                parts.append(finish.text)
        return "".join(parts), finish

    def status(self, timeout: float | None = 10.0) -> pb.StatusResponse:
        return self.stub.Status(pb.StatusRequest(), timeout=timeout, metadata=self.metadata)

    def warm(self, prompt_lengths: Sequence[int] = (), timeout: float | None = None) -> pb.WarmGraphsResponse:
        return self.stub.WarmGraphs(pb.WarmGraphsRequest(prompt_lengths=list(prompt_lengths)), timeout=timeout,
                                    metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... as the standard grpc.health.v1 service reports it."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
