"""Evaluation data that survives a few bad images.

A real evaluation set can hold a file that failed to download or cannot be
decoded. detectron2's test loader would stop the whole evaluation with a raw
error, after hours of training; here such an image gets one warning naming the
file, the evaluation finishes on the others, and the list is returned so that
the results file can say how many images were left out.
"""
import itertools
import logging

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm

from ..data.bad_data import UNREADABLE, EvalDatasetMapper

logger = logging.getLogger(__name__)


class SkipUnreadable:
    """Wraps a test loader: drops the items of unreadable images, warning once per file.

    Attributes:
        skipped: [(file name, problem)] of this process.
    """

    def __init__(self, loader, dataset_name: str):
        self.loader, self.dataset_name = loader, dataset_name
        self.skipped = []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            good = [item for item in batch if UNREADABLE not in item]
            for item in batch:
                if UNREADABLE in item:
                    logger.warning("%s: skipping image %s: %s", self.dataset_name, item[UNREADABLE], item["problem"])
                    self.skipped.append((item[UNREADABLE], item["problem"]))
            if good:
                yield good


def build_eval_loader(cfg, dataset_name: str) -> SkipUnreadable:
    """detectron2's test loader of ``dataset_name`` that skips unreadable images."""
    loader = build_detection_test_loader(cfg, dataset_name, mapper=EvalDatasetMapper(cfg, False))
    return SkipUnreadable(loader, dataset_name)


def run_inference(cfg, model, dataset_name: str, evaluator):
    """``inference_on_dataset`` over :func:`build_eval_loader`.

    Returns:
        (the evaluator's results, [(file name, problem)] of the images left out, all processes).
    """
    loader = build_eval_loader(cfg, dataset_name)
    results = inference_on_dataset(model, loader, evaluator)
    skipped = list(itertools.chain(*comm.all_gather(loader.skipped)))
    if skipped:
        logger.warning("%s: evaluated without %d unreadable image(s)", dataset_name, len(skipped))
    return results, skipped
