#!/usr/bin/env python3
"""Local Microsoft Entra ID, Azure instance metadata service and Azure Container Registry for
regcred's ACR tests. Azure ships no emulator for these, so this is a strict stand-in: it checks
what the real services check and answers with their error shapes. One process serving:

on --port (plain HTTP, the authority `http://127.0.0.1:PORT`):
* POST /<tenant>/oauth2/v2.0/token   Entra's token endpoint, grant client_credentials, with a
                                     client secret or a client assertion: a Kubernetes
                                     ServiceAccount token verified against the issuer's JWKS
                                     (signature, issuer, audience api://AzureADTokenExchange,
                                     expiry) and matched against the application's federated
                                     identity credentials (issuer and subject);
* /_emulator/*                       configuration, faults, and a record of calls;

on --imds-port (plain HTTP): GET /metadata/identity/oauth2/token, IMDS, only with
`Metadata: true` and not through a proxy (no X-Forwarded-For);

on --acr-port (HTTPS, a certificate for *.azurecr.io, *.azurecr.cn, *.azurecr.us, 127.0.0.1
and localhost from --tls-cert/--tls-key), each configured registry by its Host:
* POST /oauth2/exchange   an Entra token this emulator issued, live, of an identity with a
                          role assignment (AcrPull, AcrPush) on that registry, for an ACR
                          refresh token (a JWT whose exp is its expiry);
* GET|POST /oauth2/token  the registry's token realm: Basic
                          00000000-0000-0000-0000-000000000000:<live refresh token of this
                          registry> (or the refresh_token grant) for an access token with the
                          actions the identity's roles give;
* /v2/...                 the registry: without a live access token for the request's
                          repository and action, 401 with ACR's challenge
                          `Bearer realm="https://<registry>/oauth2/token",service="<registry>"`;
                          with one, forwarded to the registry's upstream (a CNCF distribution
                          registry on loopback, with a basic login only this front knows).

Writes STATE_DIR/ready once everything listens.
"""

import argparse
import base64
import http.client
import json
import os
import secrets
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: oidc.py

try:
    import jwt
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    import oidc
except ImportError as error:
    sys.exit(
        f"azure/emulator.py: {error} under {sys.executable}: the Azure emulator needs tests/gcp/requirements.txt "
        "(PyJWT, cryptography, Werkzeug); scripts/setup.sh installs them into a virtual environment, which the "
        "tests use (REGCRED_PYTHON)"
    )

CLIENT_CREDENTIALS = "client_credentials"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
ACR_USER = "00000000-0000-0000-0000-000000000000"
# The resources an Entra token may be for, with and without the trailing slash.
RESOURCES = {
    "https://containerregistry.azure.net",
    "https://management.azure.com",
    "https://management.chinacloudapi.cn",
    "https://management.usgovcloudapi.net",
}
ROLE_ACTIONS = {"AcrPull": {"pull"}, "AcrPush": {"pull", "push"}}
SKEW = 30
ACCESS_TOKEN_SECONDS = 300  # the registry's own access tokens


class Refused(Exception):
    """An error answer: HTTP status, the JSON body the service would send, and extra headers."""

    def __init__(self, status, body, headers=None):
        super().__init__(body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def entra_error(error, code, description, status=400):
    return Refused(
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {uuid.uuid4()} Correlation ID: "
            f"{uuid.uuid4()} Timestamp: {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}",
            "error_codes": [code],
        },
    )


def acr_error(status, code, message, headers=None):
    return Refused(status, {"errors": [{"code": code, "message": message, "detail": None}]}, headers)


def resource_of(text):
    """The resource an Entra scope or IMDS resource names, without `/.default` or a trailing slash."""
    text = text.strip()
    if text.endswith("/.default"):
        text = text[: -len("/.default")]
    return text.rstrip("/")


