"""URL user info never reaches a text: redacted in one-line errors, dropped from shown URLs."""

from __future__ import annotations

from blocks.errors import (
    describe_error,
    first_line,
    one_line,
    public_url,
    redact_urls,
    url_credentials,
    without_userinfo,
)

URL = "https://dispatch:p%40ss-w0rd@pacs.example:8443/dicom-web?token=t0k"


def test_every_url_in_a_text_loses_its_user_info() -> None:
    text = f"GET {URL} failed; retry http://u:pw@h/x later; mail a@b.org"
    assert redact_urls(text) == (
        "GET https://***@pacs.example:8443/dicom-web?token=t0k failed; "
        "retry http://***@h/x later; mail a@b.org"
    )


def test_error_lines_are_redacted() -> None:
    error = ConnectionError(f"cannot reach {URL}\nsecond line")
    for line in (one_line(error), first_line(error), describe_error(error)):
        assert "p%40ss-w0rd" not in line
        assert "dispatch:" not in line


def test_shown_and_sent_urls() -> None:
    assert public_url(URL) == "https://pacs.example:8443/dicom-web"
    assert without_userinfo(URL) == "https://pacs.example:8443/dicom-web?token=t0k"
    assert url_credentials(URL) == ("dispatch", "p@ss-w0rd")
    assert url_credentials("https://pacs.example/dicom-web") is None
