#!/usr/bin/env python3
"""Local Google for regcred's Artifact Registry tests. Google ships no emulator
for these APIs, so this is a strict stand-in: it checks what the real services
check and answers with their error shapes. One process serving, on --port:

* POST /token          OAuth 2.0 token endpoint (a key's token_uri): the RFC 7523
                       JWT bearer grant, signed with a registered service-account key;
* POST /v1/token       Security Token Service: RFC 8693 token exchange of a
                       Kubernetes ServiceAccount token, verified against the JWKS of a
                       Workload Identity Federation provider, for a federated token;
* POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken
                       IAM Credentials: impersonation, allowed by IAM bindings;
* GET  /v2/token       Artifact Registry's token realm: Basic oauth2accesstoken:<access
                       or federated token> (or _json_key:<key>) for a registry token that the CNCF
                       distribution registry's token auth accepts;
* /_emulator/*         configuration, faults, and a record of calls;

and on --metadata-port the GCE/GKE metadata server (instance service account token).

Configuration (service accounts, providers, bindings, grants) comes from --config
(a JSON file with those lists) and/or the control endpoints. Writes the ports as JSON
to STATE_DIR/ready once everything listens, and the public key of its registry tokens
as a JWKS to STATE_DIR/registry-jwks.json.
"""

import argparse
import json
import os
import re
import secrets
import sys
import threading
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: oidc.py

try:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    import oidc
except ImportError as error:
    sys.exit(
        f"gcp/emulator.py: {error} under {sys.executable}: the Google emulator needs tests/gcp/requirements.txt; "
        "scripts/setup.sh installs them into a virtual environment, which the tests use (REGCRED_PYTHON)"
    )

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
WORKLOAD_IDENTITY_USER = "roles/iam.workloadIdentityUser"
TOKEN_CREATOR = "roles/iam.serviceAccountTokenCreator"
# Google refuses key JWTs valid for longer than an hour, and tolerates some clock skew.
MAX_ASSERTION_LIFETIME = 3600
SKEW = 30
MAX_SUBJECT_BYTES = 127  # google.subject's limit
PROVIDER_NAME = re.compile(
    r"^projects/(\d+)/locations/global/workloadIdentityPools/([a-z0-9-]+)/providers/([a-z0-9-]+)$"
)
GENERATE_ACCESS_TOKEN = re.compile(r"^/v1/projects/-/serviceAccounts/([^/:]+):generateAccessToken$")
REGISTRY_TOKEN_SECONDS = 300


class Refused(Exception):
    """An error answer: HTTP status and the JSON body Google would send."""

    def __init__(self, status, body):
        super().__init__(body)
        self.status = status
        self.body = body


def oauth_error(error, description, status=400):
    return Refused(status, {"error": error, "error_description": description})


def api_error(status, code, message):
    return Refused(status, {"error": {"code": status, "message": message, "status": code}})