class State:
    """Everything the emulator knows, guarded by one lock: werkzeug serves each request on
    its own thread."""

    def __init__(self, authority):
        self.lock = threading.Lock()
        self.authority = authority
        self.signing_key = secrets.token_bytes(32)
        self.tenants = {}  # tenant id -> set of domains
        self.apps = {}  # client id -> dict, see add_app
        self.issuers = {}  # issuer -> jwt.PyJWKSet
        self.managed = {}  # client id -> {"resource_id", "system"}: identities attached to the machine
        self.roles = []  # (client id, registry, role)
        self.registries = {}  # host -> {"upstream": SplitResult, "auth": "user:pass"}
        self.tokens = {}  # token -> {kind, identity, tenant, registry, resource, expires, revoked, access}
        self.entra_lifetime = 3600
        self.refresh_lifetime = 3 * 3600
        self.faults = {}
        self.calls = []
        self.counts = {}

    # Configuration.

    def add_app(self, cfg):
        client_id = cfg["client_id"]
        tenant = cfg["tenant"]
        self.tenants.setdefault(tenant, set()).update(cfg.get("domains", []))
        app = self.apps.setdefault(
            client_id, {"tenant": tenant, "object_id": cfg.get("object_id") or str(uuid.uuid4()), "secrets": set(),
                        "federated": []}
        )
        if cfg.get("secret"):
            app["secrets"].add(cfg["secret"])
        for fic in cfg.get("federated", []):
            app["federated"].append(
                {"issuer": fic["issuer"], "subject": fic["subject"],
                 "audiences": fic.get("audiences") or [TOKEN_EXCHANGE_AUDIENCE]}
            )
        if cfg.get("managed"):
            self.managed[client_id] = {"resource_id": cfg.get("resource_id"), "system": bool(cfg.get("system"))}

    def tenant_id(self, name):
        """The tenant id a path segment names (its id or one of its domains), else None."""
        if name in self.tenants:
            return name
        for tid, domains in self.tenants.items():
            if name.lower() in {d.lower() for d in domains}:
                return tid
        return None

    def actions(self, client_id, registry):
        out = set()
        for principal, host, role in self.roles:
            if principal == client_id and host == registry:
                out |= ROLE_ACTIONS.get(role, set())
        return out

    # Tokens: JWTs (as Azure's are), signed with the emulator's key, and recorded.

    def issue(self, kind, lifetime, record, claims):
        now = int(time.time())
        claims = dict(claims, iat=now, nbf=now, exp=now + lifetime, jti=secrets.token_hex(16))
        token = jwt.encode(claims, self.signing_key, algorithm="HS256", headers={"kid": f"emulator-{kind}"})
        self.tokens[token] = dict(record, kind=kind, expires=now + lifetime, revoked=False)
        return token, lifetime

    def live(self, token, kind):
        """The record of a token of `kind` this emulator issued, neither revoked nor expired, else None."""
        t = self.tokens.get(token)
        if t is None or t["kind"] != kind or t["revoked"] or t["expires"] <= time.time():
            return None
        try:  # its signature too: a token the emulator did not sign is not one it issued
            jwt.decode(token, self.signing_key, algorithms=["HS256"], options={"verify_aud": False})
        except jwt.PyJWTError:
            return None
        return t

    def entra_token(self, app_id, resource):
        app = self.apps[app_id]
        record = {"identity": app_id, "tenant": app["tenant"], "resource": resource}
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{app['tenant']}/",
            "tid": app["tenant"],
            "oid": app["object_id"],
            "appid": app_id,
            "idtyp": "app",
        }
        return self.issue("entra", self.entra_lifetime, record, claims)


