"""Git LFS (lfs.py, routed by server.py): the application in-process, and the
real git-lfs client end to end against a live server (skipped without git and
git-lfs; ``.ci/run`` installs them)."""

import base64
import json
import os
import shutil
import subprocess
import unittest
import unittest.mock

import lfs
import server
from fixtures import (ServerProcess, WSGIClientMixin, metric_samples, open_disk_store,
                      run_concurrently, sha256, small_filesystem, temporary_directory)

LFS_TYPE = "application/vnd.git-lfs+json"
LFS_HEADERS = {"Accept": LFS_TYPE, "Content-Type": LFS_TYPE + "; charset=utf-8"}


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


class LFSContract(WSGIClientMixin):
    """The LFS routes, in-process through wsgiref.validate. Subclasses define ``make_app()``."""

    def setUp(self):
        super().setUp()
        self.app = self.make_app()
        self.addCleanup(self.app.close)

    def lfs(self, path, document=None, headers=None, method="POST", raw=None, chunked=False):
        """An LFS request (a JSON document, or ``raw`` bytes) and its response,
        which must carry LFS's media type."""
        body = raw if raw is not None else (json.dumps(document).encode()
                                            if document is not None else None)
        environ = self.environ(method, path, body, {**LFS_HEADERS, **(headers or {})},
                               chunked=chunked)
        environ["CONTENT_TYPE"] = environ.pop("HTTP_CONTENT_TYPE")
        response = self.call(environ)
        self.assertEqual(response.headers["Content-Type"], LFS_TYPE, response.body)
        return response

    def assertLFSError(self, response, status):
        self.assertEqual(response.status, status, response.body)
        self.assertIsInstance(response.json()["message"], str)

    def batch(self, operation, objects, **options):
        return self.lfs("/lfs/repo/objects/batch",
                        {"operation": operation, "transfers": ["basic"], "objects": objects},
                        **options)

    # Batch ------------------------------------------------------------------

    def test_upload_gives_the_verified_put_and_a_verify_action(self):
        data = b"large file content"
        oid = sha256(data)
        response = self.batch("upload", [{"oid": oid, "size": len(data)}],
                              headers={"Host": "lfs.example:8282"})
        self.assertEqual(response.status, 200)
        answer = response.json()
        self.assertEqual((answer["transfer"], answer["hash_algo"]), ("basic", "sha256"))
        (item,) = answer["objects"]
        self.assertEqual((item["oid"], item["size"]), (oid, len(data)))
        self.assertEqual(item["actions"]["upload"],
                         {"href": "http://lfs.example:8282/data/repo/" + oid})
        self.assertEqual(item["actions"]["verify"], {"href": "http://lfs.example:8282/lfs/repo/verify"})
        # The upload action is the verified PUT: wrong bytes are refused, nothing stored.
        self.assertJSONError(self.request("PUT", "/data/repo/" + oid, b"corrupted"), 400)
        self.assertEqual(self.request("PUT", "/data/repo/" + oid, data).status, 201)
        self.assertEqual(self.lfs("/lfs/repo/verify", {"oid": oid, "size": len(data)}).status, 200)
        # One namespace: the plain API lists it, and a second batch skips it.
        self.assertEqual(self.request("GET", "/data/repo").json()["objects"],
                         [{"oid": oid, "size": len(data)}])
        (again,) = self.batch("upload", [{"oid": oid, "size": len(data)}]).json()["objects"]
        self.assertEqual(again, {"oid": oid, "size": len(data)})

    def test_download_gives_stored_objects_and_a_404_for_missing_ones(self):
        oid = self.put("repo", b"stored through the plain API")
        missing = sha256(b"never stored")
        response = self.batch("download", [{"oid": oid, "size": 28}, {"oid": missing, "size": 1}])
        stored, absent = response.json()["objects"]
        self.assertEqual(stored["actions"]["download"]["href"], "http://127.0.0.1/data/repo/" + oid)
        self.assertEqual(absent["error"]["code"], 404)
        self.assertNotIn("actions", absent)
        self.assertEqual(self.request("GET", "/data/repo/" + oid).body, b"stored through the plain API")

    def test_malformed_objects_get_a_422_each_and_the_rest_are_answered(self):
        good = sha256(b"good")
        stored = self.put("repo", b"stored")
        objects = [{"oid": "abc", "size": 1}, {"oid": good, "size": -1},
                   {"oid": good, "size": True}, {"oid": good, "size": "4"}, "not an object",
                   {"oid": stored, "size": 5}, {"oid": good.upper(), "size": 4}]
        answers = self.batch("upload", objects).json()["objects"]
        self.assertEqual([answer.get("error", {}).get("code") for answer in answers],
                         [422, 422, 422, 422, 422, 422, None])
        self.assertIn("stored with size 6", answers[5]["error"]["message"])
        self.assertEqual(answers[6]["oid"], good.upper())   # answered as asked
        self.assertTrue(answers[6]["actions"]["upload"]["href"].endswith("/data/repo/" + good))
        self.assertEqual(answers[4], {"oid": "", "size": 0, "error": answers[4]["error"]})

    def test_an_object_over_the_size_limit_is_refused_in_the_batch(self):
        self.app.max_object_size = 10
        (answer,) = self.batch("upload", [{"oid": sha256(b"x" * 11), "size": 11}]).json()["objects"]
        self.assertEqual(answer["error"]["code"], 413)

    def test_bad_batch_requests_are_lfs_errors(self):
        oid = sha256(b"x")
        for raw, status in ((b"{", 400), (b"\xff", 400), (b"[]", 422),
                            (b'{"operation": "delete", "objects": []}', 422),
                            (b'{"operation": "upload"}', 422),
                            (b'{"operation": "upload", "objects": [], "transfers": ["tus"]}', 422),
                            (b'{"operation": "upload", "objects": [], "hash_algo": "sha512"}', 409),
                            (json.dumps({"operation": "upload", "objects": [
                                {"oid": oid, "size": 1}] * 1001}).encode(), 413),
                            (b" " * (lfs.MAX_DOCUMENT_BYTES + 1), 413)):
            with self.subTest(raw=raw[:60]):
                self.assertLFSError(self.lfs("/lfs/repo/objects/batch", raw=raw), status)
        self.assertLFSError(self.batch("upload", [], headers={"Content-Type": "text/plain"}), 415)
        self.assertLFSError(self.batch("upload", [], headers={"Accept": "text/html"}), 406)
        self.assertLFSError(self.lfs("/lfs/repo/objects/batch", method="GET"), 405)
        self.assertLFSError(self.lfs("/lfs/bad!name/objects/batch",
                                     {"operation": "upload", "objects": []}), 400)
        self.assertEqual(self.request("GET", "/data/repo").json()["objects"], [])

    def test_a_request_over_the_document_limit_is_told_so_however_framed(self):
        for chunked in (False, True):
            with self.subTest(chunked=chunked):
                response = self.lfs("/lfs/repo/objects/batch", chunked=chunked,
                                    raw=b" " * (lfs.MAX_DOCUMENT_BYTES + 100000))
                self.assertLFSError(response, 413)
                self.assertEqual(response.json()["message"],
                                 "request larger than %d bytes" % lfs.MAX_DOCUMENT_BYTES)

    def test_hostile_json_is_a_400_not_a_500(self):
        for raw in (b"[" * 100000, b'{"a":' * 100000, b'{"operation": "upload", "objects": '
                    b'[{"oid": "x", "size": NaN}]}', b'{"size": Infinity}'):
            for path in ("/lfs/repo/objects/batch", "/lfs/repo/verify", "/lfs/repo/locks",
                         "/lfs/repo/locks/verify", "/lfs/repo/locks/x/unlock"):
                with self.subTest(raw=raw[:20], path=path):
                    self.assertLFSError(self.lfs(path, raw=raw), 400)
        for path in ("/lfs/repo/locks/verify", "/lfs/repo/locks/x/unlock"):
            self.assertLFSError(self.lfs(path, raw=b"[]"), 422)

    def test_every_error_under_lfs_is_an_lfs_error(self):
        for method, path, status in (("POST", "/lfs/%ff/objects/batch", 400),
                                     ("POST", "/lfs/repo/locks/%ff/unlock", 400),
                                     ("GET", "/lfs/repo", 404), ("GET", "/lfs/repo/locks/", 404),
                                     ("POST", "/lfs/repo/objects/batch/", 404)):
            with self.subTest(path=path):
                self.assertLFSError(self.lfs(path, {}, method=method), status)
        environ = self.environ("POST", "/lfs/repo/objects/batch", b"{}", LFS_HEADERS)
        environ["CONTENT_TYPE"] = environ.pop("HTTP_CONTENT_TYPE")
        environ["CONTENT_LENGTH"] = "+2"   # as a server may pass it on
        response = self.call(environ)
        self.assertEqual((response.status, response.headers["Content-Type"]), (400, LFS_TYPE))

    def test_too_many_locks_in_one_repository(self):
        with unittest.mock.patch.object(lfs, "MAX_LOCKS", 3):
            for n in range(3):
                self.assertEqual(self.lock("%d.bin" % n).status, 201)
            self.assertLFSError(self.lock("3.bin"), 507)
        for path in ("x" * 1025, "\udc80x"):
            self.assertLFSError(self.lfs("/lfs/repo/locks", raw=json.dumps({"path": path})
                                         .encode()), 422)

    def test_whole_numbers_may_be_written_as_floats_and_refs_must_be_objects(self):
        oid = self.put("repo", b"four")
        (item,) = self.batch("download", [{"oid": oid, "size": 4.0}]).json()["objects"]
        self.assertEqual((item["size"], "download" in item["actions"]), (4, True))
        self.assertEqual(self.lfs("/lfs/repo/verify", {"oid": oid, "size": 4.0}).status, 200)
        self.assertEqual(self.lfs("/lfs/repo/locks/verify", {"limit": 5.0}).status, 200)
        (bad,) = self.batch("download", [{"oid": oid, "size": 4.5}]).json()["objects"]
        self.assertEqual(bad["error"]["code"], 422)
        for path, document in (("/lfs/repo/locks", {"path": "a", "ref": [None]}),
                               ("/lfs/repo/locks/verify", {"ref": "main"}),
                               ("/lfs/repo/locks/x/unlock", {"ref": 1}),
                               ("/lfs/repo/objects/batch", {"operation": "upload", "objects": [],
                                                            "ref": []})):
            self.assertLFSError(self.lfs(path, document), 422)

    def test_links_use_the_public_url_behind_a_proxy(self):
        self.app.public_url = "https://storage.example.com/prefix"
        oid = self.put("repo", b"x")
        (item,) = self.batch("download", [{"oid": oid, "size": 1}]).json()["objects"]
        self.assertEqual(item["actions"]["download"]["href"],
                         "https://storage.example.com/prefix/data/repo/" + oid)

    def test_verify(self):
        oid = self.put("repo", b"verified")
        self.assertEqual(self.lfs("/lfs/repo/verify", {"oid": oid, "size": 8}).json(), {})
        self.assertLFSError(self.lfs("/lfs/repo/verify", {"oid": oid, "size": 9}), 422)
        self.assertLFSError(self.lfs("/lfs/repo/verify", {"oid": sha256(b"no"), "size": 2}), 404)
        self.assertLFSError(self.lfs("/lfs/repo/verify", {"oid": "no", "size": 2}), 422)

    # Authentication ---------------------------------------------------------------

    def test_the_token_works_as_bearer_and_as_a_basic_password(self):
        self.app.auth_token = b"s3cret"
        refused = self.batch("upload", [{"oid": sha256(b"data"), "size": 4}])
        self.assertLFSError(refused, 401)
        self.assertEqual(refused.headers["LFS-Authenticate"], 'Basic realm="data-storage"')
        self.assertLFSError(self.batch("upload", [], headers={
            "Authorization": basic("alice", "wrong")}), 401)
        for credentials in ("Bearer s3cret", basic("alice", "s3cret"), basic("", "s3cret")):
            with self.subTest(credentials=credentials):
                data = credentials.encode()
                oid = sha256(data)
                response = self.batch("upload", [{"oid": oid, "size": len(data)}],
                                      headers={"Authorization": credentials})
                (item,) = response.json()["objects"]
                self.assertTrue(item["authenticated"])
                for action in item["actions"].values():   # transfers carry the batch's own credentials
                    self.assertEqual(action["header"], {"Authorization": credentials})
                put = self.request("PUT", "/data/repo/" + oid, data,
                                   headers=item["actions"]["upload"]["header"])
                self.assertEqual(put.status, 201)

    def test_a_repeated_authorization_counts_once_only_when_identical(self):
        self.app.auth_token = b"s3cret"
        twice = "Bearer s3cret, Bearer s3cret"   # as servers join repeated fields
        self.assertEqual(self.batch("upload", [], headers={"Authorization": twice}).status, 200)
        self.assertEqual(self.request("GET", "/data/repo", headers={"Authorization": twice}).status,
                         200)
        different = "Bearer s3cret, %s" % basic("x", "s3cret")
        self.assertLFSError(self.batch("upload", [], headers={"Authorization": different}), 400)
        for token, value in ((b"ab,cd", "Bearer ab,cd"),   # a token may hold commas
                             (b"ab,cd", "Bearer ab,cd, bearer ab,cd"),
                             (b"ab,cd", "Bearer ab,cd,Bearer ab,cd"),
                             (b"ab,bearer", "Bearer ab,bearer")):
            self.app.auth_token = token
            self.assertEqual(self.batch("upload", [], headers={"Authorization": value}).status,
                             200, value)

    # Locks ------------------------------------------------------------------------

    def lock(self, path, user="alice"):
        return self.lfs("/lfs/repo/locks", {"path": path}, headers={"Authorization": basic(user, "")})

    def test_locks_are_exclusive_per_path(self):
        created = self.lock("assets/a.bin")
        self.assertEqual(created.status, 201)
        lock = created.json()["lock"]
        self.assertEqual((lock["path"], lock["owner"]), ("assets/a.bin", {"name": "alice"}))
        conflict = self.lock("assets/a.bin", user="bob")
        self.assertEqual(conflict.status, 409)
        self.assertEqual(conflict.json()["lock"], lock)
        self.assertIn("already locked", conflict.json()["message"])
        self.assertEqual(self.lock("other.bin", user="bob").status, 201)
        self.assertLFSError(self.lfs("/lfs/repo/locks", {"path": ""}), 422)
        self.assertLFSError(self.lfs("/lfs/repo/locks", {"paths": "x"}), 422)

    def test_listing_locks_filters_and_pages(self):
        ids = {path: self.lock(path).json()["lock"]["id"] for path in ("c", "a", "b", "d")}
        listed = self.lfs("/lfs/repo/locks", method="GET").json()
        self.assertEqual([lock["path"] for lock in listed["locks"]], ["a", "b", "c", "d"])
        self.assertNotIn("next_cursor", listed)
        pages, cursor = [], ""
        while cursor is not None:
            page = self.lfs("/lfs/repo/locks?limit=3" + ("&cursor=" + cursor if cursor else ""),
                            method="GET").json()
            pages.append([lock["path"] for lock in page["locks"]])
            cursor = page.get("next_cursor")
        self.assertEqual(pages, [["a", "b", "c"], ["d"]])
        by_path = self.lfs("/lfs/repo/locks?path=b", method="GET").json()["locks"]
        self.assertEqual([lock["id"] for lock in by_path], [ids["b"]])
        by_id = self.lfs("/lfs/repo/locks?id=" + ids["c"], method="GET").json()["locks"]
        self.assertEqual([lock["path"] for lock in by_id], ["c"])
        self.assertEqual(self.lfs("/lfs/other/locks", method="GET").json(), {"locks": []})
        for query in ("limit=0", "limit=x", "limit=1001", "limit=1&limit=2"):
            response = self.lfs("/lfs/repo/locks?" + query, method="GET")
            self.assertIn(response.status, (400, 422), query)

    def test_verifying_locks_splits_ours_and_theirs(self):
        self.lock("mine.bin", user="alice")
        self.lock("theirs.bin", user="bob")
        answer = self.lfs("/lfs/repo/locks/verify", {"ref": {"name": "refs/heads/main"}},
                          headers={"Authorization": basic("alice", "")}).json()
        self.assertEqual([lock["path"] for lock in answer["ours"]], ["mine.bin"])
        self.assertEqual([lock["path"] for lock in answer["theirs"]], ["theirs.bin"])
        self.assertLFSError(self.lfs("/lfs/repo/locks/verify", {"limit": 0}), 422)

    def test_unlocking_someone_elses_lock_needs_force(self):
        lock_id = self.lock("a.bin", user="alice").json()["lock"]["id"]
        unlock = "/lfs/repo/locks/%s/unlock" % lock_id
        self.assertLFSError(self.lfs(unlock, {}, headers={"Authorization": basic("bob", "")}), 403)
        forced = self.lfs(unlock, {"force": True}, headers={"Authorization": basic("bob", "")})
        self.assertEqual((forced.status, forced.json()["lock"]["id"]), (200, lock_id))
        self.assertLFSError(self.lfs(unlock, {}), 404)
        self.assertEqual(self.lock("a.bin", user="bob").status, 201)   # free again
        for force in ("yes", 1, 0):
            self.assertLFSError(self.lfs(unlock, {"force": force}), 422)


