"""gunicorn's gthread worker, with new connections shared out between workers.

Every worker polls the same listening socket and the first to call accept() gets the connection.
A gthread worker's main thread only polls (its request threads answer the calls), so a worker
whose threads are all busy accepts as fast as an idle one: measured here (issue 20), 16
keep-alive connections on 2 workers left one at a full CPU and the other at a third. Epic and
load balancers keep their connections for minutes, so where they land decides the load.

`SharingThreadWorker` waits `DEFER_S` before accepting once it holds a connection per thread,
so an idler worker takes the connection first; if none does, it accepts after the wait. It never
stops polling the socket and never refuses anything; with one worker it is plain gthread.
"""

from __future__ import annotations

import time

from gunicorn.workers.gthread import ThreadWorker

# Long enough for another worker's poll to wake and accept (tens of µs when it is idle), short
# enough that a connection to a deployment where every worker is loaded waits unnoticed.
DEFER_S = 0.002


class SharingThreadWorker(ThreadWorker):
    def accept(self, listener):
        if self.cfg.workers > 1 and self.nr_conns >= self.cfg.threads:
            time.sleep(DEFER_S)  # the connection stays queued; accept() below may find it gone
        super().accept(listener)  # EAGAIN (another worker took it) is ignored there
