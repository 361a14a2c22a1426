"""Settings, URL parsing, transport options and secret redaction (``alkpubsub.config``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

import alkpubsub
from alkpubsub import ConfigError, Settings, redact_url
from alkpubsub.config import CONFIG_ENV, TransportOptions, parse_options, parse_url

SECRET = "s3cr3t-Pa55"
ENV_NAMES = (
    "URL",
    "USERNAME",
    "PASSWORD",
    "TOKEN",
    "TLS_CA",
    "TLS_CERT",
    "TLS_KEY",
    "BUFFER",
    "MAX_DELIVERIES",
    "ORIGIN",
    "OPTIONS",
    "CONFIG",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ALKPUBSUB_* from the machine running the tests leaks into them."""
    for name in ENV_NAMES:
        monkeypatch.delenv(f"ALKPUBSUB_{name}", raising=False)


class StreamOptions(TransportOptions):
    """Options of a made-up durable transport."""

    stream: str = "events"
    batch: int = 100


# -- redact_url -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"redis://app:{SECRET}@cache.local:6380/2", "redis://app:***@cache.local:6380/2"),
        (f"redis://:{SECRET}@cache.local:6379/0", "redis://:***@cache.local:6379/0"),
        (f"nats://{SECRET}@bus.local:4222", "nats://***@bus.local:4222"),
        (
            f"redis+durable://cache.local/0?stream=ev&password={SECRET}",
            "redis+durable://cache.local/0?stream=ev&password=***",
        ),
        (
            f"nats://bus.local:4222?token={SECRET}&name=worker",
            "nats://bus.local:4222?token=***&name=worker",
        ),
        (
            f"nats+durable://u:{SECRET}@bus.local?token={SECRET}&stream=EVENTS",
            "nats+durable://u:***@bus.local?token=***&stream=EVENTS",
        ),
    ],
    ids=["user-pass", "pass-only", "token-userinfo", "query-password", "query-token", "both"],
)
def test_redact_url_masks_passwords_and_tokens_and_keeps_the_rest(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    assert SECRET not in redact_url(url)


def test_redact_url_masks_a_password_containing_at_sign() -> None:
    # '@' is legal (if unwise) in a password; the host is what follows the last one.
    assert redact_url("redis://app:p@ss@cache.local/0") == "redis://app:***@cache.local/0"


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "memory://bus-1",
        "honker:///var/lib/app/events.db",
        "honker+durable:///./app.db?stream=events",
        "redis://cache.local:6379/0?a=x,y",
        "nats://bus.local:4222",
    ],
)
def test_redact_url_leaves_urls_without_secrets_unchanged(url: str) -> None:
    assert redact_url(url) == url


# -- ParsedUrl ----------------------------------------------------------------


def test_parse_url_splits_the_parts() -> None:
    parsed = parse_url(f"redis+durable://app:{SECRET}@cache.local:6380/2?stream=ev")
    assert parsed.scheme == "redis+durable"
    assert parsed.base_scheme == "redis"
    assert (parsed.host, parsed.port, parsed.path) == ("cache.local", 6380, "/2")
    assert (parsed.username, parsed.password) == ("app", SECRET)
    assert parsed.query == {"stream": "ev"}
    assert parsed.redacted == "redis+durable://app:***@cache.local:6380/2?stream=ev"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://app:{SECRET}@cache.local:6379/0",
        f"nats://{SECRET}@bus.local:4222",
        f"nats://bus.local:4222?token={SECRET}",
        f"redis://cache.local/0?password={SECRET}",
    ],
    ids=["password", "token-userinfo", "query-token", "query-password"],
)
def test_parsed_url_repr_and_str_contain_no_secret(url: str) -> None:
    parsed = parse_url(url)
    assert SECRET not in repr(parsed)
    assert SECRET not in str(parsed)
    assert "***" in repr(parsed)


@pytest.mark.parametrize("bad", ["localhost:6379", "", "redis:/x", 42])
def test_unreadable_url_raises_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="is not a transport URL"):
        parse_url(bad)  # type: ignore[arg-type]


def test_bad_port_raises_config_error_without_secret() -> None:
    with pytest.raises(ConfigError, match="cannot parse URL") as caught:
        parse_url(f"redis://app:{SECRET}@cache.local:notaport/0")
    assert SECRET not in str(caught.value)


# -- transport options --------------------------------------------------------


def test_options_come_from_url_query_over_settings() -> None:
    settings = Settings.load(url="memory://", options={"stream": "from-settings", "batch": "7"})
    options = parse_options(StreamOptions, parse_url("x+durable:///a.db?stream=mine"), settings)
    assert options == StreamOptions(stream="mine", batch=7)
    assert parse_options(StreamOptions, parse_url("x:///a.db"), None) == StreamOptions()


