"""The threaded HTTP server under every fake endpoint in the tests (FHIR, JWKS, Bulk Data, the
bench load generator's target)."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer


class LoopbackHTTPServer(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a call's 8 parallel reads overflow it, and the
    # kernel's dropped SYN is retried after 1 s, a stall that is the test server's, not ours.
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client may drop a keep-alive connection with a reset (requests closes a pooled
        # socket it will not reuse, e.g. after a 5xx). socketserver would print that traceback
        # on the test process's stderr, where a test asserting "no Traceback" reads it.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)
