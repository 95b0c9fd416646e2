"""Database URLs: one accepted spelling in, credentials never out."""

from __future__ import annotations

from sqlalchemy.engine import make_url


def sqlalchemy_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` as psycopg 3 URLs for SQLAlchemy."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def libpq_url(url: str) -> str:
    """The same URL as psycopg/libpq takes it (no SQLAlchemy driver suffix)."""
    u = make_url(sqlalchemy_url(url))
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"
