"""The application (``server.DataStorageServer``) in-process, no sockets.

Every request goes through ``wsgiref.validate``, which fails a test on any
breach of PEP 3333. ``ApplicationContract`` holds the object semantics and
runs against both stores; a backend's test case supplies ``make_store()``.
"""

import io
import itertools
import json
import os
import subprocess
import time
import unittest
import warnings
import wsgiref.validate

import checksums
import gateway
import metrics
import server
import storage
from fixtures import (HERE, WSGIClientMixin, metric_samples, open_disk_store, sha256,
                      small_filesystem, temporary_directory)


class ApplicationContract(WSGIClientMixin):
    """What the application does, whatever the store. Subclasses define ``make_store()``."""

    def setUp(self):
        super().setUp()
        self.app = server.DataStorageServer(self.make_store())

    def restart(self, store=None, **options):
        """Replace the application with one built with another store or options."""
        self.app = server.DataStorageServer(store or self.make_store(), **options)

    # The exercise's own calls ------------------------------------------------

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
        deleted = self.request("DELETE", "/data/my-repo/%s" % oid)
        self.assertEqual((deleted.status, deleted.json()), (200, {"deleted": oid}))
        self.assertEqual(self.request("GET", "/data/my-repo/%s" % oid).status, 404)
        self.assertEqual(self.request("GET", "/data/other-repo/%s" % oid).body, b"something")

    def test_delete_missing_is_404(self):
        self.assertJSONError(self.request("DELETE", "/data/my-repo/missing"), 404)
        oid = self.put("my-repo", b"once")
        self.assertEqual(self.request("DELETE", "/data/my-repo/%s" % oid.upper()).status, 200)
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

    def test_body_to_the_end_of_a_terminated_input(self):
        data = os.urandom(600 * 1024)   # several blocks
        response = self.request("PUT", "/data/repo", data, chunked=True)
        self.assertEqual(response.json(), {"oid": sha256(data), "size": len(data)})
        self.assertEqual(self.request("GET", "/data/repo/" + sha256(data)).body, data)

    def test_a_terminated_input_beside_a_zero_length_is_read_to_its_end(self):
        # Werkzeug passes a chunked body's Content-Length: 0 along, with input_terminated.
        data = os.urandom(600 * 1024)
        environ = self.environ("PUT", "/data/repo", data, chunked=True)
        environ["CONTENT_LENGTH"] = "0"
        self.assertEqual(self.call(environ).json(), {"oid": sha256(data), "size": len(data)})
        self.assertEqual(self.request("GET", "/data/repo/" + sha256(data)).body, data)

    def test_chunked_body_the_server_did_not_decode_is_411(self):
        environ = self.environ("PUT", "/data/repo", b"5\r\nhello\r\n0\r\n\r\n")
        del environ["CONTENT_LENGTH"]   # as wsgiref.simple_server passes a chunked body
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        self.assertJSONError(self.call(environ), 411)
        self.assertEqual(self.app.store.usage(), (0, 0))

    def test_content_length_bounds_the_body_read(self):
        environ = self.environ("PUT", "/data/repo", b"exactly")
        environ["wsgi.input"] = io.BytesIO(b"exactly and more after it")
        self.assertEqual(self.call(environ).json(), {"oid": sha256(b"exactly"), "size": 7})

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
        self.restart(max_object_size=10)
        self.assertEqual(self.request("PUT", "/data/repo", b"x" * 10).status, 201)
        self.assertJSONError(self.request("PUT", "/data/repo", b"y" * 11), 413)
        self.assertNotStored("repo", b"y" * 11)
        self.assertEqual(self.request("PUT", "/data/repo", b"z" * 10, chunked=True).status, 201)
        self.assertJSONError(self.request("PUT", "/data/repo", b"z" * 12, chunked=True), 413)
        self.assertNotStored("repo", b"z" * 12)

    def test_too_large_is_refused_before_reading(self):
        self.restart(max_object_size=10)
        environ = self.environ("PUT", "/data/repo", b"y" * 11)
        body = environ["wsgi.input"]
        self.assertJSONError(self.call(environ), 413)
        self.assertEqual(body.tell(), 0)

    def test_quota(self):
        self.restart(store=self.make_store(max_total_size=10))
        first = self.put("repo", b"123456")
        self.assertJSONError(self.request("PUT", "/data/repo", b"abcdef"), 507)
        self.assertNotStored("repo", b"abcdef")
        # Content already stored needs no room when its oid comes first (a verified PUT).
        self.assertEqual(self.request("PUT", "/data/repo/" + first, b"123456").status, 201)
        environ = self.environ("PUT", "/data/repo", b"0123456789")   # refused before reading
        body = environ["wsgi.input"]
        self.assertJSONError(self.call(environ), 507)
        self.assertEqual(body.tell(), 0)
        self.assertJSONError(self.request("PUT", "/data/repo", b"z" * 5, chunked=True), 507)
        self.assertEqual(self.request("GET", "/data/repo/" + first).body, b"123456")
        self.assertEqual(self.request("DELETE", "/data/repo/" + first).status, 200)
        self.assertEqual(self.request("PUT", "/data/repo", b"abcdef").status, 201)

    def test_an_input_that_fails_is_the_servers_to_answer(self):
        class BrokenInput(io.RawIOBase):
            def readinto(self, buffer):
                raise ConnectionResetError("client went away")

        environ = self.environ("PUT", "/data/repo", b"lost upload")
        environ["wsgi.input"] = BrokenInput()
        with self.assertRaises(ConnectionResetError):
            self.app(environ, lambda status, headers, exc_info=None: None)
        self.assertEqual(self.app.store.usage(), (0, 0))
        metrics = self.request("GET", "/metrics").body.decode()
        self.assertIn("datastore_http_in_flight_requests 1\n", metrics)   # only this request
        self.assertNotIn('method="PUT"', metrics)

    # Downloads -------------------------------------------------------------

    def test_get_headers(self):
        oid = self.put("repo", b"headers")
        response = self.request("GET", "/data/repo/%s" % oid)
        self.assertEqual(response.headers["Content-Type"], "application/octet-stream")
        self.assertEqual(response.headers["Content-Length"], "7")
        self.assertEqual(response.headers["ETag"], '"%s"' % oid)
        self.assertEqual(response.headers["Accept-Ranges"], "bytes")

    def test_head_sends_headers_without_body(self):
        oid = self.put("repo", b"head body")
        head = self.request("HEAD", "/data/repo/%s" % oid)
        self.assertEqual((head.status, head.body, head.headers["Content-Length"]), (200, b"", "9"))
        self.assertEqual(head.headers["ETag"], '"%s"' % oid)
        self.assertEqual(self.request("HEAD", "/data/repo/missing").status, 404)

    def test_large_get_streams_whole_object(self):
        data = os.urandom(3 * 1024 * 1024 + 7)
        oid = self.put("repo", data)
        for file_wrapper in (False, True):
            response = self.request("GET", "/data/repo/%s" % oid, file_wrapper=file_wrapper)
            self.assertEqual(response.body, data)

    def test_large_object_is_streamed_not_read_whole(self):
        data = os.urandom(2 * server.BODY_BLOCK_BYTES + 1)
        oid = self.put("repo", data)
        environ = self.environ("GET", "/data/repo/" + oid)
        result = self.app(environ, lambda status, headers, exc_info=None: None)
        try:
            blocks = list(result)
        finally:
            result.close()
        self.assertEqual([len(block) for block in blocks],
                         [server.BODY_BLOCK_BYTES, server.BODY_BLOCK_BYTES, 1])

    def test_file_wrapper_gets_the_file_at_the_range(self):
        data = os.urandom(1024 * 1024)
        oid = self.put("repo", data)
        environ = self.environ("GET", "/data/repo/" + oid, headers={"Range": "bytes=1000-800999"})
        environ["wsgi.file_wrapper"] = gateway.FileWrapper
        environ[gateway.CHECKED_SPANS_KEY] = True
        result = self.app(environ, lambda status, headers, exc_info=None: None)
        try:
            self.assertIsInstance(result, gateway.FileWrapper)
            self.assertEqual(result.filelike.tell(), 1000)
            self.assertEqual(b"".join(result), data[1000:801000])   # stops at the range's end
        finally:
            result.close()

    def test_if_none_match(self):
        oid = self.put("repo", b"cached")
        etag = '"%s"' % oid
        for value in (etag, "*", "W/" + etag, '"other", ' + etag):
            response = self.request("GET", "/data/repo/%s" % oid, headers={"If-None-Match": value})
            self.assertEqual((response.status, response.body), (304, b""), value)
            self.assertEqual(response.headers["ETag"], etag)
        for value in ('"other"', '"x,*,y"', '"x, %s"' % etag.strip('"'),   # a comma in a tag
                      "foo%sbar" % etag, etag + ", *"):   # not a list of entity-tags: no match
            response = self.request("GET", "/data/repo/%s" % oid, headers={"If-None-Match": value})
            self.assertEqual((response.status, response.body), (200, b"cached"), value)

    def test_if_none_match_stops_a_put_or_delete_of_a_stored_object(self):
        oid = self.put("repo", b"there")
        path = "/data/repo/" + oid
        for value in ("*", '"%s"' % oid, 'W/"%s"' % oid, '"other", "%s"' % oid):
            self.assertJSONError(self.request("DELETE", path, headers={"If-None-Match": value}), 412)
            self.assertJSONError(self.request("PUT", path, b"there",
                                              headers={"If-None-Match": value}), 412)
        self.assertEqual(self.request("GET", path).body, b"there")   # neither was performed
        missing = sha256(b"new")
        self.assertEqual(self.request("PUT", "/data/repo/" + missing, b"new",
                                      headers={"If-None-Match": "*"}).status, 201)
        self.assertEqual(self.request("DELETE", path, headers={"If-None-Match": '"other"'}).status,
                         200)
        self.assertJSONError(self.request("DELETE", path, headers={"If-None-Match": "*"}), 404)

    def test_if_match(self):
        oid = self.put("repo", b"matched")
        path = "/data/repo/" + oid
        etag = '"%s"' % oid
        # empty list elements are allowed (RFC 9110 §5.6.1)
        for value in (etag, "*", '"other", ' + etag, " , %s ,," % etag):
            for method in ("GET", "HEAD"):
                self.assertEqual(self.request(method, path, headers={"If-Match": value}).status,
                                 200, (method, value))
        for value in ('"other"', "W/" + etag, '"x,*,y"',   # strong only; a comma in a tag
                      # not an entity-tag list: the condition cannot be read, so it fails
                      "w/" + etag, "W/ " + etag, "foo%sbar" % etag, etag + ", *", etag + etag):
            self.assertJSONError(self.request("GET", path, headers={"If-Match": value}), 412)
            self.assertJSONError(self.request("DELETE", path, headers={"If-Match": value}), 412)
            self.assertJSONError(self.request("PUT", path, b"matched", headers={"If-Match": value}),
                                 412)
        self.assertEqual(self.request("PUT", path, b"matched", headers={"If-Match": "*"}).status, 201)
        missing = sha256(b"missing")
        self.assertJSONError(self.request("PUT", "/data/repo/" + missing, b"missing",
                                          headers={"If-Match": "*"}), 412)
        self.assertNotStored("repo", b"missing")
        self.assertJSONError(self.request("GET", "/data/repo/" + missing,
                                          headers={"If-Match": "*"}), 404)
        self.assertEqual(self.request("DELETE", path, headers={"If-Match": etag}).status, 200)
        self.assertJSONError(self.request("DELETE", path, headers={"If-Match": etag}), 404)

    def test_cache_control(self):
        oid = self.put("repo", b"cached for a year")
        for method, headers in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-1"}),
                                ("GET", {"If-None-Match": '"%s"' % oid})):
            response = self.request(method, "/data/repo/" + oid, headers=headers)
            self.assertEqual(response.headers["Cache-Control"],
                             "public, max-age=31536000, immutable", (method, headers))
        for path in ("/data/repo/" + sha256(b"later"), "/data/repo", "/healthz", "/metrics",
                     "/data/a%2Fb", "/nowhere"):
            self.assertEqual(self.request("GET", path).headers["Cache-Control"], "no-store", path)
        self.restart(auth_token="t")
        oid = self.put_with_token("repo", b"cached privately")
        response = self.request("GET", "/data/repo/" + oid, headers={"Authorization": "Bearer t"})
        self.assertEqual(response.headers["Cache-Control"], "private, max-age=31536000, immutable")

    def put_with_token(self, repository, data):
        response = self.request("PUT", "/data/" + repository, data,
                                headers={"Authorization": "Bearer t"})
        self.assertEqual(response.status, 201)
        return response.json()["oid"]

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
        for file_wrapper in (False, True):
            response = self.request("GET", "/data/repo/%s" % oid, file_wrapper=file_wrapper,
                                    headers={"Range": "bytes=1000-800999"})
            self.assertEqual((response.status, response.body), (206, data[1000:801000]))

    def test_range_unit_is_case_insensitive_and_long_ends_are_clamped(self):
        oid = self.put("repo", b"0123456789")
        for value, body in (("BYTES=2-4", b"234"), ("bytes = 8 - " + "9" * 40, b"89"),
                            ("bytes=0-" + "0" * 30 + "1", b"01"), ("bytes=-" + "9" * 5000, b"0123456789")):
            response = self.request("GET", "/data/repo/" + oid, headers={"Range": value})
            self.assertEqual((response.status, response.body), (206, body), value[:40])
        response = self.request("GET", "/data/repo/" + oid, headers={"Range": "bytes=" + "9" * 5000 + "-"})
        self.assertEqual(response.status, 416)

    def test_range_parsing_is_linear(self):
        worst = "bytes=" + " \t" * 4000 + "1" + " " * 4000 + "-" + " " * 4000 + "x"
        started = time.process_time()
        self.assertIsNone(server.parse_range(worst, 10))
        self.assertLess(time.process_time() - started, 0.02)

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

    def test_path_info_when_the_server_gives_no_raw_target(self):
        environ = self.environ("PUT", "/data/caf%C3%A9", b"x")
        del environ["REQUEST_URI"]
        self.assertJSONError(self.call(environ), 400)   # é is no repository name
        environ = self.environ("PUT", "/data/my%2Drepo?q=1", b"mounted")
        environ.update(REQUEST_URI="/prefix" + environ["REQUEST_URI"], SCRIPT_NAME="/prefix")
        self.assertEqual(self.call(environ).status, 201)
        self.assertEqual(self.request("GET", "/data/my-repo/" + sha256(b"mounted")).body, b"mounted")

    def test_query_string_is_ignored(self):
        response = self.request("PUT", "/data/repo?x=1&y", b"query")
        self.assertEqual(response.status, 201)
        self.assertEqual(self.request("GET", "/data/repo/%s?z" % sha256(b"query")).body, b"query")

    def test_absolute_form_target(self):
        response = self.request("PUT", "http://example.com/data/repo", b"absolute")
        self.assertEqual(response.status, 201)
        self.assertJSONError(self.request("GET", "ftp://example.com/data/repo"), 400)

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

    def test_unexpected_exception_is_json_500(self):
        class BrokenApplication(server.DataStorageServer):
            def delete_object(self, request, repository, oid):
                raise RuntimeError("bug")

        self.app = BrokenApplication(self.make_store())
        environ = self.environ("DELETE", "/data/repo/%s" % sha256(b""))
        environ["wsgi.errors"] = errors = io.StringIO()
        response = self.call(environ)
        self.assertJSONError(response, 500)
        self.assertNotIn(b"bug", response.body)
        self.assertIn("RuntimeError: bug", errors.getvalue())
        self.assertEqual(self.request("PUT", "/data/repo", b"still serving").status, 201)

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

    def test_listing_one_at_a_time_across_shards(self):
        oids = sorted(self.put("repo", b"object %d" % n) for n in range(40))
        self.assertGreater(len({oid[:2] for oid in oids}), 20)   # many shard directories
        collected, after = [], None
        while True:
            page = self.request("GET", "/data/repo?limit=1" + ("&after=" + after if after else ""))
            objects, after = page.json()["objects"], page.json()["next"]
            self.assertEqual(len(objects), 1)
            collected.append(objects[0]["oid"])
            if after is None:
                break
            self.assertEqual(after, objects[0]["oid"])   # next is the page's last oid
        self.assertEqual(collected, oids)

    def test_listing_with_limit_equal_to_the_count_has_no_next(self):
        oids = sorted(self.put("repo", b"entry %d" % n) for n in range(5))
        page = self.request("GET", "/data/repo?limit=5").json()
        self.assertEqual(([entry["oid"] for entry in page["objects"]], page["next"]), (oids, None))
        page = self.request("GET", "/data/repo?limit=4").json()
        self.assertEqual((len(page["objects"]), page["next"]), (4, oids[3]))
        page = self.request("GET", "/data/repo?limit=4&after=" + oids[3]).json()
        self.assertEqual(([entry["oid"] for entry in page["objects"]], page["next"]),
                         (oids[4:], None))

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

    # Health, metrics, authentication -------------------------------------------------

    def test_health(self):
        response = self.request("GET", "/healthz")
        self.assertEqual((response.status, response.json()), (200, {"status": "ok"}))
        environ = self.environ("GET", "/healthz")
        environ[gateway.DRAINING_KEY] = True
        response = self.call(environ)
        self.assertEqual((response.status, response.json()), (503, {"status": "draining"}))

    def test_metrics(self):
        oid = self.put("repo", b"measured")
        self.put("repo", b"measured")
        self.request("GET", "/data/repo/" + oid)
        self.request("GET", "/data/repo/missing")
        with warnings.catch_warnings():   # wsgiref.validate warns of methods it does not know
            warnings.simplefilter("ignore", wsgiref.validate.WSGIWarning)
            self.request("BREW", "/data/repo")
        response = self.request("GET", "/metrics")
        self.assertEqual(response.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        samples = metric_samples(response.body.decode())
        self.assertEqual(samples['datastore_http_requests_total{method="PUT",status="201"}'], 2)
        self.assertEqual(samples['datastore_http_requests_total{method="GET",status="200"}'], 1)
        self.assertEqual(samples['datastore_http_requests_total{method="GET",status="404"}'], 1)
        self.assertEqual(samples['datastore_http_requests_total{method="other",status="405"}'], 1)
        self.assertEqual(samples["datastore_http_request_duration_seconds_count"], 5)
        self.assertEqual(samples['datastore_http_request_duration_seconds_bucket{le="+Inf"}'], 5)
        self.assertLessEqual(samples['datastore_http_request_duration_seconds_bucket{le="0.0005"}'], 5)
        self.assertGreater(samples["datastore_http_request_duration_seconds_sum"], 0)
        self.assertEqual(samples["datastore_http_in_flight_requests"], 1)   # this request
        self.assertEqual((samples["datastore_objects"], samples["datastore_bytes"]), (1, 8))
        self.assertEqual(samples["datastore_received_bytes_total"], 16)
        self.assertGreaterEqual(samples["datastore_sent_bytes_total"], 8)

    def test_bearer_token(self):
        self.restart(auth_token="s3cret")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret2"}, {"Authorization": "Bearer s3c"},
                        {"Authorization": "Bearer "}, {"Authorization": "Bearer"},
                        {"Authorization": "s3cret"}, {"Authorization": "Bearer  s3cre"},
                        {"Authorization": "Bearers3cret"}):
            response = self.request("PUT", "/data/repo", b"guarded", headers=headers)
            self.assertJSONError(response, 401)
            self.assertEqual(response.headers["WWW-Authenticate"], 'Bearer realm="data-storage"')
        self.assertEqual(self.request("GET", "/data/repo/" + sha256(b"guarded"),
                                      headers={"Authorization": "Bearer s3cret"}).status, 404)
        for scheme in ("bearer", "BEARER", "Bearer"):
            response = self.request("PUT", "/data/repo", b"guarded",
                                    headers={"Authorization": scheme + " s3cret"})
            self.assertEqual(response.status, 201, scheme)

    def test_tokens_no_client_could_send_are_refused(self):
        for token in ("", " s3cret", "s3 cret", "caf\u00e9", "line\nbreak"):
            with self.assertRaises(ValueError):
                server.DataStorageServer(self.make_store(), auth_token=token)

    def test_health_needs_no_token_but_the_rest_does(self):
        self.restart(auth_token="t0ken")
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        for path in ("/metrics", "/openapi.json", "/data/repo"):
            self.assertJSONError(self.request("GET", path), 401)
            self.assertEqual(self.request("GET", path, headers={"Authorization": "Bearer t0ken"}).status,
                             200)


