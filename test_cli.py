"""``python server.py`` as a user runs it: subprocesses, signals, workers, crashes.

Each test starts the real command line and talks to it over loopback.
"""

import contextlib
import functools
import http.client
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import unittest

import server
import storage
import workers
from fixtures import (HERE, SERVER_SCRIPT, ServerProcess, child_pids, files_under, metric_samples,
                      read_line, run_concurrently, running, sha256, small_filesystem,
                      temporary_directory, wait_until)


class DiskStoreProcessTest(unittest.TestCase):
    """Crash safety and several processes on one data directory."""

    def setUp(self):
        self.root = temporary_directory(self)

    def assertAllObjectsIntact(self):
        result = subprocess.run([sys.executable, os.path.join(HERE, "storage.py"), "verify", self.root],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def kill_mid_upload(self, server):
        """SIGKILL ``server`` and its workers while an upload is being written to its disk."""
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n\r\n" + b"p" * 3000000)
        wait_until(lambda: any(path.startswith("@tmp") and
                               os.path.getsize(os.path.join(self.root, path)) > 0
                               for path in files_under(self.root)))
        server.kill()

    def test_sigkill_mid_upload_leaves_no_partial_object(self):
        first = ServerProcess(self, "--data-dir", self.root, new_session=True)
        self.assertEqual(first.request("PUT", "/data/repo", b"acknowledged").status, 201)
        self.kill_mid_upload(first)
        second = ServerProcess(self, "--data-dir", self.root)
        self.assertEqual(second.request("GET", "/data/repo/" + sha256(b"acknowledged")).body,
                         b"acknowledged")
        self.assertEqual(files_under(self.root), [   # the account, and one whole object
            "@ledger", "repo/%s/%s" % (sha256(b"acknowledged")[:2], sha256(b"acknowledged"))])
        self.assertAllObjectsIntact()

    def test_group_commit_keeps_every_acknowledged_upload_through_sigkill(self):
        if not storage.syncfs_durable(self.root)[0]:
            self.skipTest("--group-commit needs syncfs on one of %s" % (storage.SYNCFS_DURABLE,))
        self.check_acknowledged_uploads_survive_sigkill("--group-commit")

    def test_an_fsync_each_keeps_every_acknowledged_upload_through_sigkill(self):
        self.check_acknowledged_uploads_survive_sigkill("--no-group-commit")

    def check_acknowledged_uploads_survive_sigkill(self, sync_flag):
        first = ServerProcess(self, "--data-dir", self.root, sync_flag, new_session=True)
        datas = [b"acknowledged %d" % number for number in range(12)]
        statuses = []
        run_concurrently([lambda data=data: statuses.append(
            first.request("PUT", "/data/repo", data).status) for data in datas])
        self.assertEqual(statuses, [201] * len(datas))
        self.kill_mid_upload(first)
        second = ServerProcess(self, "--data-dir", self.root, sync_flag)
        for data in datas:
            self.assertEqual(second.request("GET", "/data/repo/" + sha256(data)).body, data)
        self.assertEqual(len(second.request("GET", "/data/repo").json()["objects"]), len(datas))
        self.assertAllObjectsIntact()

    def test_group_commit_needs_the_disk_store_and_syncfs(self):
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--group-commit"],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--group-commit is for the disk store", result.stderr.splitlines()[-1])
        result = subprocess.run(   # a kernel before 5.8, or no Linux: no syncfs to trust
            [sys.executable, "-c", "import runpy, storage; storage.SYNCFS = None; "
             "runpy.run_path('server.py', run_name='__main__')", "--group-commit",
             "--data-dir", self.root], cwd=HERE, capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("--group-commit needs syncfs", result.stderr)

    def test_group_commit_is_refused_where_syncfs_does_not_make_data_durable(self):
        with small_filesystem(self) as mount_point:   # tmpfs: nothing is durable there
            result = subprocess.run([sys.executable, SERVER_SCRIPT, "--group-commit",
                                     "--data-dir", mount_point],
                                    capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("this directory is on tmpfs", result.stderr)

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

    def start(self, *args, env=None, preexec_fn=None, **popen_options):
        """``python server.py ARGS``: ``(process, port)`` once it listens. The
        child starts with default stop signals, then runs ``preexec_fn``."""
        def prepare_child():
            default_stop_signals()
            if preexec_fn is not None:
                preexec_fn()

        process = subprocess.Popen([sys.executable, SERVER_SCRIPT, *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                   env=dict(os.environ, **(env or {})),
                                   preexec_fn=prepare_child, **popen_options)
        self.addCleanup(self.stop, process)
        line = process.stdout.readline().decode()
        self.assertIn("listening on http://127.0.0.1:", line)
        return process, int(line.rsplit(":", 1)[1].split()[0])

    @staticmethod
    def stop(process):
        """SIGKILL to the server and the workers it has now (orphans would only drain)."""
        try:
            workers_now = child_pids(process.pid)
        except OSError:   # it has exited
            workers_now = []
        process.kill()
        process.wait()
        for pid in workers_now:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.stdout.close()
        process.stderr.close()

    def test_workers_auto_is_one_per_usable_cpu(self):
        self.assertRegex(self.settings("--workers", "auto", "--data-dir", temporary_directory(self)),
                         r"workers %d\b" % workers.usable_cpus())

    def test_the_disk_store_has_a_worker_per_usable_cpu_by_default(self):
        self.assertRegex(self.settings("--data-dir", temporary_directory(self)),
                         r"workers %d\b" % workers.usable_cpus())
        self.assertRegex(self.settings(), r"workers 1\b")   # the in-memory store: one process

    def test_the_s3_store_has_a_worker_per_usable_cpu_by_default(self):
        self.assertEqual(server.parse_args(["--store", "s3://bucket"]).workers,
                         workers.usable_cpus() if hasattr(os, "fork") else 1)
        self.assertEqual(server.parse_args(["--store", "s3://bucket", "--workers", "1"]).workers, 1)

    def settings(self, *args):
        """The settings line ``python server.py --port 0 ARGS`` logs at start."""
        process, _ = self.start("--port", "0", *args)
        settings = b""
        while b"settings:" not in settings:
            settings = read_line(process.stderr)
        return settings.decode()

    def test_group_commit_is_on_by_default_where_syncfs_makes_data_durable(self):
        data_dir = temporary_directory(self)
        durable, kind = storage.syncfs_durable(data_dir)
        self.assertEqual("group commit" in self.settings("--data-dir", data_dir), durable, kind)
        self.assertNotIn("group commit",
                         self.settings("--data-dir", temporary_directory(self), "--no-group-commit"))
        with small_filesystem(self) as mount_point:   # tmpfs: the default is an fsync each, no error
            self.assertNotIn("group commit", self.settings("--data-dir", mount_point))

    def test_help_documents_every_flag(self):
        output = subprocess.run([sys.executable, SERVER_SCRIPT, "--help"],
                                capture_output=True, text=True, check=True).stdout
        for flag in ("--host", "--port", "--max-object-size", "--data-dir", "--max-total-size",
                     "--request-timeout", "--max-connections", "--shutdown-timeout", "--auth-token",
                     "--workers", "--log-format", "--log-level", "--group-commit",
                     "--no-group-commit", "--s3-timeout"):
            self.assertIn(flag, output)

    def refused_by_the_parser(self, *args):
        """What ``server.parse_args`` prints for ``args``, which it must refuse
        as ``python server.py`` would (exit status 2): in-process, as starting
        an interpreter for each would cost a second a handful."""
        printed = io.StringIO()
        with self.assertRaises(SystemExit) as refused, contextlib.redirect_stderr(printed):
            server.parse_args(list(args))
        self.assertEqual(refused.exception.code, 2, args)
        return printed.getvalue()

    def test_rejects_malformed_numbers(self):
        for args in (["--port", "+5"], ["--port", "70000"], ["--max-object-size", "1_0"],
                     ["--s3-timeout", "0"], ["--s3-timeout", "nan"], ["--s3-timeout", "inf"],
                     ["--request-timeout", "1e10"]):   # beyond what a socket timeout can hold
            self.refused_by_the_parser(*args)

    def test_s3_settings_without_an_s3_store_are_refused(self):
        for args in (["--s3-timeout", "5"], ["--spool-dir", "/tmp"],
                     ["--s3-endpoint", "http://127.0.0.1:1", "--data-dir", "/tmp"]):
            printed = self.refused_by_the_parser("--port", "0", *args)
            self.assertTrue(printed.startswith("usage:"), printed)   # before any store is opened
            self.assertIn("are for an S3 store", printed.splitlines()[-1])

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

    def start_upload(self, port, sent=b"first"):
        """A connection with an upload of 10 bytes under way (``sent`` so far)."""
        upload = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(upload.close)
        upload.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + sent)
        return upload

    @staticmethod
    def finish_upload(upload):
        """Send the rest of a ``start_upload`` body; its response, begun."""
        upload.sendall(b"half")
        upload.sendall(b"!")
        response = http.client.HTTPResponse(upload, method="PUT")
        response.begin()
        return response

    def test_stop_signals_let_an_upload_in_progress_finish(self):
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            with self.subTest(signal=signum):
                process, port = self.start("--port", "0")
                idle = socket.create_connection(("127.0.0.1", port), timeout=10)
                self.addCleanup(idle.close)
                upload = self.start_upload(port)
                self.assertIn(b"HTTP/1.1 404", self.exchange_on(
                    idle, b"GET /data/repo/x HTTP/1.1\r\nHost: x\r\n\r\n"))
                process.send_signal(signum)
                wait_until(lambda: not self.accepts(port))             # stopped accepting
                self.assertEqual(idle.recv(1), b"")                      # idle keep-alive closed
                response = self.finish_upload(upload)
                self.assertEqual((response.status, json.loads(response.read())["size"]), (201, 10))
                self.assertEqual(response.headers["Connection"], "close")
                self.assertEqual(process.wait(timeout=10), 0)

    def test_a_second_signal_stops_at_once(self):
        process, port = self.start("--port", "0")
        self.start_upload(port)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: not self.accepts(port))   # draining, the upload still open
        process.send_signal(signal.SIGINT)
        self.assertEqual(process.wait(timeout=10), 1)   # not the 20 s of --shutdown-timeout
        self.assertIn(b"stopping at once", process.stderr.read())

    def test_requests_cut_off_at_the_deadline_make_the_exit_status_1(self):
        process, port = self.start("--port", "0", "--shutdown-timeout", "0.5")
        self.start_upload(port)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=10), 1)
        self.assertIn(b"stopping with 1 requests unfinished", process.stderr.read())

    def test_start_up_problems_are_one_line_and_exit_2(self):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        a_file = os.path.join(temporary_directory(self), "file")
        open(a_file, "w").close()
        for args in (["--data-dir", os.path.join(temporary_directory(self), "missing", "dir")],
                     ["--data-dir", a_file], ["--data-dir", "/proc/x"],
                     ["--data-dir", a_file, "--workers", "2"],
                     ["--port", str(taken.getsockname()[1])], ["--host", "no-such-host.invalid"]):
            with self.subTest(args=args):
                result = subprocess.run([sys.executable, SERVER_SCRIPT, *args], capture_output=True,
                                        text=True, timeout=30)
                self.assertEqual((result.returncode, result.stdout), (2, ""))   # never "listening"
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertTrue(result.stderr.startswith("data storage service: cannot "))

    def test_a_read_only_data_directory_is_a_start_up_problem(self):
        with small_filesystem(self, read_only=True) as mount_point:
            result = subprocess.run([sys.executable, SERVER_SCRIPT, "--data-dir", mount_point],
                                    capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertIn("Read-only file system", result.stderr)

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

    def test_tokens_no_client_could_send_are_refused_at_start(self):
        for args, env in (([], {"DATA_STORAGE_TOKEN": ""}), (["--auth-token", ""], {}),
                          (["--auth-token", " s3cret "], {}), (["--auth-token", "s3 cret"], {}),
                          (["--auth-token", "caf\u00e9"], {}), (["--auth-token", "a\tb"], {})):
            with self.subTest(args=args, env=env):
                result = subprocess.run([sys.executable, SERVER_SCRIPT, *args], capture_output=True,
                                        text=True, env=dict(os.environ, **env), timeout=30)
                self.assertEqual(result.returncode, 2)
                self.assertIn("the token (--auth-token or DATA_STORAGE_TOKEN) must be",
                              result.stderr.splitlines()[-1])
                self.assertNotIn("Traceback", result.stderr)

    def test_settings_line_says_a_zero_quota_is_zero(self):
        process, _ = self.start("--port", "0", "--max-total-size", "0")
        self.assertIn("quota 0,", read_line(process.stderr).decode())

    def test_an_older_python_gets_one_clear_line(self):
        result = subprocess.run(
            [sys.executable, "-c", "import runpy, sys; sys.version_info = (3, 8, 18, 'final', 0); "
                                   "runpy.run_path(sys.argv[1], run_name='__main__')", SERVER_SCRIPT],
            capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stderr),
                         (1, "data storage service: needs Python 3.9 or newer, not 3.8\n"))

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

    def test_connections_are_fitted_to_the_open_files_limit(self):
        def few_descriptors():
            resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

        process, _ = self.start("--port", "0", preexec_fn=few_descriptors)
        self.assertIn(b"the limit on open files (100) is below 3 per connection + 64 (832): "
                      b"serving at most 12 connections", read_line(process.stderr))
        self.assertIn(b"max connections 12,", read_line(process.stderr))

    def test_out_of_file_descriptors_it_reclaims_idle_connections_without_spinning(self):
        process, port = self.start("--port", "0")
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (40, 40))   # fewer than it plans for
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
        for sock in idle:
            self.addCleanup(sock.close)
        cpu_before = cpu_seconds(process.pid)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(connection.close)
        connection.request("GET", "/healthz")   # queued behind idle ones that are accepted and reclaimed
        self.assertEqual(connection.getresponse().status, 200)
        wait_until(lambda: b"out of file descriptors" in read_line(process.stderr))
        self.assertLess(cpu_seconds(process.pid) - cpu_before, 1.0)   # no accept() busy loop

    def test_workers_share_the_quota_and_the_gauges(self):
        process, port = self.start("--port", "0", "--workers", "2", "--max-total-size", "100",
                                   "--data-dir", temporary_directory(self))
        wait_until(lambda: len(child_pids(process.pid)) == 2)
        statuses = []
        for number in range(12):   # 10 bytes each, on new connections: both workers take some
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("PUT", "/data/repo", body=b"object %03d" % number)
            statuses.append(connection.getresponse().status)
            connection.close()
        self.assertEqual(statuses, [201] * 10 + [507] * 2)   # one quota for the directory
        for _ in range(6):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/metrics")
            metrics = connection.getresponse().read().decode()
            connection.close()
            self.assertIn("datastore_objects 10\n", metrics)
            self.assertIn("datastore_bytes 100\n", metrics)

    def test_metrics_count_every_worker_and_outlive_a_worker(self):
        process, port = self.start("--port", "0", "--workers", "2",
                                   "--data-dir", temporary_directory(self))
        wait_until(lambda: len(child_pids(process.pid)) == 2)

        def samples():   # on a new connection: from either worker
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
            connection.close()
            return metric_samples(text)

        for number in range(12):   # on new connections: both workers take some
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("PUT", "/data/repo", body=b"object %d" % number)
            self.assertEqual(connection.getresponse().status, 201)
            connection.close()
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(stalled.close)
        stalled.sendall(b"PUT /data/repo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        in_flight = "datastore_http_in_flight_requests"
        wait_until(lambda: samples()[in_flight] == 2)   # the stalled upload and the scrape
        first_workers = child_pids(process.pid)
        for pid in first_workers:   # the stalled upload dies with its worker
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(child_pids(process.pid)) == 2
                   and not set(child_pids(process.pid)) & set(first_workers))
        for _ in range(6):
            found = samples()
            self.assertEqual(found['datastore_http_requests_total{method="PUT",status="201"}'], 12)
            self.assertEqual(found[in_flight], 1)   # the scrape: the dead workers' upload is gone

    def test_workers_refuse_new_connections_while_draining(self):
        process, port = self.start("--port", "0", "--workers", "2",
                                   "--data-dir", temporary_directory(self))
        wait_until(lambda: len(child_pids(process.pid)) == 2)
        upload = self.start_upload(port)
        process.send_signal(signal.SIGTERM)
        attempts = []

        def refused():
            attempts.append(port)
            return not self.accepts(port)

        wait_until(refused)
        # Refused at once, not queued where no process accepts: a listening socket
        # left open in the parent refuses only once its backlog (1024) is full.
        self.assertLess(len(attempts), 300)
        self.assertEqual(self.finish_upload(upload).status, 201)
        self.assertEqual(process.wait(timeout=20), 0)

    def test_a_signal_to_the_whole_process_group_drains_workers_once(self):
        # A terminal's Ctrl-C and systemd signal every process of the group:
        # each worker gets the signal itself and again from its parent.
        process, port = self.start("--port", "0", "--workers", "2",
                                   "--data-dir", temporary_directory(self), start_new_session=True)
        wait_until(lambda: len(child_pids(process.pid)) == 2)
        upload = self.start_upload(port)
        os.killpg(process.pid, signal.SIGTERM)
        wait_until(lambda: not self.accepts(port))
        self.assertEqual(self.finish_upload(upload).status, 201)
        self.assertEqual(process.wait(timeout=20), 0)

    def test_a_second_signal_stops_workers_at_once(self):
        process, port = self.start("--port", "0", "--workers", "2",
                                   "--data-dir", temporary_directory(self))
        wait_until(lambda: len(child_pids(process.pid)) == 2)
        self.start_upload(port)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: not self.accepts(port))
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=10), 1)

    def test_signals_ignored_at_start_stay_ignored(self):
        process, _ = self.start(
            "--port", "0", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        process.send_signal(signal.SIGHUP)   # as under nohup, when the terminal closes
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=20), 0)
        log = process.stderr.read()
        self.assertIn(b"signal %d: draining" % signal.SIGTERM, log)
        self.assertNotIn(b"signal %d:" % signal.SIGHUP, log)

    def test_workers_that_keep_dying_at_start_make_the_parent_give_up(self):
        process, _ = self.start("--port", "0", "--workers", "2",
                                "--data-dir", temporary_directory(self))

        def kill_workers():
            if process.poll() is not None:
                return True
            try:
                workers = child_pids(process.pid)
            except FileNotFoundError:   # the parent exited since poll()
                return False
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:   # it died since, and was reaped
                    pass
            return False

        wait_until(kill_workers, timeout=30)
        self.assertEqual(process.returncode, 1)
        self.assertIn(b"giving up", process.stderr.read())

    def test_workers_stop_when_the_parent_is_killed(self):
        process, _ = self.start("--port", "0", "--workers", "2",
                                "--data-dir", temporary_directory(self))
        wait_until(lambda: len(child_pids(process.pid)) == 2)
        workers = child_pids(process.pid)
        process.kill()
        process.wait()
        wait_until(lambda: not any(map(running, workers)))

    def test_workers_need_the_disk_store(self):
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--workers", "2"],
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


