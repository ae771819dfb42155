"""Flower 1.42's Runtime API as the ClientApp processes of this package use it (the internals fence).

The version check runs at import, before any Flower internal is named: another Flower is refused
with the reason instead of an ImportError. ``Endpoint`` says where the SuperNode's Runtime API is;
``runtime_client`` builds a client as ``flwr-clientapp`` (with a task token) or SuperExec (without)
does, with bounded retries; ``heartbeat_fn`` is the task heartbeat. Every module of this package
that uses Flower internals imports this one first; see docs/deployment.md 3.11.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__:  # the pin (flower_pin.py) owns the version; run by path (the worker), its sibling file
    from prism_flwr.deployment import flower_pin
else:
    _spec = importlib.util.spec_from_file_location(
        "_prism_flower_pin", Path(__file__).with_name("flower_pin.py")
    )
    flower_pin = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(flower_pin)
SUPPORTED_FLOWER, UnsupportedFlowerVersion = flower_pin.SUPPORTED_FLOWER, flower_pin.UnsupportedFlowerVersion


def installed_flower_version() -> str:
    return flower_pin.installed_flower_version()


def check_flower_version(version: str | None = None) -> str:
    """Return ``version`` (default: the installed Flower's) or refuse it with a clear reason."""
    version = installed_flower_version() if version is None else version
    user = "prism-flwr's ClientApp processes (clientapp-executor, clientapp)"
    return flower_pin.require_flower(user, "Run Flower's own flower-supernode and flwr-clientapp", version)


check_flower_version()  # before the internals below: a clear refusal instead of an ImportError

import httpx  # noqa: E402
from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # noqa: E402
from flwr.supercore.interceptors import (  # noqa: E402
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient  # noqa: E402

log = logging.getLogger("flwr")  # Flower's logger: same console format as the SuperNode's
RETRY_STATUS = (502, 503, 504)
RETRY_SECONDS = 60.0  # a worker's call gives up after this long without an answer (the task then fails)


@dataclass(frozen=True)
class Endpoint:
    """Where the SuperNode's Runtime API is and how to reach it (what ``flower-superexec`` takes)."""

    address: str
    insecure: bool = False
    root_certificates: str | None = None  # a PEM file; None with TLS: the system's CAs
    auth_secret_file: str | None = None  # SuperExec auth (HMAC on AcquireTask), supervisor only


class _Retry:
    """Retry transport errors and 502/503/504 with backoff for a bounded time.

    Flower's own invoker retries forever and, on a 401, sends SIGINT to its process: right for a
    process per task, wrong for a process that must outlive a task's expired token."""

    def __init__(self, max_seconds: float = RETRY_SECONDS) -> None:
        self.max_seconds = max_seconds

    def invoke(self, send):
        start, delay = time.monotonic(), 0.1
        while True:
            try:
                return send()
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                status = err.response.status_code if isinstance(err, httpx.HTTPStatusError) else None
                retryable = status is None or status in RETRY_STATUS
                if not retryable or time.monotonic() - start + delay > self.max_seconds:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 5.0)


def runtime_client(
    endpoint: Endpoint,
    token: str | None = None,
    component: str = "flwr-clientapp",
    max_seconds: float = RETRY_SECONDS,
) -> RuntimeHttpClient:
    """A Runtime API client as ``run_clientapp`` builds one (with ``token``) or SuperExec (without)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if endpoint.auth_secret_file:
        secret = Path(endpoint.auth_secret_file).read_bytes()
        protected = {"/flwr.proto.Runtime/AcquireTask"}  # what flower-superexec signs
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=protected))
    return RuntimeHttpClient.from_server_address(
        server_address=endpoint.address,
        insecure=endpoint.insecure,
        root_certificates=None if endpoint.insecure else endpoint.root_certificates,
        interceptors=interceptors,
        retry_invoker=_Retry(max_seconds),
    )


def heartbeat_fn(client: RuntimeHttpClient):
    """Flower's task heartbeat, except that a refused beat is logged instead of ending the process."""
    request = SendTaskHeartbeatRequest()
    refused = threading.Event()

    def beat() -> bool:
        try:
            ok = client.SendTaskHeartbeat(request).success
        except httpx.TransportError:
            return False  # retried by HeartbeatSender
        except httpx.HTTPStatusError as err:
            ok = False
            log.warning("task heartbeat failed: HTTP %s", err.response.status_code)
        if not ok and not refused.is_set():
            refused.set()
            log.warning("the SuperNode no longer accepts this task's heartbeat (task expired or stopped)")
        return True

    return beat
