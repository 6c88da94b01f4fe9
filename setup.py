"""embedpipe: batch image embeddings with a headless ResNet50 on Apache Beam.

Dependencies come in two layers:
- `install_requires` and the extras below hold compatible *ranges*, so that embedpipe installs
  beside a user's own TensorFlow / NumPy / Beam without rewriting them;
- `requirements.txt` holds the exact set that CI, the Dockerfile and the README's commands install
  and test (use it as a constraints file: `pip install -c requirements.txt embedpipe[serve]`).
Lower bounds are the oldest releases with the APIs the code uses; upper bounds only where a
major release is known to change them.
"""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

INSTALL_REQUIRES = [
    "apache-beam[gcp]>=2.60,<3",  # FileSystems gs://, FnApiRunner multi-processing, resource hints
    "tensorflow>=2.16,<3",  # 2.16 is the first with Keras 3 as tf.keras
    "keras>=3.3,<4",
    "numpy>=1.26,<3",
    "pyarrow>=15",  # fixed_size_list columns, iter_batches over a file object
    "pillow>=10.1",  # Image.Transpose, draft + reducing_gap
    "faiss-cpu>=1.8",
    "h5py>=3.10",  # Keras' .h5 weights files
    "matplotlib>=3.7",  # the nightly report's plots (Agg, no display)
    "rich>=13",  # the progress bar
]

EXTRAS_REQUIRE = {
    # `embedpipe serve`: the HTTP API and results page
    "serve": ["fastapi>=0.110", "uvicorn>=0.30", "python-multipart>=0.0.9"],
    # `embedpipe demo`: the sample corpus is made from photos that ship inside scikit-image
    "demo": ["scikit-image>=0.22"],
    # `--decode gpu`: JPEG decoding on the GPU worker with NVIDIA's nvImageCodec (CUDA 12 builds)
    "gpu": ["nvidia-nvimgcodec-cu12>=0.9", "nvidia-nvjpeg-cu12>=12.3"],  # pinned: infra/requirements-gpu-decode.txt
}
EXTRAS_REQUIRE["all"] = sorted({r for group in ("serve", "demo", "gpu") for r in EXTRAS_REQUIRE[group]})


def version() -> str:
    for line in (HERE / "pipeline" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("pipeline/__init__.py has no __version__")


setup(
    name="embedpipe",
    version=version(),
    description="Batch image embeddings (headless ResNet50) on Apache Beam, FAISS search on top",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    package_data={"pipeline.serve": ["*.html"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["embedpipe = pipeline.cli:main"]},
)
