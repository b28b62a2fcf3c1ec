"""The gateway (``gateway.py``) over loopback: a real server on port 0, real sockets.

Requests that ordinary clients would refuse to send (malformed framing,
pipelining, bad request lines) go over raw sockets and are read as raw bytes
where a client library would hide what happened. The application behind the
gateway is the service's, with the in-memory store: what the stores do is
``test_app.py``'s and ``test_storage.py``'s to prove, once per store.
"""

import collections
import functools
import http.client
import io
import itertools
import json
import os
import random
import re
import select
import socket
import struct
import sys
import threading
import time
import unittest

import checksums
import gateway
import logs
import server
from fixtures import (Response, RunningServer, HTTPClientMixin, SharedFile, closed_by_server, metric_samples,
                      run_concurrently, sha256, temporary_directory, wait_until)

APPLICATION_OPTIONS = ("max_object_size", "auth_token")


class GatewayTestCase(HTTPClientMixin, unittest.TestCase):
    """Starts ``self.app`` behind ``self.running``; ``start(**options)`` restarts
    both, the application options going to the application."""

    def setUp(self):
        self.running = None
        self.addCleanup(lambda: self.running.stop())
        self.start()

    def start(self, application=None, **options):
        if self.running:
            self.running.stop()
        self.app = application or server.DataStorageServer(
            **{name: options.pop(name) for name in APPLICATION_OPTIONS if name in options})
        self.running = RunningServer(self.app, **options)
        return self.running

    def idle_connections(self, count):
        return [self.raw_socket() for _ in range(count)]


