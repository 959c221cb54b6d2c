"""Per-frame compression (lz4 frame format, zstd) with bounded, checked decompression."""
from __future__ import annotations

import threading

import lz4.frame
import zstandard

from virtnbd import errors
from virtnbd.stream import format as fmt

_local = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "zstd", None)
    if cache is None:
        cache = _local.zstd = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "zstd_d", None)
    if dctx is None:
        dctx = _local.zstd_d = zstandard.ZstdDecompressor()
    return dctx


def check_method(method: str | None, level: int | None = None) -> None:
    if method not in fmt.METHOD_CODES:
        raise errors.UsageError(reason=f"unknown compression method {method!r} (use lz4 or zstd)")
    if level is None:
        return
    if method == "lz4" and not 0 <= level <= 16:
        raise errors.UsageError(reason=f"lz4 compression level {level} out of range 0..16")
    if method == "zstd" and not 1 <= level <= 22:
        raise errors.UsageError(reason=f"zstd compression level {level} out of range 1..22")


def compress(data: bytes | memoryview, method: str | None,
             level: int | None = None) -> bytes | bytearray | memoryview:
    """Compress ``data``; thread-safe (one zstd context per thread). lz4 returns a new bytearray
    (the same cost as bytes): a later codec stage may overwrite it in place."""
    if method is None:
        return data
    if method == "lz4":
        return lz4.frame.compress(data, compression_level=0 if level is None else level, store_size=True,
                                  content_checksum=False, block_linked=False, return_bytearray=True)
    if method == "zstd":
        return _zstd_compressor(3 if level is None else level).compress(data)
    raise errors.UsageError(reason=f"unknown compression method {method!r}")


def decompress(payload: bytes, method: int, length: int, path: str, pos: int) -> bytes:
    """Decompress one frame payload to exactly ``length`` bytes or raise FormatError."""
    if method == fmt.METHOD_LZ4:
        return _lz4_decompress(payload, length, path, pos)
    if method == fmt.METHOD_ZSTD:
        return _zstd_decompress(payload, length, path, pos)
    return payload


def _lz4_decompress(payload: bytes, length: int, path: str, pos: int) -> bytes:
    try:
        info = lz4.frame.get_frame_info(payload)
        if info.get("content_size") != length:
            raise errors.FormatError(path=path, offset=pos, reason="lz4 frame size does not match frame length")
        dec = lz4.frame.LZ4FrameDecompressor()
        out = dec.decompress(payload, max_length=length)
        if len(out) != length or not dec.eof or dec.unused_data:
            raise errors.FormatError(path=path, offset=pos, reason="lz4 payload does not decode to frame length")
        return out
    except (RuntimeError, ValueError, OverflowError) as err:
        raise errors.FormatError(path=path, offset=pos, reason=f"lz4 payload corrupt: {err}") from err


def _zstd_decompress(payload: bytes, length: int, path: str, pos: int) -> bytes:
    try:
        if zstandard.frame_content_size(payload) != length:
            raise errors.FormatError(path=path, offset=pos, reason="zstd frame size does not match frame length")
        out = _zstd_decompressor().decompress(payload, max_output_size=length)
    except zstandard.ZstdError as err:
        raise errors.FormatError(path=path, offset=pos, reason=f"zstd payload corrupt: {err}") from err
    if len(out) != length:
        raise errors.FormatError(path=path, offset=pos, reason="zstd payload does not decode to frame length")
    return out
