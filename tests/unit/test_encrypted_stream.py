"""Encrypted streams: the AEAD codec stage in the writer and the reader (virtnbd.crypto.stage)."""
from __future__ import annotations

import io
import os
import random

import pytest

from tests.unit.stream_helpers import meta
from virtnbd import errors
from virtnbd.crypto import keyring, store
from virtnbd.crypto.keysource import Secret
from virtnbd.crypto.setkey import SetKey
from virtnbd.crypto.stage import SealStage, with_encryption
from virtnbd.stream import format as fmt
from virtnbd.stream.detect import open_stream
from virtnbd.stream.writer import StreamWriter

MARKER = b"VNBD-MARKER-PLAINTEXT-" * 100
MiB = 1 << 20


def _key() -> SetKey:
    ring, master = keyring.create(Secret("keyfile", "t", os.urandom(32)), scrypt_n=1 << 10)
    return store.set_key(ring, master)


def _layout() -> list[tuple[str, int, bytes | int]]:
    rng = random.Random(5)
    return [("data", 0, MARKER * 40), ("zero", 1 * MiB, MiB), ("data", 2 * MiB, rng.randbytes(MiB)),
            ("data", 3 * MiB, (MARKER * 500)[:MiB]), ("data", 5 * MiB, bytes(4096) + b"x" * 4096)]


def _write(key: SetKey, compression: str | None = None, **kw: object) -> bytes:
    m = with_encryption(meta(compression, **kw), key)
    stage = SealStage(key).bind(m, "<mem>")
    buf = io.BytesIO()
    with StreamWriter(buf, m, "<mem>", stages=(stage,)) as w:
        for kind, off, val in _layout():
            if kind == "data":
                w.write_data(off, val)  # type: ignore[arg-type]
            else:
                w.write_zero(off, val)  # type: ignore[arg-type]
    return buf.getvalue()


def _image(size: int = 8 << 20) -> bytes:
    img = bytearray(size)
    for kind, off, val in _layout():
        if kind == "data":
            img[off:off + len(val)] = val  # type: ignore[arg-type]
    return bytes(img)


def _read_all(raw: bytes, key: SetKey | None) -> bytes:
    img = bytearray(8 << 20)
    with open_stream(io.BytesIO(raw), "<mem>", stages=(SealStage(key),)) as r:
        for ref in r.frames():
            if ref.kind == "data":
                data = r.read(ref)
                img[ref.offset:ref.offset + ref.length] = data
        r.verify()
    return bytes(img)


@pytest.mark.parametrize("compression", [None, "lz4", "zstd"])
def test_round_trip_no_plaintext(compression: str | None) -> None:
    key = _key()
    raw = _write(key, compression)
    assert b"VNBD-MARKER" not in raw
    assert _read_all(raw, key) == _image()
    with open_stream(io.BytesIO(raw), "<mem>", stages=(SealStage(key),)) as r:
        got = bytearray(8 << 20)
        for ref, data in r.iter_frames():
            if data is not None:
                got[ref.offset:ref.offset + ref.length] = data
        assert bytes(got) == _image()


def test_plaintext_checksum_not_stored() -> None:
    """Equal frames must not show as equal: the header checksum covers the ciphertext."""
    key = _key()
    raw = _write(key)
    first = fmt.checksum(MARKER * 40)
    assert first not in raw


def test_verify_without_key_checks_structure_only() -> None:
    key = _key()
    raw = _write(key, "lz4")
    with open_stream(io.BytesIO(raw), "<mem>", stages=(SealStage(None),)) as r:
        totals = r.verify()
        assert totals.frames == 5
    flipped = bytearray(raw)
    flipped[-300] ^= 1
    with pytest.raises(errors.FormatError):
        with open_stream(io.BytesIO(bytes(flipped)), "<mem>", stages=(SealStage(None),)) as r:
            r.verify()


def test_reader_without_stage_refuses_encrypted_stream() -> None:
    with pytest.raises(errors.FormatError, match="unknown header flags"):
        open_stream(io.BytesIO(_write(_key())), "<mem>")


def test_plain_stream_refused_in_encrypted_set() -> None:
    buf = io.BytesIO()
    with StreamWriter(buf, meta(), "<mem>") as w:
        w.write_data(0, b"a" * 4096)
    with pytest.raises(errors.FormatError, match="lacks header flags"):
        open_stream(io.BytesIO(buf.getvalue()), "<mem>", stages=(SealStage(_key()),))


def test_other_key_is_refused_clearly() -> None:
    raw = _write(_key())
    with pytest.raises(errors.WrongKey, match="not this set's"):
        open_stream(io.BytesIO(raw), "<mem>", stages=(SealStage(_key()),))


def _frames(raw: bytes, key: SetKey) -> list[tuple[int, int]]:
    """(position, size) of every data frame including its header."""
    with open_stream(io.BytesIO(raw), "<mem>", stages=(SealStage(key),)) as r:
        out = []
        for ref in r.frames():
            if ref.kind == "data":
                stored = fmt.FRAME.unpack(raw[ref.pos:ref.pos + fmt.FRAME.size])[5]
                out.append((ref.pos, fmt.FRAME.size + stored))
        return out


def _must_fail(raw: bytes, key: SetKey) -> None:
    with pytest.raises(errors.FormatError):
        _read_all(raw, key)


