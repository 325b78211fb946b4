"""The shipped implementations provide their plugin interfaces (using hoodyproxy.testing)."""

import os

from twisted.trial import unittest

from hoodyproxy.directory import SQLiteDirectory, open_database
from hoodyproxy.observe.audit import AuditLog
from hoodyproxy.testing import AuditSinkTestsMixin, ContainerDirectoryTestsMixin


class _Directory:
    def _directory(self) -> str:
        """A new directory under Trial's temporary directory (nothing left in /tmp)."""
        directory = self.mktemp()
        os.makedirs(directory)
        return directory


class SQLiteDirectoryInterfaceTests(_Directory, ContainerDirectoryTestsMixin, unittest.TestCase):
    def make_provider(self):
        path = os.path.join(self._directory(), "db.sqlite")
        conn = open_database(path)
        self.addCleanup(conn.close)
        return SQLiteDirectory(conn)


class AuditLogInterfaceTests(_Directory, AuditSinkTestsMixin, unittest.TestCase):
    def make_provider(self):
        log = AuditLog(os.path.join(self._directory(), "audit.log"))
        self.addCleanup(log.close)
        return log

    def test_one_json_line_per_record(self):
        """Each record is written as one JSON line with its fields, an ISO time, and escaping
        for client-supplied strings (a newline in a path cannot start a forged line)."""
        import json
        path = os.path.join(self._directory(), "audit.log")
        log = AuditLog(path)
        record = {"time": 0.5, "client": "203.0.113.5", "host": 'h"\\x', "route": None, "method": "GET",
                  "path": "/a\nb\u00e9", "status": 200, "bytes_in": 1, "bytes_out": 2, "duration_ms": 1.5,
                  "reason": "r", "decision": {"group": "office"}}
        log.record(dict(record))
        log.record({"time": 1.0, "status": 404, "route": {"project": "a" * 24, "container": "b" * 24,
                                                          "program": "http", "index": 80}})
        log.close()
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(json.loads(lines[0]), dict(record, time="1970-01-01T00:00:00.500Z"))
        self.assertEqual(json.loads(lines[1])["route"]["index"], 80)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
