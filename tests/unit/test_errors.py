import signal

from virtnbd import errors


def test_template_formats_fields():
    err = errors.FormatError(path="/b/sda.full.data", offset=4096, reason="bad checksum")
    assert str(err) == "/b/sda.full.data: offset 4096: bad checksum"
    assert err.offset == 4096
    assert err.exit_code == 1


def test_interrupted_exit_code_is_128_plus_signal():
    err = errors.Interrupted(signum=signal.SIGTERM, signame="SIGTERM")
    assert err.exit_code == 128 + 15
    assert "SIGTERM" in str(err)


def test_missing_field_still_gives_a_message():
    err = errors.DomainNotFound()
    assert "DomainNotFound" in str(err)
