"""Fetching a model archive: ``https://`` only (plain ``http://`` to a loopback host for tests), streamed
to disk with its SHA-256 computed on the way, redirects checked, and the partial file removed on any failure.

Torch-free; nothing downloaded is executed or unpickled here (:mod:`afloc_engine.registry.archive` unpacks).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import ipaddress
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from afloc_engine.errors import CheckpointError

DOWNLOAD_TIMEOUT_S = 60.0
"""Default bound (s) on connecting and on every read."""
CHUNK = 1 << 20
"""Bytes read and hashed at a time."""
FREE_SPACE_MARGIN = 64 << 20
"""Bytes kept free on the disk beyond what a download or unpacking needs."""


def sha256_file(path: Path) -> str:
    """The SHA-256 (64 lower-case hex digits) of a file, read in :data:`CHUNK` blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def check_free_space(folder: Path, needed: int) -> None:
    """Raise :class:`CheckpointError` unless ``folder``'s disk has ``needed`` bytes (+ 64 MiB) free."""
    free = shutil.disk_usage(folder).free
    if free < needed + FREE_SPACE_MARGIN:
        raise CheckpointError(f"not enough disk space: need {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free", folder)


def is_url(text: str) -> bool:
    """True when ``text`` starts with a URL scheme (``https://``, ``file://`` ...), not a local path."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> None:
    """Refuse anything but ``https://`` (and ``http://`` to a loopback host, for tests)."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return
    if parts.scheme == "http":
        raise CheckpointError("plain http:// downloads are refused (use https://)", url)
    raise CheckpointError(f"unsupported URL scheme {parts.scheme!r} (use https://)", url)


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs :func:`check_url` accepts (no https -> http downgrade)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download_file(url: str, dest: Path, progress: str = "none", timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[str, int]:
    """Stream ``url`` into the file ``dest``; returns (SHA-256 hex, size in bytes).

    ``timeout`` (s) bounds the connection and every read. Raises :class:`CheckpointError` for
    HTTP errors (404 ...), unreachable hosts, timeouts, truncated transfers and a full disk;
    ``dest`` is removed on any failure.
    """
    from afloc_engine.progress import Progress

    check_url(url)
    opener = urllib.request.build_opener(_SafeRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "afloc-engine"})
    digest, received = hashlib.sha256(), 0
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else 0
            if total:
                check_free_space(dest.parent, total)
            with dest.open("wb") as out, Progress(total, progress, desc=f"download {Path(url).name}") as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
        if total and received != total:
            raise CheckpointError(f"download incomplete: received {received} of {total} bytes", url)
    except urllib.error.HTTPError as err:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"download failed: HTTP {err.code} {err.reason}", url) from None
    except urllib.error.URLError as err:
        dest.unlink(missing_ok=True)
        reason = err.reason
        if isinstance(reason, TimeoutError):
            raise CheckpointError(f"download timed out after {timeout:g} s", url) from None
        raise CheckpointError(f"cannot reach the server: {reason}", url) from None
    except TimeoutError:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"download timed out after {timeout:g} s", url) from None
    except http.client.HTTPException as err:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"download broken off: {type(err).__name__} {err}", url) from None
    except OSError as err:
        dest.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise CheckpointError("not enough disk space for the download", dest.parent) from None
        raise CheckpointError(f"download failed: {err}", url) from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), received
