#!/usr/bin/env python3
"""An ECR registry for regcred's tests: an HTTPS front on 127.0.0.1:--port that authenticates
every request as ECR's registry API does and forwards those it lets in to a plain registry
(--upstream, a CNCF distribution registry without auth of its own, only reachable through
this front in the tests).

As ECR: a request is answered `401 Unauthorized` with
`WWW-Authenticate: Basic realm="https://<host>/",service="ecr.amazonaws.com"` and the body
`Not Authorized` unless it carries Basic AWS:<password> with a password the AWS emulator
(--emulator, tests/aws/emulator.py) issued through GetAuthorizationToken; an expired password
is denied (403, DENIED "Your authorization token has expired. ..."), and a principal of an
account the registry does not let in (its own, and --trust: a repository policy naming
another account) is denied its repositories (403 DENIED). The emulator decides and records
each request (POST /_emulator/registry-login, which knows the passwords it issued); this
front only asks and forwards, with the headers, body and status of both sides as they are.

Serves TLS with --cert/--key (a certificate for the registry host, 127.0.0.1 and localhost
from a test CA) and writes --ready once it listens.
"""

import argparse
import http.client
import json
import os
import re
import sys
import threading
from urllib.parse import urlsplit

try:
    from werkzeug.serving import make_server
except ImportError as error:
    sys.exit(
        f"aws/ecr_registry.py: {error} under {sys.executable}: it needs tests/aws/requirements.txt; "
        "scripts/setup.sh installs them into a virtual environment, which the tests use (REGCRED_PYTHON)"
    )

ECR_HOST = re.compile(r"^(\d{12})\.dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")
# Hop-by-hop headers (RFC 9110 7.6.1) are the connection's, not forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
CHUNK = 64 * 1024


class Front:
    def __init__(self, host, upstream, emulator, trusted):
        match = ECR_HOST.match(host)
        if not match:
            raise SystemExit(f"ecr_registry.py: {host!r} is not an ECR registry host")
        self.host, self.account, self.region = host, match.group(1), match.group(2)
        self.upstream = urlsplit(upstream)
        self.emulator = urlsplit(emulator)
        self.trusted = trusted

    def login(self, environ):
        """The emulator's decision for this request: (status, message)."""
        path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
        body = json.dumps(
            {
                "authorization": environ.get("HTTP_AUTHORIZATION"),
                "method": environ.get("REQUEST_METHOD"),
                "path": path.split("?")[0],
                "registry": self.account,
                "region": self.region,
                "trusted": self.trusted,
            }
        )
        conn = http.client.HTTPConnection(self.emulator.hostname, self.emulator.port, timeout=10)
        try:
            conn.request("POST", "/_emulator/registry-login", body, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            decision = json.loads(answer.read())
            if answer.status != 200:
                raise RuntimeError(f"the emulator answered {answer.status}: {decision}")
        finally:
            conn.close()
        return decision["status"], decision["message"]

    def __call__(self, environ, start_response):
        # Read the body whole (werkzeug has taken a chunked one apart), before any answer.
        if environ.get("wsgi.input_terminated"):
            body = environ["wsgi.input"].read()
        else:
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        status, message = self.login(environ)
        if status == 401:
            challenge = f'Basic realm="https://{self.host}/",service="ecr.amazonaws.com"'
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Docker-Distribution-Api-Version", "registry/2.0"),
                    ("WWW-Authenticate", challenge),
                    ("Content-Length", str(len(message) + 1)),
                ],
            )
            return [f"{message}\n".encode()]
        if status != 200:
            answer = json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()
            start_response(
                "403 Forbidden",
                [
                    ("Content-Type", "application/json; charset=utf-8"),
                    ("Docker-Distribution-Api-Version", "registry/2.0"),
                    ("Content-Length", str(len(answer))),
                ],
            )
            return [answer]
        return self.forward(environ, body, start_response)

    def forward(self, environ, body, start_response):
        target = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
        if "?" not in target and environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
        headers = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-").lower()
                # The upstream has no auth: the login stays here.
                if name not in HOP_BY_HOP and name not in ("authorization", "content-length"):
                    headers[name] = value
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        headers["content-length"] = str(len(body))
        headers["x-forwarded-proto"] = "https"
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        conn.request(environ["REQUEST_METHOD"], target, body, headers)
        answer = conn.getresponse()
        out = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP]
        start_response(f"{answer.status} {answer.reason}", out)

        def stream():
            try:
                while chunk := answer.read(CHUNK):
                    yield chunk
            finally:
                conn.close()

        return stream()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True, help="the ECR registry host, <account>.dkr.ecr.<region>.amazonaws.com")
    p.add_argument("--upstream", required=True, help="the plain registry, http://127.0.0.1:PORT")
    p.add_argument("--emulator", required=True, help="the AWS emulator, http://127.0.0.1:PORT")
    p.add_argument("--trust", action="append", default=[], help="another account whose principals may pull and push")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ready", required=True)
    args = p.parse_args()
    front = Front(args.host, args.upstream, args.emulator, args.trust)
    server = make_server("127.0.0.1", args.port, front, threaded=True, ssl_context=(args.cert, args.key))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with open(f"{args.ready}.tmp", "w") as f:
        json.dump({"port": args.port}, f)
    os.replace(f"{args.ready}.tmp", args.ready)
    print(f"ECR registry {args.host} ready on {args.port}", flush=True)
    threading.Event().wait()  # until SIGTERM/SIGKILL


if __name__ == "__main__":
    main()
