#!/usr/bin/env python
"""Check ood_det on a CUDA GPU in one command and print one summary (``make gpu-check``).

The command line lives in ood_det/cli/gpu_check.py; ``--help`` lists its options.
"""
import sys

import ood_det  # noqa: F401  (registers datasets and models; must precede detectron2.data)
from ood_det.cli.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
