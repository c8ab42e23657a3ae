"""Streaming JSON: the members of a top-level object or list, one at a time, in bounded memory."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from typing import Any, Iterator

DEFAULT_CHUNK_SIZE = 1 << 20  # characters read per step by the streaming JSON reader
# Largest single top-level JSON value (one MPtrj mp_id) the streaming reader will buffer. An
# unterminated string in a corrupt file would otherwise make it read the whole file.
MAX_ENTRY_CHARS = 1 << 31


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a (possibly gzip-compressed) UTF-8 text file."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


_WS = re.compile(r"[ \t\n\r]*")


def _maybe_truncated(exc: json.JSONDecodeError, buf_len: int) -> bool:
    """Could more input fix this decode error? (If not, the JSON is invalid.)

    With input cut short, the C scanner stops within a few characters of the end, except for a
    string cut in two, which it reports at the string's start.
    """
    return exc.pos >= buf_len - 32 or exc.msg.startswith("Unterminated string")


def iter_json_top_level(
    fh: io.TextIOBase, *, source: str = "<json>", chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[str | int, Any]]:
    """Stream the members of a top-level JSON object or array, one at a time.

    Yields ``(key, value)`` for an object, ``(index, value)`` for an array. Reads ``chunk_size``
    characters at a time into a buffer and decodes each member with
    :meth:`json.JSONDecoder.raw_decode` once it is complete, so memory stays bounded by one member
    (plus a chunk). When a member is larger than the buffer, the next read is at least as large as
    the buffered part (the buffer doubles), so a large member is decoded O(1) times on average.
    Raises ValueError naming ``source`` for invalid or truncated JSON.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    dropped = 0  # characters discarded from the front of the buffer
    eof = False

    def fill(at_least: int = 0) -> None:
        nonlocal buf, pos, dropped, eof
        if pos:
            dropped += pos
            buf = buf[pos:]
            pos = 0
        need = max(chunk_size, at_least)
        while need > 0 and not eof:
            piece = fh.read(need)
            if not piece:
                eof = True
                break
            buf += piece
            need -= len(piece)

    def skip_ws() -> str | None:
        """Advance past whitespace; return the next character, None at end of file."""
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf):
                return buf[pos]
            if eof:
                return None
            fill()

    def invalid(msg: str, at: int) -> ValueError:
        return ValueError(f"{source}: invalid JSON at character {dropped + at}: {msg}")

    def decode() -> Any:
        nonlocal pos
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if eof:
                    raise ValueError(f"{source}: invalid or truncated JSON at character "
                                     f"{dropped + exc.pos}: {exc.msg}") from None
                if not _maybe_truncated(exc, len(buf)):
                    raise invalid(exc.msg, exc.pos) from None
                pending = len(buf) - pos
                if pending > MAX_ENTRY_CHARS:
                    raise ValueError(f"{source}: a top-level entry at character {dropped + pos} is "
                                     f"longer than {MAX_ENTRY_CHARS} characters (or the JSON is "
                                     f"invalid)") from None
                fill(pending)
                continue
            if end == len(buf) and not eof and not isinstance(value, (dict, list, str)):
                fill()  # a number may continue in the next chunk
                continue
            pos = end
            return value

    c = skip_ws()
    if c == "\ufeff":  # byte-order mark
        pos += 1
        c = skip_ws()
    if c not in ("{", "["):
        found = "end of file" if c is None else repr(c)
        raise ValueError(f"{source}: expected a JSON object or list at the top level, found {found}")
    is_obj = c == "{"
    close = "}" if is_obj else "]"
    pos += 1
    index = 0
    while True:
        c = skip_ws()
        if c is None:
            raise ValueError(f"{source}: truncated JSON (end of file inside the top-level "
                             f"{'object' if is_obj else 'list'})")
        if c == close and index == 0:
            pos += 1
            break
        if index > 0:
            if c == close:
                pos += 1
                break
            if c != ",":
                raise invalid(f"expected ',' or {close!r}, found {c!r}", pos)
            pos += 1
            skip_ws()
        if is_obj:
            if skip_ws() != '"':
                raise invalid("expected a string key", pos)
            key = decode()
            if skip_ws() != ":":
                raise invalid("expected ':'", pos)
            pos += 1
            skip_ws()
        else:
            key = index
        value = decode()
        yield key, value
        del value
        index += 1
    if skip_ws() is not None:
        raise invalid("unexpected data after the top-level value", pos)


def _peek_json_kind(path: str | os.PathLike) -> str:
    """'mptrj' for an object of objects, 'mlearn' for a list; decodes at most one member."""
    with _open_text(path) as fh:
        it = iter_json_top_level(fh, source=str(path))
        try:
            _, first = next(it)
        except StopIteration:
            first = None
        except ValueError:
            first = None
        fh.seek(0)
        head = fh.read(4096).lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return "mlearn"
    if head.startswith("{") and isinstance(first, dict):
        return "mptrj"
    raise ValueError(f"{path}: cannot tell the dataset format from the JSON (expected an object "
                     f"of MPtrj entries or an mlearn list); pass format=")


__all__ = ["DEFAULT_CHUNK_SIZE", "MAX_ENTRY_CHARS", "iter_json_top_level"]