class FramingTest(GatewayTestCase):
    """HTTP/1.1 messages on the wire: request heads, bodies, responses (RFC 9112)."""

    def test_put_without_length_or_chunking_is_an_empty_object(self):
        response = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(response.json(), {"oid": sha256(b""), "size": 0})

    def test_absolute_form_target(self):
        response = self.raw(b"PUT http://example.com/data/repo HTTP/1.1\r\nHost: example.com\r\n"
                            b"Content-Length: 8\r\n\r\nabsolute")
        self.assertEqual(response.status, 201)

    def test_unknown_method_is_405_on_a_known_route(self):
        response = self.raw(b"QUERY /data/repo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertJSONError(response, 405)
        self.assertEqual(response.headers["Allow"], "GET, HEAD, PUT")
        self.assertJSONError(self.raw(b"BREW /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"), 404)

    def test_malformed_request_lines(self):
        for request, status in ((b"GARBAGE\r\n\r\n", 400),
                                (b"GET /\r\n\r\n", 400),                      # HTTP/0.9
                                (b"GET / HTTP/2.0\r\n\r\n", 505),
                                (b"GET / HTTP/1\r\n\r\n", 400),
                                (b"GET  /data/r HTTP/1.1\r\nHost: x\r\n\r\n", 400),
                                (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414)):
            with self.subTest(request=request[:30]):
                sock = self.raw_socket()
                self.assertJSONError(self.raw(request, sock=sock), status)
                self.assertClosed(sock)
        self.assertJSONError(self.raw(b"GET /data/r/\xff HTTP/1.1\r\nHost: x\r\n\r\n"), 400)

    def test_malformed_header_sections(self):
        many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        for headers, status in ((b"X-Long: " + b"a" * 9000 + b"\r\n", 431),
                                (many, 431),
                                (b"Bad Name: x\r\n", 400),
                                (b"X-Fold: a\r\n  folded\r\n", 400),
                                (b"Host : x\r\n", 400),
                                (b"NoColon\r\n", 400)):
            with self.subTest(headers=headers[:30]):
                self.assertJSONError(self.raw(b"GET /data/r/x HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"),
                                     status)

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        connection = self.connect()
        for index in range(20):
            data = b"item %d" % index
            self.assertEqual(self.request("PUT", "/data/repo", data, connection=connection).status, 201)
            self.assertEqual(self.request("GET", "/data/repo/%s" % sha256(data),
                                          connection=connection).body, data)

    def test_pipelined_requests(self):
        oid = sha256(b"pipe")
        responses = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\npipe"
                             b"GET /data/repo/" + oid.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"DELETE /data/repo/" + oid.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
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
        self.assertEqual(self.raw(b"GET /data/r/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                  sock=sock).status, 404)
        self.assertClosed(sock)

    def test_chunked_upload(self):
        body = (b"5;ext=1\r\nhello\r\n"
                b"1\r\n \r\n"
                b"000005\r\nworld\r\n"
                b"0\r\nX-Trailer: yes\r\n\r\n")
        sock = self.raw_socket()
        put, get = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
                            + b"GET /data/repo/" + sha256(b"hello world").encode()
                            + b" HTTP/1.1\r\nHost: x\r\n\r\n", responses=2, sock=sock)
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
                response = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
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
                self.assertJSONError(self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\nhello",
                                              sock=sock), 400)
                self.assertClosed(sock)
        self.assertNotStored("repo", b"hello")

    def test_identical_repeated_content_length_is_accepted(self):
        response = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n"
                            b"\r\nhello")
        self.assertEqual(response.json()["size"], 5)

    def test_unsupported_transfer_coding_is_501(self):
        self.assertJSONError(self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\n"
                                      b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"), 501)

    def test_unread_body_does_not_become_the_next_request(self):
        smuggled = b"GET /data/repo/missing HTTP/1.1\r\nHost: x\r\n\r\n"
        first, second = self.raw(b"GET /data/r/missing HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                 % len(smuggled) + smuggled
                                 + b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nnext",
                                 responses=2)
        self.assertEqual((first.status, second.status), (404, 201))

    def test_large_unread_body_closes_the_connection(self):
        sock = self.raw_socket()
        response = self.raw(b"POST /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                            + b"x" * 1000000, sock=sock)
        self.assertJSONError(response, 405)
        self.assertEqual(response.headers["Connection"], "close")
        self.assertClosed(sock)

    def test_expect_continue_on_acceptable_upload(self):
        sock = self.raw_socket()
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nExpect: 100-continue\r\n\r\n")
        reader = sock.makefile("rb")
        self.assertEqual(reader.readline(), b"HTTP/1.1 100 Continue\r\n")
        self.assertEqual(reader.readline(), b"\r\n")
        sock.sendall(b"continue")
        response = http.client.HTTPResponse(SharedFile(file=reader), method="PUT")
        response.begin()
        self.assertEqual((response.status, json.loads(response.read())["size"]), (201, 8))

    def test_no_interim_100_for_http_1_0(self):
        sock = self.raw_socket()
        sock.sendall(b"PUT /data/repo HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
                     b"hello")
        self.assertEqual(sock.makefile("rb").readline(), b"HTTP/1.1 201 Created\r\n")

    def test_head_response_has_no_body_on_the_wire(self):
        oid = self.put("repo", b"head body").encode()
        sock = self.raw_socket()
        sock.sendall(b"HEAD /data/repo/" + oid + b" HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"HEAD /data/repo/missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b"".join(iter(lambda: sock.recv(65536), b""))
        first, second = received.split(b"\r\n\r\n")[:2]
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n"), received)
        self.assertIn(b"\r\nContent-Length: 9", first)
        self.assertTrue(second.startswith(b"HTTP/1.1 404 Not Found\r\n"), received)   # no body between
        self.assertTrue(received.endswith(b"\r\n\r\n"), received)

    def test_two_authorization_fields_count_as_one_only_when_identical(self):
        self.start(auth_token="s3cret")
        response = self.raw(b"GET /data/repo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                            b"Authorization: Bearer other\r\n\r\n")
        self.assertJSONError(response, 400)
        self.assertIn("different values", response.json()["error"])
        response = self.raw(b"GET /data/repo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                            b"Authorization: Bearer s3cret\r\n\r\n")   # as git-lfs may send it
        self.assertEqual(response.status, 200, response.body)

    def test_expect_continue_refused_requests_get_final_status_instead(self):
        self.start(max_object_size=100)
        for request, status in ((b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n", 413),
                                (b"POST /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n", 405),
                                (b"PUT /data/repo/missing HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n", 400),
                                (b"PUT /data/a%2Fb HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n", 400),
                                (b"PUT /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n", 404)):
            with self.subTest(request=request):
                sock = self.raw_socket()
                sock.sendall(request + b"Expect: 100-continue\r\n\r\n")
                reader = sock.makefile("rb")
                # The first status line is the final one (http.client would skip a 100).
                self.assertTrue(reader.readline().startswith(b"HTTP/1.1 %d " % status))
                response = http.client.HTTPResponse(
                    SharedFile(file=io.BufferedReader(io.BytesIO(b"HTTP/1.1 %d -\r\n" % status
                                                                  + reader.read()))))
                response.begin()
                self.assertJSONError(Response.read(response), status)

    def test_head_sends_headers_without_body(self):
        oid = self.put("repo", b"head body")
        sock = self.raw_socket()
        head, get = self.raw(("HEAD /data/repo/%s HTTP/1.1\r\nHost: x\r\n\r\n"
                              "GET /data/repo/%s HTTP/1.1\r\nHost: x\r\n\r\n" % (oid, oid)).encode(),
                             responses=2, methods=["HEAD", "GET"], sock=sock)
        self.assertEqual((head.status, head.body, head.headers["Content-Length"]), (200, b"", "9"))
        self.assertEqual(head.headers["ETag"], '"%s"' % oid)
        self.assertEqual(get.body, b"head body")
        self.assertEqual(self.request("HEAD", "/data/repo/missing").status, 404)

    def test_large_get_streams_whole_object(self):
        data = os.urandom(3 * 1024 * 1024 + 7)
        oid = self.put("repo", data)
        self.assertEqual(self.request("GET", "/data/repo/%s" % oid).body, data)

    def test_large_range_is_exact(self):
        data = os.urandom(1024 * 1024)
        oid = self.put("repo", data)
        response = self.request("GET", "/data/repo/%s" % oid, headers={"Range": "bytes=1000-800999"})
        self.assertEqual((response.status, response.body), (206, data[1000:801000]))

    def test_object_larger_than_limit_is_413(self):
        self.start(max_object_size=10)
        self.assertEqual(self.request("PUT", "/data/repo", b"x" * 10).status, 201)
        self.assertJSONError(self.request("PUT", "/data/repo", b"y" * 11), 413)
        self.assertNotStored("repo", b"y" * 11)
        chunked = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"6\r\nzzzzzz\r\n6\r\nzzzzzz\r\n0\r\n\r\n")
        self.assertJSONError(chunked, 413)
        self.assertNotStored("repo", b"z" * 12)



class SlotGoneAsEachHeadIsRead(gateway.ConnectionLimiter):
    """Every request's connection reclaimed or drained as its head is read."""

    def busy(self, sock):
        return False


class ConnectionTest(GatewayTestCase):
    """Concurrency, faults, limits, draining, logs and metrics."""

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

    def test_client_disconnecting_mid_upload_stores_nothing(self):
        sock = self.raw_socket()
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
        sock.close()
        wait_until(lambda: "abandoned" in self.running.log.getvalue())
        self.assertEqual(len(self.running.log.getvalue().splitlines()), 1)
        wait_until(lambda: "datastore_http_requests_abandoned_total 1\n"
                   in self.request("GET", "/metrics").body.decode())
        self.assertEqual(self.app.store.usage(), (0, 0))
        self.assertEqual(self.put("repo", b"unaffected"), sha256(b"unaffected"))

    def test_stalled_requests_are_closed_after_the_timeout(self):
        self.start(request_timeout=0.3)
        for request in (b"",                                               # idle keep-alive
                        b"PUT /data/repo HTTP/1.1\r\nHost: x\r\n",         # mid-headers
                        b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf"):  # mid-body
            with self.subTest(request=request):
                sock = self.raw_socket()
                sock.sendall(request)
                self.assertClosed(sock)
        self.assertEqual(self.app.store.usage(), (0, 0))
        self.assertEqual(self.put("repo", b"still serving"), sha256(b"still serving"))

    def test_health(self):
        response = self.request("GET", "/healthz")
        self.assertEqual((response.status, response.json()), (200, {"status": "ok"}))
        self.running.httpd.drain(0)   # what SIGTERM does, minus closing the listener
        response = self.request("GET", "/healthz")
        self.assertEqual((response.status, response.json()), (503, {"status": "draining"}))
        self.assertEqual(response.headers["Connection"], "close")

    def test_a_response_read_is_a_response_counted(self):
        connection = self.connect()
        for count in range(1, 51):   # no pause: the count must already be there
            self.request("GET", "/data/repo/missing", connection=connection)
            samples = metric_samples(self.request("GET", "/metrics", connection=connection)
                                     .body.decode())
            self.assertEqual(samples['datastore_http_requests_total{method="GET",status="404"}'],
                             count)
            self.assertEqual(samples["datastore_http_in_flight_requests"], 1)   # this request

    def test_a_download_cut_off_logs_the_bytes_it_sent(self):
        self.start(request_timeout=0.3, log_format="json")
        data = os.urandom(32 * 1024 * 1024)   # more than the socket buffers hold
        oid = self.put("repo", data)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.addCleanup(sock.close)
        sock.connect(("127.0.0.1", self.running.port))
        sock.sendall(b"GET /data/repo/%s HTTP/1.1\r\nHost: x\r\n\r\n" % oid.encode())
        # Read nothing: the server's send stalls, and the timeout cuts it off.
        wait_until(lambda: '"status": 200' in self.running.log.getvalue())
        record = [json.loads(line) for line in self.running.log.getvalue().splitlines()
                  if '"status": 200' in line][0]
        self.assertGreater(record["response_bytes"], 0)
        self.assertLess(record["response_bytes"], len(data))

    def test_a_download_whose_client_stalls_is_cut_off_after_one_timeout(self):
        # The kernel's send timeout would end a send that took a little short,
        # and the next would wait a whole timeout again: several in all.
        self.start(server.DataStorageServer(data_dir=temporary_directory(self)),
                   request_timeout=1.0, log_format="json")
        self.addCleanup(self.app.close)
        data = os.urandom(32 * 1024 * 1024)   # more than the socket buffers hold
        for oid, kind in ((self.put("repo", data), "sendfile"),
                          (self.put("repo", data[:60000]), "one send")):
            with self.subTest(kind=kind):
                mark = len(self.running.log.getvalue())

                def logged():   # what this subtest's request logged
                    return self.running.log.getvalue()[mark:]
                sock = socket.socket()
                self.addCleanup(sock.close)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.connect(("127.0.0.1", self.running.port))
                request = b"GET /data/repo/%s HTTP/1.1\r\nHost: x\r\n\r\n" % oid.encode()
                started = time.monotonic()
                # Read nothing: a response in one send stalls once the buffers are full.
                sock.sendall(request * (1 if kind == "sendfile" else 200))
                wait_until(lambda: "abandoned: timed out" in logged())
                self.assertLess(time.monotonic() - started, 2.5)
                if kind == "sendfile":
                    wait_until(lambda: '"status": 200' in logged())
                    record = [json.loads(line) for line in logged().splitlines()
                              if '"status": 200' in line][0]
                    self.assertGreater(record["response_bytes"], 0)   # counted as they went out
                    self.assertLess(record["response_bytes"], len(data))
                wait_until(lambda: self.running.httpd.connections.counts()[0] == 0)   # and closed

    def test_a_timed_out_read_or_send_is_a_socket_timeout(self):
        # A blocking socket with a kernel timeout fails with EAGAIN, which
        # socket.SocketIO would have returned as None (no bytes yet).
        if sys.platform == "linux":
            self.assertTrue(gateway.KERNEL_TIMEOUTS)
        server_side, client_side = socket.socketpair()
        self.addCleanup(server_side.close)
        self.addCleanup(client_side.close)
        timeouts = gateway.SocketTimeouts(server_side, 0.05)
        reader = gateway.RequestReader(server_side, timeouts, 0.05)
        with self.assertRaises(socket.timeout):
            reader.readinto(bytearray(10))
        client_side.sendall(b"abc")
        self.assertEqual(reader.readinto(bytearray(10)), 3)
        writer = gateway.ResponseWriter(server_side, timeouts)
        with self.assertRaises(socket.timeout):   # the peer reads nothing
            while True:
                writer.write(b"x" * 65536)
        # A timeout too long for poll's milliseconds (--request-timeout 1e9) is "never".
        gateway.ResponseWriter(client_side, gateway.SocketTimeouts(client_side, 1e9))._wait_for_room()

    def test_a_slow_client_that_keeps_reading_is_not_cut_off(self):
        # The timeout bounds a pause, not a send: 4 MiB in one write, read 64 KiB at a time.
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client_side = socket.socket()
            client_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client_side.connect(listener.getsockname())
            server_side = listener.accept()[0]
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)   # no room for it all
        self.addCleanup(server_side.close)
        self.addCleanup(client_side.close)
        writer = gateway.ResponseWriter(server_side, gateway.SocketTimeouts(server_side, 0.2))
        received, block = [], bytearray(64 * 1024)

        def read_slowly():
            while sum(received) < 4 << 20:
                count = client_side.recv_into(block)
                if not count:   # the write failed
                    return
                received.append(count)
                time.sleep(0.01)   # a slow client: 4 MiB take longer than the timeout
        reader = threading.Thread(target=read_slowly)
        reader.start()
        started = time.monotonic()
        try:
            writer.write(b"x" * (4 << 20))
        finally:
            server_side.close()   # the reader's end, if the write failed
            reader.join()
        self.assertGreater(time.monotonic() - started, 0.2)
        self.assertEqual(sum(received), 4 << 20)

    def test_a_file_sent_to_a_closed_connection_counts_nothing_sent(self):
        # And the socket blocks again afterwards, whatever happened: its reads
        # rely on the kernel's timeout.
        server_side, client_side = socket.socketpair()
        self.addCleanup(server_side.close)
        writer = gateway.ResponseWriter(server_side, gateway.SocketTimeouts(server_side, 1.0))
        with open(os.path.join(temporary_directory(self), "file"), "w+b") as file:
            file.write(b"f" * 100000)
            self.assertEqual(writer.sendfile(file, 1000, 50000), 50000)
            self.assertEqual(client_side.recv(50000, socket.MSG_WAITALL), b"f" * 50000)
            self.assertEqual(file.tell(), 51000)
            self.assertEqual(server_side.getblocking(), gateway.KERNEL_TIMEOUTS)
            client_side.close()
            with self.assertRaises(ConnectionError):
                writer.sendfile(file, 1000, 50000)
            self.assertEqual(file.tell(), 1000)   # nothing went out
            self.assertEqual(server_side.getblocking(), gateway.KERNEL_TIMEOUTS)

    def test_without_kernel_timeouts_a_head_s_time_left_is_not_a_send_s(self):
        # One settimeout serves reads and sends alike: a send gets the whole timeout back.
        kernel_timeouts = gateway.KERNEL_TIMEOUTS
        gateway.KERNEL_TIMEOUTS = False
        self.addCleanup(setattr, gateway, "KERNEL_TIMEOUTS", kernel_timeouts)
        server_side, client_side = socket.socketpair()
        self.addCleanup(server_side.close)
        self.addCleanup(client_side.close)
        timeouts = gateway.SocketTimeouts(server_side, 30.0)
        timeouts.receive(0.01)   # what a head's last read may get
        gateway.ResponseWriter(server_side, timeouts).write(b"response")
        self.assertEqual(server_side.gettimeout(), 30.0)
        self.assertEqual(client_side.recv(100), b"response")

    def test_control_characters_from_clients_are_escaped_in_the_service_log(self):
        sock = self.raw_socket()
        sock.sendall(b"PUT /data/r?\x1b[2J HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        sock.close()   # abandoned: a warning quoting the request line
        wait_until(lambda: "abandoned" in self.running.log.getvalue())
        self.assertNotIn("\x1b", self.running.log.getvalue())
        self.assertIn("\\x1b[2J", self.running.log.getvalue())

    def test_a_request_line_cannot_forge_the_fields_of_its_access_line(self):
        self.raw(b'GET /secret" 200 123456 "x\\ HTTP/1.1\r\nHost: x\r\n\r\n')   # a 400
        wait_until(lambda: '" 400 ' in self.running.log.getvalue())
        self.assertIn('"GET /secret\\" 200 123456 \\"x\\\\ HTTP/1.1" 400 ',
                      self.running.log.getvalue())

    def test_large_objects_are_checked_while_sendfile_sends_them(self):
        self.start(server.DataStorageServer(data_dir=temporary_directory(self)))
        self.addCleanup(self.app.close)
        for size in (64 * 1024 + 1, 200000, 256 * 1024, 256 * 1024 + 1, 5 * 1024 * 1024):
            for recorded in (True, False):   # block checksums, or the oid alone
                data = os.urandom(size)
                oid = self.put("repo", data)
                if not recorded:
                    os.removexattr(self.object_path(oid), checksums.ATTRIBUTE)
                self.assertEqual(self.request("GET", "/data/repo/" + oid).body, data, size)
        for times, recorded in enumerate((True, False), 1):
            with self.subTest(recorded=recorded):
                data = os.urandom(5 * 1024 * 1024)
                oid = self.put("repo", data)
                if not recorded:
                    os.removexattr(self.object_path(oid), checksums.ATTRIBUTE)
                with open(self.object_path(oid), "r+b") as file:
                    file.seek(4 * 1024 * 1024)
                    damaged = bytes(byte ^ 0xFF for byte in file.read(16))
                    file.seek(4 * 1024 * 1024)
                    file.write(damaged)
                connection = self.connect()
                connection.request("GET", "/data/repo/" + oid)
                response = connection.getresponse()
                self.assertEqual(response.status, 200)   # the head went out before the damage showed
                with self.assertRaises(http.client.IncompleteRead) as cut:
                    response.read()
                if recorded:   # every block before the damaged one, none after
                    self.assertEqual(cut.exception.partial, data[:4 * 1024 * 1024])
                else:   # never the last block
                    self.assertLessEqual(len(cut.exception.partial),
                                         len(data) - server.BODY_BLOCK_BYTES)
                wait_until(lambda: self.running.log.getvalue().count(
                    "failed its integrity check; moved to") == times)
                self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)

    def object_path(self, oid):
        return os.path.join(self.app.store.root, "repo", oid[:2], oid)

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


    def idle_connections(self, count):
        return [self.raw_socket() for _ in range(count)]

    def test_connections_beyond_the_limit_get_503_when_all_are_busy(self):
        limiter = self.start(max_connections=2).httpd.connections
        for _ in range(2):   # two uploads stalled mid-body keep both slots busy
            self.raw_socket().sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        wait_until(lambda: limiter.counts() == (2, 0, 0))
        sock = self.raw_socket()
        response = self.raw(b"GET /data/repo/x HTTP/1.1\r\nHost: x\r\n\r\n", sock=sock)
        self.assertJSONError(response, 503)
        self.assertEqual(response.headers["Retry-After"], "1")
        self.assertClosed(sock)
        wait_until(lambda: '"-" 503 ' in self.running.log.getvalue())   # logged and counted
        self.assertIn('datastore_http_requests_total{method="other",status="503"} 1',
                      self.app.metrics.render(0, 0))

    def test_a_malformed_header_section_is_logged_with_its_request_line(self):
        self.start(log_format="json")
        self.assertJSONError(self.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX : 1\r\n\r\n"), 400)
        wait_until(lambda: self.running.log.getvalue())
        record = json.loads(self.running.log.getvalue())
        self.assertEqual((record["method"], record["path"], record["status"]),
                         ("GET", "/healthz", 400))
        self.assertIn('datastore_http_requests_total{method="GET",status="400"} 1',
                      self.app.metrics.render(0, 0))

    def test_protocol_faults_are_logged_and_counted(self):
        self.assertJSONError(self.raw(b"GET / HTTP/2.0\r\n\r\n"), 505)
        self.assertJSONError(self.raw(b"PUT /data/r HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"zz\r\n"), 400)
        wait_until(lambda: self.running.log.getvalue().count("\n") >= 2)
        lines = self.running.log.getvalue().splitlines()
        self.assertIn('"GET / HTTP/2.0" 505 ', lines[0])
        self.assertIn('"PUT /data/r HTTP/1.1" 400 ', lines[1])
        metrics = self.app.metrics.render(0, 0)
        self.assertIn('datastore_http_requests_total{method="other",status="505"} 1', metrics)
        self.assertIn('datastore_http_requests_total{method="PUT",status="400"} 1', metrics)
        self.assertIn("datastore_http_in_flight_requests 0\n", metrics)

    def test_trickled_heads_give_their_slots_to_new_requests(self):
        limiter = self.start(max_connections=4).httpd.connections
        for _ in range(4):   # slowloris: heads begun, never finished
            self.raw_socket().sendall(b"GET /data/repo/x HTTP/1.1\r\nHo")
        wait_until(lambda: limiter.counts() == (4, 0, 4))
        # Within the grace a newcomer may still be refused; then a trickler gives way.
        wait_until(lambda: self.request("GET", "/healthz").status == 200)

    def test_a_reclaimed_head_is_abandoned_not_answered(self):
        limiter = self.start(max_connections=1).httpd.connections
        self.raw_socket().sendall(b"GET /healthz HTTP/1.1\r\nHo")
        # In its head, so reclaimed as a dawdler (an idle one whose thread holds
        # its bytes unannounced gets 503: test_a_head_cut_short_as_its_slot_goes...).
        wait_until(lambda: limiter.counts() == (1, 0, 1))
        wait_until(lambda: self.request("GET", "/healthz").status == 200)
        wait_until(lambda: "abandoned" in self.running.log.getvalue())
        # No answer went out to it (the newcomers refused meanwhile log "-" as their request).
        self.assertNotRegex(self.running.log.getvalue(), r'HTTP/1\.1" (4\d\d|503) ')
        self.assertNotRegex(self.app.metrics.render(0, 0), r'method="GET",status="(4\d\d|503)"')

    def one_slot_taken_by_an_idle_connection(self, connected_pair=socket.socketpair):
        """A limiter of one slot, taken by ``ours``, idle; ``client`` is its
        peer, and ``newcomer`` a connection yet to be admitted."""
        limiter = gateway.ConnectionLimiter(1)
        ours, client = connected_pair()
        newcomer, newcomer_client = socket.socketpair()
        for sock in (ours, client, newcomer, newcomer_client):
            self.addCleanup(sock.close)
        self.assertTrue(limiter.admit(ours))
        self.assertTrue(limiter.idle(ours, first_request=True))
        return limiter, ours, client, newcomer

    def test_an_idle_connection_reclaimed_as_its_request_arrives_can_still_answer(self):
        limiter, ours, client, newcomer = self.one_slot_taken_by_an_idle_connection()
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        ours.recv(65536)   # into its thread's buffer: the kernel has nothing unread
        self.assertTrue(limiter.admit(newcomer))   # takes the slot of the "idle" one
        limiter.reading_head(ours)
        self.assertIs(limiter.busy(ours), False)   # its thread answers 503, runs nothing
        self.assertEqual(ours.recv(1), b"")        # reading is over...
        ours.sendall(b"HTTP/1.1 503 Service Unavailable\r\n")   # ...the answer still goes out
        self.assertEqual(client.recv(100), b"HTTP/1.1 503 Service Unavailable\r\n")
        self.assertEqual(limiter.counts(), (1, 1, 0))   # the newcomer only, idle

    @unittest.skipUnless(hasattr(socket, "MSG_DONTWAIT"), "a close is told from a request by "
                         "peeking without waiting (MSG_DONTWAIT)")
    def test_a_connection_its_client_has_closed_gives_its_slot_to_a_newcomer(self):
        limiter, ours, client, newcomer = self.one_slot_taken_by_an_idle_connection()
        client.close()   # readable (end-of-file), but no request: its thread has yet to see it
        self.assertTrue(limiter.admit(newcomer))
        self.assertEqual(limiter.counts(), (1, 1, 0))   # the newcomer only, idle

    @unittest.skipUnless(hasattr(socket, "MSG_DONTWAIT"), "a reset is told from a request by "
                         "peeking without waiting (MSG_DONTWAIT)")
    def test_a_connection_its_client_has_reset_gives_its_slot_to_a_newcomer(self):
        def tcp_pair():   # a reset needs TCP
            with socket.create_server(("127.0.0.1", 0)) as listener:
                client = socket.create_connection(listener.getsockname())
                return listener.accept()[0], client

        limiter, ours, client, newcomer = self.one_slot_taken_by_an_idle_connection(tcp_pair)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()   # a reset
        wait_until(lambda: select.select([ours], [], [], 0)[0])
        self.assertTrue(limiter.admit(newcomer))

    def test_a_request_its_client_sent_before_closing_keeps_its_slot(self):
        limiter, ours, client, newcomer = self.one_slot_taken_by_an_idle_connection()
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        client.shutdown(socket.SHUT_WR)   # then end-of-file: the request still wants its answer
        self.assertFalse(limiter.admit(newcomer))
        self.assertEqual(limiter.counts(), (1, 1, 0))

    def test_a_request_that_arrives_as_the_drain_closes_its_connection_is_not_run(self):
        limiter, ours, client, _ = self.one_slot_taken_by_an_idle_connection()
        limiter.RECLAIM_GRACE_SECONDS = 0   # idle long enough to be drained at once
        client.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        ours.recv(65536)   # into its thread's buffer: the kernel has nothing unread
        limiter.begin_draining()
        self.assertEqual(ours.recv(1), b"")   # shut down for reading
        limiter.reading_head(ours)
        self.assertIs(limiter.busy(ours), False)   # its thread answers 503, runs nothing
        self.assertEqual(limiter.counts(), (1, 0, 0))   # open until its thread ends
        limiter.release(ours)
        self.assertEqual(limiter.wait_closed(0), 0)

    def test_a_refused_request_that_awaits_100_continue_is_closed_without_a_linger(self):
        limiter = self.running.httpd.connections = SlotGoneAsEachHeadIsRead(4)
        self.addCleanup(setattr, gateway, "LINGER_SECONDS", gateway.LINGER_SECONDS)
        gateway.LINGER_SECONDS = 60   # far longer than wait_until waits
        response = self.raw(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                            b"Content-Length: 5\r\n\r\n")
        self.assertJSONError(response, 503)   # no 100 Continue: the body never comes,
        wait_until(lambda: limiter.counts()[0] == 0)   # so its thread does not wait for it

    def test_a_head_cut_short_as_its_slot_goes_gets_503_not_400(self):
        # The end-of-file may be the reclaim's shutdown, not the client's doing.
        self.running.httpd.connections = SlotGoneAsEachHeadIsRead(4)
        sock = self.raw_socket()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method="GET")
        response.begin()
        self.assertJSONError(Response.read(response), 503)

    def test_no_request_is_run_on_a_connection_reclaimed_under_it_without_an_answer(self):
        self.start(max_connections=2)
        statuses, unanswered = collections.Counter(), []
        deadline = time.monotonic() + 0.5

        def client(number):
            for count in itertools.count():
                if time.monotonic() > deadline:
                    return
                body = b"client %d upload %d" % (number, count)
                with socket.create_connection(("127.0.0.1", self.running.port), timeout=10) as sock:
                    response = http.client.HTTPResponse(sock, method="PUT")
                    try:
                        sock.sendall(b"PUT /data/race HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
                        response.begin()
                    except ConnectionError:   # closed (or reset) as idle before it was read
                        unanswered.append(sha256(body))
                        continue
                    statuses[response.status, response.getheader("Retry-After")] += 1
                    response.read()

        run_concurrently([functools.partial(client, number) for number in range(4)])
        self.assertLessEqual(set(statuses), {(201, None), (503, "1")})
        wait_until(lambda: self.running.httpd.connections.counts()[0] == 0)   # a slot for the HEADs
        connection = self.connect()
        self.assertEqual({self.request("HEAD", "/data/race/" + oid, connection=connection).status
                          for oid in unanswered},   # none stored (run) unanswered
                         {404} if unanswered else set())

    def trickle(self, sock, data):
        """Send ``data`` a byte every 0.1 s until the server closes the
        connection; the number of bytes it took."""
        for count, byte in enumerate(data):
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.1)[0]:   # closed by the server (or an answer)
                return count + 1
        return len(data)

    def test_a_head_must_arrive_within_the_timeout_of_its_first_byte(self):
        self.start(request_timeout=0.5)
        sock = self.raw_socket()
        head = b"GET /data/repo/x HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: y\r\n" * 10 + b"\r\n"
        sent = self.trickle(sock, head)   # each byte well within the timeout
        self.assertLess(sent, 20)          # but not the head as a whole
        self.assertClosed(sock)

    def test_a_body_must_keep_a_minimum_rate(self):
        self.start(request_timeout=0.5)
        sock = self.raw_socket()
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        sent = self.trickle(sock, b"b" * 1000)
        self.assertLess(sent, 20)
        self.assertClosed(sock)
        self.assertEqual(self.app.store.usage(), (0, 0))

    def test_idle_connections_are_reclaimed_for_new_requests(self):
        limiter = self.start(max_connections=4).httpd.connections
        idle = self.idle_connections(4)
        wait_until(lambda: limiter.counts() == (4, 4, 0))
        self.assertEqual(self.request("PUT", "/data/repo", b"served").status, 201)
        wait_until(lambda: any(map(closed_by_server, idle)))   # one idle connection gave way

    def test_400_idle_connections_do_not_block_a_request_with_defaults(self):
        limiter = self.start().httpd.connections
        self.idle_connections(400)
        wait_until(lambda: limiter.counts()[0] == gateway.DEFAULT_MAX_CONNECTIONS)
        connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=2)
        self.addCleanup(connection.close)
        self.assertEqual(self.request("PUT", "/data/repo", b"through", connection=connection).status,
                         201)

    def test_hostile_requests_get_4xx_or_a_closed_connection(self):
        self.start(request_timeout=2)
        for request in (os.urandom(2000),
                        b"\x00\x01\x02\r\n\r\n",
                        b"GET /data/r/x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100000 + b"\r\n\r\n",
                        b"GET /data/r/x HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 500 + b"\r\n",
                        b"GET /data/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /data/%2E%2E/" + sha256(b"").encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /data/r\xc3\x28/x HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"PUT /data/r HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                        b"PUT /data/r HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"FFFFFFFFFFFFFFFF\r\n",
                        b"PUT /data/r HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"F" * 1000 + b"\r\n",
                        b"PUT /data/r HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
                        b"GET http://[::1/data/r/x HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /data/r/x HTTP/1.1\r\nHost: x\r\nRange: bytes=" + b"9" * 5000 + b"-\r\n\r\n"):
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
                 b"PUT /data/repo/" + oid + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2;x=y\r\nse\r\n2\r\ned\r\n0\r\nT: 1\r\n\r\n",
                 b"GET /data/repo/" + oid + b" HTTP/1.1\r\nHost: x\r\nRange: bytes=1-2\r\n"
                 b"If-None-Match: W/\"x\", *\r\n\r\n",
                 b"HEAD /data/repo/" + oid + b"?q=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                 b"DELETE /data/repo/" + oid + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
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
        failures = []

        def client(number):
            connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=30)
            count = 0
            try:   # at least one round each, however late its thread starts
                while count == 0 or time.monotonic() < deadline:
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

        run_concurrently([functools.partial(client, n) for n in range(64)])
        self.assertEqual(failures, [])

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
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort")
        sock.close()   # an abandoned upload: a warning, below the level
        wait_until(lambda: "datastore_http_requests_abandoned_total 1\n"
                   in self.app.metrics.render(0, 0))   # handled, and not logged:
        self.assertEqual(self.running.log.getvalue(), "")
        self.request("GET", "/data/repo/missing")
        wait_until(lambda: '"status": 404' in self.running.log.getvalue())


class WSGIConformanceTest(GatewayTestCase):
    """The gateway with small WSGI applications of its own: what PEP 3333 asks
    of a server, beyond what the service's application happens to use."""

    def serve(self, application):
        self.start(application)

    def test_response_without_content_length_is_delimited_by_close(self):
        def application(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return iter([b"streamed ", b"", b"blocks"])

        self.serve(application)
        sock = self.raw_socket()
        response = self.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", sock=sock)
        self.assertEqual((response.status, response.body), (200, b"streamed blocks"))
        self.assertEqual(response.headers["Connection"], "close")
        self.assertClosed(sock)

    def test_legacy_write_and_hop_by_hop_fields(self):
        def application(environ, start_response):
            write = start_response("200 OK", [("Content-Length", "11"), ("Connection", "keep-alive"),
                                              ("Transfer-Encoding", "chunked"),
                                              ("Content-Type", "text/plain")])
            write(b"written ")
            return [b"andmore"]   # 4 bytes past the Content-Length are never sent

        self.serve(application)
        sock = self.raw_socket()
        first, second = self.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", responses=2,
                                 sock=sock)
        self.assertEqual((first.body, second.body), (b"written and", b"written and"))
        self.assertIsNone(first.headers["Transfer-Encoding"])
        self.assertIsNone(first.headers["Connection"])

    def test_environ(self):
        seen = {}

        def application(environ, start_response):
            seen.update(environ, body=environ["wsgi.input"].read())
            start_response("204 No Content", [])
            return []

        self.serve(application)
        response = self.raw(b"PUT http://example.com/a%2Fb%C3%A9?q=%2F HTTP/1.1\r\nHost: example.com\r\n"
                            b"Content-Type: text/plain\r\nX-Two: 1\r\nX-Two: 2\r\nX_Two: smuggled\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
                            methods=["PUT"])
        self.assertEqual(response.status, 204)
        self.assertEqual((seen["REQUEST_METHOD"], seen["PATH_INFO"], seen["QUERY_STRING"]),
                         ("PUT", "/a/b\xc3\xa9", "q=%2F"))   # PEP 3333: bytes as latin-1
        self.assertEqual(seen["REQUEST_URI"], "http://example.com/a%2Fb%C3%A9?q=%2F")
        self.assertEqual((seen["CONTENT_TYPE"], seen["HTTP_X_TWO"], seen["HTTP_HOST"]),
                         ("text/plain", "1, 2", "example.com"))
        self.assertNotIn("CONTENT_LENGTH", seen)
        self.assertTrue(seen["wsgi.input_terminated"])
        self.assertEqual(seen["body"], b"body")
        self.assertEqual((seen["SERVER_PROTOCOL"], seen["wsgi.url_scheme"]), ("HTTP/1.1", "http"))

    def test_start_response_in_the_first_iteration(self):
        def application(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
            yield b"hello"

        self.serve(application)
        get, head, again = self.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", responses=3,
                                    methods=["GET", "HEAD", "GET"])
        self.assertEqual([(r.status, r.body) for r in (get, head, again)],
                         [(200, b"hello"), (200, b""), (200, b"hello")])

    def test_no_body_on_head_even_from_write(self):
        def application(environ, start_response):
            write = start_response("200 OK", [("Content-Type", "text/plain"),
                                              ("Content-Length", "5")])
            write(b"hello")
            return []

        self.serve(application)
        sock = self.raw_socket()
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        received = b"".join(iter(lambda: sock.recv(65536), b""))
        self.assertEqual(received.count(b"HTTP/1.1 200 OK\r\n"), 2)
        self.assertNotIn(b"hello", received)

    def test_application_errors_are_json_500_and_the_connection_closes(self):
        def application(environ, start_response):
            if environ["PATH_INFO"] == "/late":
                start_response("200 OK", [("Content-Length", "10")])
                return self.failing_blocks()
            raise RuntimeError("early bug")

        self.serve(application)
        sock = self.raw_socket()
        response = self.raw(b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n", sock=sock)
        self.assertJSONError(response, 500)
        self.assertNotIn(b"early bug", response.body)
        self.assertClosed(sock)
        sock = self.raw_socket()
        sock.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b"".join(iter(lambda: sock.recv(65536), b""))   # cut off: no second response
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
        self.assertTrue(received.endswith(b"\r\n\r\nhalf"), received)
        wait_until(lambda: "RuntimeError: late bug" in self.running.log.getvalue())
        self.assertIn("RuntimeError: early bug", self.running.log.getvalue())

    @staticmethod
    def failing_blocks():
        yield b"half"
        raise RuntimeError("late bug")


class LogStreamTest(unittest.TestCase):
    """The logs never stop or stall the server for a stream that fails or blocks."""

    def test_a_failing_log_stream_does_not_stop_the_server(self):
        attempts = []

        class ClosedPipe(io.StringIO):
            def write(self, text):
                attempts.append(text)
                raise BrokenPipeError("the log reader went away")

        running = RunningServer(server.DataStorageServer())
        running.httpd.log.stream = ClosedPipe()
        self.addCleanup(running.stop)
        for count in range(2):   # each on a new connection: the server still accepts
            connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
            self.addCleanup(connection.close)
            connection.request("GET", "/healthz")
            self.assertEqual(connection.getresponse().read(), b'{"status": "ok"}')
            wait_until(lambda: len(attempts) > count)   # its line was written, and failed

    def test_a_blocked_log_stream_holds_no_request_thread(self):
        release, writing = threading.Event(), threading.Event()

        class SlowReader(io.StringIO):
            def write(self, text):
                writing.set()
                release.wait(10)
                return super().write(text)

        log = logs.Log(SlowReader())
        log.access("127.0.0.1", "GET", "/", "GET / HTTP/1.1", 200, 0, 0, 0.001)
        flusher = threading.Thread(target=log.flush)
        flusher.start()
        self.assertTrue(writing.wait(10))
        started = time.monotonic()
        log.access("127.0.0.1", "GET", "/", "GET / HTTP/1.1", 200, 0, 0, 0.001)   # not blocked
        self.assertLess(time.monotonic() - started, 1)
        release.set()
        flusher.join()
        log.flush()
        self.assertEqual(log.stream.getvalue().count("GET / HTTP/1.1"), 2)

    def test_log_lines_go_out_in_writes_a_shared_pipe_keeps_whole(self):
        class Recorder(io.RawIOBase):   # the writes the operating system would get
            def __init__(self, most):
                super().__init__()
                self.writes, self.most = [], most

            def writable(self):
                return True

            def write(self, data):
                self.writes.append(bytes(data[:self.most]))
                return len(self.writes[-1])

        buffered, partial = Recorder(most=1 << 20), Recorder(most=1000)
        streams = {   # name -> (stream, its recorder)
            "buffered (stderr)": (io.TextIOWrapper(io.BufferedWriter(buffered), "utf-8",
                                                   line_buffering=True), buffered),
            "unbuffered (python -u), taking 1000 bytes a write": (
                io.TextIOWrapper(partial, "utf-8", write_through=True), partial)}
        for name, (stream, recorder) in streams.items():
            with self.subTest(name):
                log = logs.Log(stream)
                for number in range(200):   # ~19 KiB of lines, each with a two-byte character
                    log.access("127.0.0.1", "GET", "/", "GET /é%03d HTTP/1.1" % number, 200, 0,
                               0, 0.001)
                log.log("error", "x" * (2 * logs.ATOMIC_WRITE_BYTES))   # longer than a write
                lines = b"".join(recorder.writes).decode().splitlines()
                self.assertEqual([line.split('"')[1] for line in lines[:200]],
                                 ["GET /é%03d HTTP/1.1" % number for number in range(200)])
                self.assertTrue(lines[200].endswith("x" * (2 * logs.ATOMIC_WRITE_BYTES)))
                self.assertEqual(len(lines), 201)
        self.assertGreaterEqual(len(buffered.writes), 5)   # not one write of it all
        for data in buffered.writes:
            self.assertTrue(data.endswith(b"\n"))
            self.assertTrue(len(data) <= logs.ATOMIC_WRITE_BYTES or data.count(b"\n") == 1)


if __name__ == "__main__":
    unittest.main()
