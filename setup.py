#!/usr/bin/env python
"""ood_det: per-box out-of-distribution scores for Detectron2 detectors.

detectron2 itself is not on PyPI and is not listed here: install it first
(see README.md), or run ``make setup``, which installs everything.
"""
from setuptools import find_packages, setup

setup(
    name="ood_det",
    version="0.2.0",
    description="Energy + Cluster-Focal-Loss out-of-distribution object detection for Detectron2",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ood_det", "ood_det.*"]),
    install_requires=[
        "torch>=1.10",
        "torchvision",
        "numpy",
        "Pillow",
        "pycocotools>=2.0.2",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7.3", "scikit-learn", "scipy", "ruff>=0.6"],
    },
)
