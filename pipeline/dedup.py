"""DedupIds: one output row per image id; every later copy becomes a `duplicate_id` error row.

Where it runs, and why: on the job's terminal rows (embedding rows and error
rows), after EmbedImages and before the writers. Every input record ends as
exactly one terminal row, so grouping those rows by id sees every copy of an id
whatever happened to it, and turning the losers into error rows keeps
seen == embedded + failed. The group-by moves ~8 KB per image (a 2048-float
vector and a few strings), never the image bytes (10-100x more), and holds one
id's copies at a time, so memory does not depend on how many duplicates there
are. The price is that a duplicate is decoded and embedded before it is
dropped; duplicates are rare, and the alternatives cost more: filtering the
images before decode needs the complete loser set first, which makes the runner
materialise every image's bytes behind a fusion break (and a side input holding
every loser in each worker's memory).

Which copy wins: the one with the smallest `uri` in natural order (digit runs
compared as numbers), i.e. the first shard path, then the first position in it
(`#17` before `#100`, `#row=9` before `#row=10`; member name for tar). The order
depends only on the data, never on workers, bundles or timing.
"""

from __future__ import annotations

import re

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import reasons, records

_DIGITS = re.compile(r"(\d+)")


def natural_key(uri: str) -> tuple:
    """Sort key of a uri with digit runs compared as numbers (`a#9` < `a#10`); ties broken by the text."""
    parts = _DIGITS.split(uri)
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), uri)


def _rank(tagged: tuple[str, dict]) -> tuple:
    kind, row = tagged
    # Rows with equal uris (the same tar member name twice) are ordered by content,
    # then embedding before error, so the choice still depends on the data alone.
    return (
        natural_key(row["uri"]),
        row.get("content_sha256") or "",
        0 if kind == "embedding" else 1,
        row.get("error") or "",
        row.get("message") or "",
    )


class _KeepFirstFn(beam.DoFn):
    def setup(self) -> None:
        self._duplicates = Metrics.counter("embedpipe", "images_duplicate_id")

    def process(self, group: tuple[str, list[tuple[str, dict]]]):
        rid, copies = group
        copies = list(copies)
        if len(copies) > 1:
            copies.sort(key=_rank)
        kind, winner = copies[0]
        yield winner if kind == "embedding" else beam.pvalue.TaggedOutput("errors", winner)
        for _, row in copies[1:]:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(
                "errors",
                records.error_row(
                    rid,
                    row["uri"],
                    "read",
                    reasons.DUPLICATE_ID,
                    f"id {rid!r} is also at {winner['uri']}, which is kept (smallest uri in natural order)",
                    row.get("content_sha256"),
                ),
            )


class DedupIds(beam.PTransform):
    """(embedding rows, error rows) -> {"embeddings": ..., "errors": ...} with each id once.

    Every copy of an id but the first (smallest uri, natural order) becomes a
    `duplicate_id` error row; the first keeps its row, embedding or error.
    """

    def expand(self, pcolls):
        embeddings, errors = pcolls
        kept = (
            (
                embeddings | "KeyEmbeddings" >> beam.Map(lambda row: (row["id"], ("embedding", row))),
                errors | "KeyErrors" >> beam.Map(lambda row: (row["id"], ("error", row))),
            )
            | "AllRows" >> beam.Flatten()
            | "GroupById" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstFn()).with_outputs("errors", main="embeddings")
        )
        return {"embeddings": kept.embeddings, "errors": kept.errors}
