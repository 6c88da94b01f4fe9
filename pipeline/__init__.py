"""embedpipe: batch image embeddings (headless ResNet50 or another Keras model) on Apache Beam, FAISS search on top."""

__version__ = "0.1.0"
