"""The service's two logs, written to one stream (stderr by default).

- The *service log*: start-up settings, signals, abandoned requests, restarted
  workers, unexpected errors with tracebacks; filtered by ``--log-level``.
- The *access log*: one line per response, in Common Log Format or as JSON.

Both escape control characters that come from clients, so a request line
cannot inject terminal escapes or fake lines.

Access-log lines are gathered and written together by ``flush``, which the
gateway calls a few times a second: one write per request would cost each
request a system call, and with it a hand-over of the GIL between the
connection threads (measured: about a fifth of the small-request rate).
A service-log line is written at once, after the access lines before it.
Request threads only append under a short lock (``_pending_lock``); writes
are serialized by another (``_write_lock``), so a stream that blocks (a slow
log reader) holds up requests only once MAX_PENDING_LINES are waiting. A
stream that fails (a closed pipe) loses lines but never stops the server.
Where the stream has bytes underneath (stderr), the lines go out in writes
of at most PIPE_BUF bytes that end at line ends: worker processes share the
stream, and a pipe (systemd's journal, a container's log) keeps only such
writes whole, so no worker's line is cut by another's. A line longer than
PIPE_BUF (a traceback, a request line of kilobytes) is one write of its own,
which a pipe may interleave with another's.
Neither lock is re-entrant: signal handlers must not log (they run on the
main thread, which may be in the middle of a flush).
"""

import datetime
import json
import os
import select
import sys
import threading
import time

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
MAX_PENDING_LINES = 256   # access lines held before ``flush`` is due anyway
ATOMIC_WRITE_BYTES = getattr(select, "PIPE_BUF", 512)   # POSIX: at least 512
_ESCAPES = {code: "\\x%02x" % code for code in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})


def printable(text):
    """``text`` with control characters written as ``\\xNN``, and ``"`` and
    ``\\`` as ``\\"`` and ``\\\\`` (as Apache writes them): a client's request
    line, quoted in a log line, cannot end its quotes and forge the fields
    after them."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.translate(_ESCAPES)


class Log:
    """Writes service-log and access-log lines; ``log_format`` is "text" or "json"."""

    def __init__(self, stream=None, log_format="text", level="info"):
        self.stream = stream or sys.stderr
        self.json = log_format == "json"
        self.threshold = LEVELS[level]
        self._date = (0, "")
        self._pending = []   # lines not yet written
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()

    def log(self, level, message):
        """A line of the service log, if ``level`` passes the threshold."""
        if LEVELS[level] < self.threshold:
            return
        now = datetime.datetime.now(datetime.timezone.utc)
        if self.json:
            line = json.dumps({"time": now.isoformat(timespec="milliseconds"),
                               "level": level, "message": message})
        else:
            line = "%s %s %s" % (now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                                 level.upper(), message)
        with self._write_lock:
            with self._pending_lock:
                self._pending.append(line)
            self._write_pending()

    def access(self, remote, method, path, request_line, status, received, sent, seconds):
        """The access-log line of a finished response. ``received`` and ``sent``
        count body bytes; ``method`` and ``path`` are None if the request line
        could not be parsed."""
        if self.json:
            line = json.dumps({
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="milliseconds"),
                "remote": remote, "method": method, "path": path, "status": status,
                "request_bytes": received, "response_bytes": sent,
                "duration_ms": round(seconds * 1000, 3)})
        else:
            line = '%s - - [%s] "%s" %d %d' % (remote, self._access_date(),
                                                 printable(request_line), status, sent)
        with self._pending_lock:
            self._pending.append(line)
            due = len(self._pending) >= MAX_PENDING_LINES
        if due:
            self.flush()

    def flush(self):
        """Write the lines gathered so far."""
        with self._write_lock:
            self._write_pending()

    def _write_pending(self):
        """Write the pending lines, together (``_write_lock`` held)."""
        with self._pending_lock:
            lines, self._pending = self._pending, []
        if lines:
            try:
                self._write("\n".join(lines) + "\n")
            except (OSError, ValueError):   # a closed pipe or stream: nobody reads these lines
                pass

    def _write(self, text):
        """``text`` (whole lines) in writes that keep lines whole on a shared
        pipe, where the stream has bytes underneath and a line end is one
        "\n" (else, as text: a Windows console's line ends are the text layer's)."""
        stream = self.stream
        stream.flush()   # what others wrote to it first (a traceback printed to stderr)
        raw = getattr(stream, "buffer", None)
        if raw is None or os.linesep != "\n":
            stream.write(text)
            stream.flush()
            return
        data = text.encode(getattr(stream, "encoding", None) or "utf-8",
                           getattr(stream, "errors", None) or "strict")
        for piece in line_pieces(data, ATOMIC_WRITE_BYTES):
            with memoryview(piece) as left:
                while left:   # a raw stream (python -u) may take part of it
                    written = raw.write(left)
                    if written is None:   # a non-blocking stream that is full: the rest is lost
                        raise BlockingIOError("log stream full")
                    left = left[written:]
            raw.flush()

    def _access_date(self):
        """The current time as the access log writes it, formatted at most once a second."""
        now = int(time.time())
        cached = self._date
        if cached[0] != now:
            cached = self._date = (now, time.strftime("%d/%b/%Y %H:%M:%S", time.localtime(now)))
        return cached[1]


def line_pieces(data, size):
    """``data`` in pieces of at most ``size`` bytes that each end at a line
    end; a longer line is a piece of its own."""
    start = 0
    while start < len(data):
        end = start + size
        if end < len(data):
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= 0 else (data.find(b"\n", end) + 1 or len(data))
        yield data[start:end]
        start = end


class ErrorStream:
    """``wsgi.errors`` for the gateway: each ``write`` becomes one error line of
    the service log (an application writes a message, traceback included, at once)."""

    def __init__(self, log):
        self._log = log

    def write(self, text):
        if text.strip():
            self._log.log("error", text.rstrip("\n"))

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass
