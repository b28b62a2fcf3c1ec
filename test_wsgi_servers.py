"""The application under other WSGI servers: gunicorn (several worker processes
on one data directory) and waitress, each started as a user would start it.

Skipped, with the reason, where a server is not installed; ``.ci/run`` installs
both in a throwaway virtual environment, so CI always runs these.
"""

import hashlib
import json
import importlib.util
import os
import re
import sys
import unittest

from fixtures import ServerProcess, sha256, temporary_directory, wait_until

CHUNKED_UPLOAD_BYTES = 48 * 1024 * 1024


def installed(module):
    return importlib.util.find_spec(module) is not None


def blocks(size, block=1024 * 1024):
    """``size`` bytes of a repeatable pattern, as an iterable of blocks, and their oid."""
    pattern = hashlib.sha256(b"seed").digest() * (block // 32)
    digest = hashlib.sha256()
    parts = []
    for offset in range(0, size, block):
        part = pattern[:min(block, size - offset)]
        digest.update(part)
        parts.append(part)
    return parts, digest.hexdigest()


@unittest.skipUnless(installed("gunicorn"), "gunicorn is not installed (pip install gunicorn); "
                                            ".ci/run installs it")
class GunicornTest(unittest.TestCase):
    """``gunicorn -w 2 'server:DataStorageServer(data_dir="DIR")'``: two processes, one store."""

    def setUp(self):
        self.root = temporary_directory(self)
        self.access_log = os.path.join(temporary_directory(self), "access.log")
        self.server = ServerProcess(self, stream="stderr", command=[
            sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", "127.0.0.1:0",
            "--access-logfile", self.access_log, "--access-logformat", '%(p)s %(s)s "%(r)s"',
            'server:DataStorageServer(data_dir="%s")' % self.root],
            listening=r"Listening at: http://127\.0\.0\.1:(\d+)")

    def workers_answering(self, status, path):
        """The pids of the workers that have answered ``GET path`` with ``status``."""
        if not os.path.exists(self.access_log):
            return set()
        with open(self.access_log) as log:
            return {pid for pid, answered, request in re.findall(r'<(\d+)> (\d+) "([^"]*)"', log.read())
                    if answered == str(status) and request == "GET %s HTTP/1.1" % path}

    def get_until_every_worker_answered(self, path, status, body=None):
        """GET ``path`` on new connections until both workers have answered it."""
        def both_answered():
            response = self.server.request("GET", path)
            self.assertEqual(response.status, status)
            if body is not None:
                self.assertEqual(response.body, body)
            return len(self.workers_answering(status, path)) == 2
        wait_until(both_answered, timeout=30)

    def test_two_workers_share_one_data_directory(self):
        put = self.server.request("PUT", "/data/repo", b"shared by the workers")
        self.assertEqual((put.status, put.json()["size"]), (201, 21))
        path = "/data/repo/" + sha256(b"shared by the workers")
        self.get_until_every_worker_answered(path, 200, b"shared by the workers")

        parts, oid = blocks(CHUNKED_UPLOAD_BYTES)
        chunked = self.server.request("PUT", "/data/repo", body=iter(parts), encode_chunked=True)
        self.assertEqual(chunked.json(), {"oid": oid, "size": CHUNKED_UPLOAD_BYTES})
        self.assertEqual(hashlib.sha256(self.server.request("GET", "/data/repo/" + oid).body)
                         .hexdigest(), oid)
        ranged = self.server.request("GET", "/data/repo/" + oid, headers={"Range": "bytes=5-9"})
        self.assertEqual((ranged.status, ranged.body), (206, b"".join(parts)[5:10]))

        self.assertEqual(self.server.request("DELETE", path).status, 200)
        self.get_until_every_worker_answered(path, 404)
        self.assertEqual(os.listdir(os.path.join(self.root, "repo", oid[:2])), [oid])


    def test_git_lfs_routes(self):
        """A batch builds its links from the Host gunicorn passes on, and a lock
        taken through one worker holds in the other (one lock file, under flock)."""
        lfs_type = {"Content-Type": "application/vnd.git-lfs+json",
                    "Accept": "application/vnd.git-lfs+json"}
        oid = sha256(b"pushed")
        batch = self.server.request("POST", "/lfs/repo/objects/batch", json.dumps(
            {"operation": "upload", "objects": [{"oid": oid, "size": 6}]}).encode(), lfs_type)
        self.assertEqual(batch.status, 200, batch.body)
        href = batch.json()["objects"][0]["actions"]["upload"]["href"]
        self.assertEqual(href, "http://127.0.0.1:%d/data/repo/%s" % (self.server.port, oid))
        self.assertEqual(self.server.request("PUT", "/data/repo/" + oid, b"pushed").status, 201)
        statuses = [self.server.request("POST", "/lfs/repo/locks", b'{"path": "a.bin"}',
                                        lfs_type).status for _ in range(6)]   # new connections
        self.assertEqual(statuses, [201] + [409] * 5)


@unittest.skipUnless(installed("waitress"), "waitress is not installed (pip install waitress); "
                                            ".ci/run installs it")
class WaitressTest(unittest.TestCase):
    """``waitress-serve --call server:DataStorageServer``: the in-memory store."""

    def test_object_round_trip(self):
        server = ServerProcess(self, stream="stderr", listening=r"Serving on http://127\.0\.0\.1:(\d+)",
                               command=[sys.executable, "-m", "waitress", "--listen=127.0.0.1:0",
                                        "--call", "server:DataStorageServer"])
        parts, oid = blocks(3 * 1024 * 1024 + 5)
        self.assertEqual(server.request("PUT", "/data/repo", body=iter(parts),
                                        encode_chunked=True).json()["oid"], oid)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).body, b"".join(parts))
        ranged = server.request("GET", "/data/repo/" + oid, headers={"Range": "bytes=1000-"})
        self.assertEqual((ranged.status, ranged.body), (206, b"".join(parts)[1000:]))
        self.assertEqual(server.request("DELETE", "/data/repo/" + oid).status, 200)
        self.assertEqual(server.request("GET", "/data/repo/" + oid).status, 404)
        self.assertEqual(server.request("GET", "/data/a%2Fb/" + oid).status, 400)


if __name__ == "__main__":
    unittest.main()
