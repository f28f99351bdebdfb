#!/usr/bin/env python
"""The lever table: what each setting change did on the tuning splits, paired by seed to a base run.

    tools/benchmark.py --validation --skip-cost --jobs 2 --seeds 0 1 --output output/tune/base
    tools/benchmark.py --validation --skip-cost --jobs 2 --seeds 0 1 --methods energy_cfl \\
        --output output/tune/relu --opts MODEL.OOD.OUTLIER_SUPPORT relu
    tools/lever_table.py --base output/tune/base --lever relu=output/tune/relu

Prints the markdown (each cell: mean over seeds, the paired difference to the base and its 95%
interval, "better"/"worse" where that interval excludes zero) and writes it with ``--output``.
Library: ``ood_det.benchmark.levers``.
"""
import argparse
import sys

from ood_det.benchmark import levers
from ood_det.errors import OODDetError
from ood_det.utils import atomic_write


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="tools/benchmark.py --validation folder of the default settings")
    p.add_argument("--lever", action="append", default=[], metavar="NAME=FOLDER",
                   help="a folder of the same seeds with one change (repeatable)")
    p.add_argument("--method", default="energy_cfl", help="the method whose runs are compared")
    p.add_argument("--output", help="also write the markdown to this file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        pairs = []
        for item in args.lever:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise OODDetError(f"--lever {item!r}: expected NAME=FOLDER")
            pairs.append((name, levers.read_benchmark(folder)))
        base = levers.read_benchmark(args.base)
        rows = levers.lever_rows(base, pairs, args.method)
        text = ("## Methods at default settings\n\n" + levers.reference_markdown(levers.reference_rows(base))
                + f"\n## Levers ({args.method})\n\n" + levers.lever_markdown(rows))
    except OODDetError as e:
        sys.exit(f"lever_table: {e}")
    print(text, end="")
    if args.output:
        atomic_write(args.output, lambda f: f.write(text))


if __name__ == "__main__":
    main()
