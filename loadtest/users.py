"""Layers 2 and 3: an abstract user that builds its client, and scenario users holding
only tasks. Configure them with `configure(...)`, which returns subclasses bound to a
model, a URL and a load shape (Locust instantiates user classes itself)."""

from __future__ import annotations

import time
from typing import Callable

import gevent
import gevent.pool
from locust import User, constant, task
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING

from loadtest.clients import (
    ClientSaturated,
    OpenAIClient,
    TritonGrpcClient,
    TritonHttpClient,
    TritonStreamClient,
)
from loadtest.payloads import Payloads


def track(environment, client):
    """Remember ``client`` on the environment, so ``close_clients`` closes it when the run ends,
    whether or not Locust ran the user's ``on_stop`` (a user killed before it started does not)."""
    if not hasattr(environment, "kiln_clients"):
        environment.kiln_clients = []
    environment.kiln_clients.append(client)
    return client


def close_clients(environment) -> int:
    """Close every client the run's users opened (idempotent); returns how many were tracked."""
    clients = getattr(environment, "kiln_clients", [])
    for client in clients:
        client.close()
    environment.kiln_clients = []
    return len(clients)


class TritonUser(User):
    """Abstract: builds the client for `protocol` against `host` on start."""

    abstract = True
    wait_time = constant(0)
    protocol = "grpc"
    model = ""
    output = "embedding"
    texts_per_request = 1
    concurrency = 1

    def __init__(self, environment):
        super().__init__(environment)
        fire = environment.events.request.fire
        if self.protocol == "grpc":
            self.client = TritonGrpcClient(fire, self.host, self.model, self.output)
        elif self.protocol == "http":
            self.client = TritonHttpClient(fire, self.host, self.model, self.output, self.concurrency)
        else:
            self.client = TritonStreamClient(fire, self.host, self.model)
        track(environment, self.client)
        self.payloads = Payloads(seed=id(self) & 0xFFFF)

    def on_stop(self):
        self.client.close()


class EmbedUser(TritonUser):
    """Closed loop: each user sends the next request when the last one is answered."""

    abstract = True

    @task
    def embed(self):
        self.client.infer_texts(self.payloads.sample(self.texts_per_request))


_STOPPING = (STATE_CLEANUP, STATE_STOPPING, STATE_STOPPED)


class OpenLoop:
    """Mixin for open-loop users: one user sends at a constant rate whatever the server's
    latency, each request in its own greenlet, so a slow server shows up as latency, not
    as a slower client (coordinated omission)."""

    fixed_count = 1
    rate = 20.0
    max_in_flight = 256
    offered = 0  # requests the schedule called for (sent or not), per configured class

    def schedule(self, send: Callable[[], object]) -> None:
        pool = gevent.pool.Pool(self.max_in_flight)
        interval, next_at = 1.0 / self.rate, time.perf_counter()
        fire = self.environment.events.request.fire
        try:
            while True:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    gevent.sleep(delay)
                # a stopping user finishes its task: without this check the schedule would
                # send on until Locust's stop_timeout kills it
                if self.environment.runner.state in _STOPPING:
                    break
                type(self).offered += 1
                if pool.full():
                    fire(request_type=self.protocol, name=self.model, response_time=0, response_length=0,
                         exception=ClientSaturated(f"{self.max_in_flight} requests outstanding"), context={})
                else:
                    pool.spawn(send)
                next_at += interval
        finally:
            pool.join(timeout=10)  # let in-flight requests finish and be counted


class OpenLoopEmbedUser(OpenLoop, TritonUser):
    abstract = True

    @task
    def drive(self):
        self.schedule(lambda: self.client.infer_texts(self.payloads.sample(self.texts_per_request)))


class StreamUser(TritonUser):
    """Token streaming through Triton's generate_stream: TTFT, inter-token, tokens/s."""

    abstract = True
    protocol = "stream"
    max_tokens = 32

    @task
    def generate(self):
        self.client.generate(self.payloads.sample(1)[0], max_tokens=self.max_tokens, stream=True)


class OpenLoopStreamUser(OpenLoop, TritonUser):
    abstract = True
    protocol = "stream"
    max_tokens = 32

    @task
    def drive(self):
        self.schedule(lambda: self.client.generate(self.payloads.sample(1)[0], max_tokens=self.max_tokens, stream=True))


class OpenAIUser(User):
    """Abstract: builds the OpenAI client against the gateway at `host` (host:port) on start."""

    abstract = True
    wait_time = constant(0)
    protocol = "openai"
    model = ""
    api_key = "none"  # a gateway without keys accepts anything
    texts_per_request = 1
    max_tokens = 32

    def __init__(self, environment):
        super().__init__(environment)
        self.client = track(environment, OpenAIClient(environment.events.request.fire, self.host, self.model,
                                                      self.api_key))
        self.payloads = Payloads(seed=id(self) & 0xFFFF)

    def on_stop(self):
        self.client.close()


class OpenAIChatUser(OpenAIUser):
    """Streamed chat answers: TTFT, inter-token, tokens/s."""

    abstract = True

    @task
    def chat(self):
        self.client.chat(self.payloads.sample(1)[0], self.max_tokens)


class OpenAIEmbedUser(OpenAIUser):
    abstract = True

    @task
    def embed(self):
        self.client.embed(self.payloads.sample(self.texts_per_request))


class OpenLoopOpenAIChatUser(OpenLoop, OpenAIUser):
    abstract = True

    @task
    def drive(self):
        self.schedule(lambda: self.client.chat(self.payloads.sample(1)[0], self.max_tokens))


class OpenLoopOpenAIEmbedUser(OpenLoop, OpenAIUser):
    abstract = True

    @task
    def drive(self):
        self.schedule(lambda: self.client.embed(self.payloads.sample(self.texts_per_request)))


def configure(base: type[User], **attrs) -> type[User]:
    return type(base.__name__.replace("User", "") + "Scenario", (base,), {"abstract": False, **attrs})
