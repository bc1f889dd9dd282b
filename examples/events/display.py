"""An event display: prints every CloudEvent it receives (binary or structured mode).

Run by `mecha up` as a Knative Service; Mecha sets PORT. Answers 202 with no body, which tells
the broker the event was handled and that there is no reply event.
"""

import http.server
import json
import os
import sys
import threading

# Events arrive concurrently (one thread per connection); one locked write per event keeps
# each on a line of its own (print() writes its pieces separately).
printing = threading.Lock()


class Display(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Type", "").startswith("application/cloudevents+json"):
            event = json.loads(body)
        else:
            event = {k[3:]: v for k, v in self.headers.items() if k.lower().startswith("ce-")}
            event["data"] = body.decode("utf-8", "replace")
        with printing:
            sys.stdout.write(f"event: {json.dumps(event, sort_keys=True)}\n")
            sys.stdout.flush()
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Display).serve_forever()
