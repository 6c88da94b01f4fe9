"""DecodeImages: SourceImage -> DecodedImage, or an error row with a reason (rules in imaging.py)."""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import records
from pipeline.imaging import DecodeError, decode_image
from pipeline.records import DecodedImage, SourceImage


class _DecodeFn(beam.DoFn):
    def __init__(self, *, size: int, resize: str, max_pixels: int, draft: bool, thumbnails: bool):
        self._kwargs = dict(size=size, resize=resize, max_pixels=max_pixels, draft=draft, thumbnail=thumbnails)
        self._failed = Metrics.counter("embedpipe", "images_failed_decode")

    def process(self, image: SourceImage):
        sha = hashlib.sha256(image.data).hexdigest()
        try:
            pixels, width, height, thumb = decode_image(image.data, **self._kwargs)
        except DecodeError as exc:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                "errors", records.error_row(image.id, image.uri, "decode", exc.reason, str(exc), sha)
            )
            return
        yield DecodedImage(image.id, image.uri, pixels, sha, width, height, image.meta, thumb)


class DecodeImages(beam.PTransform):
    """SourceImage -> DecodedImage (main output) and error rows (output "errors")."""

    def __init__(
        self,
        *,
        size: int,
        resize: str = "squash",
        max_pixels: int,
        draft: bool = True,
        thumbnails: bool = False,
        threads: int = 0,
    ) -> None:
        super().__init__()
        del threads  # wired next: a decode thread pool
        self._fn = _DecodeFn(size=size, resize=resize, max_pixels=max_pixels, draft=draft, thumbnails=thumbnails)

    def expand(self, images):
        return images | "Decode" >> beam.ParDo(self._fn).with_outputs("errors", main="decoded")