def test_settings_options_for_other_transports_are_ignored() -> None:
    # Settings.options applies to every URL of a deployment; each transport takes its own.
    settings = Settings.load(url="memory://", options={"subject_prefix": "app"})
    assert parse_options(StreamOptions, parse_url("x:///a.db"), settings) == StreamOptions()


def test_unknown_option_raises_config_error_naming_it_and_listing_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_options(
            StreamOptions, parse_url(f"x+durable://u:{SECRET}@h/a?strem=ev&batch=5"), None
        )
    message = str(caught.value)
    assert "unknown option 'strem'" in message
    assert "accepts: batch, stream" in message
    assert SECRET not in message


async def test_unknown_option_on_memory_url_is_refused_by_connect() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'colour'.*accepts: none"):
        await alkpubsub.connect("memory://bus?colour=blue")


def test_duplicate_option_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="option 'stream' is given twice") as caught:
        parse_url(f"redis+durable://u:{SECRET}@h/0?stream=a&stream=b")
    assert SECRET not in str(caught.value)


def test_bad_option_value_raises_config_error_naming_the_option() -> None:
    with pytest.raises(ConfigError, match=r"bad option .*batch"):
        parse_options(StreamOptions, parse_url("x:///a.db?batch=many"), None)


# -- Settings -------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = Settings.load()
    assert settings.url == "honker:///./alkpubsub.db"
    assert (settings.buffer, settings.max_deliveries) == (1024, 5)
    assert settings.password is None


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALKPUBSUB_URL", "redis://cache.local:6379/0")
    monkeypatch.setenv("ALKPUBSUB_USERNAME", "app")
    monkeypatch.setenv("ALKPUBSUB_PASSWORD", SECRET)
    monkeypatch.setenv("ALKPUBSUB_TOKEN", SECRET + "-tok")
    monkeypatch.setenv("ALKPUBSUB_BUFFER", "64")
    monkeypatch.setenv("ALKPUBSUB_TLS_CA", "/etc/ssl/ca.pem")
    settings = Settings.load()
    assert settings.url == "redis://cache.local:6379/0"
    assert settings.username == "app"
    assert isinstance(settings.password, SecretStr)
    assert settings.password.get_secret_value() == SECRET
    assert isinstance(settings.token, SecretStr)
    assert settings.token.get_secret_value() == SECRET + "-tok"
    assert settings.buffer == 64
    assert settings.tls_ca == Path("/etc/ssl/ca.pem")


def test_settings_url_list_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALKPUBSUB_URL", '["memory://local", "honker:///app.db"]')
    settings = Settings.load()
    assert settings.url == ["memory://local", "honker:///app.db"]
    assert settings.urls == ["memory://local", "honker:///app.db"]


def test_settings_url_list_from_code() -> None:
    settings = Settings.load(url=["memory://a", "memory://b"])
    assert settings.urls == ["memory://a", "memory://b"]
    assert Settings.load(url="memory://a").urls == ["memory://a"]


TOML_TOP_LEVEL = f"""
url = ["memory://local", "redis://cache.local:6379/0"]
password = "{SECRET}"
max_deliveries = 3

[options]
stream = "orders"
"""

TOML_TABLE = f"""
[tool.other]
ignored = true

[alkpubsub]
url = "nats://bus.local:4222"
token = "{SECRET}"
buffer = 16
"""


def _check_top_level(settings: Settings) -> None:
    assert settings.urls == ["memory://local", "redis://cache.local:6379/0"]
    assert settings.password is not None
    assert settings.password.get_secret_value() == SECRET
    assert settings.max_deliveries == 3
    assert settings.options == {"stream": "orders"}


def _check_table(settings: Settings) -> None:
    assert settings.url == "nats://bus.local:4222"
    assert settings.token is not None
    assert settings.token.get_secret_value() == SECRET
    assert settings.buffer == 16


