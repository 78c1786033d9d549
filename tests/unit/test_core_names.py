import pytest

from anycast.core.errors import InvalidInput
from anycast.core.names import check_artifact_id, check_handler, check_name, check_version


@pytest.mark.parametrize("name", ["digits", "us-east", "a", "m1-v2", "x" * 63])
def test_valid_names_are_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "..",
        "../etc",
        "has space",
        "tab\tname",
        "nl\n",
        "Upper",
        "-lead",
        "trail-",
        "1digit",
        "x" * 64,
        None,
        42,
        "nul\x00",
    ],
)
def test_bad_names_are_refused_with_the_allowed_form(name: object) -> None:
    with pytest.raises(InvalidInput) as err:
        check_name(name, "deployment name")
    assert "lowercase letters, digits and '-'" in err.value.message
    assert err.value.status == 400


def test_versions_handlers_and_ids() -> None:
    assert check_version("1.0.0+abc") == "1.0.0+abc"
    assert check_handler("predict") == "predict"
    assert check_artifact_id("a" * 64) == "a" * 64
    for bad in ("../1", "v 1", ""):
        with pytest.raises(InvalidInput):
            check_version(bad)
    with pytest.raises(InvalidInput):
        check_handler("pre-dict")
    with pytest.raises(InvalidInput):
        check_artifact_id("A" * 64)
