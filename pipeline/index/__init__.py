"""The index side of embedpipe: build a FAISS index from embeddings and query it.

Modules: `build` (one process) and `distributed` (a Beam build), `auto` (which index for a corpus
and a memory budget), `train` and `quality` (sampling, training, tuning), `io` (reading the
embeddings, writing ids), `loading` and `search` (opening and querying an index directory),
`query_model` (embedding query images with the index's model), `duplicates` and `threshold`
(near-duplicate groups and the `--auto` threshold), `cli_build`, `query_cli` and `duplicates_page`
(the `index`, `query` and `duplicates` commands). Nothing is imported here, so that
`import pipeline.index.<module>` loads only what it needs.
"""
