"""Messages for faults from outside (issue 21): a locked image, a lost libvirtd connection."""
from __future__ import annotations

import pytest

from virtnbd import errors
from virtnbd.virt import bitmaps, connection


def test_locked_image_names_the_holder_kinds_and_the_fix() -> None:
    detail = ["qemu-img: Could not open '/img/a.qcow2': Failed to get \"write\" lock",
              "Is another process using the image [/img/a.qcow2]?"]
    text = bitmaps._explain(detail, 1)
    assert "in use by another process" in text and 'Failed to get "write" lock' in text
    assert "qemu-nbd, qemu-io, guestmount" in text and "run again" in text


def test_other_qemu_img_errors_keep_their_last_line() -> None:
    assert bitmaps._explain(["qemu-img: Bitmap 'x' not found"], 1) == "qemu-img: Bitmap 'x' not found"
    assert bitmaps._explain([], 3) == "exit 3"


class _Conn:
    """Stands for a virConnect: only its identity is used."""


def test_closed_connection_raises_one_clear_error_until_forgotten() -> None:
    conn = _Conn()
    connection.check_alive(conn)                   # type: ignore[arg-type]
    assert not connection.lost(conn)               # type: ignore[arg-type]
    connection._on_close(conn, 1, None)            # type: ignore[arg-type]
    assert connection.lost(conn)                   # type: ignore[arg-type]
    with pytest.raises(errors.LibvirtError, match="connection to libvirtd lost.*end of file.*nothing was committed"):
        connection.check_alive(conn)               # type: ignore[arg-type]
    connection._lost.pop(id(conn))
