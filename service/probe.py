"""A container's health probe: ``python -m service.probe /healthz``.

Asks the server running beside it, at the address gunicorn binds (``BIND``, else
``0.0.0.0:PORT``), for a path, and exits 0 on a 200 and 1 otherwise, as Docker's
``HEALTHCHECK`` and compose's ``healthcheck`` read it. Standard library only: it runs every
few seconds, and must not pay for importing the service.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys

TIMEOUT_S = 2.0
# A wildcard address is bound on every interface; the probe asks the loopback one.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket, for ``BIND=unix:PATH``."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT_S)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def connection_to(bind: str) -> http.client.HTTPConnection:
    """A connection to the server bound at ``bind``, in gunicorn's forms: ``HOST:PORT``,
    ``[IPv6]:PORT``, ``tcp://HOST:PORT`` or ``unix:PATH``."""
    if bind.startswith("unix:"):
        return _UnixConnection(bind.removeprefix("unix:"))
    host, _, port = bind.removeprefix("tcp://").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return http.client.HTTPConnection(_LOOPBACK.get(host, host), _port(port), timeout=TIMEOUT_S)


def _port(written: str) -> int:
    """The port as the settings read it, which take 5001.0 for 5001 too."""
    try:
        return int(written)
    except ValueError:
        number = float(written)
        if not number.is_integer():
            raise
        return int(number)


def probe(path: str, environ: dict[str, str]) -> int:
    """0 when the server answers ``path`` with 200, else 1 (with the reason on stderr)."""
    named = {name.upper(): value for name, value in environ.items()}  # as the settings read them
    bind = named.get("BIND") or f"0.0.0.0:{named.get('PORT') or '5001'}"
    connection = connection_to(bind)
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        print(f"{bind}{path}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"{bind}{path}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else "/healthz", dict(os.environ)))