class Entra:
    def __init__(self, state):
        self.s = state

    def __call__(self, environ, start_response):
        req = Request(environ)
        if req.path.startswith("/_emulator/"):
            return self.control(req)(environ, start_response)
        parts = req.path.strip("/").split("/")
        if req.method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return record(self.s, "entra:token", req, lambda r: self.token(r, parts[0]))(environ, start_response)
        return json_response(404, {"error": "not_found"})(environ, start_response)

    def token(self, req, tenant_name):
        form = req.form
        with self.s.lock:
            tenant = self.s.tenant_id(tenant_name)
        if tenant is None:
            raise entra_error(
                "invalid_request", 90002, f"Tenant '{tenant_name}' not found. Check to make sure you have the correct "
                "tenant ID and are signing into the correct cloud."
            )
        if form.get("grant_type") != CLIENT_CREDENTIALS:
            raise entra_error("unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        client_id = form.get("client_id", "")
        with self.s.lock:
            app = self.s.apps.get(client_id)
            app = dict(app) if app and app["tenant"] == tenant else None
        if app is None:
            raise entra_error(
                "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the "
                f"directory '{tenant_name}'.",
            )
        scopes = form.get("scope", "").split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default") or resource_of(scopes[0]) not in RESOURCES:
            raise entra_error("invalid_scope", 1002012, f"The provided value for scope {form.get('scope', '')} is not valid.")
        if form.get("client_secret") is not None:
            if form["client_secret"] not in app["secrets"]:
                raise entra_error(
                    "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in "
                    f"the request is the client secret value, not the client secret ID, for a secret added to app "
                    f"'{client_id}'.", status=401,
                )
        elif form.get("client_assertion") is not None:
            if form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
                raise entra_error("invalid_request", 50027, "Invalid client_assertion_type.")
            self.check_assertion(form["client_assertion"], app, client_id)
        else:
            raise entra_error(
                "invalid_client", 7000216, "'client_assertion', 'client_secret' or 'request' is required for the "
                "'client_credentials' grant type.", status=401,
            )
        req.environ["emulator.identity"] = client_id
        with self.s.lock:
            token, lifetime = self.s.entra_token(client_id, resource_of(scopes[0]))
        return {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}

    def check_assertion(self, assertion, app, client_id):
        """A federated identity credential's check: the assertion is a JWT of a trusted issuer,
        signed by its key, for the credential's audience, unexpired, with its subject."""
        try:
            _, claims = oidc.unverified(assertion)
        except oidc.Rejected:
            raise entra_error("invalid_client", 50027, "JWT token is invalid or malformed.", status=401)
        issuer, subject = claims.get("iss"), claims.get("sub")
        no_match = entra_error(
            "invalid_client", 70021, f"No matching federated identity record found for presented assertion. "
            f"Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: "
            f"'{claims.get('aud')}'.", status=401,
        )
        candidates = [f for f in app["federated"] if f["issuer"] == issuer]
        with self.s.lock:
            jwks = self.s.issuers.get(issuer)
        if not candidates or jwks is None:
            raise no_match
        for fic in candidates:
            try:
                verified = oidc.verify(assertion, issuer, jwks, fic["audiences"], SKEW)
            except oidc.Rejected as e:
                if e.kind == "expired":
                    raise entra_error("invalid_client", 700024, "Client assertion is not within its valid time range.",
                                      status=401)
                if e.kind in ("signature", "key"):
                    raise entra_error("invalid_client", 5002727, "Client assertion failed signature validation.",
                                      status=401)
                continue
            if verified["sub"] == fic["subject"]:
                return
        raise no_match

    def control(self, req):
        s = self.s
        body = req.get_json(silent=True) or {}
        path = req.path.removeprefix("/_emulator/")
        with s.lock:
            if req.method == "GET" and path == "calls":
                return json_response(200, s.calls)
            if req.method == "GET" and path == "counts":
                return json_response(200, s.counts)
            if req.method == "GET" and path == "tokens":
                return json_response(200, s.tokens)
            if req.method != "POST":
                return json_response(404, {"error": "not found"})
            try:
                if path == "apps":
                    s.add_app(body)
                elif path == "issuers":  # an OIDC issuer whose keys federated credentials trust
                    s.issuers[body["issuer"]] = jwt.PyJWKSet.from_dict(body["jwks"])
                elif path == "role-assignments":
                    if body["role"] not in ROLE_ACTIONS:
                        return json_response(400, {"error": f"unknown role {body['role']}"})
                    s.roles.append((body["client_id"], body["registry"], body["role"]))
                elif path == "registries":
                    s.registries[body["host"]] = {"upstream": urlsplit(body["upstream"]), "auth": body.get("auth"),
                                                  "realm": body.get("realm"), "loopback": bool(body.get("loopback"))}
                elif path == "revoke":
                    if body["token"] not in s.tokens:
                        return json_response(404, {"error": "no such token"})
                    s.tokens[body["token"]]["revoked"] = True
                elif path == "token-lifetime":
                    if "entra" in body:
                        s.entra_lifetime = int(body["entra"])
                    if "refresh" in body:
                        s.refresh_lifetime = int(body["refresh"])
                elif path == "fail":
                    if body.get("status"):
                        s.faults[body["endpoint"]] = int(body["status"])
                    else:
                        s.faults.pop(body["endpoint"], None)
                elif path == "reset":
                    s.calls.clear()
                    s.counts.clear()
                else:
                    return json_response(404, {"error": "not found"})
            except (KeyError, ValueError, TypeError, jwt.PyJWTError) as e:
                return json_response(400, {"error": f"bad request: {e!r}"})
        return json_response(200, {})


class Imds:
    """The instance metadata service's managed identity endpoint."""

    def __init__(self, state):
        self.s = state

    def __call__(self, environ, start_response):
        req = Request(environ)
        if req.path != "/metadata/identity/oauth2/token" or req.method != "GET":
            return json_response(404, {"error": "not_found"})(environ, start_response)
        return record(self.s, "imds:token", req, self.token)(environ, start_response)

    def token(self, req):
        # As IMDS: the header proves the request is not forwarded from elsewhere (SSRF), and a
        # proxied request is refused.
        if req.headers.get("Metadata") != "true" or "X-Forwarded-For" in req.headers:
            raise Refused(400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
        if not req.args.get("api-version"):
            raise Refused(400, {"error": "invalid_request", "error_description": "Required query variable 'api-version' is missing"})
        resource = resource_of(req.args.get("resource", ""))
        if resource not in RESOURCES:
            raise Refused(400, {"error": "invalid_resource", "error_description": "AADSTS500011: The resource principal was not found."})
        client_id, resource_id = req.args.get("client_id"), req.args.get("msi_res_id") or req.args.get("mi_res_id")
        with self.s.lock:
            if client_id:
                found = client_id if client_id in self.s.managed else None
            elif resource_id:
                found = next((c for c, m in self.s.managed.items() if m["resource_id"] == resource_id), None)
            else:
                found = next((c for c, m in self.s.managed.items() if m["system"]), None)
            if found is None:
                raise Refused(400, {"error": "invalid_request", "error_description": "Identity not found"})
            token, lifetime = self.s.entra_token(found, resource)
        req.environ["emulator.identity"] = found
        now = int(time.time())
        # IMDS's numbers are strings.
        return {
            "access_token": token,
            "client_id": found,
            "expires_in": str(lifetime),
            "expires_on": str(now + lifetime),
            "ext_expires_in": str(lifetime),
            "not_before": str(now),
            "resource": req.args.get("resource"),
            "token_type": "Bearer",
        }


class Acr:
    """The registries' own endpoints, by Host."""

    def __init__(self, state):
        self.s = state

    def __call__(self, environ, start_response):
        req = Request(environ)
        host = (req.host or "").split(":")[0].lower()
        with self.s.lock:
            if host not in self.s.registries and host in ("localhost", "127.0.0.1"):
                # A node's mirror of a registry (containerd's hosts.toml) asks by address: the
                # registry the realm request names (service), else the one marked as the node's.
                service = req.args.get("service") or (req.form.get("service") if req.method == "POST" else None)
                if service in self.s.registries:
                    host = service
                else:
                    host = next((h for h, r in self.s.registries.items() if r.get("loopback")), host)
            registry = self.s.registries.get(host)
        if registry is None:
            return json_response(404, {"errors": [{"code": "NAME_UNKNOWN", "message": f"no registry {host}"}]})(
                environ, start_response
            )
        if req.path == "/oauth2/exchange" and req.method == "POST":
            return record(self.s, "acr:exchange", req, lambda r: self.exchange(r, host))(environ, start_response)
        if req.path == "/oauth2/token" and req.method in ("GET", "POST"):
            return record(self.s, "acr:token", req, lambda r: self.realm(r, host))(environ, start_response)
        if req.path == "/v2" or req.path.startswith("/v2/"):
            return self.registry(req, host, registry, environ, start_response)
        return json_response(404, {"errors": [{"code": "NOT_FOUND", "message": "not found"}]})(environ, start_response)

    def exchange(self, req, host):
        form = req.form
        if form.get("grant_type") != "access_token":
            raise acr_error(400, "UNSUPPORTED", "grant_type must be access_token")
        if form.get("service") != host:
            raise acr_error(400, "INVALID_SERVICE", f"service must be {host}")
        with self.s.lock:
            entra = self.s.live(form.get("access_token", ""), "entra")
            entra = dict(entra) if entra else None
        if entra is None:
            raise acr_error(401, "UNAUTHORIZED", "the access token is not a valid Microsoft Entra token")
        if form.get("tenant") and self.s.tenant_id(form["tenant"]) != entra["tenant"]:
            raise acr_error(401, "UNAUTHORIZED", "the tenant does not match the access token's")
        if entra["resource"] not in RESOURCES:
            raise acr_error(401, "UNAUTHORIZED", "the access token's audience is not ACR's or ARM's")
        req.environ["emulator.identity"] = entra["identity"]
        with self.s.lock:
            if not self.s.actions(entra["identity"], host):
                raise acr_error(
                    401, "UNAUTHORIZED",
                    f"the identity {entra['identity']} has no role assignment (AcrPull, AcrPush) on {host}",
                )
            claims = {"aud": host, "iss": "Azure Container Registry", "tenant": entra["tenant"],
                      "sub": entra["identity"], "grant_type": "refresh_token", "version": "1.0"}
            record_ = {"identity": entra["identity"], "tenant": entra["tenant"], "registry": host}
            token, _ = self.s.issue("refresh", self.s.refresh_lifetime, record_, claims)
        return {"refresh_token": token}

    def realm(self, req, host):
        unauthorized = acr_error(
            401, "UNAUTHORIZED",
            "authentication required, visit https://aka.ms/acr/authorization for more information.",
            {"WWW-Authenticate": f'Basic realm="https://{host}/oauth2/token"'},
        )
        if req.method == "POST":
            form = req.form
            if form.get("grant_type") != "refresh_token":
                raise unauthorized
            refresh, service, scopes = form.get("refresh_token", ""), form.get("service"), form.get("scope", "").split()
        else:
            auth = req.authorization
            if auth is None or auth.type != "basic" or auth.username != ACR_USER:
                raise unauthorized
            refresh, service, scopes = auth.password or "", req.args.get("service"), req.args.getlist("scope")
        if service != host:
            raise acr_error(400, "INVALID_SERVICE", f"service must be {host}")
        with self.s.lock:
            record_ = self.s.live(refresh, "refresh")
            if record_ is None or record_["registry"] != host:
                raise unauthorized
            identity = record_["identity"]
            allowed = self.s.actions(identity, host)
        req.environ["emulator.identity"] = identity
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            repository, _, actions = rest.rpartition(":")
            if kind == "repository" and repository:
                access.append({"type": "repository", "name": repository,
                               "actions": [a for a in actions.split(",") if a in allowed]})
        with self.s.lock:
            token, _ = self.s.issue(
                "access", ACCESS_TOKEN_SECONDS, {"identity": identity, "registry": host, "access": access},
                {"aud": host, "iss": "Azure Container Registry", "sub": identity, "access": access},
            )
        return {"access_token": token}

    def registry(self, req, host, registry, environ, start_response):
        # ACR's realm is the registry's own /oauth2/token; a registry served to a node that
        # cannot resolve its name names a realm on loopback instead (the same handler).
        realm = registry.get("realm") or f"https://{host}/oauth2/token"
        challenge = f'Bearer realm="{realm}",service="{host}"'
        parts = req.path.split("/")
        # /v2/<name...>/(manifests|blobs|tags)/...: the repository and the action asked.
        repository, action = None, None
        for i, part in enumerate(parts):
            if i > 2 and part in ("manifests", "blobs", "tags"):
                repository = "/".join(parts[2:i])
                action = "pull" if req.method in ("GET", "HEAD") else "push"
                break
        if repository:
            challenge += f',scope="repository:{repository}:{action}"'
        auth = req.headers.get("Authorization", "")
        with self.s.lock:
            token = self.s.live(auth.removeprefix("Bearer "), "access") if auth.startswith("Bearer ") else None
            token = dict(token) if token else None
        ok = token is not None and token["registry"] == host and (
            repository is None
            or any(a["name"] == repository and action in a["actions"] for a in token["access"])
        )
        entry = {"endpoint": "registry:v2", "identity": token and token["identity"], "method": req.method,
                 "path": req.path, "status": None, "error": None, "time": time.time()}
        if not ok:
            if token is not None:
                challenge += ',error="insufficient_scope"'
            entry.update(status=401, error="UNAUTHORIZED")
            with self.s.lock:
                self.s.counts["registry:v2"] = self.s.counts.get("registry:v2", 0) + 1
                self.s.calls.append(entry)
            return json_response(
                401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": None}]},
                {"WWW-Authenticate": challenge, "Docker-Distribution-Api-Version": "registry/2.0"},
            )(environ, start_response)
        entry["status"] = 200
        with self.s.lock:
            self.s.counts["registry:v2"] = self.s.counts.get("registry:v2", 0) + 1
            self.s.calls.append(entry)
        return forward(req, registry, environ, start_response)


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


def forward(req, registry, environ, start_response):
    """Forwards a request the front let in to the upstream registry, with the front's own login."""
    body = req.get_data()
    target = req.full_path if req.query_string else req.path
    headers = {k.lower(): v for k, v in req.headers.items()
               if k.lower() not in HOP_BY_HOP and k.lower() not in ("authorization", "content-length", "host")}
    headers["content-length"] = str(len(body))
    headers["x-forwarded-proto"] = "https"
    if registry["auth"]:
        headers["authorization"] = "Basic " + base64.b64encode(registry["auth"].encode()).decode()
    upstream = registry["upstream"]
    conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
    conn.request(req.method, target, body, headers)
    answer = conn.getresponse()
    out = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP]
    start_response(f"{answer.status} {answer.reason}", out)

    def stream():
        try:
            while chunk := answer.read(64 * 1024):
                yield chunk
        finally:
            conn.close()

    return stream()


def json_response(status, body, headers=None):
    resp = Response(json.dumps(body), status, content_type="application/json; charset=utf-8")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def record(state, endpoint, req, handler):
    """Runs an endpoint's handler (or the fault injected into it), and records the call."""
    entry = {"endpoint": endpoint, "identity": None, "status": None, "error": None, "time": time.time()}
    req.get_data()  # read the whole body before any answer
    with state.lock:
        state.counts[endpoint] = state.counts.get(endpoint, 0) + 1
        fault = state.faults.get(endpoint)
    try:
        if fault:
            if endpoint.startswith("acr:"):
                raise acr_error(fault, "SERVICE_UNAVAILABLE", "injected by the regcred test emulator")
            raise Refused(fault, {"error": "temporarily_unavailable",
                                  "error_description": "AADSTS90033: injected by the regcred test emulator."})
        result = handler(req)
        entry["status"] = 200
        resp = json_response(200, result)
    except Refused as e:
        entry["status"] = e.status
        entry["error"] = e.body.get("error") or e.body.get("errors")
        resp = json_response(e.status, e.body, e.headers)
    entry["identity"] = req.environ.get("emulator.identity")
    with state.lock:
        state.calls.append(entry)
    return resp


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--imds-port", type=int, required=True)
    p.add_argument("--acr-port", type=int, required=True)
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    p.add_argument("--state-dir", required=True)
    args = p.parse_args()

    state = State(f"http://127.0.0.1:{args.port}")
    servers = [
        make_server("127.0.0.1", args.port, Entra(state), threaded=True),
        make_server("127.0.0.1", args.imds_port, Imds(state), threaded=True),
        make_server("127.0.0.1", args.acr_port, Acr(state), threaded=True,
                    ssl_context=(args.tls_cert, args.tls_key)),
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ready = {"port": args.port, "imds_port": args.imds_port, "acr_port": args.acr_port}
    with open(f"{args.state_dir}/ready.tmp", "w") as f:
        json.dump(ready, f)
    os.replace(f"{args.state_dir}/ready.tmp", f"{args.state_dir}/ready")
    print(f"emulator ready: {ready}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
