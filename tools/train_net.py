#!/usr/bin/env python
"""Train and evaluate an ood_det detector.

The command line lives in ood_det/cli/train_net.py; ``--help`` lists its options.
"""
import sys

import ood_det  # noqa: F401  (registers datasets and models; must precede detectron2.data)
from ood_det.cli.train_net import main

if __name__ == "__main__":
    sys.exit(main())
