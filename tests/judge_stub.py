"""A local OpenAI-compatible judge for tests: it grades like the tiny world's rule (the candidate's
"The answer is N." equals the reference), so a run scored by the judge can be compared with one
scored by the rule. A question containing "judge-down" gets HTTP 500."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nemo_plugins.data import reasoning_world as rw

_FIELDS = re.compile(r"Question:\n(.*)\n\nReference answer:\n(.*)\n\nCandidate answer.*?<<<\n(.*)\n>>>", re.DOTALL)


class GradingJudge(BaseHTTPRequestHandler):
    """Replies CORRECT / INCORRECT by the tiny world's exact answer; records each (question, answer)."""

    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question, reference, answer = _FIELDS.search(payload["messages"][0]["content"]).groups()
        type(self).seen.append((question, answer))
        if "judge-down" in question:
            status, body = 500, b"{}"
        else:
            right = rw.extract_answer(answer) == int(reference)
            reply = {"choices": [{"message": {"role": "assistant", "content": "CORRECT" if right else "INCORRECT"}}]}
            status, body = 200, json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def start_judge() -> tuple[ThreadingHTTPServer, str]:
    """(server, base_url) of a GradingJudge on a free local port, served from a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), GradingJudge)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