@pytest.mark.parametrize(
    ("text", "check"),
    [(TOML_TOP_LEVEL, _check_top_level), (TOML_TABLE, _check_table)],
    ids=["top-level", "alkpubsub-table"],
)
def test_settings_from_toml_file(
    tmp_path: Path,
    text: str,
    check: Callable[[Settings], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "alkpubsub.toml"
    path.write_text(text)
    check(Settings.from_toml(path))
    check(Settings.from_toml(str(path)))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    check(Settings.load())  # the same file through ALKPUBSUB_CONFIG


def test_environment_wins_over_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "alkpubsub.toml"
    path.write_text('url = "memory://from-file"\nbuffer = 8\n')
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setenv("ALKPUBSUB_URL", "memory://from-env")
    settings = Settings.load()
    assert settings.url == "memory://from-env"
    assert settings.buffer == 8


def test_from_toml_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "alkpubsub.toml"
    path.write_text('url = "memory://from-file"\nbuffer = 8\n')
    assert Settings.from_toml(path, buffer=9).buffer == 9


def test_settings_repr_and_str_contain_no_secret() -> None:
    settings = Settings.load(
        url=[f"redis://app:{SECRET}@cache.local/0", f"nats://bus.local?token={SECRET}"],
        password=SECRET,
        token=SECRET,
    )
    for text in (repr(settings), str(settings)):
        assert SECRET not in text
        assert "cache.local" in text  # the rest of the URL is still shown
    single = Settings.load(url=f"nats://{SECRET}@bus.local:4222")
    assert SECRET not in repr(single)
    assert SECRET not in str(single)


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"buffer": "lots"}, "buffer"),
        ({"max_deliveries": [1]}, "max_deliveries"),
        ({"url": 5}, "url"),
        ({"bufer": 10}, "bufer"),
    ],
    ids=["bad-int", "bad-type", "bad-url-type", "unknown-setting"],
)
def test_bad_settings_raise_config_error_naming_the_setting(
    values: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError, match=f"invalid settings: .*{names}"):
        Settings.load(**values)


def test_bad_setting_in_environment_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALKPUBSUB_BUFFER", "lots")
    with pytest.raises(ConfigError, match="buffer"):
        Settings.load()


def test_unknown_key_in_toml_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "alkpubsub.toml"
    path.write_text('url = "memory://"\nbuffers = 3\n')
    with pytest.raises(ConfigError, match="buffers"):
        Settings.from_toml(path)


def test_malformed_toml_raises_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "alkpubsub.toml"
    path.write_text('url = "memory://"\nbuffer = \n')
    with pytest.raises(ConfigError, match="cannot read settings file"):
        Settings.from_toml(path)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    with pytest.raises(ConfigError, match="cannot read settings file"):
        Settings.load()


def test_missing_toml_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read settings file"):
        Settings.from_toml(tmp_path / "absent.toml")


def test_missing_config_env_file_raises_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "absent.toml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    with pytest.raises(ConfigError, match=f"ALKPUBSUB_CONFIG='{missing}' is not a file"):
        Settings.load()


UNENCODED_SECRETS = ["pa/ss-w0rd", "pa#ss-w0rd", "pa?ss-w0rd", "1234/ss-w0rd", "p@ss/w0rd"]


@pytest.mark.parametrize("secret", UNENCODED_SECRETS)
@pytest.mark.parametrize(
    "template",
    [
        "redis://user:{}@cache.local:6379/0",
        "redis://:{}@cache.local:6379/0?stream=s",
        "nats://{}@bus.local:4222",
        "nats+durable://svc:{}@bus.local:4222?stream=E&token=tok-zz9",
    ],
)
def test_a_password_with_unencoded_url_characters_never_leaks(template: str, secret: str) -> None:
    # '/', '#' and '?' in a password move the '@' out of the URL's netloc, so
    # a parser sees a path, fragment or query holding the secret.
    url = template.format(secret)
    assert secret not in redact_url(url)
    assert "tok-zz9" not in redact_url(url)
    with pytest.raises(ConfigError) as raised:
        parse_url(url)
    assert secret not in str(raised.value)
    assert "percent-encode" in str(raised.value)
    settings = Settings(url=[url, "memory://"])
    for text in (repr(settings), str(settings)):
        assert secret not in text


def test_a_percent_encoded_password_parses_back_to_itself() -> None:
    from urllib.parse import quote

    secret = "pa/ss#w?rd@x"
    parsed = parse_url(f"redis://user:{quote(secret, safe='')}@cache.local:6379/0")
    assert parsed.password == secret and parsed.host == "cache.local"
    assert secret not in repr(parsed) and secret not in parsed.redacted


def test_an_at_sign_in_a_file_path_is_not_user_info() -> None:
    assert parse_url("honker:///data/a@b/app.db").path == "/data/a@b/app.db"
    assert redact_url("honker:///data/a@b/app.db") == "honker:///data/a@b/app.db"


def test_secret_options_are_masked_in_settings_repr() -> None:
    settings = Settings(url="memory://", options={"token": "tok-secret-1", "stream": "s"})
    assert "tok-secret-1" not in repr(settings)
    assert "'stream': 's'" in repr(settings)
