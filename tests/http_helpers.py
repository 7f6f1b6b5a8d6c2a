"""Plain-HTTP helpers for tests that talk to a `serve` subprocess without an HTTP client library, and a port
nothing listens on (for connection-refused cases)."""

from __future__ import annotations

import io
import socket
import uuid


def multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, str]:
    """A multipart/form-data body with text ``fields`` and an optional PNG ``image``; (body, content type)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if image is not None:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'.encode())
        out.write(b"Content-Type: image/png\r\n\r\n" + image + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def closed_port() -> int:
    """A loopback port nothing listens on once this returns: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
