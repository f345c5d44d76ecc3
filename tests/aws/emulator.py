#!/usr/bin/env python3
"""Local AWS for regcred's ECR tests: one process serving

* moto (ECR, STS, IAM, ...) on --port, wrapped to count requests, inject
  faults and record who called GetAuthorizationToken (/_emulator/*);
* an IMDSv2 stub on --imds-port (EC2 instance role credentials);
* an EKS Pod Identity agent stub on --pod-identity-port;
* on --port too, GET /registry/token: a token realm for a CNCF distribution registry with
  token auth that stands in for an ECR registry: Basic AWS:<password> where the password is
  one GetAuthorizationToken issued and that has not expired gets a registry token (ES256,
  never outliving that password) for pull and push on any repository; anything else 401.

Access key ids tell the credential sources apart: AKIAIMDS... (IMDS),
AKIAPODID... (Pod Identity), ASIA... (moto's STS AssumeRole*).
Writes the ports as JSON to STATE_DIR/ready once everything listens, and the public key of
the registry tokens as a JWKS to STATE_DIR/registry-jwks.json (the key itself is kept in
STATE_DIR/registry-key.pem, so a restart keeps it and the registry's trust).
"""

import argparse
import base64
import hashlib
import io
import json
import os
import re
import secrets
import string
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from urllib.parse import parse_qs

try:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from werkzeug.serving import WSGIRequestHandler, make_server
    from werkzeug.wrappers import Request, Response

    from moto.core.responses import ActionResult
    from moto.ecr.responses import ECRResponse
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
except ImportError as error:
    sys.exit(
        f"aws/emulator.py: {error} under {sys.executable}: the AWS emulator needs tests/aws/requirements.txt; "
        "scripts/setup.sh installs them into a virtual environment, which the tests use (REGCRED_PYTHON)"
    )

# Shared state, guarded by LOCK: werkzeug serves each request on its own thread.
LOCK = threading.Lock()
COUNTS = {}  # "service:Action" -> number of requests
CALLS = []  # one dict per AWS API request, see Wrapper
FAULTS = {}  # "service:Action" -> (error code, HTTP status)
LIFETIME = [43200]  # seconds an ECR token is valid; a list so it can be set at runtime
CLOCK_OFFSET = [0]  # seconds AWS's clock is ahead of this machine's (Date headers, expiries)
REQUEST = threading.local()  # the current request's CALLS entry, for the ECR patch
ISSUED = {}  # ECR password -> expiresAt (epoch seconds), for the registry token realm
REGISTRY_SERVICE = "regcred-testenv-ecr"
REGISTRY_ISSUER = "regcred-testenv-ecr-realm"
REGISTRY_TOKEN_SECONDS = 300

# Authorization: AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/ecr/aws4_request, ...
CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]*/[^/]*/([^/]+)/")
# X-Amz-Target prefixes of JSON-protocol services, for unsigned requests.
TARGET_SERVICES = {"AmazonEC2ContainerRegistry_V20150921": "ecr"}


def count(key):
    with LOCK:
        COUNTS[key] = COUNTS.get(key, 0) + 1


def key_id(prefix):
    """A made-up, 20-character access key id."""
    return prefix + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(20 - len(prefix)))


def aws_time():
    """AWS's clock: this machine's, CLOCK_OFFSET ahead."""
    return time.time() + CLOCK_OFFSET[0]


class AwsClockHandler(WSGIRequestHandler):
    """Sends AWS's clock (aws_time) as every answer's Date header, as AWS does."""

    def date_time_string(self, timestamp=None):
        return formatdate(aws_time(), usegmt=True)


