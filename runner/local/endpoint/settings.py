"""What one endpoint server runs with: its deployments, key, timeouts, batching and limits, in one object."""

from dataclasses import dataclass
from typing import Dict, Optional

from runner.local.endpoint.limits import DEFAULT_LIMITS, MAX_REQUEST_BYTES, RequestLimits


@dataclass
class EndpointSettings:
    name: str
    deployments: Dict[str, str]  # deployment name -> model URI
    traffic: Dict[str, int]
    key: str
    request_timeout_ms: int = 90000
    max_batch_size: int = 16
    batch_window_ms: float = 10.0
    seed: int = 0
    shutdown_grace_s: float = 10.0
    torch_threads: Optional[int] = None
    device: str = "auto"  # auto = the first CUDA GPU when one is visible, else the CPU
    load_delay_s: float = 0.0  # testing only: hold readiness back to observe the 503 of a loading endpoint
    max_request_bytes: int = MAX_REQUEST_BYTES
    limits: RequestLimits = DEFAULT_LIMITS
    header_timeout_s: float = 10.0  # a connection's request line and headers must arrive within this (slowloris)
    body_timeout_s: float = 30.0  # ... and its body within this once the headers are in
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # beyond this many open connections (or requests in flight), new requests get 503
