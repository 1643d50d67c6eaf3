"""Credentials never travel in settings: find them in a run's settings before any work starts.

Settings are saved whole in the run directory (run.json, checkpoints' meta.json), logged to MLflow
(params, config.json, tags) and, for a submitted job, shown in the Ray dashboard (the entrypoint).
So a credential in them would be copied everywhere. Storage, tracking and Ray credentials come only
from the environment or the standard credential chains (the `HINTS` below say which variables);
`check` refuses settings that hold one, naming the dotted key, what was found (masked) and where
the credential goes instead:

- a URI (any string value with `://`: run_dir, data, tracking_uri, ...) with a password in its user
  info (`s3://KEY:SECRET@bucket/run`, `http://user:pass@host`), or with a query parameter named like a
  credential (`access_key`, `secret_key`, `session_token`, `X-Amz-Signature`, `sig`, ...);
- a key named like a credential (`access_key`, `api_token`, `password`, `client_secret`, ...) at any
  depth, domain_config included, holding a non-empty value (not a flag: booleans pass);
- a string that looks like an AWS access key id (AKIA or ASIA and 16 upper-case letters or digits).

Names are matched by their last words (`api_token` is a credential, `token_dim` and `tokens` are not).
`redact` masks the same credentials in a text that is logged anyway (a tag holding a path).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote_plus, urlsplit

MASK = "***"
AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
# The last words of a settings key or query parameter that names a credential.
SECRET_ENDINGS = (
    ("password",), ("passwd",), ("pwd",), ("passphrase",), ("secret",), ("token",), ("credential",),
    ("credentials",), ("apikey",), ("signature",), ("access", "key"), ("access", "key", "id"), ("secret", "key"),
    ("api", "key"), ("private", "key"), ("account", "key"), ("connection", "string"),
)
# Query parameters that are credentials by their whole name (fsspec's `key`, Azure SAS's `sig`).
SECRET_QUERY_NAMES = {"key", "sig", "pass"}

# Where each kind of credential goes instead.
HINTS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment, or the standard AWS "
          "credential chain (~/.aws/credentials, an instance or pod role)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS in the environment, or gcloud's application-default credentials",
    "tracking": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment",
    "ray": "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH in the environment (default ~/.ray/auth_token)",
}
HINTS["any"] = ("the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE (or the standard AWS "
                "chain) for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://, MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN for tracking, RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH "
                "for Ray")
_SCHEME_HINTS = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "ray": "ray"}
_KEY_HINTS = {"tracking_uri": "tracking", "MLFLOW_TRACKING_URI": "tracking", "address": "ray"}


class SecretInConfig(ValueError):
    """Settings hold a credential; the message names the key, never the value. Nothing has run."""

    def __init__(self, finding: Finding, name: Callable[[str], str] = str) -> None:
        super().__init__(finding.describe(name))
        self.finding = finding


@dataclass(frozen=True)
class Finding:
    """A credential found in settings: its dotted key, what it is (masked), and where it belongs."""

    key: str  # dotted settings key: run_dir, domain_config.api_token, placement.0.island
    what: str  # what was found, with every secret masked
    hint: str  # a key of HINTS

    def describe(self, name: Callable[[str], str] = str) -> str:
        """One line; `name` turns the dotted key into its origin (`run.yaml: run_dir`, `--run-dir`)."""
        return (f"{name(self.key)}: {self.what}; settings are saved with the run and logged, so credentials never "
                f"go there; use {HINTS[self.hint]}")


def check(settings: Mapping[str, Any], name: Callable[[str], str] = str) -> None:
    """Raise SecretInConfig at the first credential in `settings` (see the module docstring)."""
    finding = find(settings)
    if finding is not None:
        raise SecretInConfig(finding, name)


def check_fit(config: Mapping[str, Any], run_dir: str, launch: Any = None) -> None:
    """`check` of a fit's settings: the run config (as JSON), its run directory and its launch (a dataclass)."""
    launch_settings = asdict(launch) if is_dataclass(launch) and not isinstance(launch, type) else {}
    check({"run_dir": run_dir, **config, **launch_settings})