class MemoryLFSTest(LFSContract, unittest.TestCase):
    def make_app(self):
        return server.DataStorageServer()


class DiskLFSTest(LFSContract, unittest.TestCase):
    def make_app(self):
        self.root = temporary_directory(self)
        return server.DataStorageServer(open_disk_store(self, self.root))

    def test_locks_survive_a_restart(self):
        lock = self.lock("kept.bin").json()["lock"]
        self.app = server.DataStorageServer(open_disk_store(self, self.root))
        self.assertEqual(self.lfs("/lfs/repo/locks", method="GET").json()["locks"], [lock])
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, "@locks"))),
                         ["repo.flock", "repo.json"])   # no temporary file left behind

    def test_a_full_or_read_only_disk_is_an_lfs_error_and_leaves_nothing_behind(self):
        with small_filesystem(self, size="64k") as mount_point:
            self.app = server.DataStorageServer(open_disk_store(self, mount_point))
            self.assertEqual(self.lock("first.bin").status, 201)
            refused = [self.lock("%04d" % n + "x" * 1000).status for n in range(80)]
            self.assertIn(507, refused)
            self.assertNotIn(500, refused)
            subprocess.run(["mount", "-o", "remount,ro", mount_point], check=True)
            self.assertLFSError(self.lock("other.bin"), 503)
            subprocess.run(["mount", "-o", "remount,rw", mount_point], check=True)
            self.assertEqual([name for name in os.listdir(os.path.join(mount_point, "@locks"))
                              if "tmp" in name], [])
            self.assertEqual(self.lfs("/lfs/repo/locks?path=first.bin", method="GET")
                             .json()["locks"][0]["path"], "first.bin")

    def test_concurrent_creates_of_one_path_make_one_lock(self):
        # Two applications on one directory stand for two worker processes.
        apps = [self.app, server.DataStorageServer(open_disk_store(self, self.root))]
        statuses = []

        def create(app, user):
            environ = self.environ("POST", "/lfs/repo/locks", json.dumps({"path": "x"}).encode(),
                                   {"Authorization": basic(user, "")})
            environ["CONTENT_TYPE"] = LFS_TYPE
            status = []
            b"".join(app(environ, lambda line, headers, exc_info=None: status.append(line)))
            statuses.append(status[0][:3])

        run_concurrently([lambda app=app, n=n: create(app, "user%d" % n)
                          for n in range(20) for app in apps])
        self.assertEqual(sorted(statuses), ["201"] + ["409"] * 39)
        self.assertEqual(len(self.lfs("/lfs/repo/locks", method="GET").json()["locks"]), 1)