def iso8601(seconds_from_now):
    t = datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def get_authorization_token(self):
    """Replaces moto's, which returns a constant password that expired in 2015:
    here every call mints a new password and expires LIFETIME seconds from now,
    like real ECR (12 h)."""
    registry_ids = self._get_param("registryIds") or [self.current_account]
    expires_at = aws_time() + LIFETIME[0]
    data = []
    for registry_id in registry_ids:
        password = f"{registry_id}-{secrets.token_urlsafe(24)}"
        with LOCK:
            ISSUED[password] = expires_at
        data.append(
            {
                "authorizationToken": base64.b64encode(f"AWS:{password}".encode()).decode(),
                "expiresAt": expires_at,
                "proxyEndpoint": f"https://{registry_id}.dkr.ecr.{self.region}.amazonaws.com",
            }
        )
    record = getattr(REQUEST, "record", None)
    if record is not None:
        record["expiresAt"] = expires_at
        record["authorizationData"] = data
    return ActionResult({"authorizationData": data})


ECRResponse.get_authorization_token = get_authorization_token


def identify(environ, body):
    """("service:Action", access key id or None) of an AWS API request."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:  # JSON protocol (ECR): X-Amz-Target: <prefix>.<Action>
        prefix, _, action = target.partition(".")
        service = TARGET_SERVICES.get(prefix, prefix)
    else:  # query protocol (STS, IAM): Action=... in the form body or query string
        form = parse_qs(body.decode("utf-8", "replace")) or parse_qs(environ.get("QUERY_STRING", ""))
        action = form.get("Action", ["?"])[0]
        service = "sts"  # if unsigned: only STS's AssumeRoleWith* go without a signature
    signed = CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    if signed:  # the signing scope names the service
        return f"{signed.group(2)}:{action}", signed.group(1)
    return f"{service}:{action}", None


def aws_error(environ, code, status):
    message = f"injected by the regcred test emulator: {code}"
    if environ.get("HTTP_X_AMZ_TARGET"):
        body = json.dumps({"__type": code, "message": message})
        return Response(body, status, content_type="application/x-amz-json-1.1")
    body = (
        "<ErrorResponse><Error><Type>Sender</Type>"
        f"<Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    )
    return Response(body, status, content_type="text/xml")


class Wrapper:
    """WSGI middleware in front of moto: control endpoints, counts, faults, calls."""

    def __init__(self, registry_key, registry_kid):
        self.moto = DomainDispatcherApplication(create_backend_app)
        self.registry_key = registry_key
        self.registry_kid = registry_kid

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/_emulator/"):
            return self.control(Request(environ))(environ, start_response)
        if environ.get("PATH_INFO", "") == "/registry/token":
            return self.registry_token(Request(environ))(environ, start_response)
        # Read the body once, and hand moto a fresh copy of it.
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        key, akid = identify(environ, body)
        count(key)
        record = {"action": key, "access_key_id": akid, "time": time.time(), "status": None, "error": None}
        with LOCK:
            fault = FAULTS.get(key)
            if fault:
                record["status"], record["error"] = fault[1], fault[0]
                CALLS.append(record)
        if fault:
            return aws_error(environ, *fault)(environ, start_response)

        def recording_start_response(status, headers, exc_info=None):
            record["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        REQUEST.record = record  # completed by the GetAuthorizationToken patch
        try:
            return self.moto(environ, recording_start_response)
        finally:
            REQUEST.record = None
            with LOCK:  # only now, so /_emulator/calls never sees a half-filled record
                CALLS.append(record)

    def registry_token(self, req):
        """The registry's token realm (Docker token protocol). Recorded in CALLS as
        registry:Token with the expiresAt of the ECR password presented (null if unknown)."""
        req.get_data()  # read the body even when refusing, so no client waits on it
        count("registry:Token")
        record = {"action": "registry:Token", "access_key_id": None, "time": time.time(), "status": None, "error": None}

        def answer(status, body, error=None, headers=None):
            record["status"], record["error"] = int(str(status).split()[0]), error
            with LOCK:
                CALLS.append(record)
            return Response(json.dumps(body), status, headers=headers, content_type="application/json")

        if req.method != "GET":  # containerd tries an OAuth POST first, then GET on a 404
            return answer(404, {"errors": [{"code": "UNSUPPORTED", "message": "GET only"}]}, "method")
        if req.args.get("service") != REGISTRY_SERVICE:
            return answer(400, {"errors": [{"code": "DENIED", "message": "unknown service"}]}, "service")
        auth = req.authorization
        expires_at = None
        if auth is not None and auth.type == "basic" and auth.username == "AWS":
            with LOCK:
                expires_at = ISSUED.get(auth.password or "")
        record["expiresAt"] = expires_at
        now = aws_time()
        if expires_at is None or expires_at <= now:
            error = "unknown token" if expires_at is None else "expired token"
            body = {"errors": [{"code": "UNAUTHORIZED", "message": f"authentication failed: {error}"}]}
            # The reason phrase as Go servers (and registries) send it, not werkzeug's "UNAUTHORIZED".
            return answer("401 Unauthorized", body, error, {"WWW-Authenticate": 'Basic realm="ECR"'})
        access = []
        for scope in req.args.getlist("scope"):
            kind, _, rest = scope.partition(":")
            repository, _, actions = rest.rpartition(":")
            if kind == "repository" and repository:
                granted = [a for a in actions.split(",") if a in ("pull", "push")]
                access.append({"type": "repository", "name": repository, "actions": granted})
        issued = int(now)
        claims = {
            "iss": REGISTRY_ISSUER,
            "sub": "AWS",
            "aud": REGISTRY_SERVICE,
            "iat": issued,
            "nbf": issued,
            # Never valid longer than the ECR password it was granted for.
            "exp": min(issued + REGISTRY_TOKEN_SECONDS, int(expires_at)),
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = jwt.encode(claims, self.registry_key, algorithm="ES256", headers={"kid": self.registry_kid})
        return answer(200, {"token": token, "access_token": token, "expires_in": claims["exp"] - issued})

    def control(self, req):
        arg = req.args.get
        with LOCK:
            if req.path == "/_emulator/counts":
                return Response(json.dumps(COUNTS), content_type="application/json")
            if req.path == "/_emulator/calls":
                return Response(json.dumps(CALLS), content_type="application/json")
            if req.method != "POST":
                return Response("not found\n", 404)
            if req.path == "/_emulator/reset":  # the records, not faults or lifetime
                COUNTS.clear()
                CALLS.clear()
            elif req.path == "/_emulator/token-lifetime":
                LIFETIME[0] = int(arg("seconds"))
            elif req.path == "/_emulator/clock-offset":
                CLOCK_OFFSET[0] = int(arg("seconds"))
            elif req.path == "/_emulator/fail":
                if arg("code"):
                    FAULTS[arg("action")] = (arg("code"), int(arg("status") or 400))
                else:
                    FAULTS.pop(arg("action"), None)
            else:
                return Response("not found\n", 404)
        return Response("ok\n")


class Imds:
    """IMDSv2: a PUT mints a session token (with the TTL header aws-config
    insists on), and every GET must present one."""

    def __init__(self, region):
        self.region = region
        self.tokens = {}  # token -> expiry (monotonic)
        self.role = "regcred-node-role"

    def __call__(self, environ, start_response):
        return self.handle(Request(environ))(environ, start_response)

    def handle(self, req):
        if req.path == "/latest/api/token":
            ttl = req.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if req.method != "PUT" or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return Response("", 400)
            count("imds:Token")
            token = secrets.token_urlsafe(32)
            with LOCK:
                self.tokens[token] = time.monotonic() + int(ttl)
            return Response(token, headers={"x-aws-ec2-metadata-token-ttl-seconds": ttl})
        with LOCK:
            expiry = self.tokens.get(req.headers.get("x-aws-ec2-metadata-token", ""))
        if expiry is None or expiry < time.monotonic():
            return Response("", 401)
        creds = "/latest/meta-data/iam/security-credentials/"
        if req.path == creds:
            count("imds:RoleName")
            return Response(self.role)
        if req.path == creds + self.role:
            count("imds:Credentials")
            body = {
                "Code": "Success",
                "LastUpdated": iso8601(0),
                "Type": "AWS-HMAC",
                "AccessKeyId": key_id("AKIAIMDS"),
                "SecretAccessKey": secrets.token_urlsafe(30),
                "Token": secrets.token_urlsafe(60),
                "Expiration": iso8601(3600),
            }
            return Response(json.dumps(body), content_type="application/json")
        if req.path == "/latest/meta-data/placement/region":
            count("imds:Region")
            return Response(self.region)
        return Response("", 404)


class PodIdentity:
    """The EKS Pod Identity agent: credentials for whoever presents the
    service account token in the Authorization header."""

    def __init__(self, token):
        self.token = token

    def __call__(self, environ, start_response):
        return self.handle(Request(environ))(environ, start_response)

    def handle(self, req):
        if req.path != "/v1/credentials":
            return Response("", 404)
        count("pod-identity:Credentials")
        if req.headers.get("Authorization") != self.token:
            body = {"code": "AccessDeniedException", "message": "invalid service account token"}
            return Response(json.dumps(body), 403, content_type="application/json")
        body = {
            "AccessKeyId": key_id("AKIAPODID"),
            "SecretAccessKey": secrets.token_urlsafe(30),
            "Token": secrets.token_urlsafe(60),
            "AccountId": "123456789012",
            "Expiration": iso8601(3600),
        }
        return Response(json.dumps(body), content_type="application/json")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--imds-port", type=int, required=True)
    p.add_argument("--pod-identity-port", type=int, required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--token-lifetime", type=int, default=43200, help="seconds (default: 12 h, as ECR)")
    p.add_argument("--pod-identity-token", default="regcred-test-pod-identity-token")
    p.add_argument("--region", default="us-east-1", help="what IMDS reports as the instance's region")
    args = p.parse_args()
    LIFETIME[0] = args.token_lifetime

    # The registry tokens' key survives a restart (same state dir), and so does the registry's trust.
    key_path = f"{args.state_dir}/registry-key.pem"
    if os.path.exists(key_path):
        with open(key_path, "rb") as f:
            registry_key = serialization.load_pem_private_key(f.read(), password=None)
    else:
        registry_key = ec.generate_private_key(ec.SECP256R1())
        with open(key_path, "wb") as f:
            f.write(
                registry_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
    public_der = registry_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    registry_kid = "aws-emulator-" + hashlib.sha256(public_der).hexdigest()[:16]
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(registry_key.public_key(), as_dict=True)
    jwk.update(kid=registry_kid, use="sig", alg="ES256")
    with open(f"{args.state_dir}/registry-jwks.json.tmp", "w") as f:
        json.dump({"keys": [jwk]}, f)
    os.replace(f"{args.state_dir}/registry-jwks.json.tmp", f"{args.state_dir}/registry-jwks.json")

    apps = [
        (args.port, Wrapper(registry_key, registry_kid)),
        (args.imds_port, Imds(args.region)),
        (args.pod_identity_port, PodIdentity(args.pod_identity_token)),
    ]
    # make_server binds (with SO_REUSEADDR, so a restart can take the same
    # ports back at once) before we announce readiness.
    servers = [
        make_server("127.0.0.1", port, app, threaded=True, request_handler=AwsClockHandler) for port, app in apps
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ready = {"port": args.port, "imds_port": args.imds_port, "pod_identity_port": args.pod_identity_port}
    with open(f"{args.state_dir}/ready.tmp", "w") as f:
        json.dump(ready, f)
    # Renamed into place, so a reader never sees a half-written file.
    os.replace(f"{args.state_dir}/ready.tmp", f"{args.state_dir}/ready")
    print(f"emulator ready: {ready}", flush=True)
    threading.Event().wait()  # until SIGTERM/SIGKILL


if __name__ == "__main__":
    main()
