"""Optional lossless coding of serialized caches with zstd (CacheGen's last stage is entropy coding).

Measured on the embedded model (2048-token prompts, ``python -m kvcache_plugins.bench.entropy``), zstd level 3
saves 15-22% of ``to_bytes()`` for int8/int4 caches, 30% for int2, 43% for ``mixed_l0`` (its fp32 layer) and
17-21% for low-rank caches with quantized factors: above the 10% that makes it worth an option. It is off by
default (it costs CPU time on both ends and the bytes are no longer a plain safetensors file).

``cache.to_bytes(compress="zstd")`` / ``cache.save(path, compress="zstd")`` write a zstd frame around the usual
bytes; loading recognises the frame by its magic number and decompresses it first. zstd comes from Python 3.14's
``compression.zstd`` or the ``zstandard`` package (``pip install kvcache-plugins[zstd]``).
"""

from __future__ import annotations

from typing import Any

CODECS = ("zstd",)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: a frame declaring more than this many times its own size is refused before anything is allocated
MAX_RATIO = 64


def _zstd() -> Any:
    try:
        from compression import zstd  # Python >= 3.14

        return zstd
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise ImportError(
            "compress='zstd' needs Python >= 3.14 or the zstandard package: pip install kvcache-plugins[zstd]"
        ) from None
    return zstandard


def compress(data: bytes, codec: str | None, level: int = 3) -> bytes:
    """``data`` coded with ``codec`` (``None``: unchanged; ``"zstd"``: one frame that declares its content size).

    Bytes that zstd would shrink more than ``MAX_RATIO`` times (only degenerate caches, e.g. all zeros) are
    returned unchanged: :func:`decompress` refuses such frames, and loading reads either form.
    """
    if codec is None:
        return data
    if codec not in CODECS:
        raise ValueError(f"unknown compress={codec!r}; choose one of {CODECS} or None")
    z = _zstd()
    if hasattr(z, "ZstdCompressor") and hasattr(z, "frame_content_size"):  # the zstandard package
        out = z.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(data)
    else:  # Python 3.14's compression.zstd writes the content size of one-shot input
        out = z.compress(data, level=level, options={z.CompressionParameter.checksum_flag: 1})
    return data if len(data) > MAX_RATIO * len(out) else out


def is_compressed(data: bytes) -> bool:
    """Whether ``data`` starts with the zstd frame magic number (a saved cache never does: it starts with a
    safetensors header length)."""
    return bytes(data[:4]) == ZSTD_MAGIC


def _refuse(why: str) -> ValueError:
    return ValueError(f"not a kvcache_plugins cache: {why}")


def decompress(data: bytes) -> bytes:
    """Undo :func:`compress`: exactly one zstd frame, which must declare its content size, at most ``MAX_RATIO``
    times the input; the size is checked before anything is allocated, the output is bounded by it, and bytes
    after the frame are refused. Anything else raises ``ValueError`` (also a missing zstd module: the file is
    still input this process cannot read).
    """
    try:
        z = _zstd()
    except ImportError as err:
        raise ValueError(f"this cache is zstd-coded (compress='zstd'): {err}") from None
    if hasattr(z, "frame_content_size"):  # the zstandard package
        try:
            size = z.frame_content_size(data)
        except z.ZstdError as err:
            raise _refuse(f"damaged zstd frame header ({err})") from None
        if size < 0 or size > MAX_RATIO * len(data):
            raise _refuse(f"the zstd frame declares {size if size >= 0 else 'no'} content size from {len(data)} bytes "
                          f"(at most {MAX_RATIO} times the input)")
        try:
            out = z.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
        except z.ZstdError as err:
            raise _refuse(f"damaged zstd frame ({err})") from None
    else:  # Python 3.14's compression.zstd
        try:
            size = z.get_frame_info(data).decompressed_size
        except z.ZstdError as err:
            raise _refuse(f"damaged zstd frame header ({err})") from None
        if size is None or size > MAX_RATIO * len(data):
            raise _refuse(
                f"the zstd frame declares {size} bytes from {len(data)} (at most {MAX_RATIO} times the input)"
            )
        d = z.ZstdDecompressor()
        try:
            out = d.decompress(data, max_length=size)
        except z.ZstdError as err:
            raise _refuse(f"damaged zstd frame ({err})") from None
        if not d.eof or d.unused_data:
            raise _refuse("bytes after the zstd frame, or a frame that does not end")
    if len(out) != size:
        raise _refuse(f"the zstd frame declares {size} bytes and holds {len(out)}")
    return out
