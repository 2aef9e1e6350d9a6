"""Images central decodes (search uploads, thumbnails of originals): checked before decoding, decoded off the event loop.

Every decode goes through ``tokenline.preprocess.decode_image``, which reads the declared size from the header
and refuses anything over ``api.max_image_pixels`` (or of a format it cannot size) before OpenCV allocates a
pixel. The work runs on ``ImagePool``: ``api.image_workers`` threads with at most ``api.image_queue`` requests
waiting, so an upload never stalls the event loop (``/healthz`` and every other route keep answering) and a
burst beyond the queue is answered 503 at once instead of piling up memory.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import cv2

from central.errors import Unavailable, Unprocessable
from tokenline.preprocess import ImageError, decode_image

T = TypeVar("T")


class ImagePool:
    """A bounded pool for CPU-heavy image work; ``run`` awaits it from a route."""

    def __init__(self, workers: int, queue: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="images")
        self._slots = threading.BoundedSemaphore(workers + queue)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the pool; ``Unavailable`` ('busy') when workers and queue are all taken.

        A slot is held until the work itself ends, even when the client has gone away meanwhile."""
        if not self._slots.acquire(blocking=False):
            raise Unavailable("too many images are being decoded; retry shortly", reason="busy")

        def job() -> T:
            try:
                return fn(*args, **kwargs)
            finally:
                self._slots.release()

        try:
            fut = asyncio.get_running_loop().run_in_executor(self._executor, job)
        except BaseException:
            self._slots.release()
            raise
        return await fut

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """A JPEG at most ``size`` pixels on its long side of a stored original; ``Unprocessable`` when it does not
    decode (or is over ``max_pixels``, which uploads are checked against)."""
    try:
        img = decode_image(data, max_pixels)
    except ImageError as exc:
        raise Unprocessable(f"stored original does not decode: {exc}", reason="bad_original") from None
    h, w = img.shape[:2]
    s = size / max(h, w)
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise Unprocessable("thumbnail could not be encoded", reason="bad_original")
    return buf.tobytes()
