"""Database URLs are parsed, masked by their password field, and refused when ambiguous."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from outbox.dburl import libpq_url, mask, mask_text, parse, require_postgresql, sqlalchemy_url
from outbox.errors import ConfigError


def test_mask_hides_only_the_password_field() -> None:
    # The password equals the user name and the prefix: only the password field goes.
    assert mask("postgresql://outbox:outbox@db:5432/outbox") == \
        "postgresql://outbox:***@db:5432/outbox"
    assert mask("postgresql://app:p%40ss%3Aw%2Frd@db/shop") == "postgresql://app:***@db/shop"
    assert mask("postgresql://app@db/shop") == "postgresql://app@db/shop"


@pytest.mark.parametrize("url", [
    "postgresql://app:p@ss@db.example/shop",          # tail "ss@db.example" taken as a host
    "postgresql://app:p@ss:wxyz@db.example:5432/shop",  # "wxyz@db..." taken as a port
    "postgresql://app:s3cret@db:notaport/shop",
    "db.example:5432/shop",
    "",
])
def test_ambiguous_or_unparseable_urls_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(url)
    message = str(info.value)
    for secret in ("ss@db", "wxyz", "s3cret", "notaport"):
        assert secret not in message
    if url:
        assert "%40" in message, "the refusal tells how to write an '@' in a password"
    assert mask(url) == "<unusable database URL, not shown>"
    with pytest.raises(ConfigError):
        libpq_url(url)
    with pytest.raises(ConfigError):
        sqlalchemy_url(url)


def test_encoded_password_reaches_libpq_intact() -> None:
    url = "postgresql://app:p%40ss%3Aw%2Frd@db:5433/shop"
    assert make_url(libpq_url(url)).password == "p@ss:w/rd"
    assert libpq_url(url).startswith("postgresql://")
    assert sqlalchemy_url(url).startswith("postgresql+psycopg://")
    assert sqlalchemy_url("postgres://a@b/c") == "postgresql+psycopg://a@b/c"


def test_require_postgresql_names_the_command() -> None:
    assert require_postgresql("postgresql://a@b/c", "outbox consume").database == "c"
    with pytest.raises(ConfigError, match=r"outbox consume needs PostgreSQL.*sqlite"):
        require_postgresql("sqlite:///shop.db", "outbox consume")


def test_mask_text_masks_urls_and_dsn_passwords_but_not_other_words() -> None:
    text = ('relation "outbox_events" does not exist; url postgresql://outbox:outbox@h/outbox '
            "dsn host=h password=outbox user=outbox; quoted password='it\\'s x' dbname=d")
    masked = mask_text(text)
    assert 'relation "outbox_events" does not exist' in masked
    assert "postgresql://outbox:***@h/outbox" in masked
    assert "password=*** user=outbox" in masked
    assert "password=*** dbname=d" in masked
    assert mask_text("see https://sqlalche.me/e/20/e3q8") == "see https://sqlalche.me/e/20/e3q8"


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://app:p%40ss@/shop?host=db1:5432&host=db2:5433"
    "&target_session_attrs=read-write",
    "postgresql://app:p%40ss@db1:5432,db2:5433/shop?target_session_attrs=read-write",
])
def test_several_hosts_reach_libpq_as_a_host_list_and_sqlalchemy_as_host_params(
        url: str) -> None:
    # libpq keeps only the last of repeated host parameters: it must get one list.
    assert libpq_url(url) == ("postgresql://app:p%40ss@db1:5432,db2:5433/shop"
                              "?target_session_attrs=read-write")
    assert sqlalchemy_url(url) == ("postgresql+psycopg://app:p%40ss@/shop?host=db1:5432"
                                   "&host=db2:5433&target_session_attrs=read-write")
    assert make_url(sqlalchemy_url(url)).query["host"] == ("db1:5432", "db2:5433")
    assert "p%40ss" not in mask(url) and "***" in mask(url)


def test_one_host_as_a_parameter_is_left_to_libpq() -> None:
    assert libpq_url("postgresql://a@/db?host=/var/run/postgresql") == \
        "postgresql://a@/db?host=%2Fvar%2Frun%2Fpostgresql"
    assert libpq_url("postgresql://a@/db?host=db1") == "postgresql://a@/db?host=db1"
