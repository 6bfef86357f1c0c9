"""The threaded HTTP server the e2e peers are built on."""

from http.server import ThreadingHTTPServer


class LoopbackHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` on a loopback address whose `accept()` cannot
    block `serve_forever`: the listening socket has a timeout, so a readiness
    that no connection follows ends in a timeout (an `OSError` that
    socketserver ignores) and the loop goes on to see `shutdown()`. A blocking
    accept once hung a fixture's teardown for pytest's 180 s timeout in CI.
    Accepted sockets are blocking, as before; handler threads are daemons."""

    daemon_threads = True

    def server_activate(self):
        super().server_activate()
        self.socket.settimeout(1.0)
