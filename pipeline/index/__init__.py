"""The index side of embedpipe: build a FAISS index from embeddings (build, distributed) and query it.

Imports are lazy so that `import pipeline.index.<module>` stays cheap for the CLI.
"""

from __future__ import annotations

__all__ = ["build_index", "build_index_distributed", "choose_index"]


def __getattr__(name: str):
    if name == "build_index":
        from pipeline.index.build import build_index

        return build_index
    if name == "build_index_distributed":
        from pipeline.index.distributed import build_index_distributed

        return build_index_distributed
    if name == "choose_index":
        from pipeline.index.auto import choose_index

        return choose_index
    raise AttributeError(f"module 'pipeline.index' has no attribute {name!r}")
