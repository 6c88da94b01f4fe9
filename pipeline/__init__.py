"""embedpipe: batch image embeddings (headless ResNet50) with Apache Beam, FAISS search on top."""

__version__ = "0.1.0"
