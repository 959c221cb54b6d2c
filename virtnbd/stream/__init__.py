"""One disk at one backup point: the virtnbd stream format (spec: docs/FORMAT.md)."""
from virtnbd.stream import codec
from virtnbd.stream.format import EncodedFrame, FrameRef, StreamMeta, StreamTotals
from virtnbd.stream.reader import StreamReader, open_stream
from virtnbd.stream.writer import StreamWriter, encode_data, encode_zero

__all__ = ["EncodedFrame", "codec", "FrameRef", "StreamMeta", "StreamReader", "StreamTotals", "StreamWriter",
           "encode_data", "encode_zero", "open_stream"]
