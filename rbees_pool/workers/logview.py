"""`worker logs` for people: the worker's JSON lines as `time level message key=value...`; lines that are not
the worker's JSON (a traceback, a native library's warning) are shown as they are."""

from __future__ import annotations

import json

_OMITTED = {"ts", "level", "human", "logger", "worker_id"}  # shown as the line itself, or the same on every line


def readable(line: str) -> str:
    """One log line for people."""
    try:
        doc = json.loads(line)
    except ValueError:
        return line
    if not isinstance(doc, dict) or "human" not in doc:
        return line
    fields = " ".join(f"{k}={_value(v)}" for k, v in doc.items() if k not in _OMITTED)
    text = f"{doc.get('ts', '-')} {str(doc.get('level', '-')):<7} {doc['human']}"
    return f"{text}  {fields}" if fields else text


def _value(value: object) -> str:
    return value if isinstance(value, str) and value and " " not in value else json.dumps(value)


class Lines:
    """Cuts a followed log's byte chunks into whole lines (a chunk may end mid-line, or mid-character)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        *complete, self._pending = (self._pending + chunk).split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in complete]

    def rest(self) -> list[str]:
        """What is left once the log ends (a last line without a newline)."""
        rest, self._pending = self._pending, b""
        return [rest.decode("utf-8", errors="replace")] if rest else []
