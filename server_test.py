"""HTTP tests: a real server on port 0, real sockets, for every store backend.

``ServerContract`` holds the tests; a backend's test case supplies
``make_store()``. Requests that ordinary clients would refuse to send
(malformed framing, pipelining, bad request lines) go over raw sockets.
"""

import functools
import hashlib
import http.client
import io
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

import server
import storage
from test_storage import (files_under, open_disk_store, run_concurrently, small_filesystem,
                          temporary_directory)

HERE = os.path.dirname(os.path.abspath(__file__))


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def wait_until(condition, timeout=10.0):
    """Poll ``condition`` until it holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %s s" % timeout)
        time.sleep(0.005)


def child_pids(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as file:
        return [int(child) for child in file.read().split()]


def running(pid):
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def closed_by_server(sock):
    """True once the server has closed ``sock`` (without waiting if it has not)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def read_line(pipe, timeout=10.0):
    """The next line from an unbuffered subprocess pipe (``bufsize=0``, so that
    select sees every byte not yet read), failing instead of hanging."""
    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        raise AssertionError("no output within %s s" % timeout)
    return pipe.readline()


class Response:
    """A parsed response: status, headers (case-insensitive), body, and the raw head."""

    def __init__(self, response):
        self.status = response.status
        self.headers = response.msg
        self.body = response.read()

    def json(self):
        return json.loads(self.body)


class _KeptOpenReader(io.BufferedReader):
    """A socket reader that http.client cannot close between responses."""

    def close(self):
        pass


class _SharedFile:
    """Lets several http.client responses read from one buffered socket file."""

    def __init__(self, sock=None, file=None):
        self.file = file or _KeptOpenReader(socket.SocketIO(sock, "rb"))

    def makefile(self, *args, **kwargs):
        return self.file


