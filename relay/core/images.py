"""Image and file parts: OpenAI `image_url` / `file` and Anthropic `image` parts to Anthropic blocks.

Pure. `data:` URLs become base64 sources after checking the base64 and the bytes' magic number: an image
type labelled as another image type takes the type of its bytes; anything else that disagrees with its
label (a PNG sent as a PDF, a PDF sent as an image) is a 400. `http(s)` URLs
become URL sources handed to the model as they are (the relay never fetches them, so it cannot be
used as a proxy into its own network).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from ..errors import BadRequest

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$", re.S)
MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF87a": "image/gif",
         b"GIF89a": "image/gif"}


def sniff_image(raw: bytes) -> str | None:
    """The image type the bytes are (their magic number), whatever the label says; None if no image."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in MAGIC.items() if raw.startswith(magic)), None)


def is_pdf(raw: bytes) -> bool:
    return b"%PDF-" in raw[:1024]  # readers accept the header anywhere in the first KB


def _decoded_size(data: str) -> int:
    return len(data) * 3 // 4 - data[-2:].count("=")


def _check_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("The image data is not valid base64.", param=param, code="invalid_image") from None


def _base64_block(media: str, data: str, param: str, kind: str = "image") -> dict[str, Any]:
    if kind == "image" and media not in IMAGE_TYPES:
        raise BadRequest(f"Unsupported image type {media!r}; use one of " + ", ".join(IMAGE_TYPES),
                         param=param, code="invalid_image_format")
    raw = _check_base64(data, param)
    if not raw:
        raise BadRequest("The image is empty.", param=param, code="invalid_image")
    if kind == "image":
        sniffed = sniff_image(raw)
        if sniffed is None:
            raise BadRequest("The data is not a PNG, JPEG, GIF or WebP image.", param=param,
                             code="invalid_image_format")
        media = sniffed  # one image type labelled as another: the bytes decide (the API rejects a mismatch)
    elif not is_pdf(raw):
        raise BadRequest("The document is not a PDF: its bytes do not start with %PDF-.", param=param,
                         code="invalid_file_format")
    return {"type": kind, "source": {"type": "base64", "media_type": media, "data": data}}


def to_anthropic_block(part: dict[str, Any], param: str = "content") -> dict[str, Any]:
    kind = part.get("type")
    if kind == "image":  # Anthropic-style block
        src = part.get("source")
        if not isinstance(src, dict):
            raise BadRequest("image.source must be an object", param=param)
        if src.get("type") == "base64":
            return _base64_block(str(src.get("media_type")), str(src.get("data") or ""), param)
        if src.get("type") == "url" and isinstance(src.get("url"), str):
            return _url_block(src["url"], param)
        raise BadRequest("image.source.type must be base64 or url", param=param)
    if kind == "document":  # Anthropic-style: a PDF (base64 or URL) or plain text
        src = part.get("source")
        if not isinstance(src, dict):
            raise BadRequest("document.source must be an object", param=param)
        if src.get("type") == "base64":
            if src.get("media_type") != "application/pdf":
                raise BadRequest("A base64 document must be application/pdf.", param=param)
            block = _base64_block("application/pdf", str(src.get("data") or ""), param, kind="document")
        elif src.get("type") == "url" and isinstance(src.get("url"), str):
            block = dict(_url_block(src["url"], param), type="document")
        elif src.get("type") == "text" and isinstance(src.get("data"), str):
            block = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": src["data"]}}
        else:
            raise BadRequest("document.source.type must be base64, url or text", param=param)
        if isinstance(part.get("title"), str):
            block["title"] = part["title"]
        return block
    if kind == "file":
        f: dict[str, Any] = part["file"] if isinstance(part.get("file"), dict) else part
        if f.get("file_id"):
            raise BadRequest("file_id references are not supported; send file_data.", param=param)
        m = DATA_URL.match(str(f.get("file_data") or ""))
        if not m or not m.group(3) or m.group(1) != "application/pdf":
            raise BadRequest("file_data must be a base64 data: URL of a PDF.", param=param)
        return _base64_block("application/pdf", m.group(4), param, kind="document")
    url = part.get("image_url")
    if kind == "input_image":
        url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise BadRequest("image_url.url must be a string", param=param)
    if url.startswith("data:"):
        m = DATA_URL.match(url)
        if not m or not m.group(3):
            raise BadRequest("An image data: URL must be base64 encoded (data:image/png;base64,...).",
                             param=param, code="invalid_image")
        return _base64_block((m.group(1) or "").lower(), m.group(4).strip(), param)
    return _url_block(url, param)


def _url_block(url: str, param: str) -> dict[str, Any]:
    if not re.match(r"^https?://[^\s/]+", url, re.I):
        raise BadRequest("Image and document URLs must be http(s) or data: URLs.", param=param, code="invalid_image_url")
    return {"type": "image", "source": {"type": "url", "url": url}}


def check_limits(messages: list[dict[str, Any]], max_count: int, max_bytes: int) -> None:
    """Refuse too many, too large or malformed images and files before anything is spawned."""
    count = 0
    for i, msg in enumerate(messages):
        for j, part in enumerate(msg.get("content") or []):
            if part.get("type") == "text":
                continue
            count += 1
            param = f"messages[{i}].content[{j}]"
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            data = url.split(",", 1)[1] if isinstance(url, str) and url.startswith("data:") and "," in url else None
            if part.get("type") in ("image", "document") and isinstance(part.get("source"), dict):
                data = part["source"].get("data") if part["source"].get("type") == "base64" else None
            if part.get("type") == "file":
                f = part["file"] if isinstance(part.get("file"), dict) else part
                fd = f.get("file_data")
                data = fd.split(",", 1)[1] if isinstance(fd, str) and "," in fd else None
            if isinstance(data, str) and _decoded_size(data.strip()) > max_bytes:
                raise BadRequest(f"An image is larger than {max_bytes} bytes.", param=param,
                                      code="image_too_large")
    if count > max_count:
        raise BadRequest(f"At most {max_count} images or files per request (got {count}).",
                         param="messages", code="too_many_images")