# The real client ------------------------------------------------------------------------

GIT_LFS = shutil.which("git") and shutil.which("git-lfs")


@unittest.skipUnless(GIT_LFS, "needs git and git-lfs (Debian: apt-get install git-lfs)")
class GitLFSClientTest(unittest.TestCase):
    """git and git-lfs against ``python server.py`` on loopback: a bare
    repository is the Git remote, ``lfs.url`` points at the server."""

    TOKEN = "s3cret-token"

    def setUp(self):
        self.work = temporary_directory(self)
        self.environment = {**os.environ, "HOME": self.work, "GIT_TERMINAL_PROMPT": "0",
                            "GIT_CONFIG_NOSYSTEM": "1", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
        self.environment.pop("XDG_CONFIG_HOME", None)
        self.git("config", "--global", "user.name", "Test")
        self.git("config", "--global", "user.email", "test@example.com")
        self.git("config", "--global", "init.defaultBranch", "main")
        self.git("lfs", "install", "--skip-repo")
        self.remote = os.path.join(self.work, "remote.git")
        self.git("init", "--bare", "-q", self.remote)

    def git(self, *args, cwd=None, check=True):
        result = subprocess.run(["git", *args], cwd=cwd or self.work, env=self.environment,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        if check and result.returncode:
            self.fail("git %s failed:\n%s" % (" ".join(args), result.stdout.decode(errors="replace")))
        return result

    def start(self, *args):
        self.data_dir = os.path.join(self.work, "data")
        self.server = ServerProcess(self, "--data-dir", self.data_dir, "--max-object-size",
                                    str(200 << 20), *args)
        return "http://127.0.0.1:%d/lfs/repo" % self.server.port

    def clone(self, name, lfs_url, *config):
        """A clone whose LFS files come from ``lfs_url``, not fetched yet
        (git-lfs would fetch them during the clone, before ``lfs.url`` is set)."""
        path = os.path.join(self.work, name)
        subprocess.run(["git", "clone", "-q", self.remote, path], check=True, timeout=300,
                       env=dict(self.environment, GIT_LFS_SKIP_SMUDGE="1"))
        self.git("config", "lfs.url", lfs_url, cwd=path)
        for key, value in config:
            self.git("config", "--add", key, value, cwd=path)
        return path

    def commit_files(self, path, files):
        self.git("lfs", "track", "*.bin", cwd=path)
        for name, data in files.items():
            with open(os.path.join(path, name), "wb") as file:
                file.write(data)
        self.git("add", ".", cwd=path)
        self.git("commit", "-q", "-m", "files", cwd=path)

    def puts(self):
        samples = metric_samples(self.server.request("GET", "/metrics", headers=self.auth).body.decode())
        return sum(value for name, value in samples.items()
                   if name.startswith('datastore_http_requests_total{method="PUT"'))

    auth = {}

    def test_push_then_pull_in_a_fresh_clone(self):
        url = self.start()
        files = {"empty.bin": b"", "one.bin": b"1", "five.bin": os.urandom(5 << 20),
                 "hundred.bin": os.urandom(100 << 20)}
        first = self.clone("first", url)
        self.commit_files(first, files)
        self.git("push", "-q", "origin", "main", cwd=first)
        stored = self.server.request("GET", "/data/repo").json()["objects"]
        expected = {sha256(data) for data in files.values() if data}   # git-lfs keeps empty files in Git
        self.assertEqual({item["oid"] for item in stored}, expected)
        puts = self.puts()
        self.assertEqual(puts, 3)
        self.git("push", "origin", "main", cwd=first)
        self.git("lfs", "push", "--all", "origin", cwd=first)
        self.assertEqual(self.puts(), puts)   # already stored: nothing uploaded again

        second = self.clone("second", url)
        self.git("lfs", "pull", cwd=second)
        for name, data in files.items():
            with open(os.path.join(second, name), "rb") as file:
                self.assertEqual(file.read(), data, name)
        self.assertIn(b"Git LFS fsck OK", self.git("lfs", "fsck", cwd=second).stdout)

    def test_push_with_a_token(self):
        url = self.start("--auth-token", self.TOKEN)
        self.auth = {"Authorization": "Bearer " + self.TOKEN}
        data = os.urandom(1 << 20)
        refused = self.clone("refused", url)
        self.commit_files(refused, {"a.bin": data})
        self.assertNotEqual(self.git("push", "-q", "origin", "main", cwd=refused,
                                     check=False).returncode, 0)
        as_basic = self.clone("basic", url.replace("http://", "http://alice:%s@" % self.TOKEN))
        self.commit_files(as_basic, {"b.bin": data[::-1]})
        self.git("push", "-q", "origin", "main", cwd=as_basic)
        # The token in http.extraHeader: git-lfs sends it, and the action's copy, on transfers.
        extra = self.clone("extra", url, ("http.extraHeader", "Authorization: Bearer " + self.TOKEN))
        self.commit_files(extra, {"c.bin": data + b"c"})
        self.git("pull", "-q", "--rebase", "origin", "main", cwd=extra)
        self.git("push", "-q", "origin", "main", cwd=extra)
        stored = self.server.request("GET", "/data/repo", headers=self.auth).json()["objects"]
        self.assertEqual({item["oid"] for item in stored}, {sha256(data[::-1]), sha256(data + b"c")})

    def test_locks_from_two_clones(self):
        url = self.start("--auth-token", self.TOKEN)
        alice = self.clone("alice", url.replace("http://", "http://alice:%s@" % self.TOKEN))
        self.commit_files(alice, {"shared.bin": b"shared"})
        self.git("push", "-q", "origin", "main", cwd=alice)
        bob = self.clone("bob", url.replace("http://", "http://bob:%s@" % self.TOKEN))
        self.git("lfs", "lock", "shared.bin", cwd=alice)
        refused = self.git("lfs", "lock", "shared.bin", cwd=bob, check=False)
        self.assertNotEqual(refused.returncode, 0, refused.stdout)
        listed = self.git("lfs", "locks", "--json", cwd=bob).stdout
        (lock,) = json.loads(listed)
        self.assertEqual((lock["path"], lock["owner"]["name"]), ("shared.bin", "alice"))
        self.assertNotEqual(self.git("lfs", "unlock", "shared.bin", cwd=bob, check=False).returncode, 0)
        self.git("lfs", "unlock", "shared.bin", cwd=alice)
        self.git("lfs", "lock", "shared.bin", cwd=bob)

    def test_push_to_two_workers(self):
        url = self.start("--workers", "2")
        files = {"%d.bin" % n: os.urandom(100_000 + n) for n in range(8)}
        clone = self.clone("clone", url)
        self.commit_files(clone, files)
        self.git("push", "-q", "origin", "main", cwd=clone)
        stored = self.server.request("GET", "/data/repo").json()["objects"]
        self.assertEqual({item["oid"] for item in stored}, {sha256(data) for data in files.values()})


if __name__ == "__main__":
    unittest.main()
