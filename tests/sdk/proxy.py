"""A TCP proxy the SDK tests put between a client and the gateway, to break connections the
way a network does: `cut()` breaks every open connection at once; while `swallow` is set, what
the server sends is dropped, so a request can be handled by the server while its answer never
reaches the client (`answered` is set once a whole answer's worth was dropped: more than the
few bytes of an HTTP/2 PING, SETTINGS ack or WINDOW_UPDATE); `freeze()` makes the connections
open now go silent both ways without closing them (a peer or middlebox gone).

It runs on threads of its own, so that it works the same under the async client (on the test's
event loop) and the sync one (on a worker thread).
"""

from __future__ import annotations

import contextlib
import socket
import threading

ANSWER_BYTES = 64


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._frozen: list[tuple[socket.socket, socket.socket]] = []
        self.swallow = False
        self.swallowed = 0
        self.answered = threading.Event()
        self.connections = 0
        self.cuts = 0
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                self._pairs.append(pair)
                self.connections += 1
            for source, target, from_server in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(pair, source, target, from_server), daemon=True
                ).start()

    def _pump(
        self,
        pair: tuple[socket.socket, socket.socket],
        source: socket.socket,
        target: socket.socket,
        from_server: bool,
    ) -> None:
        try:
            while data := source.recv(65536):
                if pair in self._frozen:
                    continue
                if from_server and self.swallow:
                    self.swallowed += len(data)
                    if self.swallowed >= ANSWER_BYTES:
                        self.answered.set()
                    continue
                target.sendall(data)
        except OSError:
            pass
        finally:
            if pair not in self._frozen:  # a frozen connection's client is never told
                self._break(pair)

    def _break(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def freeze(self) -> None:
        """The connections open now carry nothing more, either way, and stay open; new ones are
        served."""
        with self._lock:
            self._frozen.extend(self._pairs)

    def cut(self) -> None:
        """Breaks every open connection (what was swallowed is lost); new ones are served."""
        with self._lock:
            pairs = list(self._pairs)
            self.cuts += 1
        for pair in pairs:
            self._break(pair)
        self._frozen.clear()
        self.swallow = False

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
