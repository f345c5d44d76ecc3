"""Verifying a Kubernetes ServiceAccount token (an OIDC ID token) as a cloud's token exchange
does: against the issuer's published JWKS, its issuer, audience and expiry. Shared by the
AWS emulator (STS AssumeRoleWithWebIdentity) and the Google emulator (STS token exchange);
each maps a Rejected's kind to its own cloud's error."""

import jwt


class Rejected(Exception):
    """Why a token was refused. kind: malformed, issuer, key, signature, audience, expired,
    invalid; detail: the library's words (never the token)."""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def unverified(token):
    """(header, claims) of a JWT, unverified: to find the issuer and the key id to check it with."""
    try:
        return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise Rejected("malformed", str(e))


def verify(token, issuer, jwks, audiences, leeway):
    """The claims of `token` if `jwks` (a jwt.PyJWKSet) holds the key its kid names and that key
    signed it, and iss is `issuer`, aud one of `audiences`, exp (with `leeway` seconds) not
    past; iss, sub, aud, exp and iat are required. Else Rejected."""
    header, claims = unverified(token)
    if claims.get("iss") != issuer:
        raise Rejected("issuer", f"{claims.get('iss')!r} is not {issuer!r}")
    try:
        key = jwks[header.get("kid")]
    except KeyError:
        raise Rejected("key", f"no key {header.get('kid')!r} in the issuer's JWKS")
    try:
        return jwt.decode(
            token,
            key.key,
            # Only the key's own algorithm: an RS256 token under an EC key's kid is a forgery.
            algorithms=[key.algorithm_name],
            audience=audiences,
            issuer=issuer,
            leeway=leeway,
            options={"require": ["iss", "sub", "aud", "exp", "iat"]},
        )
    except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError) as e:
        raise Rejected("signature", str(e))
    except jwt.InvalidAudienceError as e:
        raise Rejected("audience", str(e))
    except jwt.ExpiredSignatureError as e:
        raise Rejected("expired", str(e))
    except jwt.PyJWTError as e:
        raise Rejected("invalid", str(e))
