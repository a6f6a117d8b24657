"""SecretValue never shows itself; Minted knows when it must be refreshed or dropped."""

from __future__ import annotations

import logging
import pickle

import pytest

from proxy.errors import status_for
from proxy.secrets import Minted, ProviderError, SecretValue

TEXT = "ghs_0123456789abcdefSECRET"


def test_secret_value_is_masked_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    v = SecretValue(TEXT)
    shown = [repr(v), str(v), f"{v}", f"{v!r}", f"{v:>40}", "%s" % (v,), f"{v}",  # noqa: UP031
             repr([v]), repr({"k": v}), repr(Minted("gh", v, 0.0))]
    assert all(TEXT not in s for s in shown), shown
    assert shown[0] == "[secure]"
    logging.getLogger("t").warning("value %s %r", v, v)
    assert TEXT not in caplog.text
    assert v.reveal() == TEXT and len(v) == len(TEXT)


def test_secret_value_is_never_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(SecretValue(TEXT))


def test_secret_value_compares_by_value() -> None:
    assert SecretValue(TEXT) == SecretValue(TEXT) != SecretValue(TEXT + "x")
    assert len({SecretValue(TEXT), SecretValue(TEXT)}) == 1
    with pytest.raises(TypeError):
        SecretValue(b"bytes")  # type: ignore[arg-type]


def test_provider_error_is_a_502_naming_the_secret() -> None:
    e = ProviderError("github-write", "rejected", "HTTP 401")
    assert status_for(e) == (502, "secret_unavailable", "secret 'github-write' is unavailable: "
                             "the provider refused the request (HTTP 401)")


@pytest.mark.parametrize(("issued", "expires", "skew", "now", "fresh", "usable"), [
    (0, None, 60, 1e9, True, True),     # never expires
    (0, 3600, 60, 3539, True, True),    # 61 s left, skew 60
    (0, 3600, 60, 3541, False, True),   # 59 s left: refresh, still usable
    (0, 100, 60, 49, True, True),       # short life: half of it (50) wins over the skew
    (0, 100, 60, 51, False, True),
    (0, 100, 0, 99.9, True, True),      # no skew: fresh to the end
    (0, 100, 60, 100, False, False),    # expired: never handed out
    (0, 100, 60, 150, False, False),
])
def test_refresh_and_expiry_moments(issued: float, expires: float | None, skew: float,
                                    now: float, fresh: bool, usable: bool) -> None:
    m = Minted("s", SecretValue(TEXT), issued, expires)
    assert (m.fresh(now, skew), m.usable(now)) == (fresh, usable)
