"""A TCP pass-through to the real S3 server (MinIO) for faults a store shows: a test tool, not a
fake (every byte still goes to MinIO and back).

- `hold`: requests whose HTTP request line contains it are held until `release()`. A held
  request puts the client in a known state for as long as a test needs it ("the trainer is
  downloading the base model"), so a signal sent then lands there on any machine, however slow
  or loaded, instead of wherever a race left the process.
- `listen_after`: nothing listens on the port for that many seconds (connection refused), as a
  store that is down and comes back.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from urllib.parse import urlsplit

from localenv.testing import free_port


class ForwardingProxy:
    def __init__(self, upstream_url: str, hold: str = "", listen_after: float = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"plain http upstream expected, got {upstream_url}")
        self._upstream = (parts.hostname, parts.port or 80)
        # A request line, at the start of what the client sends: `GET /bucket/key?... HTTP/1.1`.
        self._hold = re.compile(rb"^[A-Z]+ \S*" + re.escape(hold).encode()) if hold else None
        self.held = threading.Event()  # a matching request arrived and is being held
        self._released = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        port = free_port() if listen_after else 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._timer = threading.Timer(listen_after, self._listen)
        self._timer.daemon = True
        self._timer.start()

    def _listen(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._listener.listen(16)
        self._accept()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed.set()
            self._released.set()
            for sock in [self._listener, *self._sockets]:
                # shutdown, unlike close, wakes a thread blocked in accept or recv
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def __enter__(self) -> ForwardingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if self._closed.is_set():  # accepted while closing: not served
                sock.close()
                raise OSError("proxy closed")
            self._sockets.append(sock)
        return sock

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client = self._track(self._listener.accept()[0])
                upstream = self._track(socket.create_connection(self._upstream))
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                # HTTP/1.1 requests on one connection follow one another, so a request line
                # starts a chunk from the client.
                held = from_client and self._hold is not None and self._hold.match(chunk)
                if held and not self._released.is_set():
                    self.held.set()
                    self._released.wait()
                    if self._closed.is_set():
                        return
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
