#!/usr/bin/env python
"""Run an OOD-aware detector on your own images: pictures with every box, and per-box JSON.

The command line lives in ood_det/cli/visualize_ood.py; ``--help`` lists its options.
"""
import sys

import ood_det  # noqa: F401  (registers datasets and models; must precede detectron2.data)
from ood_det.cli.visualize_ood import main

if __name__ == "__main__":
    sys.exit(main())
