"""Real servers on 127.0.0.1 for remote I/O tests and bench/bench_remote.py: moto's S3 server, and an HTTP file
server with Range support whose /cut/ paths drop the connection partway through a response (fault injection)."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-7f3a", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3():
    """moto's S3 server on 127.0.0.1, reached the standard way (AWS_ENDPOINT_URL and dummy keys in os.environ,
    restored after). Yields the endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of files under `root` with single-range `Range` requests (206). Paths:
    /files/NAME  served whole; /cut/NAME  the first response that reaches the middle of the file stops there
    and the connection is closed (Content-Length promised more); /dead/NAME  every response is cut;
    /denied/NAME  403. Every request is logged as (path, first byte) in `server.requests`, the body bytes written
    are added up in `server.sent`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _target(self):
        mode, _, name = self.path.lstrip("/").partition("/")
        return mode, os.path.join(self.server.root, name)

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        mode, path = self._target()
        if mode == "denied":
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode not in ("files", "cut", "dead") or not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = os.path.getsize(path)
        start, end = 0, size - 1
        m = _RANGE.match(self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if body:
            self.server.requests.append((self.path, start))
        self.send_response(206 if m else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        middle = size // 2
        cut = (mode == "dead" or (mode == "cut" and path not in self.server.cut_done)) and start <= middle <= end
        if cut:
            self.server.cut_done.add(path)
            self.server.sent += middle - start
            self.wfile.write(data[: middle - start])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.server.sent += len(data)
        self.wfile.write(data)


@contextlib.contextmanager
def range_server(root: str):
    """A threaded RangeHandler server over `root`; yields it (.url, .requests, .sent, .cut_done)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.daemon_threads = True
    server.root, server.requests, server.sent, server.cut_done = str(root), [], 0, set()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def dask_hosts(folder, workers: int = 1):
    """A Dask scheduler and `workers` worker processes started as separate commands on 127.0.0.1, each worker in
    its own empty working folder under `folder` (as on separate hosts: nothing shared but the network and the
    environment). Yields the scheduler address."""
    import pathlib
    import subprocess
    import sys
    import time

    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", ":0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for i in range(workers):
            home = pathlib.Path(folder) / f"worker-{i}"
            home.mkdir(parents=True)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1",
                 "--local-directory", str(home), "--no-dashboard"],
                cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 120
        while True:
            try:
                with Client(address, timeout=5) as client:
                    if len(client.scheduler_info()["workers"]) >= workers:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"dask workers did not join {address}")
            time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
