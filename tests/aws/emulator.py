#!/usr/bin/env python3
"""Local AWS for regcred's ECR tests: one process serving

* moto (ECR, IAM, ...) on --port, wrapped to check every request's SigV4 signature against
  the secret key (and session token) of its access key id, to answer STS AssumeRole and
  AssumeRoleWithWebIdentity itself (roles with trust policies, OIDC providers with inline
  JWKS), to count requests, inject faults and record who asked for what (/_emulator/*);
* an IMDSv2 stub on --imds-port (EC2 instance role credentials);
* an EKS Pod Identity agent stub on --pod-identity-port;
* on --port too, POST /_emulator/registry-login: the check behind tests/aws/ecr_registry.py, the
  HTTPS front that stands in for an ECR registry (with ECR's Basic challenge): Basic
  AWS:<password> where the password is one GetAuthorizationToken issued and that has not
  expired is let in where the registry lets its caller's account in; an expired one is denied
  (403), anything else is not authorized (401). See Wrapper.registry_login.

Only access keys the emulator knows sign: those registered (/_emulator/access-keys, as IAM's
CreateAccessKey), and the temporary ones it hands out. Their ids tell the credential sources
apart: AKIAIMDS... (IMDS), AKIAPODID... (Pod Identity), ASIA... (STS AssumeRole*).
Writes the ports as JSON to STATE_DIR/ready once everything listens.
"""

import argparse
import base64
import hashlib
import hmac
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
from urllib.parse import parse_qs, quote, unquote
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: oidc.py

try:
    import jwt
    from werkzeug.serving import WSGIRequestHandler, make_server
    from werkzeug.wrappers import Request, Response

    from moto.core.responses import ActionResult
    from moto.ecr.responses import ECRResponse
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    import oidc
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
STS_LIFETIME = [3600]  # seconds at most that STS credentials are valid (AWS: 1 h by default)
REQUEST = threading.local()  # the current request's CALLS entry and account, for the ECR patch
# ECR password -> (expiresAt (epoch seconds), the caller's ARN, its account), for registry logins
ISSUED = {}
# access key id -> {"secret", "arn", "account", "token" (None for long-term keys), "expires" (epoch or None)}
KEYS = {}
# role ARN -> {"principals": [ARN allowed to AssumeRole], "external_id": str or None,
#              "web_identity": [{"issuer", "subjects", "audience"}]}
ROLES = {}
PROVIDERS = {}  # OIDC issuer -> jwt.PyJWKSet (IAM's OpenID Connect providers, keys given inline)
ACCOUNT = "123456789012"
# AWS refuses a signature dated more than 5 minutes from its clock ("Signature expired: ... - 5 min.").
SKEW = 300
STS_AUDIENCE = "sts.amazonaws.com"
# The query-protocol actions of STS (the one endpoint serves IAM through moto too).
STS_ACTIONS = {
    "AssumeRole",
    "AssumeRoleWithWebIdentity",
    "AssumeRoleWithSAML",
    "GetCallerIdentity",
    "GetSessionToken",
    "GetFederationToken",
    "GetAccessKeyInfo",
    "DecodeAuthorizationMessage",
}
# X-Amz-Target prefixes of JSON-protocol services.
TARGET_SERVICES = {"AmazonEC2ContainerRegistry_V20150921": "ecr"}
REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+$")
SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
ROLE_ARN = re.compile(r"^arn:aws:iam::(\d{12}):role/(?:[\w+=,.@-]+/)*([\w+=,.@-]{1,64})$")


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


def mint(access_key_id, arn, account, lifetime):
    creds = {
        "AccessKeyId": access_key_id,
        "SecretAccessKey": secrets.token_urlsafe(30),
        "SessionToken": secrets.token_urlsafe(60),
        "Expiration": iso8601(lifetime),
    }
    with LOCK:
        KEYS[access_key_id] = {
            "secret": creds["SecretAccessKey"],
            "arn": arn,
            "account": account,
            "token": creds["SessionToken"],
            "expires": time.time() + lifetime,
        }
    return creds


