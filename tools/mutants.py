"""Mutation testing by hand: does the test suite catch the bugs users fear?

    python tools/mutants.py            # every mutant; a few minutes
    python tools/mutants.py -k fsync   # the mutants whose name contains "fsync"

Each mutant is a realistic one-line bug: one exact snippet of one file,
replaced. For each, the tree (the files git tracks) is copied to a temporary
directory, the snippet replaced, and the README's test command run there,
stopping at the first failure. A mutant is *killed* when the suite fails, and
*survives* when it passes: a promise no test keeps. The unmutated copy must
pass first. Standard library only; not part of CI (it takes minutes). The
S3 store's mutants are killed only by tests on an engine: set
DATA_STORAGE_TEST_SEAWEEDFS as for the tests.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEST_COMMAND = [sys.executable, "-m", "unittest", "discover", "-f", "-p", "*test*.py"]
TIMEOUT_SECONDS = 600

MUTANTS = [   # (name, file, snippet, replacement)
    ("no fsync of the object file", "storage.py",
     "self._sync_file(file.fileno())", "pass"),
    ("no fsync of the directory after the rename", "storage.py",
     "                raise\n"
     "            self._sync_directory(os.path.join(self.root, *object_directory(repository, oid)))",
     "                raise\n            pass"),
    ("copy instead of temp file + atomic rename", "storage.py",
     "os.replace(upload.temporary_path, upload.oid, dst_dir_fd=upload.shard_fd)",
     "shutil.copyfile(upload.temporary_path, "
     "os.path.join(self.root, upload.repository, upload.oid[:2], upload.oid))"),
    ("no digest check on a verified PUT", "storage.py",
     "if expected_oid is not None and oid != expected_oid:", "if False:"),
    ("range end past the object", "server.py",
     "size - 1 if not last else min(_position(last), size - 1)",
     "size - 1 if not last else min(_position(last), size)"),
    ("If-None-Match: * ignored", "server.py",
     "    return tags is None or any(tag == etag for _, tag in tags)",
     "    return tags is not None and any(tag == etag for _, tag in tags)"),
    ("trailers after the last chunk left unread", "http11.py",
     "                self._read_trailers()\n", "                pass\n"),
    ("eager 100 Continue", "gateway.py",
     "self.continue_pending = self.head.expects_continue and not self.body.finished",
     "self.continue_pending = self.head.expects_continue and not self.body.finished; "
     "self._body_begins()"),
    ("one namespace for all repositories", "storage.py",
     "    return repository, oid[:2]", '    return "shared", oid[:2]'),
    ("DELETE of a missing object succeeds", "storage.py",
     "                if size is None:\n                    raise not_found(repository, oid)",
     "                if size is None:\n                    return"),
    ("token compared as a prefix", "server.py",
     "return hmac.compare_digest(secret, self.auth_token)",
     "return self.auth_token.startswith(secret)"),
    ("any bearer token accepted", "server.py",
     "        elif scheme == \"bearer\":\n            secret = secret.encode(\"latin-1\")",
     "        elif scheme == \"bearer\":\n            return True"),
    ("any Basic password accepted", "server.py",
     "secret = basic_credentials(secret)[1]", "return True"),
    ("'+5' accepted as a Content-Length", "http11.py",
     "if len(values) != 1 or not all(item.isascii() and item.isdigit() for item in values):",
     "if len(values) != 1:"),
    ("size limit off by one", "server.py",
     "if length is not None and length > self.max_object_size:",
     "if length is not None and length >= self.max_object_size:"),
    ("no size limit on chunked bodies", "server.py",
     "if self.received > self.limit:", "if False:"),
    ("unread body not drained", "gateway.py",
     "while self.body.readinto(buffer):", "while False:"),
    ("listing's next is one past the page", "server.py",
     '"next": page[-1][0] if len(listed) > limit else None',
     '"next": listed[-1][0] if len(listed) > limit else None'),
    ("idle connections never reclaimed", "gateway.py",
     "victim = next((s for s in self._idle if not _has_unread_bytes(s)), None)", "victim = None"),
    ("a block sent before it is checked", "server.py",
     "self._unchecked_end = first if self._checksums else",
     "self._unchecked_end = self.end if self._checksums else"),
    ("an S3 block sent before it is checked", "server.py",
     "                if zlib.crc32(block) != crc:\n                    self._fail()",
     "                if False:\n                    self._fail()"),
    ("a range's last block sent whole from S3", "server.py",
     "block = block[max(0, self._first - offset):self._body_end - offset]",
     "block = block[max(0, self._first - offset):]"),
    ("S3 block checksums fetched for every HEAD", "s3.py",
     "lambda: self._recorded_checksums(repository, canonical, size))",
     "(lambda found: lambda: found)(self._recorded_checksums(repository, canonical, size)))"),
    ("S3 block checksums left behind by a DELETE", "s3.py",
     "        if size >= CHECKSUMS_FROM_BYTES:   # first: a PUT racing this one records them after",
     "        if False:"),
    ("S3 block checksums not mended when wrong", "s3.py",
     "        if reread == oid:\n            self._record_checksums(repository, oid, recorder.finish())",
     "        if reread == oid:\n            pass"),
    ("S3 engine failing before the first bytes: a 500", "server.py",
     "        except OSError as error:\n            raise storage.StoreUnavailable(\"reading object",
     "        except ValueError as error:\n            raise storage.StoreUnavailable(\"reading object"),
    ("S3 object quarantined when it cannot be read again", "s3.py",
     "            raise storage.StoreUnavailable(\"could not read %s again to check it: %s\"\n"
     "                                           % (oid, error)) from None",
     "            reread = None"),
    ("LFS upload asked again for a stored object", "lfs.py",
     "    if stored_size is not None:\n        if stored_size != size:",
     "    if False:\n        if stored_size != size:"),
    ("two LFS locks for one path", "lfs.py",
     "            if path in locks:\n", "            if False:\n"),
    ("someone else's LFS lock removed without force", "lfs.py",
     'if lock["owner"]["name"] != owner and not force:', "if False:"),
    ("a send that blocks (no timeout for a client that reads nothing)", "gateway.py",
     "left = left[self._sock.send(left, socket.MSG_DONTWAIT):]",
     "left = left[self._sock.send(left):]"),
    ("a file's sends not counted when the client leaves", "gateway.py",
     "                file.seek(offset + sent)", "                pass"),
    ("a socket left non-blocking after a file", "gateway.py",
     "                self._sock.setblocking(True)", "                pass"),
    ("a kernel timeout read as end of input", "gateway.py",
     "        except BlockingIOError:\n            raise _timed_out() from None\n"
     "        if self._body_started",
     "        except BlockingIOError:\n            return 0\n        if self._body_started"),
    ("block checksums read through a stale descriptor", "storage.py",
     "checksums=lambda: _recorded_checksums(file.fileno()),",
     "checksums=lambda: _recorded_checksums(fd),"),
    ("openat2 following symlinks", "storage.py",
     "_RESOLVE_NO_SYMLINKS = 0x04", "_RESOLVE_NO_SYMLINKS = 0"),
    ("group commit: renames synced after their batch is acknowledged", "storage.py",
     "                self._publish([upload for upload in synced if upload.error is None])\n"
     "                self._sync()",
     "                self._sync()\n"
     "                self._publish([upload for upload in synced if upload.error is None])"),
    ("group commit: one object twice in a batch counted twice", "storage.py",
     "                if (upload.repository, upload.oid) in unplaced:", "                if False:"),
    ("group commit: the account kept high after a failed rename", "storage.py",
     "            if (objects, stored_bytes) != estimated:", "            if False:"),
    ("group commit: closing drops the uploads queued", "storage.py",
     "                if not (self._queued or synced):\n                    return",
     "                if not (self._queued or synced) or self._closing:\n                    return"),
    ("group commit: room held counted again once stored", "storage.py",
     "                    self._quota.release(upload.hold)   # counted in stored_bytes from here",
     "                    pass"),
    ("group commit: one upload's failure fails its whole batch", "storage.py",
     "    except Exception as error:\n        upload.error = error",
     "    except Exception as error:\n        upload.error = error\n        raise"),
    ("workers: each counts only its own metrics", "server.py",
     "metrics=None if slot is None else metrics_module.Metrics(board, slot))", "metrics=None)"),
    ("workers: each counts only its own calls to the S3 engine", "server.py",
     "            client.on_call = self.metrics.store_call",
     "            client.on_call = metrics_module.Metrics().store_call"),
    ("workers: a dead worker's requests kept in flight", "workers.py",
     "            worker_exited(slot)", "            pass"),
    ("S3 GET: the HeadObject still asked first", "server.py",
     'whole=request.method == "GET" and not any(', "whole=False and not any("),
    ("S3 GET: a range opened as a read of the whole", "server.py",
     '("HTTP_RANGE", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH")', '("HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH")'),
    ("S3 GET: a held GET kept waiting through a reread", "s3.py",
     "            file.let_go()", "            pass"),
    ("S3 GET: an error answer's connection dropped", "s3.py",
     "                self._client.release(connection, response)\n            if response.status == 404:",
     "                connection.close()\n            if response.status == 404:"),
    ("S3 PUT: a small plain PUT spooled to a file", "s3.py",
     "            small = length is not None and length <= storage.HANDED_OVER_BYTES",
     "            small = False"),
    ("S3 workers: each asks the engine about the bucket as it starts", "server.py",
     "check=slot is None)", "check=True)"),
    ("log lines: a partial write taken as whole", "logs.py",
     "                    left = left[written:]", "                    left = left[len(left):]"),
    ("disk store: a kept small object served without asking the disk", "storage.py",
     "            if self._still_stored(names):", "            if True:"),
    ("disk store: a small object kept on its reader's word", "storage.py",
     "        if len(data) <= HANDED_OVER_BYTES and hashlib.sha256(data).hexdigest() == key[1]:",
     "        if len(data) <= HANDED_OVER_BYTES:"),
]


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in listed.stdout.decode().split("\0") if name]


def copy_tree(destination):
    for name in tracked_files():
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), target)


def _check_snippet(tree, file, snippet):
    with open(os.path.join(tree, file)) as source:
        count = source.read().count(snippet)
    if count != 1:
        raise SystemExit("mutant snippet found %d times in %s (the code moved: update it): %r"
                         % (count, file, snippet[:60]))


def mutate(tree, file, snippet, replacement):
    _check_snippet(tree, file, snippet)
    path = os.path.join(tree, file)
    with open(path) as source:
        text = source.read()
    with open(path, "w") as source:
        source.write(text.replace(snippet, replacement))


def suite_passes(tree):
    """``(passed, seconds, last line of the failure)``."""
    started = time.monotonic()
    try:
        result = subprocess.run(TEST_COMMAND, cwd=tree, capture_output=True, text=True,
                                timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started, "timed out"
    failure = [line for line in result.stderr.splitlines() if line.startswith(("FAIL:", "ERROR:"))]
    return result.returncode == 0, time.monotonic() - started, (failure or [""])[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only the mutants whose name contains this")
    options = parser.parse_args()
    chosen = [mutant for mutant in MUTANTS if options.k in mutant[0]]
    with tempfile.TemporaryDirectory() as work:
        baseline = os.path.join(work, "unmutated")
        copy_tree(baseline)
        for _, file, snippet, _ in chosen:   # every snippet still there, before minutes go by
            _check_snippet(baseline, file, snippet)
        passed, seconds, failure = suite_passes(baseline)
        if not passed:
            raise SystemExit("the unmutated tree fails its tests: %s" % failure)
        print("unmutated tree passes (%.0f s); %d mutants" % (seconds, len(chosen)), flush=True)
        survived = 0
        for number, (name, file, snippet, replacement) in enumerate(chosen, 1):
            tree = os.path.join(work, "mutant-%d" % number)
            copy_tree(tree)
            mutate(tree, file, snippet, replacement)
            passed, seconds, failure = suite_passes(tree)
            survived += passed
            print("%-9s %-46s %4.0f s  %s" % ("SURVIVED" if passed else "killed", name, seconds,
                                              "" if passed else failure[:90]), flush=True)
            shutil.rmtree(tree)
    print("%d killed, %d survived" % (len(chosen) - survived, survived))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
