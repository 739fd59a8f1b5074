import pytest

from streamharness.errors import InvalidInput
from streamharness.keys import make_key, parse_key


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 129, "tenant with space", "ü"])
def test_bad_names_are_rejected_with_the_reason(bad):
    with pytest.raises(InvalidInput) as err:
        make_key("acme", bad)
    assert "stream_id" in str(err.value)


def test_parse_requires_a_slash():
    with pytest.raises(InvalidInput, match="<tenant>/<stream_id>"):
        parse_key("acme-cam")
