"""The service on the S3 store (``--store s3://...``), end to end against real
engines (SeaweedFS and Ceph RGW, started by ``tools/s3engines/``; skipped
without them, and ``.ci/run`` starts them), through a TCP relay the tests can
cut to play an engine going down."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

import checksums
import s3

import server as server_module
from fixtures import (HERE, SERVER_SCRIPT, ServerProcess, WSGIClientMixin, child_pids,
                      metric_samples, new_bucket, read_line, s3_engine, sha256, wait_until)


class Relay:
    """A TCP relay on loopback to ``target`` (host, port), on a port that stays
    the same across ``stop()`` and ``start()``: while stopped, connections are
    refused and those open are cut. With ``limit`` set, each connection made
    from then on is cut once that many bytes have come from the engine."""

    def __init__(self, target):
        self.target = target
        self.limit = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener = None
        self._open = []
        self._lock = threading.Lock()

    def start(self):
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self):
        if self._listener is None:
            return
        self._listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() blocked on it
        self._listener.close()
        self._listener = None
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                engine = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, engine]
            for source, sink, limit in ((client, engine, None), (engine, client, self.limit)):
                threading.Thread(target=self._pump, args=(source, sink, limit),
                                 daemon=True).start()

    @staticmethod
    def _pump(source, sink, limit):
        try:
            for data in iter(lambda: source.recv(1 << 16), b""):
                if limit is not None and len(data) >= limit:
                    sink.sendall(data[:limit])
                    for sock in (source, sink):
                        sock.shutdown(socket.SHUT_RDWR)
                    return
                sink.sendall(data)
                limit = None if limit is None else limit - len(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def engine_calls(server, *operations):
    """The calls to the engine that ``server``'s /metrics counts, one number per operation."""
    samples = metric_samples(server.request("GET", "/metrics").body.decode())
    return [samples.get('datastore_store_calls_total{operation="%s"}' % operation, 0)
            for operation in operations]


