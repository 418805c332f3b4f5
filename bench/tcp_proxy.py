"""A loopback TCP proxy that fails like a network does, for outage tests and `bench.records_outage`.

    proxy = TcpProxy(("127.0.0.1", 5432)).start()   # listens on 127.0.0.1:proxy.port
    proxy.set_mode("refuse")     # connections refused, open ones reset (the database is down)
    proxy.set_mode("blackhole")  # connections accepted, nothing delivered either way (a network
                                 # dropping packets: no error, no answer)
    proxy.set_mode("pass")       # back to normal; held data flows again (the partition heals)
    proxy.close()

Blackhole stops forwarding on every connection, open or new, and holds what was sent, so a
client waits exactly as it would behind a firewall that drops packets: until its own timeout.
"""

from __future__ import annotations

import socket
import threading

MODES = ("pass", "refuse", "blackhole")


class TcpProxy:
    def __init__(self, target: tuple[str, int], port: int = 0):
        self.target = target
        self.port = port
        self.mode = "pass"
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._closed = False

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        with self._lock:
            previous, self.mode = self.mode, mode
        if mode == "pass":
            self._flowing.set()
            if previous == "refuse":
                self._listen()
        elif mode == "blackhole":
            self._flowing.clear()
            if previous == "refuse":
                self._listen()
        else:
            self._flowing.set()  # let held pumps run into the closed sockets and end
            self._stop_listening()
            self._reset_all()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._stop_listening()
        self._reset_all()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
            except OSError:
                pass
            listener.close()

    def _reset_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for sock in connections:
            # Shut down, not closed: a pump blocked in recv() on it wakes and closes it. Closing
            # under a blocked recv() would not wake it, and the descriptor's number, reused by
            # the next connection, would hand that connection's bytes to the old pump.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # blackholed: held here until the network heals
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's pump
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._connections.difference_update((source, sink))