def check_uri(uri: str, key: str) -> None:
    """Raise SecretInConfig when `uri` carries a credential; `key` names where it came from."""
    finding = _value_finding(key, uri)
    if finding is not None:
        raise SecretInConfig(finding)


def find(settings: Mapping[str, Any], prefix: str = "") -> Finding | None:
    """The first credential in `settings` (nested mappings and lists, keys dotted), or None."""
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        found = _key_finding(dotted, str(key), value) or _nested_finding(dotted, value)
        if found is not None:
            return found
    return None


def _nested_finding(dotted: str, value: Any) -> Finding | None:
    if isinstance(value, Mapping):
        return find(value, f"{dotted}.")
    if isinstance(value, (list, tuple)):
        return find({str(i): item for i, item in enumerate(value)}, f"{dotted}.")
    return _value_finding(dotted, value) if isinstance(value, str) else None


def _key_finding(dotted: str, key: str, value: Any) -> Finding | None:
    """A key named like a credential that holds something (None, "", empty collections and booleans do not)."""
    if not is_secret_name(key) or isinstance(value, bool) or value is None or value in ("", [], {}):
        return None
    return Finding(dotted, f"a setting named like a credential holds a value ({MASK})", _hint(dotted, value))


def _value_finding(dotted: str, value: str) -> Finding | None:
    """A credential inside one string: a URI's password or credential query parameter, or an AWS key id."""
    if "://" in value:
        parts = _split(value)
        if parts is not None and parts.password:
            return Finding(dotted, f"the URI {redact(value)} holds a password in its user info", _hint(dotted, value))
        named = [k for k, v in _query(parts) if v and _is_secret_parameter(k)]
        if named:
            return Finding(dotted, f"the URI {redact(value)} holds the credential parameter(s) {', '.join(named)}",
                           _hint(dotted, value))
    if AWS_KEY_ID.search(value):
        return Finding(dotted, f"the value holds what looks like an AWS access key id ({redact(value)})", "s3")
    return None


def is_secret_name(name: str) -> bool:
    """Whether a settings key or query parameter names a credential, by its last words
    (`aws_secret_access_key`, `apiToken`, `X-Amz-Signature`: yes; `token_dim`, `tokens`, `key`: no)."""
    words = tuple(re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()))
    words = tuple(word for word in words if word)
    return any(words[-len(ending):] == ending for ending in SECRET_ENDINGS)


def _is_secret_parameter(name: str) -> bool:
    return is_secret_name(name) or name.lower() in SECRET_QUERY_NAMES


def redact(text: str) -> str:
    """`text` with every credential masked: a URI's user info and credential query values, AWS key ids.
    Text without a credential comes back unchanged."""
    text = AWS_KEY_ID.sub(lambda found: found.group()[:4] + MASK, text)
    parts = _split(text) if "://" in text else None
    if parts is None or not (parts.password or any(v and _is_secret_parameter(k) for k, v in _query(parts))):
        return text
    if parts.password:
        parts = parts._replace(netloc=f"{MASK}@{parts.netloc.rpartition('@')[2]}")
    fields = [field.partition("=") for field in parts.query.split("&")]
    query = "&".join(f"{k}{sep}{MASK if v and _is_secret_parameter(unquote_plus(k)) else v}" for k, sep, v in fields)
    return parts._replace(query=query).geturl()


def _split(uri: str) -> SplitResult | None:
    """`urlsplit(uri)`, or None where it cannot be parsed (an unbalanced IPv6 bracket)."""
    try:
        parts = urlsplit(uri)
        parts.password  # noqa: B018 -- parsing the user info may raise too
    except ValueError:
        return None
    return parts


def _query(parts: SplitResult | None) -> list[tuple[str, str]]:
    return parse_qsl(parts.query, keep_blank_values=True) if parts is not None else []


def _hint(dotted: str, value: Any) -> str:
    """Which of HINTS applies: by the URI's scheme, else by the key (tracking_uri, address), else all."""
    if isinstance(value, str) and "://" in value:
        scheme = value.partition("://")[0].lower()
        if scheme in _SCHEME_HINTS:
            return _SCHEME_HINTS[scheme]
    last = dotted.rsplit(".", 1)[-1]
    if last in _KEY_HINTS:
        return _KEY_HINTS[last]
    return "s3" if last.lower().startswith("aws") else "any"