class MemoryStoreApplicationTest(ApplicationContract, unittest.TestCase):
    def make_store(self, **options):
        return storage.MemoryStore(**options)

    def test_engine_settings_are_refused_beside_a_store_and_for_the_in_memory_store(self):
        for setting in ({"s3_endpoint": "http://127.0.0.1:1"}, {"spool_dir": "/tmp"},
                        {"s3_timeout": 5.0}):
            with self.subTest(setting=setting):
                with self.assertRaises(ValueError):
                    server.DataStorageServer(self.make_store(), **setting)
                with self.assertRaisesRegex(ValueError, "for an S3 store"):
                    server.DataStorageServer(**setting)
                with self.assertRaisesRegex(ValueError, "for an S3 store"):
                    server.DataStorageServer("memory", **setting)

    def test_no_arguments_means_a_fresh_in_memory_store(self):
        first, second = server.DataStorageServer(), server.DataStorageServer()
        self.assertIsInstance(first.store, storage.MemoryStore)
        self.app = first
        self.put("repo", b"only in the first")
        self.app = second
        self.assertNotStored("repo", b"only in the first")


class DiskStoreApplicationTest(ApplicationContract, unittest.TestCase):
    def make_store(self, **options):
        return open_disk_store(self, temporary_directory(self), **options)

    def test_data_dir_opens_the_disk_store(self):
        root = temporary_directory(self)
        self.app = server.DataStorageServer(data_dir=root, max_total_size=100)
        self.addCleanup(self.app.close)
        oid = self.put("repo", b"on disk")
        self.assertTrue(os.path.isfile(os.path.join(root, "repo", oid[:2], oid)))
        self.assertJSONError(self.request("PUT", "/data/repo", b"x" * 101), 507)
        with self.assertRaises(ValueError):
            server.DataStorageServer(self.make_store(), data_dir=root)

    def test_delete_during_download_does_not_break_it(self):
        data = os.urandom(4 * server.BODY_BLOCK_BYTES)
        oid = self.put("repo", data)
        result = self.app(self.environ("GET", "/data/repo/" + oid),
                          lambda status, headers, exc_info=None: None)
        try:
            blocks = iter(result)
            first = next(blocks)
            self.assertEqual(self.request("DELETE", "/data/repo/" + oid).status, 200)
            self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)
            self.assertEqual(first + b"".join(blocks), data)
        finally:
            result.close()

    def test_entries_the_store_did_not_write_are_404_until_put_replaces_them(self):
        outside = os.path.join(temporary_directory(self), "outside")
        with open(outside, "wb") as file:
            file.write(b"outside the data directory")
        makers = {b"where a directory was": os.mkdir,
                  b"outside the data directory": lambda path: os.symlink(outside, path)}
        for data, make in makers.items():
            with self.subTest(data=data):
                oid = sha256(data)
                path = storage.object_path(self.app.store.root, "repo", oid)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                make(path)
                for method in ("GET", "HEAD", "DELETE"):
                    self.assertEqual(self.request(method, "/data/repo/" + oid).status, 404, method)
                self.assertEqual(self.request("GET", "/data/repo").json()["objects"], [])
                self.assertEqual(self.request("PUT", "/data/repo/" + oid, data).status, 201)
                self.assertEqual(self.request("GET", "/data/repo/" + oid).body, data)
                self.assertEqual(self.request("DELETE", "/data/repo/" + oid).status, 200)

    def test_a_read_only_filesystem_is_503_and_unhealthy_until_writable_again(self):
        with small_filesystem(self) as mount_point:
            self.restart(store=open_disk_store(self, mount_point))
            oid = self.put("repo", b"stored before")
            remount(self, mount_point, "ro")
            for method, path, body in (("PUT", "/data/repo", b"new"),
                                       ("PUT", "/data/other", b"new"),
                                       ("DELETE", "/data/repo/" + oid, None)):
                environ = self.environ(method, path, body)
                environ["wsgi.errors"] = errors = io.StringIO()
                response = self.call(environ)
                self.assertJSONError(response, 503)
                self.assertIn("cannot be written now", response.json()["error"])
                self.assertIn("store error in %s" % method, errors.getvalue())   # for the operator
            self.assertEqual(self.request("GET", "/data/repo/" + oid).body, b"stored before")
            health = self.request("GET", "/healthz")
            self.assertEqual((health.status, health.json()), (503, {"status": "not writable"}))
            remount(self, mount_point, "rw")
            self.assertEqual(self.request("GET", "/healthz").status, 200)
            self.assertEqual(self.request("PUT", "/data/repo", b"new").status, 201)

    def object_path(self, oid):
        return os.path.join(self.app.store.root, "repo", oid[:2], oid)

    def damage(self, oid, how, at=None):
        """Change a stored object's file behind the store's back: flip the bits
        of one byte (at ``at``, else in the middle), or cut the last byte off."""
        with open(self.object_path(oid), "r+b") as file:
            size = file.seek(0, os.SEEK_END)
            if how == "overwrite":
                file.seek(size // 2 if at is None else at)
                byte = file.read(1)[0]
                file.seek(-1, os.SEEK_CUR)
                file.write(bytes([byte ^ 0xFF]))
            else:
                file.truncate(size - 1)

    def put_object(self, data, recorded):
        """Store ``data``; without its block checksums unless ``recorded`` (as
        by an older version, or copied by a tool that drops extended attributes;
        a small object gets them only from an older version)."""
        oid = self.put("repo", data)
        small = len(data) < storage.CHECKSUMS_FROM_BYTES   # stored without them
        if recorded and small:   # as versions before 2026-11-27 stored small objects
            recorder = checksums.Recorder(len(data))
            recorder.update(data)
            os.setxattr(self.object_path(oid), checksums.ATTRIBUTE, recorder.finish().to_bytes())
        elif not recorded and not small:
            os.removexattr(self.object_path(oid), checksums.ATTRIBUTE)
        return oid

    def read_cut_short(self, environ, logged="failed its integrity check"):
        """The bytes a body that failed its check delivered before it was cut
        short; the service log must say ``logged``."""
        environ["wsgi.errors"] = errors = io.StringIO()
        result = self.app(environ, lambda status, headers, exc_info=None: None)
        received = bytearray()
        with self.assertRaises(OSError):
            for block in result:
                received += block
        result.close()
        self.assertIn(logged, errors.getvalue())
        return bytes(received)

    def test_a_damaged_small_object_is_never_served(self):
        for recorded, how in itertools.product((True, False), ("overwrite", "truncate")):
            with self.subTest(recorded=recorded, how=how):
                oid = self.put_object(b"small and damaged %s %s" % (how.encode(), b"%d" % recorded),
                                      recorded)
                self.damage(oid, how)
                environ = self.environ("GET", "/data/repo/" + oid)
                environ["wsgi.errors"] = errors = io.StringIO()
                response = self.call(environ)
                self.assertJSONError(response, 500)
                self.assertIn("failed its integrity check", response.json()["error"])
                self.assertIn("moved to", errors.getvalue())
                self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)
                self.assertEqual(self.request("GET", "/data/repo/" + oid,
                                              headers={"Range": "bytes=0-1"}).status, 404)
        # Out of the account too; by its size now, so the truncated ones leave a byte each.
        self.assertEqual(self.app.store.usage(), (0, 2))

    def test_a_small_object_read_once_is_served_from_memory_and_its_damage_found_elsewhere(self):
        data = b"read once, then damaged at rest"
        oid = self.put("repo", data)
        self.assertEqual(self.request("GET", "/data/repo/" + oid).body, data)   # checked: kept
        self.damage(oid, "overwrite")
        response = self.request("GET", "/data/repo/" + oid, headers={"Range": "bytes=1-4"})
        self.assertEqual((response.status, response.body), (206, data[1:5]))   # from memory
        self.assertEqual(self.request("HEAD", "/data/repo/" + oid).status, 200)
        other_worker = server.DataStorageServer(open_disk_store(self, self.app.store.root))
        self.addCleanup(other_worker.close)
        environ = self.environ("GET", "/data/repo/" + oid)
        environ["wsgi.errors"] = io.StringIO()
        mine, self.app = self.app, other_worker
        try:
            self.assertJSONError(self.call(environ), 500)   # it reads the file
        finally:
            self.app = mine
        self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)   # gone for all

    def test_a_damaged_large_object_never_arrives_whole(self):
        for recorded, how in itertools.product((True, False), ("overwrite", "truncate")):
            with self.subTest(recorded=recorded, how=how):
                data = os.urandom(3 * server.BODY_BLOCK_BYTES + 10) + how.encode()
                oid = self.put_object(data, recorded)
                self.damage(oid, how)
                environ = self.environ("GET", "/data/repo/" + oid)
                if recorded and how == "truncate":   # found by its size before a byte goes out
                    self.assertJSONError(self.call(environ), 500)
                else:   # with its checksums, nothing of its one block; without, never the last
                    received = self.read_cut_short(environ)
                    self.assertLessEqual(len(received),
                                         0 if recorded else len(data) - server.BODY_BLOCK_BYTES)
                self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)

    def test_each_block_is_checked_before_it_goes_out(self):
        mib = checksums.MIN_BLOCK_BYTES
        data = os.urandom(3 * mib + 10)
        oid = self.put("repo", data)
        self.damage(oid, "overwrite", at=2 * mib + 5)
        whole = self.environ("GET", "/data/repo/" + oid)
        self.assertEqual(self.read_cut_short(whole), data[:2 * mib])   # the two good blocks
        self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)

    def test_a_range_is_checked_by_the_blocks_it_touches(self):
        mib = checksums.MIN_BLOCK_BYTES
        data = os.urandom(3 * mib + 10)
        oid = self.put("repo", data)
        self.damage(oid, "overwrite", at=2 * mib + 5)
        response = self.request("GET", "/data/repo/" + oid, headers={"Range": "bytes=100-2097151"})
        self.assertEqual((response.status, response.body), (206, data[100:2 * mib]))
        touching = self.environ("GET", "/data/repo/" + oid,
                                headers={"Range": "bytes=%d-%d" % (mib + 7, 3 * mib)})
        self.assertEqual(self.read_cut_short(touching), data[mib + 7:2 * mib])
        self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)

    def test_a_small_range_is_checked_too(self):
        data = os.urandom(3 * checksums.MIN_BLOCK_BYTES)
        oid = self.put("repo", data)
        self.damage(oid, "overwrite", at=100)
        small = self.environ("GET", "/data/repo/" + oid, headers={"Range": "bytes=0-1000"})
        self.assertEqual(self.read_cut_short(small), b"")
        self.assertEqual(self.request("GET", "/data/repo/" + oid).status, 404)

    def test_wrong_checksums_cut_a_response_but_keep_the_object(self):
        data = os.urandom(3 * checksums.MIN_BLOCK_BYTES)
        oid = self.put("repo", data)
        path = self.object_path(oid)
        wrong = checksums.BlockChecksums.from_bytes(os.getxattr(path, checksums.ATTRIBUTE))
        wrong.crcs[1] ^= 1
        os.setxattr(path, checksums.ATTRIBUTE, wrong.to_bytes())
        received = self.read_cut_short(self.environ("GET", "/data/repo/" + oid),
                                       logged="recorded anew")
        self.assertEqual(received, data[:checksums.MIN_BLOCK_BYTES])
        self.assertEqual(self.request("GET", "/data/repo/" + oid).body, data)   # mended
        wrong.size -= 1   # now of another size: found before anything is sent
        os.setxattr(path, checksums.ATTRIBUTE, wrong.to_bytes())
        self.assertEqual(self.request("GET", "/data/repo/" + oid).body, data)

    def test_damaged_checksums_fall_back_to_the_oid(self):
        data = os.urandom(3 * checksums.MIN_BLOCK_BYTES)
        oid = self.put("repo", data)
        path = self.object_path(oid)
        os.setxattr(path, checksums.ATTRIBUTE, os.getxattr(path, checksums.ATTRIBUTE)[:-1])
        self.assertEqual(self.request("GET", "/data/repo/" + oid).body, data)
        self.damage(oid, "overwrite")
        received = self.read_cut_short(self.environ("GET", "/data/repo/" + oid))
        self.assertLess(len(received), len(data))

    def test_full_disk_is_507_and_keeps_serving(self):
        with small_filesystem(self) as mount_point:
            self.restart(store=open_disk_store(self, mount_point))
            oid = self.put("repo", b"stored before")
            self.assertJSONError(self.request("PUT", "/data/repo", os.urandom(2 * 1024 * 1024)), 507)
            self.assertEqual(self.request("GET", "/data/repo/" + oid).body, b"stored before")
            self.assertEqual(self.request("PUT", "/data/repo", b"fits").status, 201)


