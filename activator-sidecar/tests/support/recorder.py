"""A keep-alive upstream that records every request it parses, for the hostile end-to-end tests.

Each request is appended as one JSON line to the file named by RECORD_LOG *before* it is
answered, so a client holding its response knows its request is in the log. The answer is
200 with the same JSON as its body: the request as this server parsed it, so a client can tell
whether the response it got is its own. Fields:

  seq      order of arrival (1, 2, ...)
  conn     which connection it came on (1, 2, ... in order of accept)
  line     the request line as received, e.g. "GET /ws HTTP/1.1"
  method, target
  headers  [[name, value], ...] in the order received; bytes above 0x7f are kept as the
           code points U+0080..U+00FF (latin-1), so a value compares byte for byte
  body     number of body bytes, framed by Content-Length or chunked (parsed strictly here,
           independently of the proxy)
  malformed  set when the body broke its framing (answered 400, connection closed)
  incomplete set when the connection ended inside the body (not answered): a streaming
           proxy whose client went away mid-body
  error    instead of the above, for bytes http.server could not parse as a request head:
           the status it answered and the raw first line

An upgrade request (Connection: upgrade) is answered 101 and then echoes bytes until closed.
Only the standard library: it runs wherever python3 does.
"""
import http.server
import json
import os
import signal
import sys
import threading

LOCK = threading.Lock()
COUNTERS = {"seq": 0, "conn": 0}
LOG = open(os.environ["RECORD_LOG"], "a", encoding="utf-8")
HEX = set(b"0123456789abcdefABCDEF")


class Malformed(Exception):
    pass


class Incomplete(Exception):
    pass


class Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with LOCK:
            COUNTERS["conn"] += 1
            self.conn = COUNTERS["conn"]

    def __getattr__(self, name):
        # Every method, including ones http.server has never heard of.
        if name.startswith("do_"):
            return self.record
        raise AttributeError(name)

    def read_line(self):
        line = self.rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise Incomplete("the connection ended in a chunk line")
        if not line.endswith(b"\r\n"):
            raise Malformed("a chunk line without CRLF")
        return line[:-2]

    def read_body(self):
        codings = [v for k, v in self.headers.items() if k.lower() == "transfer-encoding"]
        lengths = [v for k, v in self.headers.items() if k.lower() == "content-length"]
        if codings:
            if [c.strip().lower() for c in codings] != ["chunked"] or lengths:
                raise Malformed("framing this server will not guess at")
            total = 0
            while True:
                size = self.read_line().split(b";", 1)[0]
                if not size or len(size) > 16 or not set(size) <= HEX:
                    raise Malformed(f"chunk size {size!r}")
                size = int(size, 16)
                if size == 0:
                    while self.read_line():
                        pass
                    return total
                data = self.rfile.read(size)
                end = self.rfile.read(2)
                if len(data) != size or len(end) != 2:
                    raise Incomplete("the connection ended in a chunk")
                if end != b"\r\n":
                    raise Malformed("a chunk longer than its size")
                total += size
        if lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                raise Malformed(f"content-length {lengths!r}")
            size = int(lengths[0])
            if len(self.rfile.read(size)) != size:
                raise Incomplete("the connection ended in the body")
            return size
        return 0

    def record(self):
        with LOCK:
            COUNTERS["seq"] += 1
            seq = COUNTERS["seq"]
        entry = {
            "seq": seq,
            "conn": self.conn,
            "line": self.requestline,
            "method": self.command,
            "target": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": None,
        }
        try:
            entry["body"] = self.read_body()
        except Malformed as error:
            entry["malformed"] = str(error)
            self.close_connection = True
        except Incomplete as error:
            # A proxy streams a body it has not seen the end of; when its client goes away
            # mid-body it closes this connection too. Not a request: nothing is answered.
            entry["incomplete"] = str(error)
            self.close_connection = True
        text = json.dumps(entry)
        with LOCK:
            LOG.write(text + "\n")
            LOG.flush()
        if "incomplete" in entry:
            return
        upgrade = "upgrade" in self.headers.get("Connection", "").lower()
        if upgrade and "malformed" not in entry:
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", self.headers.get("Upgrade", ""))
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.rfile.read1(4096)
                if not data:
                    break
                self.wfile.write(data)
                self.wfile.flush()
            self.close_connection = True
            return
        body = text.encode()
        self.send_response(400 if "malformed" in entry else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Recorded", str(seq))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        # Whatever reached this server is on the record, even what it could not parse.
        with LOCK:
            COUNTERS["seq"] += 1
            entry = {
                "seq": COUNTERS["seq"],
                "conn": self.conn,
                "line": getattr(self, "raw_requestline", b"").decode("latin-1").rstrip("\r\n"),
                "error": code,
            }
            LOG.write(json.dumps(entry) + "\n")
            LOG.flush()
        super().send_error(code, message, explain)

    def log_message(self, fmt, *args):
        pass


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Recorder)
server.daemon_threads = True
print("recorder up", flush=True)
server.serve_forever()
