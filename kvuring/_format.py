"""The on-disk block format and key naming.

A verified block file (``verify=True``, suffix ``.kvb``) is the payload
followed by one 4 KiB trailer page, so the payload starts at offset 0 and
both parts stay O_DIRECT-aligned::

    offset 0            payload (block_size bytes)
    offset block_size   trailer (TRAILER_SIZE bytes, little-endian):
        magic "KVUB" | version u16 | trailer size u16 | checksum algorithm u32
        payload length u64 | key length u16 | 6 reserved bytes | key (64 bytes, zero padded)
        payload xxh3-64 u64 | xxh3-64 of every trailer byte before this field u64
        zeros to the end of the page

A raw file (``verify=False``, suffix ``.bin``) is the payload alone, byte for
byte what vLLM's FS tier writes.
"""

from __future__ import annotations

import re
import struct

import xxhash

TRAILER_SIZE = 4096
MAGIC = b"KVUB"
VERSION = 1
ALGO_XXH3_64 = 1
MAX_KEY_BYTES = 64

_HEAD = struct.Struct("<4sHHIQH6x64sQ")
_TAIL = struct.Struct("<Q")
TRAILER_USED = _HEAD.size + _TAIL.size
_ZEROS = bytes(TRAILER_SIZE - TRAILER_USED)

VERIFIED_SUFFIX = ".kvb"
RAW_SUFFIX = ".bin"

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._-]+")

checksum = xxhash.xxh3_64_intdigest


def key_bytes(key: object) -> bytes:
    """The canonical bytes of a key: ``bytes`` as is, an ``int`` as minimal big-endian bytes."""
    if type(key) is bytes and 1 <= len(key) <= MAX_KEY_BYTES:
        return key  # the common case, without a copy
    if isinstance(key, bytes):
        if not 1 <= len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"key must be 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")
        return bytes(key)
    if isinstance(key, int) and not isinstance(key, bool):
        if key < 0:
            raise ValueError(f"int key must be >= 0, got {key}")
        raw = key.to_bytes(max(1, (key.bit_length() + 7) // 8), "big")
        if len(raw) > MAX_KEY_BYTES:
            raise ValueError(f"int key needs {len(raw)} bytes; at most {MAX_KEY_BYTES}")
        return raw
    raise TypeError(f"key must be bytes or int, not {type(key).__name__}")


def block_relpath(kb: bytes, suffix: bytes) -> tuple[bytes, bytes]:
    """(leaf directory, file path) relative to the namespace: ``abc/de``, ``abc/de/<hex><suffix>``."""
    hexed = kb.hex().encode()
    fan = hexed if len(hexed) >= 5 else hexed.ljust(5, b"0")
    leaf = fan[0:3] + b"/" + fan[3:5]
    return leaf, leaf + b"/" + hexed + suffix


#: where block files go: kvuring's own names, or vLLM's FileMapper names
LAYOUTS = ("kvuring", "vllm")
VLLM_GROUP_BYTES = 4


def vllm_relpath(kb: bytes) -> tuple[bytes, bytes]:
    """vLLM's layout: the key is hash + 4-byte big-endian group; ``abc/de_g<G>``, ``abc/de_g<G>/<hash hex>.bin``."""
    hexed = kb[:-VLLM_GROUP_BYTES].hex().encode()
    group = int.from_bytes(kb[-VLLM_GROUP_BYTES:], "big")
    fan = hexed.ljust(5, b"0")
    leaf = fan[0:3] + b"/" + fan[3:5] + b"_g%d" % group
    return leaf, leaf + b"/" + hexed + RAW_SUFFIX.encode()


def check_layout(layout: object, verify: bool) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
    if layout == "vllm" and verify:
        raise ValueError(
            "layout='vllm' names raw files as vLLM's tier does; it needs verify=False "
            "(kvuring's checksummed .kvb files keep kvuring's layout)"
        )
    assert isinstance(layout, str)
    return layout


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, not {type(namespace).__name__}")
    if not _NAMESPACE_RE.fullmatch(namespace) or namespace in (".", "..") or len(namespace) > 200:
        raise ValueError(
            f"namespace must match [A-Za-z0-9._-]+ (at most 200 characters) and not be "
            f"'.' or '..'; got {namespace!r}"
        )
    return namespace


def pack_trailer(page: memoryview, kb: bytes, payload_len: int, payload_sum: int) -> None:
    """Write a complete trailer into ``page`` (TRAILER_SIZE bytes)."""
    _HEAD.pack_into(page, 0, MAGIC, VERSION, TRAILER_SIZE, ALGO_XXH3_64, payload_len, len(kb), kb,
                    payload_sum)  # fmt: skip
    _TAIL.pack_into(page, _HEAD.size, checksum(page[: _HEAD.size]))
    page[TRAILER_USED:TRAILER_SIZE] = _ZEROS


def read_trailer(page: memoryview, kb: bytes, length: int) -> tuple[str | None, int]:
    """Check a trailer against itself, the key and the payload length.

    Returns (None, the payload checksum it records) when it is sound, else
    (why not, 0).  The payload itself is checked by comparing its checksum.
    """
    magic, version, size, algo, plen, klen, key, psum = _HEAD.unpack_from(page, 0)
    if magic != MAGIC:
        return "bad magic", 0
    if _TAIL.unpack_from(page, _HEAD.size)[0] != checksum(page[: _HEAD.size]):
        return "trailer checksum mismatch", 0
    # tobytes() first: comparing a memoryview item by item costs ~20 us a page.
    if page[TRAILER_USED:TRAILER_SIZE].tobytes() != _ZEROS:
        return "trailer padding is not zero", 0
    if version != VERSION or size != TRAILER_SIZE or algo != ALGO_XXH3_64:
        return f"unsupported format (version {version}, algorithm {algo})", 0
    if plen != length:
        return f"payload length {plen}, expected {length}", 0
    if key[:klen] != kb:
        return "key mismatch", 0
    return None, int(psum)


#: why a load is CORRUPT when only the payload's checksum disagrees
PAYLOAD_MISMATCH = "payload checksum mismatch"
