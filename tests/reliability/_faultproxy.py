"""A fault-injecting HTTP proxy on loopback, in front of the S3 test server.

Clients (s3fs, pyarrow, delta-rs) are pointed at the proxy's endpoint instead of the server's.
Requests matching a :class:`Rule` (method + path regex) meet a fault with probability
``rate`` (from a seeded generator, so a run is repeatable up to thread interleaving):

* ``503``: an S3 ``SlowDown`` error, request not forwarded;
* ``drop``: the connection is closed without an answer, request not forwarded;
* ``slow``: the answer is delayed by ``slow_s`` seconds, then forwarded normally.

Paths listed in ``always_fail`` get a 503 every time (an object that stays unreadable).
:attr:`FaultProxy.injected` counts faults per rule and kind; :attr:`FaultProxy.seen` counts the
matching requests. Everything else is forwarded untouched.

Tests use :class:`FaultProxyProcess`: the proxy must run in its own process because delta-rs
holds the GIL while it waits on HTTP, so an in-process proxy thread could never answer it (the
commit hangs). The child reports its counts at ``GET /__faultproxy__/stats``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

STATS_PATH = "/__faultproxy__/stats"

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>injected by the test fault proxy</Message></Error>")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te",
        "upgrade", "content-length"}


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    method: str  # regex on the HTTP method
    path: str  # regex on the request path (``/bucket/key?query``)

    def matches(self, method: str, path: str) -> bool:
        return bool(re.fullmatch(self.method, method)) and bool(re.search(self.path, path))


#: Delta commits: the put of ``_delta_log/<version>.json`` (put-if-absent).
DELTA_COMMITS = Rule("delta_commit", "PUT", r"/_delta_log/\d+\.json")
#: Image reads: GETs of image objects (not masks' PNGs of the lake: only under ``archive/``).
IMAGE_READS = Rule("image_read", "GET", r"/archive/.*\.(jpe?g|png|tiff?)(\?|$)")


class FaultProxy:
    def __init__(self, upstream: str, *, rules: list[Rule], rate: float, seed: int,
                 faults: tuple[str, ...] = ("503", "drop", "slow"), slow_s: float = 1.5,
                 always_fail: tuple[str, ...] = ()) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules = rules
        self.rate = rate
        self.faults = faults
        self.slow_s = slow_s
        self.always_fail = always_fail
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.seen: collections.Counter[str] = collections.Counter()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def total(self, rule: str) -> int:
        return sum(n for (r, _), n in self.injected.items() if r == rule)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"injected": {f"{r}/{k}": n for (r, k), n in sorted(self.injected.items())},
                    "seen": dict(self.seen)}

    # -- decisions ----------------------------------------------------------------------------
    def decide(self, method: str, path: str) -> tuple[str | None, str | None]:
        """(rule name, fault) for a request; fault None = forward untouched."""
        for rule in self.rules:
            if rule.matches(method, path):
                with self._lock:
                    self.seen[rule.name] += 1
                    if any(p in path for p in self.always_fail):
                        fault: str | None = "503"
                    elif self._rng.random() < self.rate:
                        fault = self._rng.choice(self.faults)
                    else:
                        fault = None
                    if fault:
                        self.injected[(rule.name, fault)] += 1
                return rule.name, fault
        return None, None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on a slow or dropped answer are the point, not news


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        if self.path == STATS_PATH:
            data = json.dumps(self.owner.stats()).encode()
            self.send_response_only(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        _, fault = self.owner.decide(self.command, self.path)
        if fault == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "503":
            self.send_response_only(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.send_header("Retry-After", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(_SLOWDOWN)
            return
        if fault == "slow":
            time.sleep(self.owner.slow_s)
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            if self.command == "HEAD":
                self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


RULES = {r.name: r for r in (DELTA_COMMITS, IMAGE_READS)}


class FaultProxyProcess:
    """:class:`FaultProxy` in a child process (see the module docstring); same arguments, rules
    given by name (:data:`RULES`). ``stats()`` returns the child's counts."""

    def __init__(self, upstream: str, *, rules: list[str], rate: float, seed: int,
                 slow_s: float = 1.5, always_fail: tuple[str, ...] = ()) -> None:
        self.args = [sys.executable, "-m", "tests.reliability._faultproxy", upstream,
                     "--rules", ",".join(rules), "--rate", str(rate), "--seed", str(seed),
                     "--slow-s", str(slow_s), *(a for p in always_fail for a in ("--always-fail", p))]
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint_url = ""

    def __enter__(self) -> FaultProxyProcess:
        from tests.conftest import _die_with_parent

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True, cwd=root,
                                     env=env, preexec_fn=_die_with_parent)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"fault proxy did not start: {line!r}")
        self.endpoint_url = f"http://127.0.0.1:{int(line.split()[1])}"
        return self

    def stats(self) -> dict[str, dict[str, int]]:
        with urlopen(self.endpoint_url + STATS_PATH, timeout=30) as r:
            return json.loads(r.read())

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("upstream")
    ap.add_argument("--rules", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--slow-s", type=float, default=1.5)
    ap.add_argument("--always-fail", action="append", default=[])
    a = ap.parse_args()
    proxy = FaultProxy(a.upstream, rules=[RULES[n] for n in a.rules.split(",")], rate=a.rate,
                       seed=a.seed, slow_s=a.slow_s, always_fail=tuple(a.always_fail))
    with proxy:
        print(f"PORT {proxy.endpoint_url.rsplit(':', 1)[1]}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    _main()
