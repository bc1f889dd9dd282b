"""A hello function: answers every request with a greeting, on the port Mecha gives it.

Standard library only. Mecha sets PORT, K_SERVICE, K_REVISION and K_CONFIGURATION, as Knative
does; TARGET comes from the Service's env.
"""
import http.server
import os
import signal
import sys

TARGET = os.environ.get("TARGET", "World")
REVISION = os.environ.get("K_REVISION", "unknown")


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffer the response so headers and body leave in one write: with Nagle's algorithm on,
    # a second small write waits for the peer's delayed ACK (40 ms on Linux).
    wbufsize = -1

    def do_GET(self):
        body = f"Hello {TARGET}! (revision {REVISION}, pid {os.getpid()})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, fmt, *args):
        # One line per request on stdout; Mecha prefixes it with [service/replica].
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


def main():
    port = int(os.environ.get("PORT", "8080"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Hello)
    server.daemon_threads = True
    # SIGTERM: stop accepting, finish the request in progress, exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hello listening on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