class RunningServer:
    """A DataStorageServer on 127.0.0.1:0 serving from a background thread."""

    def __init__(self, store, handler_class=server.DataStorageHandler, **options):
        self.log = io.StringIO()
        self.httpd = server.DataStorageServer(("127.0.0.1", 0), store, log_stream=self.log,
                                              handler_class=handler_class, **options)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class HTTPClientMixin:
    """Requests to ``self.running`` (a RunningServer) and assertions on the answers."""

    def connect(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=10)
        self.addCleanup(connection.close)
        return connection

    def request(self, method, path, body=None, headers=None, connection=None):
        connection = connection or self.connect()
        connection.request(method, path, body=body, headers=headers or {})
        return Response(connection.getresponse())

    def put(self, repository, data):
        response = self.request("PUT", "/data/%s" % repository, data)
        self.assertEqual(response.status, 201, response.body)
        return response.json()["oid"]

    def raw_socket(self):
        sock = socket.create_connection(("127.0.0.1", self.running.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def raw(self, data, responses=1, methods=None, sock=None):
        """Send raw bytes; parse and return ``responses`` responses from the connection."""
        sock = sock or self.raw_socket()
        sock.sendall(data)
        shared = _SharedFile(sock)
        parsed = []
        for method in (methods or ["GET"] * responses):
            response = http.client.HTTPResponse(shared, method=method)
            response.begin()
            parsed.append(Response(response))
        return parsed if responses > 1 else parsed[0]

    def assertJSONError(self, response, status):
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertIsInstance(response.json()["error"], str)

    def assertClosed(self, sock):
        sock.settimeout(5)
        try:
            self.assertEqual(sock.recv(1), b"")
        except ConnectionResetError:
            pass

    def assertNotStored(self, repository, data):
        self.assertEqual(self.request("GET", "/data/%s/%s" % (repository, sha256(data))).status, 404)


class ServerContract(HTTPClientMixin):
    """HTTP behaviour every store backend must show. Subclasses define ``make_store()``."""

    server_options = {}

    def setUp(self):
        super().setUp()
        self.running = RunningServer(self.make_store(), **self.server_options)
        self.addCleanup(lambda: self.running.stop())

    def restart_server(self, store=None, **options):
        """Replace the running server with one built with another store or options."""
        self.running.stop()
        self.running = RunningServer(store or self.make_store(), **options)

    @property
    def store(self):
        return self.running.httpd.store

    # The exercise's own tests ------------------------------------------------

    def test_put_returns_oid_and_size(self):
        first = self.request("PUT", "/data/my-repo", b"something")
        self.assertEqual(first.status, 201)
        self.assertEqual(first.json(), {"oid": sha256(b"something"), "size": 9})
        second = self.request("PUT", "/data/my-repo", b"other")
        self.assertEqual(second.status, 201)
        self.assertEqual(second.json()["size"], 5)
        self.assertNotEqual(first.json()["oid"], second.json()["oid"])

    def test_get_returns_the_exact_bytes(self):
        for data in (b"something", b"other", bytes(range(256)) * 1000):
            oid = self.put("my-repo", data)
            response = self.request("GET", "/data/my-repo/%s" % oid)
            self.assertEqual((response.status, response.body), (200, data))

    def test_get_missing_is_404(self):
        self.assertJSONError(self.request("GET", "/data/my-repo/missing"), 404)

    def test_delete_leaves_the_other_repositorys_copy(self):
        oid = self.put("my-repo", b"something")
        self.assertEqual(self.put("other-repo", b"something"), oid)
        self.assertEqual(self.request("DELETE", "/data/my-repo/%s" % oid).status, 200)
        self.assertEqual(self.request("GET", "/data/my-repo/%s" % oid).status, 404)
        self.assertEqual(self.request("GET", "/data/other-repo/%s" % oid).body, b"something")

    def test_delete_missing_is_404(self):
        self.assertJSONError(self.request("DELETE", "/data/my-repo/missing"), 404)
        oid = self.put("my-repo", b"once")
        self.assertEqual(self.request("DELETE", "/data/my-repo/%s" % oid).status, 200)
        self.assertJSONError(self.request("DELETE", "/data/my-repo/%s" % oid), 404)

    # Uploads ---------------------------------------------------------------

    def test_put_response_headers(self):
        response = self.request("PUT", "/data/repo", b"body")
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertEqual(response.headers["Location"], "/data/repo/%s" % sha256(b"body"))
        self.assertEqual(int(response.headers["Content-Length"]), len(response.body))

    def test_put_existing_content_answers_the_same(self):
        first = self.request("PUT", "/data/repo", b"again")
        second = self.request("PUT", "/data/repo", b"again")
        self.assertEqual((second.status, second.json()), (201, first.json()))

    def test_empty_body_is_an_object(self):
        response = self.request("PUT", "/data/repo", b"")
        self.assertEqual(response.json(), {"oid": sha256(b""), "size": 0})
        self.assertEqual(self.request("GET", "/data/repo/%s" % sha256(b"")).body, b"")

    def test_put_without_length_or_chunking_is_an_empty_object(self):
        response = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(response.json(), {"oid": sha256(b""), "size": 0})

    def test_verified_put(self):
        oid = sha256(b"verified")
        response = self.request("PUT", "/data/repo/%s" % oid, b"verified")
        self.assertEqual((response.status, response.json()), (201, {"oid": oid, "size": 8}))
        self.assertEqual(self.request("GET", "/data/repo/%s" % oid).body, b"verified")

    def test_verified_put_with_wrong_oid_stores_nothing(self):
        wrong = sha256(b"expected")
        self.assertJSONError(self.request("PUT", "/data/repo/%s" % wrong, b"actual"), 400)
        self.assertNotStored("repo", b"actual")
        self.assertEqual(self.request("GET", "/data/repo/%s" % wrong).status, 404)

    def test_verified_put_with_malformed_oid_is_400(self):
        self.assertJSONError(self.request("PUT", "/data/repo/missing", b"data"), 400)
        self.assertNotStored("repo", b"data")

    def test_object_larger_than_limit_is_413(self):
        self.restart_server(max_object_size=10)
        self.assertEqual(self.request("PUT", "/data/repo", b"x" * 10).status, 201)
        self.assertJSONError(self.request("PUT", "/data/repo", b"y" * 11), 413)
        self.assertNotStored("repo", b"y" * 11)
        chunked = self.raw(b"PUT /data/repo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"6\r\nzzzzzz\r\n6\r\nzzzzzz\r\n0\r\n\r\n")
        self.assertJSONError(chunked, 413)
        self.assertNotStored("repo", b"z" * 12)

    # Downloads -------------------------------------------------------------

    def test_get_headers(self):
        oid = self.put("repo", b"headers")
        response = self.request("GET", "/data/repo/%s" % oid)
        self.assertEqual(response.headers["Content-Type"], "application/octet-stream")
        self.assertEqual(response.headers["Content-Length"], "7")
        self.assertEqual(response.headers["ETag"], '"%s"' % oid)
        self.assertEqual(response.headers["Accept-Ranges"], "bytes")
        self.assertIn("Date", response.headers)

    def test_head_sends_headers_without_body(self):
        oid = self.put("repo", b"head body")
        sock = self.raw_socket()
        head, get = self.raw(("HEAD /data/repo/%s HTTP/1.1\r\n\r\n"
                              "GET /data/repo/%s HTTP/1.1\r\n\r\n" % (oid, oid)).encode(),
                             responses=2, methods=["HEAD", "GET"], sock=sock)
        self.assertEqual((head.status, head.body, head.headers["Content-Length"]), (200, b"", "9"))
        self.assertEqual(head.headers["ETag"], '"%s"' % oid)
        self.assertEqual(get.body, b"head body")
        self.assertEqual(self.request("HEAD", "/data/repo/missing").status, 404)

    def test_large_get_streams_whole_object(self):
        data = os.urandom(3 * 1024 * 1024 + 7)
        oid = self.put("repo", data)
        self.assertEqual(self.request("GET", "/data/repo/%s" % oid).body, data)

    def test_if_none_match(self):
        oid = self.put("repo", b"cached")
        etag = '"%s"' % oid
        for value in (etag, "*", "W/" + etag, '"other", ' + etag):
            response = self.request("GET", "/data/repo/%s" % oid, headers={"If-None-Match": value})
            self.assertEqual((response.status, response.body), (304, b""), value)
            self.assertEqual(response.headers["ETag"], etag)
        response = self.request("GET", "/data/repo/%s" % oid, headers={"If-None-Match": '"other"'})
        self.assertEqual((response.status, response.body), (200, b"cached"))

    def test_single_ranges(self):
        oid = self.put("repo", b"0123456789")
        path = "/data/repo/%s" % oid
        for value, body, content_range in (("bytes=2-4", b"234", "bytes 2-4/10"),
                                           ("bytes=7-", b"789", "bytes 7-9/10"),
                                           ("bytes=-3", b"789", "bytes 7-9/10"),
                                           ("bytes=8-100", b"89", "bytes 8-9/10"),
                                           ("bytes=-50", b"0123456789", "bytes 0-9/10")):
            response = self.request("GET", path, headers={"Range": value})
            self.assertEqual((response.status, response.body), (206, body), value)
            self.assertEqual(response.headers["Content-Range"], content_range)

    def test_large_range_is_exact(self):
        data = os.urandom(1024 * 1024)
        oid = self.put("repo", data)
        response = self.request("GET", "/data/repo/%s" % oid, headers={"Range": "bytes=1000-800999"})
        self.assertEqual((response.status, response.body), (206, data[1000:801000]))

    def test_unsatisfiable_range_is_416(self):
        oid = self.put("repo", b"short")
        for value in ("bytes=5-", "bytes=100-200", "bytes=-0"):
            response = self.request("GET", "/data/repo/%s" % oid, headers={"Range": value})
            self.assertJSONError(response, 416)
            self.assertEqual(response.headers["Content-Range"], "bytes */5")

    def test_ranges_we_do_not_serve_get_the_whole_object(self):
        oid = self.put("repo", b"whole")
        path = "/data/repo/%s" % oid
        for headers in ({"Range": "bytes=0-1,3-4"}, {"Range": "bytes=3-1"}, {"Range": "items=0-1"},
                        {"Range": "bytes=0-1", "If-Range": '"stale"'}):
            response = self.request("GET", path, headers=headers)
            self.assertEqual((response.status, response.body), (200, b"whole"), headers)
        head = self.request("HEAD", path, headers={"Range": "bytes=0-1"})
        self.assertEqual((head.status, head.headers["Content-Length"]), (200, "5"))

    # Names and routes ----------------------------------------------------------

    def test_repository_name_rules(self):
        for name in ("a", "A.b_c-9", "x" * 100):
            self.assertEqual(self.request("PUT", "/data/%s" % name, b"ok").status, 201, name)
        for name in ("x" * 101, "%2E", "%2E%2E", "a%2Fb", "caf%C3%A9", "a%00b", "%FF", "a%20b"):
            with self.subTest(name=name):
                self.assertJSONError(self.request("PUT", "/data/%s" % name, b"no"), 400)
                self.assertJSONError(self.request("GET", "/data/%s/%s" % (name, sha256(b"no"))), 400)

    def test_percent_encoded_names_are_decoded(self):
        oid = self.put("my%2Drepo", b"decoded")
        self.assertEqual(self.request("GET", "/data/my-repo/%s" % oid).body, b"decoded")

    def test_query_string_is_ignored(self):
        response = self.request("PUT", "/data/repo?x=1&y", b"query")
        self.assertEqual(response.status, 201)
        self.assertEqual(self.request("GET", "/data/repo/%s?z" % sha256(b"query")).body, b"query")

    def test_absolute_form_target(self):
        response = self.raw(b"PUT http://example.com/data/repo HTTP/1.1\r\nHost: example.com\r\n"
                            b"Content-Length: 8\r\n\r\nabsolute")
        self.assertEqual(response.status, 201)

    def test_unknown_paths_are_404(self):
        for path in ("/", "/data", "/data/", "/data/repo/%s/extra" % sha256(b""), "/other/repo",
                     "/data//x"):
            self.assertJSONError(self.request("GET", path), 404)

    def test_disallowed_method_is_405_with_allow(self):
        response = self.request("POST", "/data/repo", b"x")
        self.assertJSONError(response, 405)
        self.assertEqual(response.headers["Allow"], "GET, HEAD, PUT")
        response = self.request("PATCH", "/data/repo/%s" % sha256(b""), b"x")
        self.assertJSONError(response, 405)
        self.assertEqual(response.headers["Allow"], "GET, HEAD, PUT, DELETE")

    def test_unknown_method_is_405_on_a_known_route(self):
        response = self.raw(b"QUERY /data/repo HTTP/1.1\r\n\r\n")
        self.assertJSONError(response, 405)
        self.assertEqual(response.headers["Allow"], "GET, HEAD, PUT")
        self.assertJSONError(self.raw(b"BREW /nowhere HTTP/1.1\r\n\r\n"), 404)

    # Malformed requests ---------------------------------------------------------

    def test_malformed_request_lines(self):
        for request, status in ((b"GARBAGE\r\n\r\n", 400),
                                (b"GET /\r\n\r\n", 400),                      # HTTP/0.9
                                (b"GET / HTTP/2.0\r\n\r\n", 505),
                                (b"GET / HTTP/1\r\n\r\n", 400),
                                (b"GET  /data/r HTTP/1.1\r\n\r\n", 400),
                                (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414)):
            with self.subTest(request=request[:30]):
                sock = self.raw_socket()
                self.assertJSONError(self.raw(request, sock=sock), status)
                self.assertClosed(sock)
        self.assertJSONError(self.raw(b"GET /data/r/\xff HTTP/1.1\r\n\r\n"), 400)

    def test_malformed_header_sections(self):
        many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        for headers, status in ((b"X-Long: " + b"a" * 9000 + b"\r\n", 431),
                                (many, 431),
                                (b"Bad Name: x\r\n", 400),
                                (b"X-Fold: a\r\n  folded\r\n", 400),
                                (b"Host : x\r\n", 400),
                                (b"NoColon\r\n", 400)):
            with self.subTest(headers=headers[:30]):
                self.assertJSONError(self.raw(b"GET /data/r/x HTTP/1.1\r\n" + headers + b"\r\n"),
                                     status)

    def test_unexpected_exception_is_json_500(self):
        class BrokenHandler(server.DataStorageHandler):
            def delete_object(self, repository, oid):
                raise RuntimeError("bug")

        self.restart_server(handler_class=BrokenHandler)
        response = self.request("DELETE", "/data/repo/%s" % sha256(b""))
        self.assertJSONError(response, 500)
        self.assertNotIn(b"bug", response.body)
        wait_until(lambda: "RuntimeError: bug" in self.running.log.getvalue())
        self.assertEqual(self.request("PUT", "/data/repo", b"still serving").status, 201)

    # Framing -------------------------------------------------------------------

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        connection = self.connect()
        for index in range(20):
            data = b"item %d" % index
            self.assertEqual(self.request("PUT", "/data/repo", data, connection=connection).status, 201)
            self.assertEqual(self.request("GET", "/data/repo/%s" % sha256(data),
                                          connection=connection).body, data)

    def test_pipelined_requests(self):
        oid = sha256(b"pipe")
        responses = self.raw(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 4\r\n\r\npipe"
                             b"GET /data/repo/" + oid.encode() + b" HTTP/1.1\r\n\r\n"
                             b"DELETE /data/repo/" + oid.encode() + b" HTTP/1.1\r\n\r\n",
                             responses=3)
        self.assertEqual([r.status for r in responses], [201, 200, 200])
        self.assertEqual(responses[1].body, b"pipe")

    def test_http_1_0_closes_after_response(self):
        sock = self.raw_socket()
        response = self.raw(b"PUT /data/repo HTTP/1.0\r\nContent-Length: 3\r\n\r\nold", sock=sock)
        self.assertEqual(response.status, 201)
        self.assertEqual(response.headers["Connection"], "close")
        self.assertClosed(sock)

    def test_connection_close_is_honoured(self):
        sock = self.raw_socket()
        self.assertEqual(self.raw(b"GET /data/r/x HTTP/1.1\r\nConnection: close\r\n\r\n",
                                  sock=sock).status, 404)
        self.assertClosed(sock)

    def test_chunked_upload(self):
        body = (b"5;ext=1\r\nhello\r\n"
                b"1\r\n \r\n"
                b"000005\r\nworld\r\n"
                b"0\r\nX-Trailer: yes\r\n\r\n")
        sock = self.raw_socket()
        put, get = self.raw(b"PUT /data/repo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body
                            + b"GET /data/repo/" + sha256(b"hello world").encode()
                            + b" HTTP/1.1\r\n\r\n", responses=2, sock=sock)
        self.assertEqual(put.json(), {"oid": sha256(b"hello world"), "size": 11})
        self.assertEqual(get.body, b"hello world")

    def test_chunked_upload_from_http_client(self):
        data = os.urandom(300000)
        connection = self.connect()
        connection.request("PUT", "/data/repo", body=iter([data[:100000], data[100000:]]),
                           encode_chunked=True)
        self.assertEqual(connection.getresponse().read(), json.dumps(
            {"oid": sha256(data), "size": len(data)}).encode())

    def test_malformed_chunks_are_400_and_store_nothing(self):
        for body in (b"zz\r\nhello\r\n0\r\n\r\n",
                     b"5\r\nhelloXX0\r\n\r\n",
                     b"5\nhello\r\n0\r\n\r\n",
                     b"-5\r\nhello\r\n0\r\n\r\n",
                     b"1" * 20 + b"\r\n"):
            with self.subTest(body=body):
                sock = self.raw_socket()
                response = self.raw(b"PUT /data/repo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + body, sock=sock)
                self.assertJSONError(response, 400)
                self.assertClosed(sock)
        self.assertNotStored("repo", b"hello")

    def test_conflicting_framing_is_400(self):
        for headers in (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                        b"Content-Length: 5\r\nContent-Length: 6\r\n",
                        b"Content-Length: 5, 6\r\n",
                        b"Content-Length: +5\r\n",
                        b"Content-Length: -5\r\n",
                        b"Content-Length: 1_0\r\n",
                        b"Content-Length: 5x\r\n",
                        b"Transfer-Encoding: chunked, gzip\r\n",
                        b"Transfer-Encoding: chunked, chunked\r\n"):
            with self.subTest(headers=headers):
                sock = self.raw_socket()
                self.assertJSONError(self.raw(b"PUT /data/repo HTTP/1.1\r\n" + headers + b"\r\nhello",
                                              sock=sock), 400)
                self.assertClosed(sock)
        self.assertNotStored("repo", b"hello")

    def test_identical_repeated_content_length_is_accepted(self):
        response = self.raw(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n"
                            b"\r\nhello")
        self.assertEqual(response.json()["size"], 5)

    def test_unsupported_transfer_coding_is_501(self):
        self.assertJSONError(self.raw(b"PUT /data/repo HTTP/1.1\r\n"
                                      b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"), 501)

    def test_unread_body_does_not_become_the_next_request(self):
        smuggled = b"GET /data/repo/missing HTTP/1.1\r\n\r\n"
        first, second = self.raw(b"GET /data/r/missing HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                                 % len(smuggled) + smuggled
                                 + b"PUT /data/repo HTTP/1.1\r\nContent-Length: 4\r\n\r\nnext",
                                 responses=2)
        self.assertEqual((first.status, second.status), (404, 201))

    def test_large_unread_body_closes_the_connection(self):
        sock = self.raw_socket()
        response = self.raw(b"POST /data/repo HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n"
                            + b"x" * 1000000, sock=sock)
        self.assertJSONError(response, 405)
        self.assertEqual(response.headers["Connection"], "close")
        self.assertClosed(sock)

    def test_expect_continue_on_acceptable_upload(self):
        sock = self.raw_socket()
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 8\r\nExpect: 100-continue\r\n\r\n")
        reader = sock.makefile("rb")
        self.assertEqual(reader.readline(), b"HTTP/1.1 100 Continue\r\n")
        self.assertEqual(reader.readline(), b"\r\n")
        sock.sendall(b"continue")
        response = http.client.HTTPResponse(_SharedFile(file=reader), method="PUT")
        response.begin()
        self.assertEqual((response.status, json.loads(response.read())["size"]), (201, 8))

    def test_expect_continue_refused_requests_get_final_status_instead(self):
        self.restart_server(max_object_size=100)
        for request, status in ((b"PUT /data/repo HTTP/1.1\r\nContent-Length: 101\r\n", 413),
                                (b"POST /data/repo HTTP/1.1\r\nContent-Length: 5\r\n", 405),
                                (b"PUT /data/repo/missing HTTP/1.1\r\nContent-Length: 5\r\n", 400),
                                (b"PUT /data/a%2Fb HTTP/1.1\r\nContent-Length: 5\r\n", 400),
                                (b"PUT /nowhere HTTP/1.1\r\nContent-Length: 5\r\n", 404)):
            with self.subTest(request=request):
                sock = self.raw_socket()
                response = self.raw(request + b"Expect: 100-continue\r\n\r\n", sock=sock)
                self.assertJSONError(response, status)   # http.client would fail on a 100 here
                self.assertClosed(sock)

    # Concurrency ---------------------------------------------------------------

    def test_32_concurrent_clients(self):
        failures = []

        def client(number):
            connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=30)
            try:
                for round_ in range(10):
                    data = b"client %d round %d " % (number, round_) * (number + 1)
                    oid = sha256(data)
                    checks = [self.request("PUT", "/data/repo", data, connection=connection).status == 201,
                              self.request("GET", "/data/repo/" + oid, connection=connection).body == data,
                              self.request("DELETE", "/data/repo/" + oid, connection=connection).status == 200,
                              self.request("GET", "/data/repo/" + oid, connection=connection).status == 404]
                    if not all(checks):
                        failures.append((number, round_, checks))
            except Exception as error:   # a thread's exception would otherwise vanish
                failures.append((number, repr(error)))
            finally:
                connection.close()

        run_concurrently([functools.partial(client, n) for n in range(32)])
        self.assertEqual(failures, [])

    def test_concurrent_put_and_delete_never_expose_a_partial_object(self):
        data = os.urandom(512 * 1024)
        oid = sha256(data)
        bad = []
        done = threading.Event()

        def churn():
            connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=30)
            for _ in range(15):
                self.request("PUT", "/data/race", data, connection=connection)
                self.request("DELETE", "/data/race/" + oid, connection=connection)
            connection.close()

        def read():
            connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=30)
            while not done.is_set():
                response = self.request("GET", "/data/race/" + oid, connection=connection)
                if response.status not in (200, 404) or (response.status == 200 and response.body != data):
                    bad.append((response.status, len(response.body)))
            connection.close()

        writers = [threading.Thread(target=churn) for _ in range(2)]
        readers = [threading.Thread(target=read) for _ in range(2)]
        for thread in writers + readers:
            thread.start()
        for thread in writers:
            thread.join()
        done.set()
        for thread in readers:
            thread.join()
        self.assertEqual(bad, [])

    # Faults and limits -------------------------------------------------------------

    def test_client_disconnecting_mid_upload_stores_nothing(self):
        sock = self.raw_socket()
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
        sock.close()
        wait_until(lambda: "abandoned" in self.running.log.getvalue())
        self.assertEqual(len(self.running.log.getvalue().splitlines()), 1)
        wait_until(lambda: "datastore_http_requests_abandoned_total 1\n"
                   in self.request("GET", "/metrics").body.decode())
        self.assertEqual(self.store.usage(), (0, 0))
        self.assertEqual(self.put("repo", b"unaffected"), sha256(b"unaffected"))

    def test_stalled_requests_are_closed_after_the_timeout(self):
        self.restart_server(request_timeout=0.3)
        for request in (b"",                                               # idle keep-alive
                        b"PUT /data/repo HTTP/1.1\r\nHost: x\r\n",         # mid-headers
                        b"PUT /data/repo HTTP/1.1\r\nContent-Length: 10\r\n\r\nhalf"):  # mid-body
            with self.subTest(request=request):
                sock = self.raw_socket()
                sock.sendall(request)
                self.assertClosed(sock)
        self.assertEqual(self.store.usage(), (0, 0))
        self.assertEqual(self.put("repo", b"still serving"), sha256(b"still serving"))

    def test_quota(self):
        self.restart_server(store=self.make_store(max_total_size=10))
        first = self.put("repo", b"123456")
        self.assertJSONError(self.request("PUT", "/data/repo", b"abcdef"), 507)
        self.assertNotStored("repo", b"abcdef")
        self.assertEqual(self.request("PUT", "/data/repo", b"123456").status, 201)  # already stored
        self.assertEqual(self.request("PUT", "/data/repo/" + first, b"123456").status, 201)
        self.assertEqual(self.request("GET", "/data/repo/" + first).body, b"123456")
        self.assertEqual(self.request("DELETE", "/data/repo/" + first).status, 200)
        self.assertEqual(self.request("PUT", "/data/repo", b"abcdef").status, 201)

    # Listing ---------------------------------------------------------------------

    def test_listing_pages_through_a_repository(self):
        expected = sorted(({"oid": self.put("repo", b"entry %d" % n), "size": len(b"entry %d" % n)}
                           for n in range(7)), key=lambda entry: entry["oid"])
        self.put("other", b"elsewhere")
        collected, after = [], None
        for _ in range(5):
            query = "?limit=3" + ("&after=" + after if after else "")
            page = self.request("GET", "/data/repo" + query)
            self.assertEqual((page.status, page.headers["Content-Type"]), (200, "application/json"))
            collected += page.json()["objects"]
            after = page.json()["next"]
            if after is None:
                break
        self.assertEqual(collected, expected)
        self.assertEqual(self.request("GET", "/data/repo").json(), {"objects": expected, "next": None})

    def test_listing_an_empty_repository(self):
        self.assertEqual(self.request("GET", "/data/nothing-here").json(), {"objects": [], "next": None})
        head = self.request("HEAD", "/data/nothing-here")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(int(head.headers["Content-Length"]), len(b'{"objects": [], "next": null}'))

    def test_listing_rejects_bad_parameters(self):
        for query in ("limit=0", "limit=10001", "limit=-1", "limit=%2B5", "limit=null",
                      "limit=-1e400", "limit=", "limit=1&limit=2", "after=xyz", "after=",
                      "after=%ff", "after=%00", "after=%s&after=%s" % ("0" * 64, "1" * 64)):
            with self.subTest(query=query):
                self.assertJSONError(self.request("GET", "/data/repo?" + query), 400)
        self.assertJSONError(self.request("GET", "/data/" + "x" * 101), 400)
        self.assertJSONError(self.request("GET", "/data/%01"), 400)
        self.assertEqual(self.request("GET", "/data/repo?limit=10000&after=%s&unknown=1"
                                      % ("F" * 64)).status, 200)

    # Health and metrics --------------------------------------------------------------

    def test_health(self):
        response = self.request("GET", "/healthz")
        self.assertEqual((response.status, response.json()), (200, {"status": "ok"}))
        self.running.httpd.drain(0)   # what SIGTERM does, minus closing the listener
        response = self.request("GET", "/healthz")
        self.assertEqual((response.status, response.json()), (503, {"status": "draining"}))
        self.assertEqual(response.headers["Connection"], "close")

    def test_metrics(self):
        oid = self.put("repo", b"measured")
        self.put("repo", b"measured")
        self.request("GET", "/data/repo/" + oid)
        self.request("GET", "/data/repo/missing")
        response = self.request("GET", "/metrics")
        self.assertEqual(response.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        samples = {}
        for line in response.body.decode().splitlines():
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        self.assertEqual(samples['datastore_http_requests_total{method="PUT",status="201"}'], 2)
        self.assertEqual(samples['datastore_http_requests_total{method="GET",status="200"}'], 1)
        self.assertEqual(samples['datastore_http_requests_total{method="GET",status="404"}'], 1)
        self.assertEqual(samples["datastore_http_request_duration_seconds_count"], 4)
        self.assertEqual(samples['datastore_http_request_duration_seconds_bucket{le="+Inf"}'], 4)
        self.assertLessEqual(samples['datastore_http_request_duration_seconds_bucket{le="0.0005"}'], 4)
        self.assertGreater(samples["datastore_http_request_duration_seconds_sum"], 0)
        self.assertEqual(samples["datastore_http_in_flight_requests"], 1)   # this request
        self.assertEqual((samples["datastore_objects"], samples["datastore_bytes"]), (1, 8))
        self.assertEqual(samples["datastore_received_bytes_total"], 16)
        self.assertGreaterEqual(samples["datastore_sent_bytes_total"], 8)

    # Logging ---------------------------------------------------------------------

    def test_one_access_log_line_per_request(self):
        connection = self.connect()   # one connection, one thread: lines come in request order
        self.request("PUT", "/data/repo", b"logged", connection=connection)
        self.request("GET", "/data/repo/missing", connection=connection)
        # The line is written just after the response is sent.
        wait_until(lambda: len(self.running.log.getvalue().splitlines()) >= 2)
        lines = self.running.log.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn('"PUT /data/repo HTTP/1.1" 201', lines[0])
        self.assertIn('"GET /data/repo/missing HTTP/1.1" 404', lines[1])


class MemoryStoreServerTest(ServerContract, unittest.TestCase):
    def make_store(self, **options):
        return storage.MemoryStore(**options)


class DiskStoreServerTest(ServerContract, unittest.TestCase):
    def make_store(self, **options):
        return open_disk_store(self, temporary_directory(self), **options)

    def test_delete_during_download_does_not_break_it(self):
        data = os.urandom(16 * 1024 * 1024)
        oid = self.put("repo", data)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # keep the server mid-send
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.running.port))
        self.addCleanup(sock.close)
        sock.sendall(b"GET /data/repo/%s HTTP/1.1\r\n\r\n" % oid.encode())
        response = http.client.HTTPResponse(sock, method="GET")
        response.begin()
        first = response.read(1024)
        self.assertEqual(self.request("DELETE", "/data/repo/" + oid).status, 200)
        self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)
        self.assertEqual(first + response.read(), data)

    def test_full_disk_is_507_and_keeps_serving(self):
        with small_filesystem(self) as mount_point:
            self.restart_server(store=open_disk_store(self, mount_point))
            oid = self.put("repo", b"stored before")
            self.assertJSONError(self.request("PUT", "/data/repo", os.urandom(2 * 1024 * 1024)), 507)
            self.assertEqual(self.request("GET", "/data/repo/" + oid).body, b"stored before")
            self.assertEqual(self.request("PUT", "/data/repo", b"fits").status, 201)


class HardeningTest(HTTPClientMixin, unittest.TestCase):
    """Connection limits, authentication and hostile input (HTTP only: one store)."""

    def setUp(self):
        self.running = None
        self.addCleanup(lambda: self.running.stop())

    def start(self, **options):
        if self.running:
            self.running.stop()
        self.running = RunningServer(storage.MemoryStore(), **options)
        return self.running

    def idle_connections(self, count):
        return [self.raw_socket() for _ in range(count)]

    def test_connections_beyond_the_limit_get_503_when_all_are_busy(self):
        limiter = self.start(max_connections=2).httpd.connections
        for _ in range(2):   # two uploads stalled mid-body keep both slots busy
            self.raw_socket().sendall(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
        wait_until(lambda: limiter.counts() == (2, 0))
        sock = self.raw_socket()
        response = self.raw(b"GET /data/repo/x HTTP/1.1\r\n\r\n", sock=sock)
        self.assertJSONError(response, 503)
        self.assertEqual(response.headers["Retry-After"], "1")
        self.assertClosed(sock)

    def test_idle_connections_are_reclaimed_for_new_requests(self):
        limiter = self.start(max_connections=4).httpd.connections
        idle = self.idle_connections(4)
        wait_until(lambda: limiter.counts() == (4, 4))
        self.assertEqual(self.request("PUT", "/data/repo", b"served").status, 201)
        wait_until(lambda: any(map(closed_by_server, idle)))   # one idle connection gave way

    def test_400_idle_connections_do_not_block_a_request_with_defaults(self):
        limiter = self.start().httpd.connections
        self.idle_connections(400)
        wait_until(lambda: limiter.counts()[0] == server.DEFAULT_MAX_CONNECTIONS)
        connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=2)
        self.addCleanup(connection.close)
        self.assertEqual(self.request("PUT", "/data/repo", b"through", connection=connection).status,
                         201)

    def test_bearer_token(self):
        self.start(auth_token="s3cret")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret2"}):
            response = self.request("PUT", "/data/repo", b"guarded", headers=headers)
            self.assertJSONError(response, 401)
            self.assertEqual(response.headers["WWW-Authenticate"], 'Bearer realm="data-storage"')
        self.assertEqual(self.request("GET", "/data/repo/" + sha256(b"guarded"),
                                      headers={"Authorization": "Bearer s3cret"}).status, 404)
        response = self.request("PUT", "/data/repo", b"guarded",
                                headers={"Authorization": "bearer s3cret"})
        self.assertEqual(response.status, 201)
        refused = self.raw(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 5\r\n"
                           b"Expect: 100-continue\r\n\r\n")
        self.assertJSONError(refused, 401)   # instead of 100 Continue

    def test_hostile_requests_get_4xx_or_a_closed_connection(self):
        self.start(request_timeout=2)
        for request in (os.urandom(2000),
                        b"\x00\x01\x02\r\n\r\n",
                        b"GET /data/r/x HTTP/1.1\r\nX: " + b"a" * 100000 + b"\r\n\r\n",
                        b"GET /data/r/x HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
                        b"GET /data/../../etc/passwd HTTP/1.1\r\n\r\n",
                        b"GET /data/%2E%2E/" + sha256(b"").encode() + b" HTTP/1.1\r\n\r\n",
                        b"GET /data/r\xc3\x28/x HTTP/1.1\r\n\r\n",
                        b"PUT /data/r HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                        b"PUT /data/r HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"FFFFFFFFFFFFFFFF\r\n",
                        b"PUT /data/r HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"F" * 1000 + b"\r\n",
                        b"PUT /data/r HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
                        b"GET http://[::1/data/r/x HTTP/1.1\r\n\r\n",
                        b"GET /data/r/x HTTP/1.1\r\nRange: bytes=" + b"9" * 5000 + b"-\r\n\r\n"):
            with self.subTest(request=request[:40]):
                statuses = self.exchange(request)
                self.assertTrue(all(400 <= status < 500 for status in statuses), statuses)
        self.assertEqual(self.request("PUT", "/data/repo", b"fine").status, 201)

    def exchange(self, request):
        """Send ``request``, half-close, and return the statuses of every response."""
        sock = self.raw_socket()
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the server may close on us before it has read everything
        received = bytearray()
        try:
            for data in iter(lambda: sock.recv(65536), b""):
                received += data
        except ConnectionResetError:
            pass
        return [int(status) for status in re.findall(rb"(?:^|\n)HTTP/1\.1 (\d{3}) ", received)]

    def test_fuzzed_requests_never_get_a_server_error(self):
        self.start(request_timeout=1, max_object_size=1 << 20)
        oid = sha256(b"seed").encode()
        seeds = [b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nseed",
                 b"PUT /data/repo/" + oid + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2;x=y\r\nse\r\n2\r\ned\r\n0\r\nT: 1\r\n\r\n",
                 b"GET /data/repo/" + oid + b" HTTP/1.1\r\nRange: bytes=1-2\r\n"
                 b"If-None-Match: W/\"x\", *\r\n\r\n",
                 b"HEAD /data/repo/" + oid + b"?q=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                 b"DELETE /data/repo/" + oid + b" HTTP/1.1\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 0\r\n\r\n"]
        generator = random.Random(20261126)
        pieces = [b"\r\n", b"\n", b" ", b":", b";", b"%", b"%ff", b"/", b"..", b"\x00", b"\xff",
                  b"-1", b"99999999999999999999", b"chunked", b"Content-Length: 5\r\n",
                  b"Transfer-Encoding: chunked\r\n", b"HTTP/1.1", b"0\r\n\r\n"]

        def mutate(data):
            data = bytearray(data)
            for _ in range(generator.randint(1, 4)):
                position = generator.randrange(len(data) + 1)
                choice = generator.randrange(5)
                if choice == 0 and data:
                    data[min(position, len(data) - 1)] = generator.randrange(256)
                elif choice == 1:
                    data[position:position] = generator.choice(pieces)
                elif choice == 2:
                    del data[position:position + generator.randint(1, 8)]
                elif choice == 3:
                    data[position:position] = data[position:position + generator.randint(1, 30)]
                else:
                    data[position:position] = os.urandom(generator.randint(1, 16))
            return bytes(data)

        server_errors = []
        for _ in range(300):
            request = mutate(generator.choice(seeds))
            statuses = self.exchange(request)
            if any(status == 500 or status > 505 for status in statuses):
                server_errors.append((request, statuses))
        self.assertEqual(server_errors, [])
        self.assertEqual(self.request("PUT", "/data/repo", b"after fuzzing").status, 201)
        self.assertEqual(self.request("GET", "/data/repo/" + sha256(b"after fuzzing")).body,
                         b"after fuzzing")

    def test_64_clients_for_two_seconds(self):
        self.start()
        deadline = time.monotonic() + 2
        failures, rounds = [], []

        def client(number):
            connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=30)
            count = 0
            try:
                while time.monotonic() < deadline:
                    data = b"%d-%d " % (number, count) * (1 + count % 50)
                    put = self.request("PUT", "/data/load", data, connection=connection)
                    got = self.request("GET", "/data/load/" + sha256(data), connection=connection)
                    if put.status != 201 or put.json()["oid"] != sha256(data) or got.body != data:
                        failures.append((number, count, put.status, got.status))
                    count += 1
            except Exception as error:
                failures.append((number, repr(error)))
            finally:
                connection.close()
                rounds.append(count)

        run_concurrently([functools.partial(client, n) for n in range(64)])
        self.assertEqual(failures, [])
        self.assertTrue(all(rounds), rounds)


class OperabilityTest(HTTPClientMixin, unittest.TestCase):
    """The OpenAPI document, tokens on operational routes, and log formats."""

    def start(self, **options):
        self.running = RunningServer(storage.MemoryStore(), **options)
        self.addCleanup(self.running.stop)

    def test_openapi_document_is_served_as_stored(self):
        self.start()
        response = self.request("GET", "/openapi.json")
        self.assertEqual(response.headers["Content-Type"], "application/json")
        with open(os.path.join(HERE, "openapi.json"), "rb") as document:
            self.assertEqual(response.body, document.read())

    def test_openapi_routes_match_the_server(self):
        with open(os.path.join(HERE, "openapi.json")) as document:
            paths = json.load(document)["paths"]
        documented = {(path, method.upper()) for path, item in paths.items() for method in item
                      if method in ("get", "head", "put", "post", "delete", "patch", "options")}
        served = {(server.ROUTE_PATHS[route], method)
                  for route, methods in server.DataStorageHandler.routes.items() for method in methods}
        self.assertEqual(documented, served)
        for path, route in server.FIXED_ROUTES.items():
            self.assertEqual(server.parse_target(path)[0], route)
        self.assertEqual(server.parse_target("/data/r")[0], "repository")
        self.assertEqual(server.parse_target("/data/r/o")[0], "object")

    def test_openapi_responses_are_concrete(self):
        with open(os.path.join(HERE, "openapi.json")) as document:
            paths = json.load(document)["paths"]
        bodyless = {("head", status) for status in ("200", "304", "400", "401", "404", "414", "431",
                                                    "500", "501", "503", "505")}
        bodyless |= {("get", "304"), ("delete", "200")}
        for path, item in paths.items():
            for method, operation in item.items():
                self.assertNotIn("default", operation["responses"], (path, method))
                for status, response in operation["responses"].items():
                    where = (path, method, status)
                    if (method, status) in bodyless:
                        self.assertNotIn("content", response, where)
                        continue
                    self.assertTrue(response["content"], where)
                    for media_type, content in response["content"].items():
                        self.assertNotIn("*", media_type, where)
                        self.assertTrue(content["schema"], where)

    def test_health_needs_no_token_but_the_rest_does(self):
        self.start(auth_token="t0ken")
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        for path in ("/metrics", "/openapi.json", "/data/repo"):
            self.assertJSONError(self.request("GET", path), 401)
            self.assertEqual(self.request("GET", path, headers={"Authorization": "Bearer t0ken"}).status,
                             200)

    def test_json_access_log(self):
        self.start(log_format="json")
        self.request("PUT", "/data/repo?q=1", b"twelve bytes")
        wait_until(lambda: self.running.log.getvalue().count("\n") >= 1)
        record = json.loads(self.running.log.getvalue().splitlines()[0])
        self.assertEqual(set(record), {"time", "remote", "method", "path", "status",
                                       "request_bytes", "response_bytes", "duration_ms"})
        self.assertEqual((record["method"], record["path"], record["status"], record["request_bytes"],
                          record["remote"]), ("PUT", "/data/repo?q=1", 201, 12, "127.0.0.1"))
        self.assertGreater(record["response_bytes"], 0)
        self.assertGreaterEqual(record["duration_ms"], 0)

    def test_log_level_filters_the_service_log(self):
        self.start(log_level="error", log_format="json")
        sock = socket.create_connection(("127.0.0.1", self.running.port), timeout=10)
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort")
        sock.close()   # an abandoned upload: a warning, below the level
        wait_until(lambda: "datastore_http_requests_abandoned_total 1\n"
                   in self.running.httpd.metrics.render(0, 0))   # handled, and not logged:
        self.assertEqual(self.running.log.getvalue(), "")
        self.request("GET", "/data/repo/missing")
        wait_until(lambda: '"status": 404' in self.running.log.getvalue())


class ServerProcess:
    """``python server.py ARGS`` in a subprocess, with the port it reports."""

    def __init__(self, test, *args):
        self.process = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"),
                                         "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        bufsize=0)
        test.addCleanup(self.stop)
        line = read_line(self.process.stdout).decode()
        test.assertIn("listening on http://127.0.0.1:", line)
        self.port = int(line.rsplit(":", 1)[1].split()[0])

    def request(self, method, path, body=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body)
            return Response(connection.getresponse())
        finally:
            connection.close()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()


class DiskStoreProcessTest(unittest.TestCase):
    """Crash safety and several processes on one data directory."""

    def setUp(self):
        self.root = temporary_directory(self)

    def assertAllObjectsIntact(self):
        result = subprocess.run([sys.executable, os.path.join(HERE, "storage.py"), "verify", self.root],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_sigkill_mid_upload_leaves_no_partial_object(self):
        first = ServerProcess(self, "--data-dir", self.root)
        self.assertEqual(first.request("PUT", "/data/repo", b"acknowledged").status, 201)
        sock = socket.create_connection(("127.0.0.1", first.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 8000000\r\n\r\n" + b"p" * 3000000)
        wait_until(lambda: any(path.startswith("@tmp") and
                               os.path.getsize(os.path.join(self.root, path)) > 0
                               for path in files_under(self.root)))
        first.process.kill()
        first.process.wait()
        second = ServerProcess(self, "--data-dir", self.root)
        self.assertEqual(second.request("GET", "/data/repo/" + sha256(b"acknowledged")).body,
                         b"acknowledged")
        self.assertEqual(files_under(self.root),
                         ["repo/%s/%s" % (sha256(b"acknowledged")[:2], sha256(b"acknowledged"))])
        self.assertAllObjectsIntact()

    def test_two_processes_share_one_directory(self):
        one = ServerProcess(self, "--data-dir", self.root)
        two = ServerProcess(self, "--data-dir", self.root)
        oid = one.request("PUT", "/data/repo", b"written by one").json()["oid"]
        self.assertEqual(two.request("GET", "/data/repo/" + oid).body, b"written by one")
        self.assertEqual(two.request("DELETE", "/data/repo/" + oid).status, 200)
        self.assertEqual(one.request("GET", "/data/repo/" + oid).status, 404)

        data = os.urandom(256 * 1024)
        contested = sha256(data)
        problems = []

        def churn(server_process):
            for _ in range(15):
                put = server_process.request("PUT", "/data/shared", data)
                deleted = server_process.request("DELETE", "/data/shared/" + contested)
                got = server_process.request("GET", "/data/shared/" + contested)
                if (put.status != 201 or deleted.status not in (200, 404)
                        or (got.status, got.body) not in ((404, got.body), (200, data))):
                    problems.append((put.status, deleted.status, got.status, len(got.body)))

        run_concurrently([functools.partial(churn, p) for p in (one, two, one, two)])
        self.assertEqual(problems, [])
        self.assertAllObjectsIntact()


class CommandLineTest(unittest.TestCase):
    """``python server.py`` as a user runs it, in a subprocess."""

    def start(self, *args, env=None):
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"), *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                   env=dict(os.environ, **(env or {})))
        self.addCleanup(self.stop, process)
        line = process.stdout.readline().decode()
        self.assertIn("listening on http://127.0.0.1:", line)
        return process, int(line.rsplit(":", 1)[1].split()[0])

    @staticmethod
    def stop(process):
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()

    def test_help_documents_every_flag(self):
        output = subprocess.run([sys.executable, os.path.join(HERE, "server.py"), "--help"],
                                capture_output=True, text=True, check=True).stdout
        for flag in ("--host", "--port", "--max-object-size", "--data-dir", "--max-total-size",
                     "--request-timeout", "--max-connections", "--shutdown-timeout", "--auth-token",
                     "--workers", "--log-format", "--log-level"):
            self.assertIn(flag, output)

    def test_rejects_malformed_numbers(self):
        for args in (["--port", "+5"], ["--port", "70000"], ["--max-object-size", "1_0"]):
            result = subprocess.run([sys.executable, os.path.join(HERE, "server.py"), *args],
                                    capture_output=True, text=True)
            self.assertEqual(result.returncode, 2, args)

    def test_serves_and_stops_cleanly_on_signals(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            process, port = self.start("--port", "0")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("PUT", "/data/cli", body=b"from the command line")
            self.assertEqual(connection.getresponse().status, 201)
            connection.close()
            wait_until(lambda: b'"PUT /data/cli HTTP/1.1" 201' in read_line(process.stderr))
            process.send_signal(signum)
            self.assertEqual(process.wait(timeout=10), 0)

    def test_sigterm_lets_an_upload_in_progress_finish(self):
        process, port = self.start("--port", "0")
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(idle.close)
        upload = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(upload.close)
        upload.sendall(b"PUT /data/repo HTTP/1.1\r\nContent-Length: 10\r\n\r\nfirst")
        self.assertIn(b"HTTP/1.1 404", self.exchange_on(idle, b"GET /data/repo/x HTTP/1.1\r\n\r\n"))
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: not self.accepts(port))             # stopped accepting
        self.assertEqual(idle.recv(1), b"")                      # idle keep-alive closed
        upload.sendall(b"half")
        upload.sendall(b"!")
        response = http.client.HTTPResponse(upload, method="PUT")
        response.begin()
        self.assertEqual((response.status, json.loads(response.read())["size"]), (201, 10))
        self.assertEqual(response.headers["Connection"], "close")
        self.assertEqual(process.wait(timeout=10), 0)

    @staticmethod
    def exchange_on(sock, request):
        sock.sendall(request)
        return sock.recv(65536)

    @staticmethod
    def accepts(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def test_token_from_environment(self):
        process, port = self.start("--port", "0", env={"DATA_STORAGE_TOKEN": "from-env"})
        for headers, status in (({}, 401), ({"Authorization": "Bearer from-env"}, 201)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("PUT", "/data/repo", body=b"x", headers=headers)
            self.assertEqual(connection.getresponse().status, status)
            connection.close()

    def test_workers_share_the_socket_and_the_disk_store(self):
        process, port = self.start("--port", "0", "--workers", "2",
                                   "--data-dir", temporary_directory(self))

        def workers():
            return child_pids(process.pid)

        wait_until(lambda: len(workers()) == 2)
        first_workers = workers()

        def round_trips(count):
            for number in range(count):   # each request on a new connection: any worker may take it
                data = b"object %d" % number
                put = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                put.request("PUT", "/data/repo", body=data)
                self.assertEqual(put.getresponse().status, 201)
                put.close()
                get = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                get.request("GET", "/data/repo/" + sha256(data))
                self.assertEqual(get.getresponse().read(), data)
                get.close()

        round_trips(20)
        os.kill(first_workers[0], signal.SIGKILL)
        wait_until(lambda: len(workers()) == 2 and first_workers[0] not in workers())
        round_trips(10)
        final_workers = workers()
        process.terminate()
        self.assertEqual(process.wait(timeout=20), 0)
        for pid in final_workers:
            self.assertFalse(running(pid), "worker %d still running" % pid)

    def test_workers_stop_when_the_parent_is_killed(self):
        process, _ = self.start("--port", "0", "--workers", "2",
                                "--data-dir", temporary_directory(self))
        wait_until(lambda: len(child_pids(process.pid)) == 2)
        workers = child_pids(process.pid)
        process.kill()
        process.wait()
        wait_until(lambda: not any(map(running, workers)))

    def test_workers_need_the_disk_store(self):
        result = subprocess.run([sys.executable, os.path.join(HERE, "server.py"), "--workers", "2"],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--workers above 1 needs --data-dir", result.stderr)

    def test_port_from_environment(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        process, listening = self.start(env={"PORT": str(port)})
        self.assertEqual(listening, port)
        process.terminate()
        self.assertEqual(process.wait(timeout=10), 0)


if __name__ == "__main__":
    unittest.main()
