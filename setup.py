"""embedpipe: batch image embeddings with a headless ResNet50 on Apache Beam."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="embedpipe",
    version="0.1.0",
    description="Batch image embeddings (headless ResNet50) on Apache Beam, FAISS search on top",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    package_data={"pipeline.serve": ["*.html"]},
    install_requires=requirements(),
    entry_points={"console_scripts": ["embedpipe = pipeline.cli:main"]},
)
