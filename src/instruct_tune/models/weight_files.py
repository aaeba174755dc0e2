"""Check a local folder's safetensors files before loading them, so a truncated file is named.

The safetensors reader reports a cut-short file as "Error while deserializing header: incomplete metadata"
without saying which file; `check_weight_files` reads each file's header and compares the sizes it declares
with the file's.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

__all__ = ["WeightFileError", "check_safetensors", "check_weight_files"]

_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "adapter_model.safetensors")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class WeightFileError(OSError):
    """A weights file that cannot be what it claims (truncated or corrupt); the message names it."""


def check_safetensors(path: str | Path) -> None:
    """Raise WeightFileError naming `path` when its header or tensor data is cut short or unreadable."""
    path = Path(path)
    size = path.stat().st_size

    def bad(problem: str) -> WeightFileError:
        return WeightFileError(
            f"{path}: truncated or corrupt safetensors file ({problem}); save or download it again"
        )

    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, less than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise bad(f"its header claims {length:,} bytes, the file holds {size:,}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2
    ]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise bad(f"its tensors need {expected:,} bytes, the file holds {size:,}")


def check_weight_files(source: str | Path) -> None:
    """Check the model or adapter weights of a local folder (a Hub id or a missing path is left alone)."""
    folder = Path(source)
    if not folder.is_dir():
        return
    for pattern in _WEIGHT_PATTERNS:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():
                check_safetensors(path)
