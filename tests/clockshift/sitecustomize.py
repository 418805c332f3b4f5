"""Moves the wall clock of this interpreter (and of every Python subprocess that inherits the
environment) by TEST_CLOCK_SHIFT, e.g. `+1100d`, for the shifted-clock run (`make test-shifted`).

time-machine patches time.time(), datetime.now(), date.today() and friends; the monotonic
clocks keep running untouched, so sleeps, waits and timeouts behave. libfaketime (LD_PRELOAD)
was tried first: under Python 3.11 it makes time.sleep() fail with EINVAL, or hangs
threading waits, depending on FAKETIME_DONT_FAKE_MONOTONIC.
"""

import os
import re

_SHIFT = os.environ.get("TEST_CLOCK_SHIFT", "")
_match = re.fullmatch(r"([+-]?\d+)d", _SHIFT)
if _match:
    import time
    from datetime import timedelta

    import time_machine

    time_machine.travel(time.time() + timedelta(days=int(_match[1])).total_seconds(),
                        tick=True).start()
elif _SHIFT:
    raise SystemExit(f"TEST_CLOCK_SHIFT={_SHIFT!r}: expected days, e.g. +1100d")
