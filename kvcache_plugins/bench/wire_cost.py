"""What a selection message costs its receiver: parse time and peak RSS growth of ``Selection.from_bytes``.

Run: ``python -m kvcache_plugins.bench.wire_cost`` (``--only NAME`` for one message). Every message is well formed
with a correct CRC-32 (what a forger sends); each is parsed in a fresh subprocess, whose peak resident set is reset
(``/proc/self/clear_refs``) just before the parse, so "peak RSS growth" is ``VmHWM`` after the parse minus
``VmRSS`` before it. Linux only (``/proc``).

Messages (issue 29): one row whose bitmap has every bit set (2**26 kept positions, 8.4 MB); 209,715 empty rows of a
per-layer selection (one row, 209,715 layers, 839 kB); 209,715 empty rows of a global selection (839 kB); and, as
the legitimate yardstick, a real-sized selection (one row of 1M tokens, half kept at random, 32 layers).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
import zlib

from .measure import proc_status

MAGIC = b"KVSL"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(rows: int, layers: int, entries: bytes) -> bytes:
    body = MAGIC + bytes([1, 1 if layers else 0]) + _varint(rows) + _varint(layers) + _varint(0) + b"F" * 8
    body += _varint(3) + b"q2c" + entries
    return body + struct.pack("<I", zlib.crc32(body))


def full_bitmap(span: int = 2**26) -> bytes:
    """One row, no sinks or question, a bitmap with all ``span`` bits set."""
    return _message(1, 0, _varint(span) + _varint(0) + _varint(span) + b"\0" + b"\xff" * (span // 8))


def empty_rows(count: int = 209_715, per_layer: bool = False) -> bytes:
    """``count`` entries of 4 bytes (an empty prompt, nothing kept, delta encoding)."""
    entry = _varint(0) + _varint(0) + _varint(0) + b"\1"
    return _message(1 if per_layer else count, count if per_layer else 0, entry * count)


def real_selection(tokens: int = 1 << 20, layers: int = 32) -> bytes:
    """A legitimate per-layer selection: ``tokens`` context tokens, half kept at random per layer."""
    import torch

    from ..scout import Selection

    gen = torch.Generator().manual_seed(0)
    per_layer = [[torch.randperm(tokens, generator=gen)[: tokens // 2].sort().values.tolist()] for _ in range(layers)]
    return Selection(per_layer[0], [tokens], [0], 0, b"F" * 8, "q2c", per_layer).to_bytes()


MESSAGES = {
    "full_bitmap_67M": full_bitmap,
    "empty_per_layer_rows_209715": lambda: empty_rows(per_layer=True),
    "empty_rows_209715": empty_rows,
    "real_1M_tokens_32_layers": real_selection,
}


def measure(name: str) -> dict:
    """Parse one message in this process: bytes, seconds, peak RSS growth, outcome."""
    import gc

    from ..scout import Selection

    data = MESSAGES[name]()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = proc_status("VmRSS")
    start = time.perf_counter()
    try:
        Selection.from_bytes(data)
        outcome = "parsed"
    except ValueError as err:
        outcome = f"refused: {err}"
    seconds = time.perf_counter() - start
    return {"message": name, "bytes": len(data), "seconds": seconds, "peak_rss_growth": proc_status("VmHWM") - before,
            "outcome": outcome}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(MESSAGES), help="measure one message")
    parser.add_argument("--child", choices=sorted(MESSAGES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return []
    results = []
    print(f"{'message':<30} {'bytes':>10} {'parse s':>9} {'peak RSS MB':>12}  outcome")
    for name in [args.only] if args.only else MESSAGES:
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", name], capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        print(f"{name:<30} {row['bytes']:>10} {row['seconds']:>9.3f} {row['peak_rss_growth'] / 2**20:>12.1f}  "
              f"{row['outcome'][:90]}")
    return results


if __name__ == "__main__":
    main()
