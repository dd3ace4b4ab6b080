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
    """``data`` coded with ``codec`` (``None``: unchanged; ``"zstd"``)."""
    if codec is None:
        return data
    if codec not in CODECS:
        raise ValueError(f"unknown compress={codec!r}; choose one of {CODECS} or None")
    z = _zstd()
    if hasattr(z, "ZstdCompressor") and hasattr(z, "frame_content_size"):  # the zstandard package
        return z.ZstdCompressor(level=level).compress(data)
    return z.compress(data, level=level)


def is_compressed(data: bytes) -> bool:
    return bytes(data[:4]) == ZSTD_MAGIC


def decompress(data: bytes) -> bytes:
    """Undo :func:`compress`; frames that declare no size, or more than ``MAX_RATIO`` times their own, are refused."""
    z = _zstd()
    if hasattr(z, "frame_content_size"):
        size = z.frame_content_size(data)
        if size < 0 or size > MAX_RATIO * len(data):
            raise ValueError(f"zstd frame declares {size} bytes from {len(data)}: not a kvcache_plugins cache")
        return z.ZstdDecompressor().decompress(data, max_output_size=size)
    size = z.get_frame_info(data).decompressed_size  # Python 3.14's compression.zstd
    if size is None or size > MAX_RATIO * len(data):
        raise ValueError(f"zstd frame declares {size} bytes from {len(data)}: not a kvcache_plugins cache")
    return z.decompress(data)
