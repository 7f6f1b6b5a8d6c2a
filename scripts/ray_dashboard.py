"""Open Ray's dashboard from the Docker host without publishing it (docs/scaling.md, "Ray's ports").

Ray has no authentication: whoever reaches the dashboard's Jobs API runs code on the cluster.  So the
compose file's ``ray-head`` binds the dashboard to the container's own loopback and publishes nothing.
This forwarder listens on the host's loopback (``127.0.0.1:8265``) and carries each connection through
``docker compose exec -T ray-head python -c BRIDGE`` — a stdin/stdout pipe to ``127.0.0.1:8265`` inside
the container — so only someone who may run ``docker`` on the host gets in.  From another machine:
``ssh -L 8265:127.0.0.1:8265 dockerhost``, then http://127.0.0.1:8265.

    python scripts/ray_dashboard.py                  # in the folder of docker-compose.yml
    python scripts/ray_dashboard.py --exec "docker exec -i my-ray-head"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import sys

DEFAULT_EXEC = "docker compose exec -T ray-head"

BRIDGE = """
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", {port}))
def up():
    while data := sys.stdin.buffer.raw.read(65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""
"""Runs inside the container with its Python: one TCP connection to the dashboard, spliced to stdin/stdout."""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file, then close the writing side (the other direction may still be open)."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError):
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()


async def _forward(client: asyncio.StreamReader, back: asyncio.StreamWriter, command: list[str]) -> None:
    """One browser connection: one ``exec`` of the bridge, bytes copied both ways until both ends finish."""
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        await asyncio.gather(_pump(client, process.stdin), _pump(process.stdout, back))
    finally:
        back.close()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def bridge_command(exec_prefix: str, port: int = 8265) -> list[str]:
    """The command that reaches ``127.0.0.1:port`` inside the container ``exec_prefix`` runs in."""
    return [*shlex.split(exec_prefix), "python", "-c", BRIDGE.format(port=port)]


async def serve(listen_port: int, command: list[str], ready: asyncio.Future[int] | None = None) -> None:
    """Listen on the host's loopback only and forward every connection until cancelled."""
    server = await asyncio.start_server(lambda r, w: _forward(r, w, command), "127.0.0.1", listen_port)
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(port)
    else:
        print(f"Ray dashboard: http://127.0.0.1:{port} (Ctrl-C to stop)", file=sys.stderr)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8265, help="host loopback port to listen on")
    parser.add_argument("--exec", dest="exec_prefix", default=DEFAULT_EXEC, help="how to run a command in ray-head")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="the dashboard's port in the container")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, bridge_command(args.exec_prefix, args.dashboard_port)))


if __name__ == "__main__":
    main()
