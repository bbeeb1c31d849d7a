#!/usr/bin/env python3
"""The soak test's misbehaving API (benches/soak.sh).

    python3 benches/soak/upstream.py PORT MODE_FILE [SLOW_SECONDS]

Answers every GET/POST according to the word in MODE_FILE, read on each request:

    healthy  200 {"status":"compliant","score":90}
    slow     the same, after SLOW_SECONDS (default 3) -- beyond the rule's timeout
    503      503 {"error":"unavailable"}

"Refused" is not a mode: soak.sh stops this process, so connections are refused.
HTTP/1.1 keep-alive, one thread per connection; standard library only.
"""

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HEALTHY = b'{"status":"compliant","score":90}'
UNAVAILABLE = b'{"error":"unavailable"}'


def main() -> None:
    port = int(sys.argv[1])
    mode_file = sys.argv[2]
    slow_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without TCP_NODELAY the second
        # waits for the client's delayed ACK (~40 ms a request).
        disable_nagle_algorithm = True

        def log_message(self, format, *args):  # noqa: A002 - quiet
            pass

        def answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            try:
                with open(mode_file, encoding="ascii") as f:
                    mode = f.read().strip()
            except OSError:
                mode = "healthy"
            if mode == "slow":
                time.sleep(slow_seconds)
            status, body = (503, UNAVAILABLE) if mode == "503" else (200, HEALTHY)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = answer
        do_POST = answer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 1024

        def handle_error(self, request, client_address):
            # The caller gave up (timeout) and closed the connection: expected here.
            pass

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