# Run before the server's own code: the platform has no fcntl, fork, SIGHUP,
# signal masks, sendfile or poll, as on Windows.
WITHOUT_POSIX = """
import os, select, signal, sys
sys.modules["fcntl"] = None
for module, name in ((os, "fork"), (os, "sendfile"), (signal, "SIGHUP"),
                     (signal, "pthread_sigmask"), (select, "poll")):
    delattr(module, name)
"""


class UsableCpusTest(unittest.TestCase):
    """``--workers auto``: the affinity mask, capped by the cgroups' CPU quota."""

    def cgroups(self, memberships, files):
        """A /proc/self/cgroup and a cgroup mount, as ``(proc path, mount)``."""
        root = temporary_directory(self)
        for path, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(root, "fs", path)), exist_ok=True)
            with open(os.path.join(root, "fs", path), "w") as file:
                file.write(text)
        with open(os.path.join(root, "cgroup"), "w") as file:
            file.write(memberships)
        return os.path.join(root, "cgroup"), os.path.join(root, "fs")

    def test_a_cgroup_v2_quota_caps_the_count(self):
        proc, mount = self.cgroups("0::/service/worker\n", {
            "cpu.max": "max 100000\n",
            "service/cpu.max": "150000 100000\n",   # 1.5 CPUs, on the parent: it binds the child
            "service/worker/cpu.max": "max 100000\n"})
        self.assertEqual(workers.cgroup_cpu_quota(proc, mount), 1.5)
        self.assertEqual(workers.usable_cpus(proc, mount), min(self.uncapped(mount), 2))   # rounded up

    def test_a_cgroup_v1_quota_caps_the_count(self):
        proc, mount = self.cgroups("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
        self.assertEqual(workers.cgroup_cpu_quota(proc, mount), 1.0)
        self.assertEqual(workers.usable_cpus(proc, mount), 1)

    def test_in_a_container_the_mounts_own_root_counts(self):
        # The path is the host's; the container sees its own cgroup at the mount's root.
        proc, mount = self.cgroups("0::/system.slice/docker-abc.scope\n",
                                   {"cpu.max": "50000 100000\n"})
        self.assertEqual(workers.cgroup_cpu_quota(proc, mount), 0.5)
        self.assertEqual(workers.usable_cpus(proc, mount), 1)   # at least one

    def test_lines_it_cannot_read_are_passed_over(self):
        proc, mount = self.cgroups("\ngarbage\n1:name=systemd:/\n0::/\n", {
            "cpu.max": "200000 100000\n"})
        self.assertEqual(workers.cgroup_cpu_quota(proc, mount), 2.0)
        with open(proc, "wb") as file:   # a name that is not UTF-8, with a NUL in it
            file.write(b"0::/\xff\x00x\n")
        self.assertEqual(workers.cgroup_cpu_quota(proc, mount), 2.0)
        proc, mount = self.cgroups("0::/\n", {"cpu.max": "\u00b2 100000\n"})   # digit-like, not digits
        self.assertIsNone(workers.cgroup_cpu_quota(proc, mount))

    def test_without_a_quota_every_cpu_of_the_affinity_mask(self):
        proc, mount = self.cgroups("0::/\n", {"cpu.max": "max 100000\n"})
        self.assertIsNone(workers.cgroup_cpu_quota(proc, mount))
        self.assertIsNone(workers.cgroup_cpu_quota(os.path.join(mount, "missing"), mount))
        self.assertEqual(workers.usable_cpus(proc, mount), self.uncapped(mount))
        if hasattr(os, "sched_getaffinity"):
            self.assertEqual(self.uncapped(mount), len(os.sched_getaffinity(0)))

    @staticmethod
    def uncapped(mount):
        """The count without cgroups to read."""
        return workers.usable_cpus(os.path.join(mount, "missing"), mount)


class PortableStartTest(unittest.TestCase):
    """The in-memory service where POSIX-only modules and calls are missing."""

    def run_without_posix(self, code, *args):
        return subprocess.run([sys.executable, "-c", WITHOUT_POSIX + code, *args], cwd=HERE,
                              capture_output=True, text=True, timeout=60)

    def test_the_exercise_calls_work_in_process(self):
        result = self.run_without_posix("""
import io, json, wsgiref.util, wsgiref.validate
import server
app = wsgiref.validate.validator(server.DataStorageServer())
def call(method, path, body=b""):
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, CONTENT_LENGTH=str(len(body)),
                   QUERY_STRING="")
    environ["wsgi.input"] = io.BytesIO(body)
    answer = []
    result = app(environ, lambda status, headers, exc_info=None: answer.append(status))
    body = b"".join(result)
    result.close()
    return int(answer[0][:3]), body
status, body = call("PUT", "/data/my-repo", b"something")
oid = json.loads(body)["oid"]
assert (status, json.loads(body)["size"]) == (201, 9)
assert call("GET", "/data/my-repo/" + oid) == (200, b"something")
assert call("GET", "/data/my-repo/missing")[0] == 404
assert call("DELETE", "/data/my-repo/" + oid)[0] == 200
assert call("DELETE", "/data/my-repo/missing")[0] == 404
print("ok")
""")
        self.assertEqual((result.returncode, result.stdout), (0, "ok\n"), result.stderr)

    def test_python_server_py_serves_the_memory_store(self):
        server = ServerProcess(self, command=[
            sys.executable, "-c", WITHOUT_POSIX + "import runpy; runpy.run_path('server.py', "
                                                  "run_name='__main__')", "--port", "0"])
        data = os.urandom(3 * 1024 * 1024)   # large enough to be sent as a file
        oid = server.request("PUT", "/data/repo", data).json()["oid"]
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, data)
        self.assertEqual(server.request("DELETE", "/data/repo/" + oid).status, 200)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).status, 404)
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(timeout=20), 0)

    def test_options_the_platform_cannot_support_are_one_line_errors(self):
        for args, message in ((["--data-dir", temporary_directory(self)], "--data-dir needs fcntl"),
                              (["--workers", "2", "--data-dir", "x"], "--workers above 1 needs os.fork")):
            with self.subTest(args=args):
                result = self.run_without_posix(
                    "import runpy; runpy.run_path('server.py', run_name='__main__')", *args)
                self.assertEqual(result.returncode, 2)
                self.assertIn(message, result.stderr)
                self.assertNotIn("Traceback", result.stderr)


def default_stop_signals():
    """In a child before it runs the server: stop signals as a terminal would
    deliver them, whatever this suite inherited (run in the background by a
    shell, it ignores SIGINT, and the server keeps ignored signals ignored)."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def cpu_seconds(pid):
    """User and system CPU time of process ``pid`` so far."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    unittest.main()
