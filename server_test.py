"""The exercise's own test: exactly its calls, through WebTest, unmodified in spirit.

``webtest.TestApp(server.DataStorageServer())`` drives the application as the
exercise's test file does (its ``setUp`` builds the application with no
arguments, so each test starts with an empty in-memory store). WebTest checks
every exchange with its WSGI lint. Skipped, with the reason, where WebTest is
not installed; ``.ci/run`` installs it, so CI always runs it.
"""

import json
import unittest

import server

try:
    import webtest
except ImportError:
    webtest = None


@unittest.skipIf(webtest is None, "WebTest is not installed (pip install webtest); "
                                  ".ci/run installs it in a throwaway virtual environment")
class TestDataStorageServer(unittest.TestCase):
    def setUp(self):
        app = server.DataStorageServer()
        self.testapp = webtest.TestApp(app)

    def test_put_get(self):
        response = self.testapp.put("/data/my-repo", "something")
        self.assertEqual(response.status_int, 201)
        first = json.loads(response.body)
        self.assertEqual(first["size"], 9)
        self.assertIsInstance(first["oid"], str)
        self.assertTrue(first["oid"])

        response = self.testapp.put("/data/my-repo", "other")
        self.assertEqual(response.status_int, 201)
        second = json.loads(response.body)
        self.assertEqual(second["size"], 5)
        self.assertNotEqual(first["oid"], second["oid"])

        response = self.testapp.get("/data/my-repo/" + first["oid"])
        self.assertEqual(response.status_int, 200)
        self.assertEqual(response.body, b"something")

        response = self.testapp.get("/data/my-repo/" + second["oid"])
        self.assertEqual(response.status_int, 200)
        self.assertEqual(response.body, b"other")

        response = self.testapp.get("/data/my-repo/missing", expect_errors=True)
        self.assertEqual(response.status_int, 404)

    def test_delete(self):
        response = self.testapp.put("/data/my-repo", "something")
        self.assertEqual(response.status_int, 201)
        oid = json.loads(response.body)["oid"]
        response = self.testapp.put("/data/other-repo", "something")
        self.assertEqual(response.status_int, 201)

        response = self.testapp.delete("/data/my-repo/" + oid)
        self.assertEqual(response.status_int, 200)

        response = self.testapp.get("/data/my-repo/" + oid, expect_errors=True)
        self.assertEqual(response.status_int, 404)

        response = self.testapp.get("/data/other-repo/" + oid)
        self.assertEqual(response.status_int, 200)
        self.assertEqual(response.body, b"something")

        response = self.testapp.delete("/data/my-repo/missing", expect_errors=True)
        self.assertEqual(response.status_int, 404)


if __name__ == "__main__":
    unittest.main()
