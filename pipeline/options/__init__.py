"""Command-line options of `embedpipe`, each defined once, as groups the subcommands share.

- `embedding`: model, input, execution and size-limit groups, and the ModelConfig / InputSpec /
  EmbedConfig they build (embed, nightly, demo, query, serve).
- `indexing`: the index group and the IndexConfig it builds (index, nightly), and deprecated spellings.
- `runner`: local worker processes, and the check that every option embedpipe does not define is
  one Beam knows (every subcommand).

A subcommand's own module adds only the options that are its own. Nothing is imported here, so
that `import pipeline.options.<module>` loads only what it needs.
"""
