"""Evaluation data that survives a few bad images.

A real evaluation set can hold a file that failed to download or cannot be
decoded, or whose json gives another size than the image has. detectron2's test
loader would stop the whole evaluation with a raw error, after hours of
training; here such an image gets one warning naming the file and the problem,
the evaluation finishes on the others, and the list is returned so that the
results file can say which images were left out and why.
"""
import itertools
import logging

from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm

from ..data.bad_data import UNREADABLE, EvalDatasetMapper

logger = logging.getLogger(__name__)


class SkipUnreadable:
    """Wraps a test loader: drops the items of images left out, warning once per file, and
    hands the others on in batches of ``batch_size`` (``TEST.IMS_PER_BATCH``).

    Attributes:
        skipped: [(file name, problem)] of this process.
    """

    def __init__(self, loader, dataset_name: str, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"TEST.IMS_PER_BATCH must be >= 1, got {batch_size}")
        self.loader, self.dataset_name, self.batch_size = loader, dataset_name, batch_size
        self.skipped = []

    def __len__(self):
        return -(-len(self.loader) // self.batch_size)

    def __iter__(self):
        batch = []
        for item in (item for items in self.loader for item in items):
            if UNREADABLE in item:
                logger.warning("%s: skipping image %s: %s", self.dataset_name, item[UNREADABLE], item["problem"])
                self.skipped.append((item[UNREADABLE], item["problem"]))
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def evenly_spaced(items, max_items):
    """At most ``max_items`` of ``items``, spread evenly over them, in order (all when
    ``max_items`` is None or 0, or when there are no more)."""
    n = len(items)
    if not max_items or n <= max_items:
        return list(items)
    return [items[(i * n) // max_items] for i in range(max_items)]


def build_eval_loader(cfg, dataset_name: str, max_images=None) -> SkipUnreadable:
    """detectron2's test loader of ``dataset_name`` that skips the images it cannot use and batches
    ``TEST.IMS_PER_BATCH`` images per forward pass; over an evenly spaced subset of at most
    ``max_images`` of its images when that is given."""
    mapper = EvalDatasetMapper(cfg, False, dataset_name=dataset_name)
    if max_images:
        dicts = evenly_spaced(get_detection_dataset_dicts([dataset_name], filter_empty=False), max_images)
        loader = build_detection_test_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)
    else:
        loader = build_detection_test_loader(cfg, dataset_name, mapper=mapper)
    return SkipUnreadable(loader, dataset_name, cfg.TEST.IMS_PER_BATCH)


def run_inference(cfg, model, dataset_name: str, evaluator, max_images=None):
    """``inference_on_dataset`` over :func:`build_eval_loader` (of at most ``max_images`` images).

    Returns:
        (the evaluator's results, [(file name, problem)] of the images left out, all processes).
    """
    loader = build_eval_loader(cfg, dataset_name, max_images)
    results = inference_on_dataset(model, loader, evaluator)
    skipped = list(itertools.chain(*comm.all_gather(loader.skipped)))
    if skipped:
        logger.warning("%s: evaluated without %d image(s) left out (named above)", dataset_name, len(skipped))
    return results, skipped


def skipped_record(skipped) -> dict:
    """The images left out of one dataset, as ``ood_results.json`` lists them: their count and,
    per file, the reason (unreadable, missing, or another size than the json's)."""
    return {"count": len(skipped), "files": [{"file": f, "reason": reason} for f, reason in skipped]}