def rfc3339(epoch):
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class State:
    """Everything the emulator knows, guarded by one lock: werkzeug serves each
    request on its own thread."""

    def __init__(self, token_uri, registry_service, registry_issuer, metadata_email, lifetime):
        self.lock = threading.Lock()
        self.token_uri = token_uri
        self.registry_service = registry_service
        self.registry_issuer = registry_issuer
        self.metadata_email = metadata_email
        self.lifetime = lifetime  # seconds an access or federated token lives
        self.keys = {}  # client_email -> {private_key_id: public key}
        self.projects = {}  # client_email -> project_id
        self.providers = {}  # provider resource name -> dict, see add_provider
        self.bindings = []  # (service account email, role, member)
        self.grants = {}  # identity -> [(repository prefix, [actions])]
        self.tokens = {}  # access or federated token -> dict, see issue
        self.faults = {}  # endpoint -> HTTP status
        self.calls = []
        self.counts = {}
        self.registry_key = ec.generate_private_key(ec.SECP256R1())
        self.registry_kid = "gcp-emulator-" + secrets.token_hex(8)

    # Configuration, from --config or the control endpoints.

    def add_service_account(self, cfg):
        email = cfg["email"]
        project_id = cfg.get("project_id") or email.split("@")[1].split(".")[0]
        if "public_key_pem" in cfg:
            key_id, private_pem = cfg["key_id"], None
            public = serialization.load_pem_public_key(cfg["public_key_pem"].encode())
        else:  # Google generates the key and hands out its private half once, as keys.create does.
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            key_id, public = secrets.token_hex(20), private.public_key()
            private_pem = private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode()
        self.keys.setdefault(email, {})[key_id] = public
        self.projects[email] = project_id
        if private_pem is None:
            return {"email": email, "key_id": key_id}
        return {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": key_id,
            "private_key": private_pem,
            "client_email": email,
            "client_id": str(int(key_id[:15], 16)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
        }

    def delete_key(self, cfg):
        self.keys.get(cfg["email"], {}).pop(cfg["key_id"], None)

    def add_provider(self, cfg):
        name = cfg["name"]
        if not PROVIDER_NAME.match(name):
            raise ValueError(f"not a provider resource name: {name}")
        self.providers[name] = {
            "issuer": cfg["issuer"],
            # Inline keys, as gcloud's --jwk-json-path gives them for an issuer Google cannot reach.
            "jwks": jwt.PyJWKSet.from_dict(cfg["jwks"]),
            # Empty: the provider's own name, with or without https:, as Google does.
            "audiences": cfg.get("allowed_audiences")
            or ["//iam.googleapis.com/" + name, "https://iam.googleapis.com/" + name],
            "condition": cfg.get("condition") or {},
        }

    def add_binding(self, cfg):
        self.bindings.append((cfg["service_account"], cfg["role"], cfg["member"]))

    def add_grant(self, cfg):
        self.grants.setdefault(cfg["identity"], []).append((cfg["repository_prefix"], list(cfg["actions"])))

    # Tokens.

    def issue(self, kind, identity, scopes, lifetime):
        prefix = {"access": "ya29.c.", "federated": "ya29.d."}[kind]
        token = prefix + secrets.token_urlsafe(48)
        expires = time.time() + lifetime
        self.tokens[token] = {
            "kind": kind, "identity": identity, "scopes": scopes, "expires": expires, "revoked": False
        }
        return token, expires

    def live_token(self, token):
        """The record of a token this emulator issued that is neither revoked nor expired, else None."""
        t = self.tokens.get(token)
        if t is None or t["revoked"] or t["expires"] <= time.time():
            return None
        return t

    def may_impersonate(self, caller, target):
        """Whether the caller (a token record) may mint tokens for the service account
        `target`: a federated principal needs roles/iam.workloadIdentityUser on it, a
        service account roles/iam.serviceAccountTokenCreator."""
        if caller["kind"] == "federated":
            role = WORKLOAD_IDENTITY_USER
            subject = caller["identity"]
            pool_prefix = subject.split("/subject/")[0]
            members = {subject, pool_prefix.replace("principal://", "principalSet://", 1) + "/*"}
        else:
            role = TOKEN_CREATOR
            members = {"serviceAccount:" + caller["identity"]}
        return any(sa == target and r == role and m in members for sa, r, m in self.bindings)

    def allowed_actions(self, identity, repository):
        grants = self.grants.get(identity)
        if grants is None:  # by default a service account may pull its own project's repositories
            project = self.projects.get(identity)
            grants = [(project + "/", ["pull"])] if project else []
        actions = set()
        for prefix, acts in grants:
            if repository == prefix or repository.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                actions.update(acts)
        return actions


class Emulator:
    def __init__(self, state):
        self.s = state

    def __call__(self, environ, start_response):
        return self.handle(Request(environ))(environ, start_response)

    def route(self, req):
        if req.path == "/token" and req.method == "POST":
            return "oauth:token", self.oauth_token
        if req.path == "/v1/token" and req.method == "POST":
            return "sts:token", self.sts_token
        if GENERATE_ACCESS_TOKEN.match(req.path) and req.method == "POST":
            return "iamcredentials:generateAccessToken", self.generate_access_token
        if req.path == "/v2/token" and req.method == "GET":
            return "registry:token", self.registry_token
        return None, None

    def handle(self, req):
        if req.path.startswith("/_emulator/"):
            return self.control(req)
        endpoint, handler = self.route(req)
        if handler is None:
            return json_response(404, {"error": {"code": 404, "message": "Not Found", "status": "NOT_FOUND"}})
        return record(self.s, endpoint, req, handler)

    # OAuth 2.0: the JWT bearer grant of a service-account key.

    def oauth_token(self, req):
        form = req.form
        if form.get("grant_type") != JWT_BEARER:
            raise oauth_error("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        assertion = form.get("assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise oauth_error("invalid_grant", "Invalid JWT: malformed.")
        email = claims.get("iss")
        with self.s.lock:
            keys = dict(self.s.keys.get(email, {}))
        if not keys:
            raise oauth_error("invalid_grant", "Invalid grant: account not found")
        if header.get("alg") != "RS256":
            raise oauth_error("invalid_grant", "Invalid JWT: only RS256 is accepted.")
        # Google looks the key up by kid; without one it tries each of the account's keys.
        candidates = [keys.get(header["kid"])] if "kid" in header else list(keys.values())
        if not any(verifies(assertion, key) for key in candidates):
            raise oauth_error("invalid_grant", "Invalid JWT Signature.")
        if claims.get("sub", email) != email:
            # A sub other than the account asks for domain-wide delegation, which this emulator has not.
            raise oauth_error(
                "unauthorized_client", "Client is unauthorized to retrieve access tokens using this method."
            )
        if claims.get("aud") != self.s.token_uri:
            raise oauth_error("invalid_grant", "Invalid JWT: audience must be the token_uri.")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            raise oauth_error("invalid_grant", "Invalid JWT: iat and exp are required.")
        if iat > now + SKEW or exp <= now - SKEW or exp - iat > MAX_ASSERTION_LIFETIME or exp <= iat:
            raise oauth_error(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                "Check your iat and exp values in the JWT claim.",
            )
        scopes = str(claims.get("scope", "")).split()
        if CLOUD_PLATFORM not in scopes:
            raise oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        with self.s.lock:
            token, _ = self.s.issue("access", email, scopes, self.s.lifetime)
            lifetime = self.s.lifetime
        req.environ["emulator.identity"] = email
        return {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}

    # STS: RFC 8693 token exchange for Workload Identity Federation.

    def sts_token(self, req):
        form = req.form
        if form.get("grant_type") != TOKEN_EXCHANGE:
            raise oauth_error("invalid_request", f"Invalid value for \"grant_type\": {form.get('grant_type', '')}")
        if form.get("requested_token_type") != ACCESS_TOKEN_TYPE:
            raise oauth_error("invalid_request", "Invalid value for \"requested_token_type\".")
        if form.get("subject_token_type") not in (JWT_TYPE, ID_TOKEN_TYPE):
            raise oauth_error("invalid_request", "Invalid value for \"subject_token_type\".")
        scopes = form.get("scope", "").split()
        if not scopes:
            raise oauth_error("invalid_scope", "The scope parameter is required.")
        audience = form.get("audience", "")
        name = audience.removeprefix("//iam.googleapis.com/")
        with self.s.lock:
            provider = self.s.providers.get(name) if audience.startswith("//iam.googleapis.com/") else None
        if provider is None:
            raise oauth_error(
                "invalid_target", "The target service indicated by the \"audience\" parameters is invalid."
            )
        subject_token = form.get("subject_token", "")
        try:
            claims = oidc.verify(subject_token, provider["issuer"], provider["jwks"], provider["audiences"], SKEW)
        except oidc.Rejected as e:
            raise sts_rejection(e, subject_token, provider)
        subject = claims["sub"]  # the attribute mapping google.subject = assertion.sub
        if len(subject.encode()) > MAX_SUBJECT_BYTES:
            raise oauth_error(
                "invalid_request", "The size of mapped attribute google.subject exceeds the 127 bytes limit."
            )
        if not condition_holds(provider["condition"], claims):
            raise oauth_error("unauthorized_client", "The given credential is rejected by the attribute condition.")
        project, pool, _ = PROVIDER_NAME.match(name).groups()
        pool_name = f"projects/{project}/locations/global/workloadIdentityPools/{pool}"
        principal = f"principal://iam.googleapis.com/{pool_name}/subject/{subject}"
        with self.s.lock:
            # A federated token never outlives the credential it was exchanged for.
            lifetime = max(1, min(self.s.lifetime, int(claims["exp"] - time.time())))
            token, _ = self.s.issue("federated", principal, scopes, lifetime)
        req.environ["emulator.identity"] = principal
        return {
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": lifetime,
        }

    # IAM Credentials: impersonation.

    def generate_access_token(self, req):
        target = GENERATE_ACCESS_TOKEN.match(req.path).group(1)
        auth = req.headers.get("Authorization", "")
        with self.s.lock:
            caller = self.s.live_token(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
            caller = dict(caller) if caller else None
        if caller is None:
            raise api_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
                "other valid authentication credential.",
            )
        req.environ["emulator.identity"] = caller["identity"]
        if CLOUD_PLATFORM not in caller["scopes"]:
            raise api_error(403, "PERMISSION_DENIED", "Request had insufficient authentication scopes.")
        body = req.get_json(silent=True) or {}
        scopes = body.get("scope")
        if not isinstance(scopes, list) or not scopes:
            raise api_error(400, "INVALID_ARGUMENT", "Scope required.")
        lifetime = body.get("lifetime", "3600s")
        m = re.fullmatch(r"(\d+)(?:\.\d+)?s", str(lifetime))
        if not m or not 1 <= int(m.group(1)) <= 3600:
            raise api_error(
                400,
                "INVALID_ARGUMENT",
                "The lifetime must be a duration in seconds, at most 3600s without an org policy.",
            )
        with self.s.lock:
            allowed = target in self.s.keys and self.s.may_impersonate(caller, target)
            if allowed:
                lifetime = min(int(m.group(1)), self.s.lifetime)
                token, expires = self.s.issue("access", target, scopes, lifetime)
        if not allowed:
            # Google says the same whether the account is missing or the caller lacks the role.
            raise api_error(
                403,
                "PERMISSION_DENIED",
                "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
            )
        return {"accessToken": token, "expireTime": rfc3339(expires)}

    # Artifact Registry's token realm, in the Docker token protocol.

    def registry_token(self, req):
        if req.args.get("service") != self.s.registry_service:
            raise Refused(400, {"errors": [{"code": "DENIED", "message": "unknown service"}]})
        identity = self.registry_identity(req)
        req.environ["emulator.identity"] = identity
        access = []
        with self.s.lock:
            for scope in req.args.getlist("scope"):
                kind, _, rest = scope.partition(":")
                repository, _, actions = rest.rpartition(":")
                if kind != "repository" or not repository:
                    continue
                granted = [a for a in actions.split(",") if a in self.s.allowed_actions(identity, repository)]
                # As the Docker token spec says: grant what is allowed, and let the registry refuse the rest.
                access.append({"type": "repository", "name": repository, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.s.registry_issuer,
            "sub": identity,
            "aud": self.s.registry_service,
            "iat": now,
            "nbf": now,
            "exp": now + REGISTRY_TOKEN_SECONDS,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = jwt.encode(claims, self.s.registry_key, algorithm="ES256", headers={"kid": self.s.registry_kid})
        return {"token": token, "access_token": token, "expires_in": REGISTRY_TOKEN_SECONDS, "issued_at": rfc3339(now)}

    def registry_identity(self, req):
        """The identity behind Basic oauth2accesstoken:<access token> or _json_key:<key JSON>."""
        unauthorized = Refused(401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication failed"}]})
        auth = req.authorization
        if auth is None or auth.type != "basic":
            raise unauthorized
        if auth.username == "oauth2accesstoken":
            with self.s.lock:
                token = self.s.live_token(auth.password or "")
                # Federated tokens too: Artifact Registry grants a pool's principals access
                # directly (roles on principal://...), without impersonation.
                if token is None or CLOUD_PLATFORM not in token["scopes"]:
                    raise unauthorized
                return token["identity"]
        if auth.username == "_json_key":
            try:
                key = json.loads(auth.password or "")
                private = serialization.load_pem_private_key(key["private_key"].encode(), password=None)
            except (ValueError, KeyError, TypeError):
                raise unauthorized
            with self.s.lock:
                public = self.s.keys.get(key.get("client_email"), {}).get(key.get("private_key_id"))
            if public is None or public.public_numbers() != private.public_key().public_numbers():
                raise unauthorized
            return key["client_email"]
        raise unauthorized

    # Control.

    def control(self, req):
        s = self.s
        body = req.get_json(silent=True) or {}
        path = req.path.removeprefix("/_emulator/")
        with s.lock:
            if req.method == "GET" and path == "calls":
                return json_response(200, s.calls)
            if req.method == "GET" and path == "counts":
                return json_response(200, s.counts)
            if req.method == "GET" and path == "tokens":  # for tests: token -> kind, identity, expiry
                return json_response(200, s.tokens)
            if req.method != "POST":
                return json_response(404, {"error": "not found"})
            try:
                if path == "service-accounts":
                    return json_response(200, s.add_service_account(body))
                if path == "delete-key":
                    s.delete_key(body)
                elif path == "providers":
                    s.add_provider(body)
                elif path == "bindings":
                    s.add_binding(body)
                elif path == "grants":
                    s.add_grant(body)
                elif path == "revoke":
                    if body["token"] not in s.tokens:
                        return json_response(404, {"error": "no such token"})
                    s.tokens[body["token"]]["revoked"] = True
                elif path == "token-lifetime":
                    s.lifetime = int(body["seconds"])
                elif path == "metadata-identity":
                    s.metadata_email = body["email"]
                elif path == "fail":  # status null or absent: serve again
                    if body.get("status"):
                        s.faults[body["endpoint"]] = int(body["status"])
                    else:
                        s.faults.pop(body["endpoint"], None)
                elif path == "reset":  # the records, not the configuration
                    s.calls.clear()
                    s.counts.clear()
                else:
                    return json_response(404, {"error": "not found"})
            except (KeyError, ValueError, TypeError, jwt.PyJWTError) as e:
                return json_response(400, {"error": f"bad request: {e!r}"})
        return json_response(200, {})


class Metadata:
    """The GCE/GKE metadata server: tokens for the instance's (or, with GKE Workload
    Identity, the pod's) service account, only to requests carrying Metadata-Flavor."""

    def __init__(self, state):
        self.s = state

    def __call__(self, environ, start_response):
        req = Request(environ)
        prefix = "/computeMetadata/v1/"
        if req.path in ("", "/"):  # what client libraries probe to detect GCE
            return Response("computeMetadata/\n", headers={"Metadata-Flavor": "Google"})(environ, start_response)
        endpoint = {
            prefix + "instance/service-accounts/default/token": "metadata:token",
            prefix + "instance/service-accounts/default/email": "metadata:email",
            prefix + "project/project-id": "metadata:project-id",
        }.get(req.path)
        if endpoint is None:
            return Response("Not Found\n", 404, headers={"Metadata-Flavor": "Google"})(environ, start_response)
        return record(self.s, endpoint, req, self.serve)(environ, start_response)

    def serve(self, req):
        # The real server also refuses proxied requests, so that a proxy cannot reach it for someone else.
        if req.headers.get("Metadata-Flavor") != "Google" or "X-Forwarded-For" in req.headers:
            raise Refused(403, "Missing required header \"Metadata-Flavor\": \"Google\"\n")
        with self.s.lock:
            email = self.s.metadata_email
            req.environ["emulator.identity"] = email
            if req.path.endswith("/email"):
                return email
            if req.path.endswith("/project-id"):
                return self.s.projects.get(email) or email.split("@")[1].split(".")[0]
            scopes = req.args.get("scopes", CLOUD_PLATFORM).split(",")
            token, expires = self.s.issue("access", email, scopes, self.s.lifetime)
        return {"access_token": token, "expires_in": int(expires - time.time()), "token_type": "Bearer"}


def verifies(token, public_key):
    """Whether an RS256 JWT is signed by this key; its claims are checked by the caller."""
    if public_key is None:
        return False
    try:
        jwt.api_jws.decode_complete(token, public_key, algorithms=["RS256"])
        return True
    except jwt.PyJWTError:
        return False


def sts_rejection(rejected, token, provider):
    """Google STS's answer to a subject token that oidc.verify refused."""
    if rejected.kind == "malformed":
        return oauth_error("invalid_grant", "The subject token is not a valid JWT.")
    header, claims = oidc.unverified(token)
    if rejected.kind == "issuer":
        return oauth_error(
            "invalid_grant",
            f"The issuer in ID Token {claims.get('iss')} does not match the expected issuer {provider['issuer']}.",
        )
    if rejected.kind == "key":
        return oauth_error(
            "invalid_grant", f"The ID Token signing key {header.get('kid')} was not found in the provider's JWKS."
        )
    if rejected.kind == "signature":
        return oauth_error("invalid_grant", "Unable to verify the ID Token signature.")
    if rejected.kind == "audience":
        return oauth_error(
            "invalid_grant", f"The audience in ID Token {claims.get('aud')} does not match the expected audience."
        )
    if rejected.kind == "expired":
        return oauth_error("invalid_grant", "ID Token has expired.")
    return oauth_error("invalid_grant", f"Invalid ID Token: {rejected.detail}.")


def condition_holds(condition, claims):
    """The provider's attribute condition, a small stand-in for Google's CEL: every
    given test must hold (sub_equals: one of these subjects, sub_prefix: starts with
    one of these)."""
    sub = claims.get("sub", "")
    if "sub_equals" in condition and sub not in condition["sub_equals"]:
        return False
    if "sub_prefix" in condition and not any(sub.startswith(p) for p in condition["sub_prefix"]):
        return False
    return True


def json_response(status, body):
    return Response(json.dumps(body), status, content_type="application/json; charset=utf-8")


def record(state, endpoint, req, handler):
    """Runs a Google endpoint's handler (or the fault injected into it), and records the call."""
    entry = {"endpoint": endpoint, "identity": None, "status": None, "error": None, "time": time.time()}
    # Read the whole body even when refusing before the handler does (an injected fault): answered
    # with its input unread, a client's read now and then hung until its timeout.
    req.get_data()
    with state.lock:
        state.counts[endpoint] = state.counts.get(endpoint, 0) + 1
        fault = state.faults.get(endpoint)
    try:
        if fault:
            raise api_error(fault, "UNAVAILABLE", "injected by the regcred test emulator")
        result = handler(req)
        entry["status"] = 200
        if isinstance(result, str):  # the metadata server's plain-text answers
            resp = Response(result, headers={"Metadata-Flavor": "Google"})
        else:
            resp = json_response(200, result)
    except Refused as e:
        entry["status"] = e.status
        entry["error"] = e.body if isinstance(e.body, str) else (e.body.get("error") or e.body.get("errors"))
        resp = Response(e.body, e.status) if isinstance(e.body, str) else json_response(e.status, e.body)
        if e.status == 401 and endpoint == "registry:token":
            resp.headers["WWW-Authenticate"] = 'Basic realm="Artifact Registry"'
    entry["identity"] = req.environ.get("emulator.identity")
    with state.lock:
        state.calls.append(entry)
    return resp


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metadata-port", type=int, required=True)
    p.add_argument("--tls-port", type=int, help="serve the endpoints of --port over HTTPS here too")
    p.add_argument("--tls-cert", help="the certificate (PEM) of --tls-port")
    p.add_argument("--tls-key", help="its key (PEM)")
    p.add_argument("--state-dir", required=True)
    p.add_argument(
        "--config", help="JSON: service_accounts, providers, bindings, grants (as the control endpoints take them)"
    )
    p.add_argument(
        "--token-lifetime", type=int, default=3600, help="seconds an access token lives (default: 1 h, as Google)"
    )
    p.add_argument("--registry-service", default="regcred-testenv-gcp")
    p.add_argument("--registry-issuer", default="regcred-testenv-gcp-realm")
    p.add_argument("--metadata-email", default="regcred-node@regcred-test.iam.gserviceaccount.com")
    args = p.parse_args()

    token_uri = f"http://127.0.0.1:{args.port}/token"
    state = State(token_uri, args.registry_service, args.registry_issuer, args.metadata_email, args.token_lifetime)
    if args.config:
        with open(args.config) as f:
            cfg = json.load(f)
        for sa in cfg.get("service_accounts", []):
            state.add_service_account(sa)
        for provider in cfg.get("providers", []):
            state.add_provider(provider)
        for binding in cfg.get("bindings", []):
            state.add_binding(binding)
        for grant in cfg.get("grants", []):
            state.add_grant(grant)

    jwk = jwt.algorithms.ECAlgorithm.to_jwk(state.registry_key.public_key(), as_dict=True)
    jwk.update(kid=state.registry_kid, use="sig", alg="ES256")
    with open(f"{args.state_dir}/registry-jwks.json", "w") as f:
        json.dump({"keys": [jwk]}, f)

    apps = [(args.port, Emulator(state)), (args.metadata_port, Metadata(state))]
    # make_server binds before we announce readiness.
    servers = [make_server("127.0.0.1", port, app, threaded=True) for port, app in apps]
    if args.tls_port:
        tls = (args.tls_cert, args.tls_key)
        servers.append(make_server("127.0.0.1", args.tls_port, apps[0][1], threaded=True, ssl_context=tls))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ready = {"port": args.port, "metadata_port": args.metadata_port, "tls_port": args.tls_port}
    with open(f"{args.state_dir}/ready.tmp", "w") as f:
        json.dump(ready, f)
    # Renamed into place, so a reader never sees a half-written file.
    os.replace(f"{args.state_dir}/ready.tmp", f"{args.state_dir}/ready")
    print(f"emulator ready: {ready}", flush=True)
    threading.Event().wait()  # until SIGTERM/SIGKILL


if __name__ == "__main__":
    main()