class DurabilityOrderTest(WSGIClientMixin, unittest.TestCase):
    """A 201 or a DELETE's 200 leaves only once the change is durable: the
    object's data synced before its rename into place, its directory synced
    after it, both before the response; a removal's directory synced before
    the 200. The disk store's sync calls are recorded (and still made): here
    an fsync per file and directory, as where there is no syncfs."""

    group_commit = False

    def setUp(self):
        self.root = temporary_directory(self)
        self.events = []
        self.final_path = None
        store = open_disk_store(self, self.root, sync_file=self.sync_file,
                                sync_directory=self.sync_directory,
                                sync_filesystem=self.sync_filesystem if self.group_commit else None)
        application = server.DataStorageServer(store)

        def recorded(environ, start_response):
            def start(status, headers, exc_info=None):
                self.events.append(("response", status[:3]))
                return start_response(status, headers, exc_info)
            return application(environ, start)

        self.app = recorded

    def sync_file(self, fd):
        self.events.append(("sync file", os.path.exists(self.final_path)))
        os.fsync(fd)

    def sync_directory(self, path):
        self.events.append(("sync directory", os.path.relpath(path, self.root),
                            os.path.exists(self.final_path)))
        storage._fsync_dir(path)

    def sync_filesystem(self, fd):
        uploading = sorted(os.path.getsize(os.path.join(directory, name)) for directory, _, names
                           in os.walk(os.path.join(self.root, "@tmp")) for name in names)
        self.events.append(("sync filesystem", os.path.exists(self.final_path), uploading))
        os.sync()

    def expect(self, data):
        oid = sha256(data)
        self.final_path = storage.object_path(self.root, "repo", oid)
        self.events.clear()
        return oid

    def test_put_is_durable_before_201(self):
        for number, (chunked, verified) in enumerate(((False, False), (True, False),
                                                      (False, True), (True, True))):
            with self.subTest(chunked=chunked, verified=verified):
                data = b"durable %d" % number * (number + 1) * 70000   # several blocks when large
                oid = self.expect(data)
                path = "/data/repo/" + oid if verified else "/data/repo"
                self.assertEqual(self.request("PUT", path, data, chunked=chunked).status, 201)
                if self.group_commit:   # all written, not yet renamed; then renamed
                    self.assertEqual([event for event in self.events if event[0] != "sync directory"],
                                     [("sync filesystem", False, [len(data)]),
                                      ("sync filesystem", True, []), ("response", "201")])
                    continue
                shard = os.path.join("repo", oid[:2])
                synced_file = self.events.index(("sync file", False))      # before the rename
                synced_shard = self.events.index(("sync directory", shard, True))   # after it
                self.assertLess(synced_file, synced_shard)
                self.assertEqual(self.events[-1], ("response", "201"))

    def test_new_directories_are_synced_into_their_parents(self):
        oid = self.expect(b"first object of a repository")
        self.assertEqual(self.request("PUT", "/data/repo", b"first object of a repository").status,
                         201)
        synced = [event[1] for event in self.events if event[0] == "sync directory"]
        self.assertEqual(synced, ["repo", "."] + ([] if self.group_commit else [
            os.path.join("repo", oid[:2])]))

    def test_delete_is_durable_before_200(self):
        oid = self.expect(b"to be removed")
        self.assertEqual(self.request("PUT", "/data/repo", b"to be removed").status, 201)
        self.events.clear()
        self.assertEqual(self.request("DELETE", "/data/repo/" + oid).status, 200)
        self.assertEqual(self.events, [("sync directory", os.path.join("repo", oid[:2]), False),
                                       ("response", "200")])


