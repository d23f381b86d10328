"""tfhybrid: hybrid structured compression for Keras (tf_keras) models."""

from setuptools import find_packages, setup

setup(
    name="tfhybrid",
    version="0.1.0",
    description=(
        "Learn filter removal, low-rank layers and sparse corrections under one budget "
        "inside model.fit, then export a physically smaller Keras / TFLite model."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tfhybrid", "tfhybrid.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "tensorflow==2.21.*",  # what tf-keras requires (tensorflow-cpu would come on top)
        "tf-keras==2.21.*",
        "tensorboard==2.21.*",
        "tensorflow-model-optimization==0.8.1",
        "tensorflow-datasets",
        "importlib_resources",  # tensorflow-datasets imports it to download, undeclared
        "absl-py",
        "ai-edge-litert",
        "numpy",
    ],
    entry_points={"console_scripts": ["tfhybrid = tfhybrid.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "ruff"],
        "benchmark": ["matplotlib"],
    },
)
