"""Credentials never leave the environment: detection and redaction of secrets in URIs, keys and free text.

medvl's policy (README, "Faults, security and bad input"): passwords and tokens come from the environment only
(`MLFLOW_TRACKING_URI`, `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` / `MLFLOW_TRACKING_TOKEN`,
`RAY_AUTH_TOKEN`, cloud credentials). A recipe value that carries one is an error (`secret_in_recipe`), and whatever
medvl writes (MLflow params, tags and artifacts, `recipe.yaml`, printed hints and error messages) goes through
`redact_uri` / `redact_value` / `redact_text` first.

    >>> redact_uri("http://alice:s3cret@mlflow.internal:5000/")
    'http://alice:***@mlflow.internal:5000/'

No medvl imports: the config layer (the lowest one) uses it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_WORDS = {"password", "passwd", "pwd", "secret", "credential", "credentials", "apikey"}
_SECRET_PAIRS = ("api_key", "api-key", "access_key", "access-key", "secret_key", "private_key", "client_secret",
                 "session_key", "auth_key")
# `<prefix>_token` names a credential for these prefixes (not `pad_token`, `mask_token`, `max_tokens`)
_TOKEN_PREFIXES = {"", "auth", "access", "api", "hf", "bearer", "refresh", "session", "github", "gh", "wandb",
                   "mlflow", "ray", "tracking", "id", "security", "oauth"}
# scheme://user:password@host in free text (error messages print request URLs with their userinfo)
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/\s:@]*):(?P<pw>[^@\s/]+)@")


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key or variable name names a credential: `hf_token`, `db.password`, `AWS_SECRET_ACCESS_KEY`,
    `api_key`, `RAY_AUTH_TOKEN` (not `max_tokens`, `pad_token` or `tokenizer`)."""
    last = key.rsplit(".", 1)[-1].lower().replace("-", "_")
    if last in ("pwd", "oldpwd"):  # the shell's working-directory variables, not passwords
        return False
    parts = last.split("_")
    if set(parts) & _SECRET_WORDS or any(p.replace("-", "_") in last for p in _SECRET_PAIRS):
        return True
    if parts[-1] == "token":
        return "_".join(parts[:-1]) in _TOKEN_PREFIXES or parts[-2] in _TOKEN_PREFIXES
    return False


def uri_secret(uri: Any) -> Optional[str]:
    """The password (or secret query value) a URI carries, or None."""
    if not isinstance(uri, str) or "://" not in uri:
        return None
    try:
        u = urlsplit(uri)
        if u.password:
            return u.password
        for k, v in parse_qsl(u.query, keep_blank_values=False):
            if is_secret_key(k) and v:
                return v
    except ValueError:
        return None
    return None


def redact_uri(uri: Any) -> Any:
    """`uri` with its password and secret query values replaced by ***; anything else unchanged."""
    if not isinstance(uri, str) or uri_secret(uri) is None:
        return uri
    u = urlsplit(uri)
    netloc = u.netloc
    if u.password:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}"
    query = u.query
    if query:
        pairs = [(k, MASK if is_secret_key(k) and v else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


def redact_value(key: str, value: Any) -> Any:
    """A config/param value as it may be logged: masked when its key names a credential, URIs redacted."""
    if is_secret_key(key) and value not in (None, "", [], {}):
        return MASK
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, list):
        return [redact_value(key, v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    return value


def redact_mapping(d: dict) -> dict:
    """A (nested) dict with every value passed through `redact_value` under its own key."""
    return {k: (redact_mapping(v) if isinstance(v, dict) else redact_value(str(k), v)) for k, v in d.items()}


def environment_secrets(environ: Optional[dict] = None) -> list[str]:
    """Secret values present in the environment (values of credential-named variables, passwords inside URIs)."""
    env = os.environ if environ is None else environ
    found = []
    for k, v in env.items():
        if not v:
            continue
        if is_secret_key(k) and len(v) >= 4:
            found.append(v)
        pw = uri_secret(v)
        if pw and len(pw) >= 4:
            found.append(pw)
    return sorted(set(found), key=len, reverse=True)


def redact_text(text: Any, extra: Iterable[str] = ()) -> str:
    """Free text (an exception message, a log line) without URI userinfo passwords and without any secret value
    that the environment holds (so an MLflow error quoting its request URL prints no password)."""
    s = str(text)
    s = _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", s)
    for secret in [*environment_secrets(), *extra]:
        if secret and secret in s:
            s = s.replace(secret, MASK)
    return s


def strip_credentials(uri: str) -> str:
    """`uri` without userinfo and without secret query values (what may travel where others can read it)."""
    if uri_secret(uri) is None:
        return uri
    u = urlsplit(uri)
    host = u.netloc.rsplit("@", 1)[-1]
    pairs = [(k, v) for k, v in parse_qsl(u.query, keep_blank_values=True) if not is_secret_key(k)]
    return urlunsplit((u.scheme, host, u.path, urlencode(pairs), u.fragment))


def default_ray_auth_mode(environ: Optional[dict] = None) -> str:
    """RAY_AUTH_MODE when the user set none: `token` if a Ray token is in the environment (RAY_AUTH_TOKEN /
    RAY_AUTH_TOKEN_PATH), else `disabled` (Ray >= 2.59 would otherwise turn token auth on by itself whenever an
    earlier `ray.init()` left ~/.ray/auth_token behind)."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE"):
        return env["RAY_AUTH_MODE"]
    return "token" if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") else "disabled"


def secret_in_recipe(flat: dict[str, Any]) -> Optional[str]:
    """The first dotted recipe key whose value is a credential (a URI with a password, or a non-empty value of a
    credential-named key), or None. Recipes are logged as MLflow params and copied into every run: credentials
    come from the environment only."""
    for key, value in flat.items():
        if is_secret_key(key) and value not in (None, "", [], {}):
            return key
        values = value if isinstance(value, list) else [value]
        if any(uri_secret(v) for v in values):
            return key
    return None
