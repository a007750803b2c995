"""The Open Inference Protocol over real HTTP on loopback, as a client on the network sees a
runtime (in a container, a VM or a process): JSON status and documents, and one inference."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any

import numpy as np


def http_request(url: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on its own connection, redirects not followed: GET ``url``, or
    POST ``body`` as JSON. (status, body); status 0: nothing answered (refused, reset, timed
    out, or the connection closed before a whole response)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        if body is None:
            connection.request("GET", target)
        else:
            connection.request("POST", target, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        connection.close()


def http_json(url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """:func:`http_request` with ``body`` sent as JSON: (status, the reply's JSON, or the head
    of its text when it is not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    status, payload = http_request(url, data, timeout)
    try:
        return status, json.loads(payload or b"null")
    except ValueError:
        return status, payload.decode(errors="replace")[:300]


def infer(
    base_url: str, model: str, input_name: str, data: np.ndarray, timeout: float = 120.0
) -> np.ndarray:
    """One FP32 inference on ``model``: its first output, in the shape the runtime says."""
    body = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(data.shape),
                "datatype": "FP32",
                "data": data.reshape(-1).tolist(),
            }
        ]
    }
    status, doc = http_json(f"{base_url}/v2/models/{model}/infer", body, timeout)
    assert status == 200, (status, doc)
    output = doc["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
