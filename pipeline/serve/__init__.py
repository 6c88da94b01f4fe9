"""`embedpipe serve`: an HTTP API and a results page over one index directory (FastAPI under uvicorn)."""