class GroupCommitDurabilityOrderTest(DurabilityOrderTest):
    """The same, with the uploads' syncs made by the store's GroupCommit (a
    sync of the whole filesystem: os.sync() here, syncfs in service)."""

    group_commit = True


def remount(test, mount_point, mode):
    result = subprocess.run(["mount", "-o", "remount," + mode, mount_point], capture_output=True)
    test.assertEqual(result.returncode, 0, result.stderr)


class SharedMetricsTest(WSGIClientMixin, unittest.TestCase):
    """``/metrics`` of an application counting into one slot of a board that
    another process (here, another slot's Metrics) counts into too."""

    def setUp(self):
        board = metrics.Board(slots=2)
        self.app = server.DataStorageServer(metrics=metrics.Metrics(board, 0))
        self.other_worker = metrics.Metrics(board, 1)

    def test_every_slots_requests_and_engine_calls_are_added_up(self):
        self.assertEqual(self.request("PUT", "/data/repo", b"counted").status, 201)
        self.other_worker.count("PUT", 201, 0.002, 5, 70)
        self.app.metrics.store_call("GetObject", False, 0.25)
        self.other_worker.store_call("GetObject", True, 0.5)
        self.other_worker.store_call("RestoreObject", True, 1.0)   # not one the S3 store makes
        samples = metric_samples(self.request("GET", "/metrics").body.decode())
        self.assertEqual(samples['datastore_http_requests_total{method="PUT",status="201"}'], 2)
        self.assertEqual(samples["datastore_received_bytes_total"], 7 + 5)
        self.assertEqual(samples['datastore_store_calls_total{operation="GetObject"}'], 2)
        self.assertEqual(samples['datastore_store_errors_total{operation="GetObject"}'], 1)
        self.assertEqual(samples['datastore_store_call_seconds_total{operation="GetObject"}'], 0.75)
        self.assertEqual(samples['datastore_store_calls_total{operation="other"}'], 1)
        self.assertNotIn('datastore_store_calls_total{operation="PutObject"}', samples)   # no calls

    def test_a_store_without_engine_calls_shows_none(self):
        self.assertNotIn("datastore_store_", self.request("GET", "/metrics").body.decode())


