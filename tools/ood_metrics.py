#!/usr/bin/env python
"""Recompute OOD metrics offline from saved per-box score files.

The command line lives in ood_det/cli/ood_metrics.py; ``--help`` lists its options.
"""
import sys

import ood_det  # noqa: F401  (registers datasets and models; must precede detectron2.data)
from ood_det.cli.ood_metrics import main

if __name__ == "__main__":
    sys.exit(main())
