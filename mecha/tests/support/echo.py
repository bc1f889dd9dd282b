"""Test function for Mecha's end-to-end tests.

GET /            -> "{K_REVISION} {pid}"
GET /sleep?ms=N  -> sleeps N ms, then answers like /
GET /stream?wait=PATH -> chunked: "first", then "last" once PATH exists
Upgrade: echo    -> 101, then echoes raw bytes until the client closes
"""
import http.server
import os
import signal
import sys
import time
import urllib.parse


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "echo":
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
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
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"6\r\nfirst\n\r\n")
            self.wfile.flush()
            deadline = time.time() + 20
            while not os.path.exists(query["wait"][0]) and time.time() < deadline:
                time.sleep(0.01)
            self.wfile.write(b"5\r\nlast\n\r\n0\r\n\r\n")
            self.wfile.flush()
            return
        if url.path == "/sleep":
            time.sleep(int(query.get("ms", ["0"])[0]) / 1000)
        body = f"{os.environ['K_REVISION']} {os.getpid()} {os.environ.get('COLOR', '')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Seen-Host", self.headers.get("Host", ""))
        self.send_header("X-Seen-Forwarded-For", self.headers.get("X-Forwarded-For", ""))
        self.send_header("X-Seen-Traceparent", self.headers.get("traceparent", ""))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"{self.command} {self.path}", flush=True)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Echo)
server.daemon_threads = True
print("echo up", flush=True)
server.serve_forever()