class ServiceOnS3Contract(WSGIClientMixin):
    """``python server.py --store s3://BUCKET/PREFIX`` on a real engine
    (``engine``); and the application in-process (``self.request``, through
    ``wsgiref.validate``) where what a server would do with its body must not
    hide a mistake."""

    engine = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.settings = s3_engine(cls.engine)

    def setUp(self):
        host, port = self.settings["endpoint"].rpartition("/")[2].rsplit(":", 1)
        self.relay = Relay((host, int(port)))
        self.relay.start()
        self.addCleanup(self.relay.stop)
        self.endpoint = "http://127.0.0.1:%d" % self.relay.port
        self.client, self.bucket = new_bucket(self, self.settings)
        self.environment = dict(os.environ, AWS_ACCESS_KEY_ID=self.settings["access_key"],
                                AWS_SECRET_ACCESS_KEY=self.settings["secret_key"],
                                AWS_REGION=self.settings["region"])

    def serve(self, *args, bucket=None, environment=None):
        """The service on this test's bucket, through the relay; one process
        unless ``args`` say ``--workers`` (a test of the engine's connections
        must know which process makes them)."""
        workers_given = "--workers" in args
        return ServerProcess(self, "--store", "s3://%s/service" % (bucket or self.bucket),
                             "--s3-endpoint", self.endpoint,
                             *(() if workers_given else ("--workers", "1")), *args,
                             env=environment or self.environment)

    def test_objects_round_trip(self):
        server = self.serve()
        data = os.urandom(3 * 1024 * 1024 + 5)
        oid = sha256(data)
        put = server.request("PUT", "/data/repo", data)   # spooled: its oid is not known yet
        self.assertEqual((put.status, put.json()["oid"]), (201, oid))
        small = server.request("PUT", "/data/repo/" + sha256(b"small"), b"small")   # streamed
        self.assertEqual(small.status, 201)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, data)
        ranged = server.request("GET", "/data/repo/" + oid, headers={"Range": "bytes=1000-2999"})
        self.assertEqual((ranged.status, ranged.body), (206, data[1000:3000]))
        head = server.request("HEAD", "/data/repo/" + oid)
        self.assertEqual(head.headers["Content-Length"], str(len(data)))
        listed = server.request("GET", "/data/repo").json()["objects"]
        self.assertEqual(sorted(item["oid"] for item in listed), sorted([oid, sha256(b"small")]))
        self.assertEqual(server.request("DELETE", "/data/repo/" + oid).status, 200)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).status, 404)
        self.assertEqual(server.request("DELETE", "/data/repo/" + oid).status, 404)

    def test_100_mib_up_and_down_in_bounded_memory(self):
        server = self.serve("--max-object-size", str(200 << 20))

        def peak_kib():
            with open("/proc/%d/status" % server.process.pid) as status:
                return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

        data = os.urandom(100 << 20)
        oid = sha256(data)
        before = peak_kib()
        self.assertEqual(server.request("PUT", "/data/repo/" + oid, data).status, 201)   # streamed
        self.assertEqual(server.request("DELETE", "/data/repo/" + oid).status, 200)
        self.assertEqual(server.request("PUT", "/data/repo", data).status, 201)   # spooled
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, data)
        self.assertLess(peak_kib() - before, 64 * 1024)   # a 100 MiB object never in memory

    def test_a_corrupted_verified_upload_is_refused_and_never_stored(self):
        server = self.serve()
        claimed = sha256(b"the real bytes" * 100000)
        refused = server.request("PUT", "/data/repo/" + claimed, b"other bytes" * 100000)
        self.assertEqual(refused.status, 400, refused.body)
        self.assertEqual(server.request("GET", "/data/repo/" + claimed).status, 404)
        self.assertEqual(server.request("GET", "/data/repo").json()["objects"], [])

    def test_two_instances_on_one_bucket_agree(self):
        first, second = self.serve(), self.serve()
        oid = first.request("PUT", "/data/shared", b"seen by both").json()["oid"]
        self.assertEqual(second.request("GET", "/data/shared/" + oid).body, b"seen by both")
        self.assertEqual([item["oid"] for item in
                          second.request("GET", "/data/shared").json()["objects"]], [oid])
        self.assertEqual(first.request("DELETE", "/data/shared/" + oid).status, 200)
        self.assertEqual(second.request("GET", "/data/shared/" + oid).status, 404)

    def test_bytes_changed_in_the_engine_are_never_served_whole(self):
        server = self.serve()
        data = os.urandom(2 * 1024 * 1024)
        oid = server.request("PUT", "/data/repo", data).json()["oid"]
        other = os.urandom(len(data))   # written under the oid's key behind the service's back
        status, _, body = self.client.request(
            "PutObject", "PUT", "/%s/service/repo/%s" % (self.bucket, oid), body=other,
            payload_hash=sha256(other), headers={"content-length": str(len(other))})
        self.assertEqual(status, 200, body)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.addCleanup(connection.close)
        connection.request("GET", "/data/repo/" + oid)
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        with self.assertRaises(http.client.IncompleteRead) as cut:
            response.read()
        self.assertLess(len(cut.exception.partial), len(data))

    def engine_put(self, key, data):
        """Write ``data`` under ``key`` of the service's prefix, behind its back."""
        status, _, body = self.client.request(
            "PutObject", "PUT", "/%s/service/%s" % (self.bucket, key), body=data,
            payload_hash=sha256(data), headers={"content-length": str(len(data))})
        self.assertEqual(status, 200, body)

    def cut_get(self, server, path, headers=None):
        """The bytes a GET delivers before the service cuts its response."""
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.addCleanup(connection.close)
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        self.assertIn(response.status, (200, 206))
        with self.assertRaises(http.client.IncompleteRead) as cut:
            response.read()
        return cut.exception.partial

    def test_large_objects_are_checked_block_by_block_ranges_too(self):
        server = self.serve()
        mib = 1 << 20
        data = os.urandom(s3.CHECKSUMS_FROM_BYTES + mib + 7)   # 10 blocks, the last of 7 bytes
        oid = server.request("PUT", "/data/repo/" + sha256(data), data).json()["oid"]   # streamed
        for first, last in ((0, 0), (mib - 1, mib), (3 * mib + 5, 5 * mib + 9),
                            (len(data) - 8, len(data) - 1), (0, len(data) - 1)):
            ranged = server.request("GET", "/data/repo/" + oid,
                                    headers={"Range": "bytes=%d-%d" % (first, last)})
            self.assertEqual((ranged.status, ranged.body), (206, data[first:last + 1]), first)
        damaged = bytearray(data)
        damaged[2 * mib + 100] ^= 1   # the third block
        self.engine_put("repo/" + oid, bytes(damaged))
        good_range = server.request("GET", "/data/repo/" + oid,
                                    headers={"Range": "bytes=%d-%d" % (mib, 2 * mib - 1)})
        self.assertEqual((good_range.status, good_range.body), (206, data[mib:2 * mib]))
        partial = self.cut_get(server, "/data/repo/" + oid)   # cut before the bad block
        self.assertEqual(partial, data[:len(partial)])
        self.assertLessEqual(len(partial), 2 * mib)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).status, 404)   # quarantined
        self.assertEqual(server.request("PUT", "/data/repo/" + oid, data).status, 201)
        self.engine_put("repo/" + oid, bytes(damaged))
        bad_range = server.request("GET", "/data/repo/" + oid, headers={"Range": "bytes=%d-%d" % (
            2 * mib + 10, 2 * mib + 20)})   # found bad before the response begins: a status
        self.assertEqual(bad_range.status, 500)
        self.assertIn("taken out of service", bad_range.json()["error"])
        self.assertEqual(server.request("GET", "/data/repo/" + oid).status, 404)

    def test_a_range_is_exactly_its_bytes_whatever_the_server(self):
        # Our gateway sends no more than the Content-Length; another WSGI
        # server might send all it is given: the body itself must be exact.
        self.app = server_module.DataStorageServer(s3.S3Store(self.bucket, "service/",
                                                              self.client))
        data = os.urandom(s3.CHECKSUMS_FROM_BYTES + (1 << 20) + 7)
        oid = self.request("PUT", "/data/repo", data).json()["oid"]
        for first, last in ((5, 9), ((1 << 20) - 1, 1 << 20), (3 << 20, (5 << 20) + 2),
                            (len(data) - 3, len(data) - 1)):
            ranged = self.request("GET", "/data/repo/" + oid,
                                  headers={"Range": "bytes=%d-%d" % (first, last)})
            self.assertEqual((ranged.status, ranged.body), (206, data[first:last + 1]), first)
        samples = metric_samples(self.request("GET", "/metrics").body.decode())   # a store passed in
        self.assertGreaterEqual(samples['datastore_store_calls_total{operation="GetObject"}'], 4)

    def test_wrong_block_checksums_are_recorded_anew_and_the_object_kept(self):
        server = self.serve()
        data = os.urandom(s3.CHECKSUMS_FROM_BYTES)
        oid = server.request("PUT", "/data/repo", data).json()["oid"]   # spooled
        key = "@checksums/repo/" + oid
        status, _, recorded = self.client.request(
            "GetObject", "GET", "/%s/service/%s" % (self.bucket, key))
        self.assertEqual(status, 200)
        self.assertTrue(checksums.BlockChecksums.from_bytes(recorded).match(data))
        other = checksums.Recorder(block_size=1 << 20)
        other.update(os.urandom(len(data)))
        self.engine_put(key, other.finish().to_bytes())
        failed = server.request("GET", "/data/repo/" + oid)   # in its first block: a status
        self.assertEqual((failed.status, failed.headers["Retry-After"]), (503, "1"))
        self.assertIn("not found damaged", failed.json()["error"])
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, data)
        status, _, recorded = self.client.request(
            "GetObject", "GET", "/%s/service/%s" % (self.bucket, key))
        self.assertTrue(checksums.BlockChecksums.from_bytes(recorded).match(data))

    def test_a_head_does_not_fetch_block_checksums(self):
        server = self.serve()
        data = os.urandom(s3.CHECKSUMS_FROM_BYTES)
        oid = server.request("PUT", "/data/repo", data).json()["oid"]

        def gets():
            return engine_calls(server, "GetObject")[0]

        before = gets()
        self.assertEqual(server.request("HEAD", "/data/repo/" + oid).status, 200)
        self.assertEqual(gets(), before)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, data)
        self.assertEqual(gets(), before + 2)   # its bytes and its checksums

    def test_a_plain_get_is_one_engine_call(self):
        server = self.serve()
        data = os.urandom(1000)
        oid = server.request("PUT", "/data/repo", data).json()["oid"]

        def calls():
            return engine_calls(server, "HeadObject", "GetObject")

        for method, headers, status, body, made in (
                ("GET", {}, 200, data, [0, 1]),   # the GET alone: its length is the size
                ("HEAD", {}, 200, b"", [1, 0]),
                ("GET", {"Range": "bytes=10-19"}, 206, data[10:20], [1, 1]),
                ("GET", {"If-None-Match": '"%s"' % oid}, 304, b"", [1, 0])):
            before = calls()
            response = server.request(method, "/data/repo/" + oid, headers=headers)
            self.assertEqual((response.status, response.body), (status, body))
            self.assertEqual([after - then for after, then in zip(calls(), before)], made,
                             (method, headers))
        self.assertEqual(server.request("GET", "/data/repo/" + sha256(b"absent")).status, 404)

    def limit_engine_connections(self, limit):
        """Every engine connection from now on breaks off after ``limit`` bytes
        from the engine; those open are cut (the service makes new ones)."""
        self.relay.limit = limit
        self.relay.stop()
        self.relay.start()

    def test_an_engine_that_fails_before_the_first_bytes_go_out_is_a_503(self):
        server = self.serve()
        large = os.urandom(s3.CHECKSUMS_FROM_BYTES)   # checked block by block
        medium = os.urandom(2 << 20)   # checked against its oid, its last block held back
        oids = [server.request("PUT", "/data/repo", data).json()["oid"] for data in (large, medium)]
        self.limit_engine_connections(256 << 10)
        for oid in oids:
            failed = server.request("GET", "/data/repo/" + oid)
            self.assertEqual((failed.status, failed.headers["Retry-After"]), (503, "1"),
                             failed.body[:200])
            self.assertIn("retry", failed.json()["error"])
        self.relay.limit = None
        self.assertEqual([server.request("GET", "/data/repo/" + oid).body for oid in oids],
                         [large, medium])

    def test_an_object_that_cannot_be_read_again_is_left_in_place(self):
        server = self.serve()
        data = os.urandom(s3.CHECKSUMS_FROM_BYTES)
        oid = server.request("PUT", "/data/repo", data).json()["oid"]
        wrong = checksums.Recorder(block_size=1 << 20)
        wrong.update(os.urandom(len(data)))
        self.engine_put("@checksums/repo/" + oid, wrong.finish().to_bytes())
        self.limit_engine_connections(2 << 20)   # the first block passes; not a read of all
        failed = server.request("GET", "/data/repo/" + oid)
        self.assertEqual((failed.status, failed.headers["Retry-After"]), (503, "1"),
                         failed.body[:200])
        self.relay.limit = None
        status, _, listing = self.client.request("ListObjectsV2", "GET", "/" + self.bucket,
                                                 [("list-type", "2")])
        self.assertNotIn(b"@quarantine", listing)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).status, 503)   # now mended
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, data)

    def test_workers_count_each_others_engine_calls(self):
        server = self.serve("--workers", "2")
        wait_until(lambda: len(child_pids(server.process.pid)) == 2)
        for number in range(12):   # on new connections: each worker takes some
            self.assertEqual(server.request("PUT", "/data/repo", b"object %d" % number).status, 201)
        for _ in range(6):   # a scrape from any worker counts them all
            samples = metric_samples(server.request("GET", "/metrics").body.decode())
            self.assertEqual(samples['datastore_http_requests_total{method="PUT",status="201"}'], 12)
            self.assertGreaterEqual(samples['datastore_store_calls_total{operation="PutObject"}'], 12)
            self.assertEqual(samples['datastore_store_errors_total{operation="PutObject"}'], 0)
            self.assertNotIn('datastore_store_calls_total{operation="other"}', samples)

    def test_workers_started_while_the_engine_is_away_serve_503s_then_resume(self):
        server = self.serve("--workers", "2")
        wait_until(lambda: len(child_pids(server.process.pid)) == 2)
        oid = server.request("PUT", "/data/repo", b"kept").json()["oid"]
        self.relay.stop()
        first_workers = child_pids(server.process.pid)
        for pid in first_workers:
            os.kill(pid, signal.SIGKILL)
        # Their replacements serve at once; the parent asked about the bucket at start.
        self.assertEqual(server.request("GET", "/healthz").status, 503)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).status, 503)
        self.assertFalse(set(child_pids(server.process.pid)) & set(first_workers))
        self.relay.start()
        self.assertEqual(server.request("GET", "/healthz").status, 200)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, b"kept")
        self.assertIsNone(server.process.poll())

    def test_an_engine_that_goes_away_is_503_then_service_resumes(self):
        server = self.serve()
        oid = server.request("PUT", "/data/repo", b"kept").json()["oid"]
        self.relay.stop()
        for method, path, body in (("GET", "/data/repo/" + oid, None), ("PUT", "/data/repo", b"x"),
                                   ("GET", "/data/repo", None), ("DELETE", "/data/repo/" + oid, None)):
            response = server.request(method, path, body)
            self.assertEqual(response.status, 503, (method, path, response.body))
            self.assertEqual(response.headers["Retry-After"], "1")
            self.assertIn("unavailable", response.json()["error"])
        self.assertEqual(server.request("GET", "/healthz").status, 503)
        self.relay.start()
        self.assertEqual(server.request("GET", "/healthz").status, 200)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, b"kept")
        samples = metric_samples(server.request("GET", "/metrics").body.decode())
        self.assertGreater(samples['datastore_store_errors_total{operation="HeadBucket"}'], 0)
        self.assertGreater(samples['datastore_store_calls_total{operation="PutObject"}'], 0)

    def test_connections_the_engine_closed_are_not_reused(self):
        server = self.serve()
        oid = server.request("PUT", "/data/repo", b"before").json()["oid"]
        self.relay.stop()   # cuts every open connection, as an engine closes idle ones
        self.relay.start()
        data = b"after" * 1000
        self.assertEqual(server.request("PUT", "/data/repo/" + sha256(data), data).status, 201)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, b"before")
        self.assertEqual(server.request("GET", "/healthz").status, 200)

    def test_git_lfs_locking_is_not_offered(self):
        server = self.serve()
        response = server.request("POST", "/lfs/repo/locks", b'{"path": "a.bin"}',
                                  {"Content-Type": "application/vnd.git-lfs+json"})
        self.assertEqual(response.status, 404)
        self.assertIn("locking is not available", response.json()["message"])
        batch = server.request("POST", "/lfs/repo/objects/batch", json.dumps(
            {"operation": "upload", "objects": [{"oid": sha256(b"x"), "size": 1}]}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"})
        self.assertEqual(batch.status, 200)

    def test_an_lfs_upload_over_what_s3_takes_in_one_put_is_refused_in_the_batch(self):
        self.app = server_module.DataStorageServer(
            s3.S3Store(self.bucket, "service/", self.client), max_object_size=10 << 30)
        environ = self.environ("POST", "/lfs/repo/objects/batch", json.dumps(
            {"operation": "upload", "objects": [{"oid": sha256(b"x"), "size": s3.MAX_SINGLE_PUT},
                                                {"oid": sha256(b"y"), "size": s3.MAX_SINGLE_PUT + 1}]}
        ).encode())
        environ["CONTENT_TYPE"] = "application/vnd.git-lfs+json"
        fits, too_large = self.call(environ).json()["objects"]
        self.assertIn("upload", fits["actions"])
        self.assertEqual(too_large["error"]["code"], 413)

    def test_start_up_problems_are_one_line_and_exit_2(self):
        wrong_secret = dict(self.environment, AWS_SECRET_ACCESS_KEY="wrong")
        for args, environment, says in (
                (["--store", "s3://%s" % self.bucket], wrong_secret, "access denied"),
                (["--store", "s3://no-such-bucket-here"], self.environment, "no such bucket"),
                (["--store", "s3://%s" % self.bucket, "--max-total-size", "10"], self.environment,
                 "--max-total-size"),
                (["--store", "s3://%s" % self.bucket], {k: v for k, v in self.environment.items()
                                                        if not k.startswith("AWS_")},
                 "AWS_ACCESS_KEY_ID")):
            with self.subTest(says=says):
                result = subprocess.run(
                    [sys.executable, SERVER_SCRIPT, "--port", "0", "--s3-endpoint", self.endpoint,
                     *args], cwd=HERE, env=environment, capture_output=True, timeout=60)
                self.assertEqual(result.returncode, 2)
                self.assertIn(says.encode(), result.stderr.splitlines()[-1])
                if "--max-total-size" not in args:   # that one is argparse's: usage, then a line
                    self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)


    def test_the_settings_line_names_the_engine_calls_timeout(self):
        for args, says in (([], b", S3 timeout 10.0s"), (["--s3-timeout", "2.5"], b", S3 timeout 2.5s")):
            with self.subTest(args=args):
                process = subprocess.Popen(
                    [sys.executable, SERVER_SCRIPT, "--port", "0", "--store", "s3://%s" % self.bucket,
                     "--s3-endpoint", self.endpoint, "--workers", "1", *args],
                    cwd=HERE, env=self.environment, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, bufsize=0)
                try:
                    line = b""
                    while b"settings:" not in line:
                        line = read_line(process.stderr, timeout=30)
                        self.assertTrue(line, "the server exited before its settings line")
                finally:
                    process.kill()
                    process.wait()
                    process.stderr.close()
                self.assertIn(says, line)


class SilentEngineTest(unittest.TestCase):
    """An engine that accepts connections and never answers: every call has a
    timeout (--s3-timeout) and a stuck call is not retried, so start-up ends,
    with one line."""

    def test_start_up_gives_up_after_one_timeout(self):
        silent = socket.create_server(("127.0.0.1", 0))   # connections wait, never accepted
        self.addCleanup(silent.close)
        environment = dict(os.environ, AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, SERVER_SCRIPT, "--port", "0", "--store", "s3://bucket",
             "--s3-endpoint", "http://127.0.0.1:%d" % silent.getsockname()[1],
             "--s3-timeout", "1"],
            cwd=HERE, env=environment, capture_output=True, timeout=60)
        elapsed = time.monotonic() - started
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"timed out", result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertGreaterEqual(elapsed, 1)
        self.assertLess(elapsed, s3.DEFAULT_TIMEOUT)   # the option's timeout, not the default
        silent.setblocking(False)
        connections = 0
        while True:   # each call, and each retry, connected anew
            try:
                silent.accept()[0].close()
            except BlockingIOError:
                break
            connections += 1
        self.assertEqual(connections, 1)


class SeaweedFSServiceTest(ServiceOnS3Contract, unittest.TestCase):
    engine = "seaweedfs"


class CephRGWServiceTest(ServiceOnS3Contract, unittest.TestCase):
    engine = "ceph-rgw"


if __name__ == "__main__":
    unittest.main()