def get_authorization_token(self):
    """Replaces moto's, which returns a constant password that expired in 2015:
    here every call mints a new password and expires LIFETIME seconds from now,
    like real ECR (12 h). The default registry is the signer's account. As ECR's, a password
    is the caller's: it opens every registry that lets the caller's account pull."""
    account = getattr(REQUEST, "account", None) or self.current_account
    record = getattr(REQUEST, "record", None)
    caller = (record or {}).get("caller") or f"arn:aws:iam::{account}:root"
    registry_ids = self._get_param("registryIds") or [account]
    expires_at = aws_time() + LIFETIME[0]
    data = []
    for registry_id in registry_ids:
        password = f"{registry_id}-{secrets.token_urlsafe(24)}"
        with LOCK:
            ISSUED[password] = (expires_at, caller, account)
        data.append(
            {
                "authorizationToken": base64.b64encode(f"AWS:{password}".encode()).decode(),
                "expiresAt": expires_at,
                "proxyEndpoint": f"https://{registry_id}.dkr.ecr.{self.region}.amazonaws.com",
            }
        )
    if record is not None:
        record["expiresAt"] = expires_at
        record["authorizationData"] = data
    return ActionResult({"authorizationData": data})


ECRResponse.get_authorization_token = get_authorization_token


class Refused(Exception):
    """An AWS error answer: code, HTTP status, message."""

    def __init__(self, code, status, message):
        super().__init__(f"{code}: {message}")
        self.code, self.status, self.message = code, status, message


