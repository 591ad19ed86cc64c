"""Clock shim for chaos tests: offsets the wall clock of the engine subprocess.

Loaded only when tests/chaos/controllers.py puts this directory on PYTHONPATH (with
TXCHAOS_CLOCK_FILE set). `time.time()` and `time.time_ns()` return the real clock plus the
nanoseconds written in that file; the file is re-read at start and whenever the process gets
SIGUSR1, so a test can jump the clock of a running engine forwards or backwards. The monotonic
clock is untouched (as with a real wall-clock step). No engine code is changed.
"""
import os
import signal
import time

_FILE = os.environ.get("TXCHAOS_CLOCK_FILE")

if _FILE:
    _real_time_ns = time.time_ns
    _offset = [0]

    def _reload(*_args):
        try:
            with open(_FILE) as f:
                _offset[0] = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pass

    def _time_ns():
        return _real_time_ns() + _offset[0]

    def _time():
        return (_real_time_ns() + _offset[0]) / 1e9

    _reload()
    time.time_ns = _time_ns
    time.time = _time
    signal.signal(signal.SIGUSR1, _reload)
