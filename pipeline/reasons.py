"""Error reason codes: the `error` column of errors/*.parquet."""

# Short, stable codes to group and alert on.
# The exception type and its text go into `message`.
EMPTY_FILE = "empty_file"
TOO_LARGE = "too_large"
TOO_MANY_PIXELS = "too_many_pixels"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated_image"
DECODE_ERROR = "decode_error"
UNREADABLE = "unreadable"
EMBED_ERROR = "embed_error"
DUPLICATE_ID = "duplicate_id"
TRUNCATED_SHARD = "truncated_shard"  # a shard ends or breaks part-way; the row says where; what follows is lost
CORRUPT_RECORD = "corrupt_record"  # one record fails its checksum or does not parse; the shard goes on
EMPTY_INPUT = "empty_input"  # an input path (folder, glob, shard pattern) holding no image; the row says what it found
# The source itself records that it has no image for this row (img2dataset's `status` other than
# "success": failed_to_download, failed_to_resize); the message carries the source's status and error.
SOURCE_FAILED = "source_failed"