def test_every_single_byte_flip_is_detected() -> None:
    key = _key()
    raw = _write(key, "lz4")
    rng = random.Random(9)
    for pos in rng.sample(range(len(raw)), 60):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        _must_fail(bytes(flipped), key)


def test_payload_swapped_within_stream_and_between_streams_detected() -> None:
    key = _key()
    one, two = _write(key), _write(key, time="2026-11-23T04:00:00+00:00")
    f1, f2 = _frames(one, key), _frames(two, key)
    # the same frame (same offset, same bytes) from another point of the same set
    (p1, n1), (p2, n2) = f1[1], f2[1]
    assert n1 == n2
    swapped = one[:p1] + two[p2:p2 + n2] + one[p1 + n1:]
    _must_fail(swapped, key)
    # a frame from another set opened by the same key file (its own master key and set id)
    secret = Secret("keyfile", "t", os.urandom(32))
    keys = [store.set_key(*keyring.create(secret, scrypt_n=1 << 10)) for _ in range(2)]
    mine, theirs = _write(keys[0]), _write(keys[1])
    (p3, n3), (p4, n4) = _frames(mine, keys[0])[1], _frames(theirs, keys[1])[1]
    assert n3 == n4
    _must_fail(mine[:p3] + theirs[p4:p4 + n4] + mine[p3 + n3:], keys[0])
    # payloads of two frames of one stream exchanged (same sizes: frames 1 and 2 are 1 MiB random/marker)
    (pa, na), (pb, nb) = f1[1], f1[2]
    head = fmt.FRAME.size
    if na == nb:
        mixed = bytearray(one)
        mixed[pa + head:pa + na], mixed[pb + head:pb + nb] = one[pb + head:pb + nb], one[pa + head:pa + na]
        _must_fail(bytes(mixed), key)



def test_in_place_seal_and_open_keep_the_frame_format(tmp_path: object) -> None:
    """The backup seals its read buffer in place (``owned``; the tag written after it) and the
    reader decrypts its batch buffer in place: the stream's bytes are those of the copying path."""
    from pathlib import Path  # noqa: PLC0415
    key = _key()
    m = with_encryption(meta(None), key)
    stage = SealStage(key).bind(m, "<mem>")
    streams = []
    for owned in (False, True):
        buf = io.BytesIO()
        with StreamWriter(buf, m, "<mem>", stages=(stage,)) as w:
            for kind, off, val in _layout():
                if kind == "zero":
                    w.write_zero(off, val)  # type: ignore[arg-type]
                    continue
                data = bytearray(val)  # type: ignore[arg-type]
                w.add(w.codec.encode_data(off, memoryview(data), owned=owned))
                assert (bytes(data) == val) is not owned        # sealed in place only when given up
        streams.append(buf.getvalue())
    assert streams[0] == streams[1]
    path = Path(str(tmp_path)) / "s.stream"
    path.write_bytes(streams[1])
    with path.open("rb") as f, open_stream(f, str(path), stages=(SealStage(key),)) as r:
        refs = [ref for ref in r.frames() if ref.kind == "data"]
        jobs = [(ref.pos, ref.offset, ref.length) for ref in refs]
        got = r.read_batch([*jobs, jobs[-1]])                   # a frame asked for twice: still its bytes
    image = _image()
    for (_, off, length), data in zip([*jobs, jobs[-1]], got, strict=True):
        assert bytes(data) == image[off:off + length]


GOLDEN = {   # sha256 of the stream below, taken with the code of main before in-place sealing (issue 16)
    ("aes-256-gcm", None): "21b39d06e224471d74f09dbae347b096bfd5f5962e33c431f5bdaebe1155e7f7",
    ("aes-256-gcm", "lz4"): "14796b530e59b66aaeafc2de35ade651227a152e57eb6130b8081578159bf683",
    ("chacha20-poly1305", None): "88a993bd4b05b3b9d801da9f28484e8cb8a5f4c7c6c33a260a8cc0f4bd5184aa",
    ("chacha20-poly1305", "lz4"): "e279d58eaa91df421792e84093d70db3ef1c06981919a174206dfb1bca313ede",
}


@pytest.mark.parametrize(("cipher", "compression"), list(GOLDEN))
@pytest.mark.parametrize("owned", [False, True])
def test_golden_encrypted_stream(cipher: str, compression: str | None, owned: bool) -> None:
    """Golden: an encrypted stream with a fixed key and salt, byte for byte, whether frames are sealed
    into a new buffer or in place into the caller's (the frame format is unchanged)."""
    import hashlib  # noqa: PLC0415
    from types import MappingProxyType  # noqa: PLC0415
    key = SetKey("golden-set", cipher, "golden-fp", bytes(range(32)))
    record = {"cipher": cipher, "set_id": "golden-set", "fingerprint": "golden-fp", "salt": "00" * 16}
    m = meta(compression, extra=MappingProxyType({"note": "x", "encryption": record}))
    stage = SealStage(key).bind(m, "<mem>")
    data = random.Random(16).randbytes(MiB)
    buf = io.BytesIO()
    with StreamWriter(buf, m, "<mem>", stages=(stage,)) as w:
        for off, val in ((0, data), (2 * MiB, b"golden " * 20000), (4 * MiB, data[:4096])):
            w.add(w.codec.encode_data(off, memoryview(bytearray(val)), owned=owned))
            if off == 0:
                w.write_zero(MiB, MiB)
    assert hashlib.sha256(buf.getvalue()).hexdigest() == GOLDEN[(cipher, compression)]
