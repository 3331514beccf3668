"""The spec's `secrets`: names of environment variables, not spinyard's, not also in `env`."""

import pytest
from pydantic import ValidationError

from schemas.names import check_secret_name
from schemas.spec import AppSpec

BASE = {"name": "alice/app", "command": ["run"]}


def test_secrets_default_to_none_and_take_environment_variable_names():
    assert AppSpec(**BASE).secrets == []
    spec = AppSpec(**BASE, secrets=["DB_URL", "_private", "a1"])
    assert spec.secrets == ["DB_URL", "_private", "a1"]


@pytest.mark.parametrize(
    ("secrets", "env", "words"),
    [
        (["db-url"], {}, "not an environment variable name"),
        (["1DB"], {}, "not an environment variable name"),
        ([""], {}, "not an environment variable name"),
        (["DB\n"], {}, "not an environment variable name"),
        (["SPINYARD_PORT"], {}, "SPINYARD_"),
        (["spinyard_x"], {}, "SPINYARD_"),
        (["DB", "DB"], {}, "named twice"),
        (["DB"], {"DB": "x"}, "in env too"),
        ([f"S{i}" for i in range(101)], {}, "at most 100"),
    ],
)
def test_a_bad_secrets_list_is_refused_naming_the_field(secrets, env, words):
    with pytest.raises(ValidationError) as refused:
        AppSpec(**BASE, secrets=secrets, env=env)
    [error] = refused.value.errors()
    assert error["loc"][0] == "secrets" and words in str(refused.value)


def test_check_secret_name_bounds_its_length():
    assert check_secret_name("A" * 128) == "A" * 128
    with pytest.raises(ValueError, match="at most 128"):
        check_secret_name("A" * 129)