class OpenAPITest(WSGIClientMixin, unittest.TestCase):
    """The OpenAPI document against the application's routes."""

    def setUp(self):
        self.app = server.DataStorageServer()
        with open(os.path.join(HERE, "openapi.json")) as document:
            self.paths = json.load(document)["paths"]

    def test_openapi_document_is_served_as_stored(self):
        response = self.request("GET", "/openapi.json")
        self.assertEqual(response.headers["Content-Type"], "application/json")
        with open(os.path.join(HERE, "openapi.json"), "rb") as document:
            self.assertEqual(response.body, document.read())
        self.assertEqual(response.headers["Cache-Control"], "max-age=300")
        etag = response.headers["ETag"]
        self.assertEqual(etag, '"%s"' % sha256(response.body))
        again = self.request("GET", "/openapi.json", headers={"If-None-Match": etag})
        self.assertEqual((again.status, again.body, again.headers["ETag"]), (304, b"", etag))

    def test_openapi_routes_match_the_server(self):
        documented = {(path, method.upper()) for path, item in self.paths.items() for method in item
                      if method in ("get", "head", "put", "post", "delete", "patch", "options")}
        served = {(server.ROUTE_PATHS[route], method)
                  for route, methods in server.DataStorageServer.routes.items() for method in methods}
        self.assertEqual(documented, served)
        for path, route in server.FIXED_ROUTES.items():
            self.assertEqual(server.parse_target(path)[0], route)
        self.assertEqual(server.parse_target("/data/r")[0], "repository")
        self.assertEqual(server.parse_target("/data/r/o")[0], "object")

    def test_openapi_responses_are_concrete(self):
        bodyless = {("head", status) for status in ("200", "304", "400", "401", "404", "412", "414",
                                                    "417", "431", "500", "501", "503", "505")}
        bodyless |= {("get", "304")}
        for path, item in self.paths.items():
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


if __name__ == "__main__":
    unittest.main()
