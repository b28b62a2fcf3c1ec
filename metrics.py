"""Request metrics of the data storage service, in the Prometheus text format.

One ``Metrics`` object per application counts what its requests did: the
application counts each request when it hands its response to the server, so
a client that has read a response finds it counted; the gateway counts the
responses it gives itself (protocol errors, refusals, abandoned requests).
Updates take one lock for a handful of integer operations, cheap next to a
request's own work; ``render`` writes the text exposition format, version 0.0.4.
"""

import bisect
import collections
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KNOWN_METHODS = frozenset(   # other methods are labelled "other", so clients cannot grow the label set
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, a request-duration histogram and an in-flight gauge."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests = collections.Counter()   # (method, status) -> count
        self._bucket_counts = [0] * (len(DURATION_BUCKETS) + 1)   # the last is +Inf
        self._duration_sum = 0.0
        self._received = 0
        self._sent = 0
        self._in_flight = 0
        self._abandoned = 0

    def request_started(self):
        with self._lock:
            self._in_flight += 1

    def request_ended(self, method, status, seconds, received, sent):
        """Count a request that ``request_started`` counted in flight."""
        self.count(method, status, seconds, received, sent, in_flight=-1)

    def request_handed_back(self):
        """A request leaves the application unanswered (its body could not be
        read): the server answers and counts it."""
        with self._lock:
            self._in_flight -= 1

    def count(self, method, status, seconds, received, sent, in_flight=0):
        """Count a request; ``status`` is None if no response was sent (abandoned)."""
        method = method if method in KNOWN_METHODS else "other"
        bucket = bisect.bisect_left(DURATION_BUCKETS, seconds)
        with self._lock:
            self._in_flight += in_flight
            self._received += received
            self._sent += sent
            if status is None:
                self._abandoned += 1
            else:
                self._requests[method, status] += 1
                self._bucket_counts[bucket] += 1
                self._duration_sum += seconds

    def render(self, objects, stored_bytes, store_calls=None):
        """The exposition text, with the store's current ``objects`` and
        ``stored_bytes`` (None: not counted), and ``store_calls``, an
        ``{operation: [calls, errors, seconds]}`` of the storage engine's calls."""
        with self._lock:
            requests = sorted(self._requests.items())
            buckets = list(self._bucket_counts)
            duration_sum, received, sent = self._duration_sum, self._received, self._sent
            in_flight, abandoned = self._in_flight, self._abandoned
        lines = ["# HELP datastore_http_requests_total HTTP requests answered, by method and status.",
                 "# TYPE datastore_http_requests_total counter"]
        lines += ['datastore_http_requests_total{method="%s",status="%d"} %d' % (method, status, count)
                  for (method, status), count in requests]
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