def identify(environ, body):
    """(service, Action, form) of an AWS API request: JSON protocol (ECR) by X-Amz-Target,
    query protocol (STS) by Action in the form body or query string."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:  # X-Amz-Target: <prefix>.<Action>
        prefix, _, action = target.partition(".")
        return TARGET_SERVICES.get(prefix, prefix), action, {}
    form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True) or parse_qs(
        environ.get("QUERY_STRING", ""), keep_blank_values=True
    )
    form = {k: v[0] for k, v in form.items()}
    action = form.get("Action", "?")
    if action in STS_ACTIONS:  # the service is the one asked, whatever the signature's scope says
        return "sts", action, form
    # moto serves the rest (IAM) under the scope's service.
    scoped = re.search(r"Credential=[^/,\s]+/[^/]*/[^/]*/([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
    return (scoped.group(1) if scoped else "sts"), action, form


def header(environ, name):
    """A request header by its lower-case name, as WSGI keeps it."""
    if name in ("content-type", "content-length"):
        return environ.get(name.upper().replace("-", "_"))
    return environ.get("HTTP_" + name.upper().replace("-", "_"))


def errors(json_protocol):
    """The codes and statuses of authentication errors in each protocol, as AWS sends them."""
    if json_protocol:  # awsJson (ECR)
        return {
            "missing": ("MissingAuthenticationTokenException", 403),
            "incomplete": ("IncompleteSignatureException", 400),
            "unknown": ("UnrecognizedClientException", 403),
            "signature": ("InvalidSignatureException", 403),
            "expired": ("ExpiredTokenException", 400),
        }
    return {  # query (STS)
        "missing": ("MissingAuthenticationToken", 403),
        "incomplete": ("IncompleteSignature", 400),
        "unknown": ("InvalidClientTokenId", 403),
        "signature": ("SignatureDoesNotMatch", 403),
        "expired": ("ExpiredToken", 400),
    }


def refuse(json_protocol, kind, message):
    code, status = errors(json_protocol)[kind]
    return Refused(code, status, message)


MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def canonical_query(raw):
    pairs = []
    for part in raw.split("&") if raw else []:
        k, _, v = part.partition("=")
        pairs.append((quote(unquote(k.replace("+", " ")), safe="-_.~"), quote(unquote(v.replace("+", " ")), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def authenticate(environ, body, service, json_protocol):
    """Checks the request's SigV4 signature (Authorization header) as AWS does; returns the
    access key id and its KEYS entry, or raises Refused with AWS's error."""
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    if not authorization:
        raise refuse(json_protocol, "missing", "Missing Authentication Token")
    scheme, _, rest = authorization.partition(" ")
    fields = dict(p.strip().split("=", 1) for p in rest.split(",") if "=" in p)
    if scheme != "AWS4-HMAC-SHA256" or not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
        raise refuse(
            json_protocol,
            "incomplete",
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters "
            f"(scheme {scheme!r}, parameters {sorted(fields)}).",
        )
    scope = fields["Credential"].split("/")
    amz_date = header(environ, "x-amz-date") or ""
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise refuse(json_protocol, "incomplete", f"Credential should be scoped correctly: {'/'.join(scope[1:])}.")
    access_key_id, date, region, scoped_service, _ = scope
    try:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise refuse(
            json_protocol, "incomplete", "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
        )
    with LOCK:
        key = dict(KEYS[access_key_id]) if access_key_id in KEYS else None
    if key is None:
        raise refuse(json_protocol, "unknown", "The security token included in the request is invalid.")
    token = header(environ, "x-amz-security-token")
    if token != key["token"]:  # a temporary key without its token, or a token for no such key
        raise refuse(json_protocol, "unknown", "The security token included in the request is invalid.")
    if key["expires"] is not None and key["expires"] <= time.time():
        raise refuse(json_protocol, "expired", "The security token included in the request is expired")
    if scoped_service != service:
        raise refuse(json_protocol, "signature", f"Credential should be scoped to correct service: '{service}'. ")
    if not REGION.match(region):
        raise refuse(json_protocol, "signature", "Credential should be scoped to a valid region. ")
    if date != amz_date[:8]:
        raise refuse(
            json_protocol,
            "signature",
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
            f"'{date}' != '{amz_date[:8]}', from '{amz_date}'.",
        )
    signed_headers = fields["SignedHeaders"].split(";")
    if "host" not in signed_headers:
        raise refuse(json_protocol, "signature", "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
    canonical_headers = ""
    for name in signed_headers:
        value = header(environ, name)
        if value is None:
            raise refuse(json_protocol, "signature", MISMATCH)
        canonical_headers += f"{name}:{' '.join(value.split())}\n"
    raw_path = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO") or "/").split("?")[0]
    payload_hash = header(environ, "x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
    canonical_request = "\n".join(
        [
            environ.get("REQUEST_METHOD", "GET"),
            quote(raw_path, safe="/-_.~"),
            canonical_query(environ.get("QUERY_STRING", "")),
            canonical_headers,
            fields["SignedHeaders"],
            payload_hash,
        ]
    )
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            f"{date}/{region}/{scoped_service}/aws4_request",
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    signing_key = ("AWS4" + key["secret"]).encode()
    for part in (date, region, scoped_service, "aws4_request"):
        signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(signing_key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields["Signature"]):
        raise refuse(json_protocol, "signature", MISMATCH)
    now = datetime.now(timezone.utc)
    fmt = "%Y%m%dT%H%M%SZ"
    if signed_at < now - timedelta(seconds=SKEW):
        early = (now - timedelta(seconds=SKEW)).strftime(fmt)
        raise refuse(
            json_protocol,
            "signature",
            f"Signature expired: {amz_date} is now earlier than {early} ({now.strftime(fmt)} - 5 min.)",
        )
    if signed_at > now + timedelta(seconds=SKEW):
        late = (now + timedelta(seconds=SKEW)).strftime(fmt)
        raise refuse(
            json_protocol,
            "signature",
            f"Signature not yet current: {amz_date} is still later than {late} ({now.strftime(fmt)} + 5 min.)",
        )
    return access_key_id, key


def aws_error(environ, code, status, message=None):
    message = message or f"injected by the regcred test emulator: {code}"
    if environ.get("HTTP_X_AMZ_TARGET"):
        body = json.dumps({"__type": code, "message": message})
        return Response(body, status, content_type="application/x-amz-json-1.1", headers={"x-amzn-ErrorType": code})
    body = (
        "<ErrorResponse><Error><Type>Sender</Type>"
        f"<Code>{code}</Code><Message>{escape(message)}</Message></Error>"
        "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    )
    return Response(body, status, content_type="text/xml")


def sts_answer(action, result):
    """An STS query-protocol answer: <ActionResponse><ActionResult>result</ActionResult>...."""
    ns = "https://sts.amazonaws.com/doc/2011-06-15/"
    body = (
        f'<{action}Response xmlns="{ns}"><{action}Result>{result}</{action}Result>'
        f"<ResponseMetadata><RequestId>{secrets.token_hex(16)}</RequestId></ResponseMetadata></{action}Response>"
    )
    return Response(body, 200, content_type="text/xml")


def credentials_xml(creds, role_arn, session_name):
    account, role_name = ROLE_ARN.match(role_arn).groups()
    tags = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in creds.items())
    role_id = "AROA" + hashlib.sha256(role_arn.encode()).hexdigest()[:17].upper()
    return (
        f"<Credentials>{tags}</Credentials><AssumedRoleUser><AssumedRoleId>{role_id}:{escape(session_name)}"
        f"</AssumedRoleId><Arn>arn:aws:sts::{account}:assumed-role/{role_name}/{escape(session_name)}</Arn>"
        "</AssumedRoleUser>"
    )


def role_session(form, record):
    """The RoleArn and RoleSessionName of an AssumeRole*, recorded and checked as STS does."""
    role_arn, session_name = form.get("RoleArn", ""), form.get("RoleSessionName", "")
    record["role_arn"], record["session_name"] = role_arn, session_name
    if not ROLE_ARN.match(role_arn):
        raise Refused("ValidationError", 400, f"{role_arn!r} is invalid: roleArn must be an IAM role ARN")
    if not SESSION_NAME.match(session_name):
        raise Refused(
            "ValidationError",
            400,
            "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: [\\w+=,.@-]*",
        )
    return role_arn, session_name


def lifetime(form):
    """STS's lifetime for these credentials: DurationSeconds (900 s to 12 h, default 1 h), at
    most the emulator's STS_LIFETIME."""
    wanted = form.get("DurationSeconds") or "3600"
    if not wanted.isdigit() or not 900 <= int(wanted) <= 43200:
        raise Refused("ValidationError", 400, "DurationSeconds must be between 900 and 43200")
    return min(int(wanted), STS_LIFETIME[0])


def assume_role(form, caller, record):
    """STS AssumeRole: the caller's principal must be trusted by the role, and the ExternalId
    must match when the role's trust policy requires one."""
    role_arn, session_name = role_session(form, record)
    record["external_id"] = form.get("ExternalId")
    with LOCK:
        role = ROLES.get(role_arn)
    denied = Refused(
        "AccessDenied", 403, f"User: {caller['arn']} is not authorized to perform: sts:AssumeRole on resource: {role_arn}"
    )
    if role is None or caller["arn"] not in role["principals"]:
        raise denied
    if role["external_id"] is not None and form.get("ExternalId") != role["external_id"]:
        raise denied
    account = ROLE_ARN.match(role_arn).group(1)
    arn = f"arn:aws:sts::{account}:assumed-role/{ROLE_ARN.match(role_arn).group(2)}/{session_name}"
    creds = mint(key_id("ASIA"), arn, account, lifetime(form))
    return sts_answer("AssumeRole", credentials_xml(creds, role_arn, session_name) + "<PackedPolicySize>0</PackedPolicySize>")


def assume_role_with_web_identity(form, record):
    """STS AssumeRoleWithWebIdentity: the token must verify against an OIDC provider's keys
    (issuer, audience sts.amazonaws.com, expiry), and the role must trust that issuer for the
    token's sub (the StringEquals condition on <issuer>:sub of an IAM OIDC trust policy)."""
    role_arn, session_name = role_session(form, record)
    token = form.get("WebIdentityToken", "")
    try:
        _, unverified = oidc.unverified(token)
    except oidc.Rejected:
        raise Refused("InvalidIdentityToken", 400, "The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)")
    issuer = unverified.get("iss")
    with LOCK:
        jwks = PROVIDERS.get(issuer)
        role = ROLES.get(role_arn)
    if jwks is None:
        raise Refused("InvalidIdentityToken", 400, f"No OpenIDConnect provider found in your account for {issuer}")
    try:
        claims = oidc.verify(token, issuer, jwks, [STS_AUDIENCE], 0)
    except oidc.Rejected as e:
        if e.kind == "expired":
            raise Refused(
                "ExpiredTokenException",
                400,
                f"Token expired: current date/time {int(time.time())} must be before the expiration date/time "
                f"{unverified.get('exp')}",
            )
        if e.kind == "audience":
            raise Refused("InvalidIdentityToken", 400, "Incorrect token audience")
        raise Refused("InvalidIdentityToken", 400, f"Couldn't verify the token: {e.kind}")
    record["sub"] = claims["sub"]
    trusted = role is not None and any(
        w["issuer"] == issuer and claims["sub"] in w["subjects"] for w in role["web_identity"]
    )
    if not trusted:
        raise Refused("AccessDenied", 403, "Not authorized to perform sts:AssumeRoleWithWebIdentity")
    account, role_name = ROLE_ARN.match(role_arn).groups()
    arn = f"arn:aws:sts::{account}:assumed-role/{role_name}/{session_name}"
    creds = mint(key_id("ASIA"), arn, account, lifetime(form))
    provider = escape(issuer.removeprefix("https://"))
    extra = (
        f"<SubjectFromWebIdentityToken>{escape(claims['sub'])}</SubjectFromWebIdentityToken>"
        f"<Audience>{STS_AUDIENCE}</Audience><Provider>{provider}</Provider>"
    )
    return sts_answer("AssumeRoleWithWebIdentity", credentials_xml(creds, role_arn, session_name) + extra)


def get_caller_identity(caller):
    account = caller["account"]
    user_id = hashlib.sha256(caller["arn"].encode()).hexdigest()[:21].upper()
    result = f"<UserId>{user_id}</UserId><Account>{account}</Account><Arn>{escape(caller['arn'])}</Arn>"
    return sts_answer("GetCallerIdentity", result)


class Wrapper:
    """WSGI middleware in front of moto: control endpoints, counts, faults, calls."""

    def __init__(self):
        self.moto = DomainDispatcherApplication(create_backend_app)

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "") == "/_emulator/registry-login":
            return self.registry_login(Request(environ))(environ, start_response)
        if environ.get("PATH_INFO", "").startswith("/_emulator/"):
            return self.control(Request(environ))(environ, start_response)
        # Read the body once, and hand moto a fresh copy of it.
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        service, action, form = identify(environ, body)
        key = f"{service}:{action}"
        count(key)
        record = {
            "action": key,
            "access_key_id": None,  # that signed it (also when refused); null if unsigned
            "caller": None,  # its principal's ARN, once the signature checked out
            "time": time.time(),
            "status": None,
            "error": None,
            "role_arn": None,
            "external_id": None,
            "session_name": None,
            "sub": None,  # AssumeRoleWithWebIdentity: the verified token's subject
            "message": None,  # the error message, when refused
        }
        claimed = re.search(r"Credential=([^/,\s]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        record["access_key_id"] = claimed.group(1) if claimed else None

        def answer(response, error=None):
            record["status"], record["error"] = response.status_code, error
            with LOCK:  # only now, so /_emulator/calls never sees a half-filled record
                CALLS.append(record)
            return response(environ, start_response)

        with LOCK:
            fault = FAULTS.get(key)
        if fault:
            return answer(aws_error(environ, *fault), fault[0])
        json_protocol = bool(environ.get("HTTP_X_AMZ_TARGET"))
        try:
            caller = None
            # Only AssumeRoleWithWebIdentity goes unsigned (its token is the credential).
            if key != "sts:AssumeRoleWithWebIdentity" or environ.get("HTTP_AUTHORIZATION"):
                _, caller = authenticate(environ, body, service, json_protocol)
                record["caller"] = caller["arn"]
            if key == "sts:AssumeRole":
                return answer(assume_role(form, caller, record))
            if key == "sts:AssumeRoleWithWebIdentity":
                return answer(assume_role_with_web_identity(form, record))
            if key == "sts:GetCallerIdentity":
                return answer(get_caller_identity(caller))
        except Refused as e:
            record["message"] = e.message
            return answer(aws_error(environ, e.code, e.status, e.message), e.code)

        def recording_start_response(status, headers, exc_info=None):
            record["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        REQUEST.record = record  # completed by the GetAuthorizationToken patch
        REQUEST.account = caller["account"]
        try:
            return self.moto(environ, recording_start_response)
        finally:
            REQUEST.record = None
            REQUEST.account = None
            with LOCK:  # only now, so /_emulator/calls never sees a half-filled record
                CALLS.append(record)

    def registry_login(self, req):
        """Whether an ECR registry lets a request in, as ECR's registry API decides it; for the
        front that stands in for a registry (tests/aws/ecr_registry.py), not for clients. In:
        the request's Authorization header (or null), method and path, and the registry's
        account, region and the accounts whose principals it lets pull and push (its own, plus
        those a repository policy names). Out: the HTTP status and ECR's message.

        ECR takes Basic AWS:<password> with a password GetAuthorizationToken issued: an
        expired one is denied (403 DENIED, "Your authorization token has expired.
        Reauthenticate and try again."); a live one of a principal whose account the registry
        does not let in passes GET /v2/ (it authenticates) but is denied the repository (403
        DENIED, "User: ... is not authorized to perform: ecr:... because no resource-based
        policy allows the ecr:... action"); an unknown password, another user name, another
        scheme or none gets the Basic challenge (401, "Not Authorized"). Recorded in CALLS as
        registry:Login with registry, method, path, status, error, caller and the expiresAt of
        the password presented (null if unknown)."""
        body = req.get_json(silent=True) or {}
        registry, region = str(body.get("registry") or ""), str(body.get("region") or "")
        trusted = {registry, *(str(a) for a in body.get("trusted") or [])}
        method, path = str(body.get("method") or ""), str(body.get("path") or "")
        count("registry:Login")
        record = {
            "action": "registry:Login",
            "access_key_id": None,
            "time": time.time(),
            "registry": registry,
            "method": method,
            "path": path,
            "status": None,
            "error": None,
            "caller": None,
            "expiresAt": None,
        }
        user, password = None, None
        scheme, _, credentials = str(body.get("authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                pass
        with LOCK:
            issued = ISSUED.get(password) if user == "AWS" and password else None
        status, error, message = 200, None, None
        if issued is None:
            status, message = 401, "Not Authorized"
            if password:
                error = "unknown token" if user == "AWS" else "user name is not AWS"
            else:
                error = "no Basic credentials"
        else:
            expires_at, caller, account = issued
            record["expiresAt"], record["caller"] = expires_at, caller
            repository = re.match(r"^/v2/(.+)/(manifests|blobs|tags)/", path)
            if expires_at <= aws_time():
                status, error = 403, "expired token"
                message = "Your authorization token has expired. Reauthenticate and try again."
            elif account not in trusted and repository:
                name, kind = repository.group(1), repository.group(2)
                reading = method in ("GET", "HEAD")
                if kind == "blobs":
                    action = "ecr:GetDownloadUrlForLayer" if reading else "ecr:InitiateLayerUpload"
                elif kind == "tags":
                    action = "ecr:ListImages"
                else:
                    action = "ecr:BatchGetImage" if reading else "ecr:PutImage"
                status, error = 403, "account not allowed"
                message = (
                    f"User: {caller} is not authorized to perform: {action} on resource: "
                    f"arn:aws:ecr:{region}:{registry}:repository/{name} because no resource-based policy "
                    f"allows the {action} action"
                )
        record["status"], record["error"] = status, error
        with LOCK:
            CALLS.append(record)
        return Response(json.dumps({"status": status, "message": message}), content_type="application/json")

    def control(self, req):
        arg = req.args.get
        body = req.get_json(silent=True) or {}
        with LOCK:
            if req.path == "/_emulator/counts":
                return Response(json.dumps(COUNTS), content_type="application/json")
            if req.path == "/_emulator/calls":
                return Response(json.dumps(CALLS), content_type="application/json")
            if req.method != "POST":
                return Response("not found\n", 404)
            try:
                if req.path == "/_emulator/reset":  # the records, not faults, lifetimes, keys or roles
                    COUNTS.clear()
                    CALLS.clear()
                elif req.path == "/_emulator/token-lifetime":
                    LIFETIME[0] = int(arg("seconds"))
                elif req.path == "/_emulator/clock-offset":
                    CLOCK_OFFSET[0] = int(arg("seconds"))
                elif req.path == "/_emulator/sts-lifetime":
                    STS_LIFETIME[0] = int(arg("seconds"))
                elif req.path == "/_emulator/fail":
                    if arg("code"):
                        FAULTS[arg("action")] = (arg("code"), int(arg("status") or 400))
                    else:
                        FAULTS.pop(arg("action"), None)
                elif req.path == "/_emulator/access-keys":  # IAM CreateAccessKey of a user
                    account = body.get("account") or ACCOUNT
                    arn = f"arn:aws:iam::{account}:user/{body['user']}"
                    KEYS[body["access_key_id"]] = {
                        "secret": body["secret_access_key"],
                        "arn": arn,
                        "account": account,
                        "token": None,
                        "expires": None,
                    }
                    return Response(json.dumps({"arn": arn}), content_type="application/json")
                elif req.path == "/_emulator/roles":  # IAM CreateRole with its trust policy
                    if not ROLE_ARN.match(body["arn"]):
                        raise ValueError(f"not a role ARN: {body['arn']}")
                    ROLES[body["arn"]] = {
                        "principals": list(body.get("principals") or []),
                        "external_id": body.get("external_id"),
                        "web_identity": [
                            {"issuer": w["issuer"], "subjects": list(w["subjects"])}
                            for w in body.get("web_identity") or []
                        ],
                    }
                elif req.path == "/_emulator/oidc-providers":  # IAM CreateOpenIDConnectProvider
                    PROVIDERS[body["issuer"]] = jwt.PyJWKSet.from_dict(body["jwks"])
                else:
                    return Response("not found\n", 404)
            except (KeyError, ValueError, TypeError, jwt.PyJWTError) as e:
                return Response(f"bad request: {e!r}\n", 400)
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
            arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/{self.role}/i-0123456789abcdef0"
            keys = mint(key_id("AKIAIMDS"), arn, ACCOUNT, 3600)
            keys["Token"] = keys.pop("SessionToken")
            body = {"Code": "Success", "LastUpdated": iso8601(0), "Type": "AWS-HMAC", **keys}
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
        arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/regcred-pod-identity-role/eks-regcred-pod"
        body = mint(key_id("AKIAPODID"), arn, ACCOUNT, 3600)
        body["Token"] = body.pop("SessionToken")
        body["AccountId"] = ACCOUNT
        return Response(json.dumps(body), content_type="application/json")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--imds-port", type=int, required=True)
    p.add_argument("--pod-identity-port", type=int, required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--token-lifetime", type=int, default=43200, help="seconds (default: 12 h, as ECR)")
    p.add_argument("--sts-lifetime", type=int, default=3600, help="seconds STS credentials live at most (default: 1 h)")
    p.add_argument("--pod-identity-token", default="regcred-test-pod-identity-token")
    p.add_argument("--region", default="us-east-1", help="what IMDS reports as the instance's region")
    args = p.parse_args()
    LIFETIME[0] = args.token_lifetime
    STS_LIFETIME[0] = args.sts_lifetime

    apps = [
        (args.port, Wrapper()),
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
