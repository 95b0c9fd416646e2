"""Database URLs: one accepted spelling in, credentials never out.

URLs are parsed with SQLAlchemy's `make_url`; masking replaces the parsed password
field, never the password's text wherever it occurs (that garbles messages and gives
short passwords away). A URL that does not parse cleanly is refused, and the refusal
never repeats the URL: it may hold a password.
"""

from __future__ import annotations

import re

from sqlalchemy.engine import URL, make_url

from outbox.errors import ConfigError

ENCODE_HINT = ("percent-encode special characters in the user name and password "
               "('@' as %40, ':' as %3A, '/' as %2F, '%' as %25)")


# libpq's multi-host spelling: scheme://[userinfo@]host:port,host:port[/db][?query]
_MULTI_HOST = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/?#]*@)?"
                         r"(?P<hosts>[^/?#@]*,[^/?#@]*)(?P<path>/[^?#]*)?(?:\?(?P<query>.*))?$")


def _sqlalchemy_hosts(url: str) -> str:
    """libpq's `user@a:5432,b:5433/db` as SQLAlchemy spells it, `user@/db?host=a:5432&host=
    b:5433` (make_url reads no host list in the authority); other URLs as they are."""
    m = _MULTI_HOST.match(url) if isinstance(url, str) else None
    if not m:
        return url
    hosts = "&".join(f"host={h}" for h in m["hosts"].split(",") if h)
    query = f"{hosts}&{m['query']}" if m["query"] else hosts
    return f"{m['scheme']}{m['user'] or ''}{m['path'] or '/'}?{query}"


def parse(url: str) -> URL:
    """The parsed URL, or a ConfigError saying what is wrong (without the URL's text).

    Several hosts (for a primary and its standbys, with `target_session_attrs=read-write`)
    may be given either way libpq or SQLAlchemy spells them (see `libpq_url`)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("the database URL is empty")
    try:
        u = make_url(_sqlalchemy_hosts(url))
    except Exception:  # ArgumentError, or ValueError on a bad port: both may quote it
        raise ConfigError(
            "cannot parse the database URL (not shown: it may hold a password); expected "
            f"postgresql://user:password@host:port/database; {ENCODE_HINT}") from None
    if "@" in (u.host or ""):
        # make_url ends the password at the first '@': the rest would be taken as a host.
        raise ConfigError(
            "the database URL has more than one '@' before its host (not shown: it may "
            f"hold a password); {ENCODE_HINT}")
    return u


def sqlalchemy_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` as psycopg 3 URLs for SQLAlchemy.

    Raises ConfigError for a URL that does not parse cleanly (see `parse`).
    """
    parse(url)
    return _with_driver(_sqlalchemy_hosts(url))


def _with_driver(url: str) -> str:
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def libpq_url(url: str) -> str:
    """The same URL as psycopg/libpq takes it (no SQLAlchemy driver suffix).

    SQLAlchemy's host list (`?host=a:5432&host=b:5433`) becomes libpq's (`@a:5432,b:5433`):
    libpq would keep only the last of repeated `host` parameters, and reads no port in
    one. libpq then tries the hosts in order, keeping the first that suits
    `target_session_attrs`."""
    u = parse(url).set(drivername="postgresql")
    hosts = u.query.get("host")
    if not hosts or (isinstance(hosts, str) and (hosts.startswith("/") or ":" not in hosts)):
        return u.render_as_string(hide_password=False)  # one host (or socket directory)
    listed = ",".join([hosts] if isinstance(hosts, str) else hosts)
    rest = u.difference_update_query(["host"]).render_as_string(hide_password=False)
    scheme, _, tail = rest.partition("://")
    user, at, path = tail.rpartition("@") if "@" in tail.split("/", 1)[0] else ("", "", tail)
    return f"{scheme}://{user}{at}{listed}{path}"


def require_postgresql(url: str, what: str) -> URL:
    """The parsed URL if it names PostgreSQL; else a ConfigError naming `what` needs it."""
    u = parse(url)
    if u.get_backend_name() != "postgresql":
        raise ConfigError(f"{what} needs PostgreSQL (postgresql://user:password@host/db); "
                          f"got a {u.get_backend_name()} URL")
    return u


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for logs and error messages."""
    try:
        return parse(url).render_as_string(hide_password=True)
    except ConfigError:
        return "<unusable database URL, not shown>"


# URLs with credentials (an '@' after the scheme), and libpq's password=... in a DSN.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]*@[^\s\"'<>]*")
_PASSWORD_IN_DSN = re.compile(r"\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'\"]+)",
                              re.IGNORECASE)


def mask_text(text: str) -> str:
    """A message with every URL or key=value DSN in it masked by parsing that URL or DSN."""
    text = _URL_IN_TEXT.sub(lambda m: mask(m.group(0)), text)
    return _PASSWORD_IN_DSN.sub(lambda m: m.group(1) + "***", text)
