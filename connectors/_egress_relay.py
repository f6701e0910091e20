"""In-jail relay: 127.0.0.1:PORT of the jail's own network namespace -> the egress proxy's socket.

Run inside the sandbox as ``python -I -S _egress_relay.py PORT SOCKET -- COMMAND ARGS...``: it
binds the port, forks a child that relays each TCP connection to the unix socket, and execs
COMMAND in its own place. Standard library only (the jail holds no broker code). It adds no
policy: the proxy on the other side of the socket decides everything; this only carries bytes
across the namespace boundary that the jail's empty network namespace otherwise closes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _serve(client: socket.socket, path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(path)
    except OSError:
        client.close()
        upstream.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _relay(listener: socket.socket, path: str) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve, args=(client, path), daemon=True).start()


def main(argv: list[str]) -> None:
    port, path, separator, *command = argv
    if separator != "--" or not command:
        sys.exit("usage: _egress_relay.py PORT SOCKET -- COMMAND [ARGS...]")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(64)
    if os.fork() == 0:
        try:
            # Never hold the connector's stdio pipes: its stdout is the MCP stream.
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):
                os.dup2(null, fd)
            _relay(listener, path)
        finally:
            os._exit(0)
    listener.close()
    os.execv(command[0], command)  # noqa: S606 - the connector's fixed argv


if __name__ == "__main__":
    main(sys.argv[1:])
