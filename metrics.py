"""Request metrics of the data storage service, in the Prometheus text format.

One ``Metrics`` object per application counts what its requests did: the
application counts each request when it hands its response to the server, so
a client that has read a response finds it counted; the gateway counts the
responses it gives itself (protocol errors, refusals, abandoned requests).
Updates take one lock for a handful of integer operations, cheap next to a
request's own work; ``render`` writes the text exposition format, version 0.0.4.

The counts live in a ``Board``: one slot of fixed layout per process. Worker
processes share one board, made before they are forked, so that ``/metrics``
from any worker counts the requests of all of them, and their calls to the
storage engine (``store_call``: the S3 store's calls, by operation).
"""

import bisect
import mmap
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KNOWN_METHODS = frozenset(   # other methods are labelled "other", so clients cannot grow the label set
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# A slot's layout, in 8-byte words: a request count for each method label and
# status (PEP 3333: a status is three digits; anything else counts as 0), the
# duration histogram's buckets (the last is +Inf), then the totals.
METHOD_LABELS = tuple(sorted(KNOWN_METHODS)) + ("other",)
_METHOD_ROWS = {method: row for row, method in enumerate(METHOD_LABELS)}
_STATUSES = 1000
_BUCKETS = len(METHOD_LABELS) * _STATUSES
_RECEIVED = _BUCKETS + len(DURATION_BUCKETS) + 1
_SENT, _ABANDONED, _IN_FLIGHT, _DURATION_SUM = range(_RECEIVED + 1, _RECEIVED + 5)
# Then, for each call to the storage engine by operation, three words: calls,
# errors, seconds. The operations are the S3 store's; any other counts as "other".
STORE_OPERATIONS = ("CopyObject", "DeleteObject", "GetObject", "HeadBucket", "HeadObject",
                    "ListObjectsV2", "PutObject", "other")
_STORE_ROWS = {operation: row for row, operation in enumerate(STORE_OPERATIONS)}
_STORE_CALLS = _DURATION_SUM + 1
SLOT_BYTES = 8 * (_STORE_CALLS + 3 * len(STORE_OPERATIONS))
# Request counts are added up a block of statuses at a time: a service answers
# few statuses, and an empty block is passed over in one comparison.
_BLOCK = 100
_EMPTY_BLOCK = bytes(8 * _BLOCK)


class Board:
    """The counts of ``slots`` processes, a slot each. ``shared``: in memory
    that processes forked after it is made share (an anonymous shared
    mmap), else in this process's own.

    A slot is written by one process only, under that process's lock;
    ``totals`` adds every slot up without a lock. Each count is an aligned
    8-byte word, written with one store on a 64-bit machine, so a sum may
    be a moment old (one request's counts half added) but is not torn."""

    def __init__(self, slots=1, shared=False):
        self.slots = slots
        self._memory = mmap.mmap(-1, slots * SLOT_BYTES) if shared else bytearray(
            slots * SLOT_BYTES)

    def slot(self, index):
        """``(bytes, unsigned words, signed words, float words)``: one slot, four ways."""
        view = memoryview(self._memory)[index * SLOT_BYTES:(index + 1) * SLOT_BYTES]
        return view, view.cast("Q"), view.cast("q"), view.cast("d")

    def forget_in_flight(self, index):
        """The requests in flight in slot ``index`` died with its process:
        they are in flight no more (its parent says so once it has reaped it)."""
        self.slot(index)[2][_IN_FLIGHT] = 0

    def totals(self):
        """Every slot added up: ``({word index: count} of the request counts
        that are not 0, [the words from the histogram's first to the
        abandoned requests], requests in flight, the durations' sum,
        {operation: [calls, errors, seconds]} of the storage engine's calls
        for the operations called)``."""
        requests = {}
        tail = [0] * (_IN_FLIGHT - _BUCKETS)
        in_flight = duration_sum = 0
        store_calls = [[0, 0, 0.0] for _ in STORE_OPERATIONS]
        for index in range(self.slots):
            view, words, signed, floats = self.slot(index)
            for start in range(0, _BUCKETS, _BLOCK):
                if bytes(view[8 * start:8 * (start + _BLOCK)]) != _EMPTY_BLOCK:
                    for word, count in enumerate(words[start:start + _BLOCK], start):
                        if count:
                            requests[word] = requests.get(word, 0) + count
            for offset, count in enumerate(words[_BUCKETS:_IN_FLIGHT]):
                tail[offset] += count
            in_flight += signed[_IN_FLIGHT]
            duration_sum += floats[_DURATION_SUM]
            for row, counts in enumerate(store_calls):
                first = _STORE_CALLS + 3 * row
                counts[0] += words[first]
                counts[1] += words[first + 1]
                counts[2] += floats[first + 2]
        return requests, tail, in_flight, duration_sum, {
            operation: counts for operation, counts in zip(STORE_OPERATIONS, store_calls)
            if counts[0]}


class Metrics:
    """Counters, a request-duration histogram and an in-flight gauge: this
    process's counts in slot ``slot`` of ``board`` (by default a board of
    its own), and the whole board's in ``render``."""

    def __init__(self, board=None, slot=0):
        self._board = board or Board()
        self._lock = threading.Lock()
        _, self._words, self._signed, self._floats = self._board.slot(slot)

    def request_started(self):
        with self._lock:
            self._signed[_IN_FLIGHT] += 1

    def request_ended(self, method, status, seconds, received, sent):
        """Count a request that ``request_started`` counted in flight."""
        self.count(method, status, seconds, received, sent, in_flight=-1)

    def request_handed_back(self):
        """A request leaves the application unanswered (its body could not be
        read): the server answers and counts it."""
        with self._lock:
            self._signed[_IN_FLIGHT] -= 1

    def count(self, method, status, seconds, received, sent, in_flight=0):
        """Count a request; ``status`` is None if no response was sent (abandoned)."""
        row = _METHOD_ROWS.get(method, len(METHOD_LABELS) - 1)
        bucket = _BUCKETS + bisect.bisect_left(DURATION_BUCKETS, seconds)
        words = self._words
        with self._lock:
            if in_flight:
                self._signed[_IN_FLIGHT] += in_flight
            words[_RECEIVED] += received
            words[_SENT] += sent
            if status is None:
                words[_ABANDONED] += 1
            else:
                words[row * _STATUSES + (status if 0 <= status < _STATUSES else 0)] += 1
                words[bucket] += 1
                self._floats[_DURATION_SUM] += seconds

    def store_call(self, operation, failed, seconds):
        """Count a call to the storage engine (``operation``: one of
        STORE_OPERATIONS, else it counts as "other")."""
        first = _STORE_CALLS + 3 * _STORE_ROWS.get(operation, len(STORE_OPERATIONS) - 1)
        with self._lock:
            self._words[first] += 1
            self._words[first + 1] += bool(failed)
            self._floats[first + 2] += seconds

    def render(self, objects, stored_bytes):
        """The exposition text, with the store's current ``objects`` and
        ``stored_bytes`` (None: not counted), and the storage engine's calls
        if there were any."""
        counts, tail, in_flight, duration_sum, store_calls = self._board.totals()
        requests = sorted((METHOD_LABELS[word // _STATUSES], word % _STATUSES, count)
                          for word, count in counts.items())
        buckets = tail[:_RECEIVED - _BUCKETS]
        received, sent, abandoned = tail[_RECEIVED - _BUCKETS:]
        lines = ["# HELP datastore_http_requests_total HTTP requests answered, by method and status.",
                 "# TYPE datastore_http_requests_total counter"]
        lines += ['datastore_http_requests_total{method="%s",status="%d"} %d' % (method, status, count)
                  for method, status, count in requests]
        lines += ["# HELP datastore_http_request_duration_seconds Time from the request "
                  "reaching the application to its response being ready.",
                  "# TYPE datastore_http_request_duration_seconds histogram"]
        cumulative = 0
        for bound, count in zip(DURATION_BUCKETS + (float("inf"),), buckets):
            cumulative += count
            lines.append('datastore_http_request_duration_seconds_bucket{le="%s"} %d'
                         % ("+Inf" if bound == float("inf") else repr(bound), cumulative))
        lines += ["datastore_http_request_duration_seconds_sum %r" % duration_sum,
                  "datastore_http_request_duration_seconds_count %d" % cumulative]
        for name, kind, value, text in (
                ("datastore_http_in_flight_requests", "gauge", in_flight,
                 "Requests the application is working on now."),
                ("datastore_http_requests_abandoned_total", "counter", abandoned,
                 "Requests whose client went away or stalled before any response."),
                ("datastore_objects", "gauge", objects, "Objects stored, all repositories."),
                ("datastore_bytes", "gauge", stored_bytes, "Bytes stored, all repositories."),
                ("datastore_received_bytes_total", "counter", received,
                 "Request body bytes received."),
                ("datastore_sent_bytes_total", "counter", sent, "Response body bytes sent.")):
            if value is not None:   # a store that does not count its objects gives None
                lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind),
                          "%s %d" % (name, value)]
        for name, column, text in (
                ("datastore_store_calls_total", 0, "Calls to the storage engine, by operation."),
                ("datastore_store_errors_total", 1,
                 "Calls to the storage engine that failed, by operation."),
                ("datastore_store_call_seconds_total", 2,
                 "Time spent in calls to the storage engine, by operation.")) if store_calls else ():
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s counter" % name]
            lines += ['%s{operation="%s"} %s' % (name, operation, counts[column])
                      for operation, counts in sorted(store_calls.items())]
        return "\n".join(lines) + "\n"
