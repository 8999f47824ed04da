"""``response_format: "url"``: images written under ``api.image_store`` (any fsspec URL), answered by
link: a presigned HTTPS URL for ``s3://`` (valid ``url_expiry_s``), a ``file://`` URL for a local
directory. Names are 256 random bits, so a link cannot be guessed from another. A store that fails
is the server's fault (502), never the client's."""

from __future__ import annotations

import logging
import posixpath
import secrets
from typing import Any

from .config import ImageStoreSection
from .errors import APIError

logger = logging.getLogger(__name__)


class ImageStore:
    def __init__(self, section: ImageStoreSection):
        import fsspec

        self.url = section.url.rstrip("/")
        options = dict(section.storage_options)
        if self.url.startswith("file://"):
            options.setdefault("auto_mkdir", True)
        elif self.url.startswith("s3://"):  # links signed with SigV4, which every S3 region takes
            config = options.setdefault("config_kwargs", {})
            config.setdefault("signature_version", "s3v4")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.expiry_s = section.url_expiry_s
        self.signed = "s3" in _protocols(self.fs)

    def put(self, png: bytes) -> str:
        """Write one PNG; its URL. Blocking (a worker thread's)."""
        path = posixpath.join(self.root, f"{secrets.token_urlsafe(32)}.png")
        try:
            self.fs.pipe_file(path, png)
            if self.signed:
                return self.fs.sign(path, expiration=self.expiry_s)
        except Exception as exc:  # the store's fault, whatever the backend raises
            logger.warning("image store %s failed: %s: %s", self.url, type(exc).__name__, exc)
            raise APIError(
                502, f"the image store failed ({type(exc).__name__}); retry later", code="image_store_error"
            ) from None
        return self.fs.unstrip_protocol(path)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
