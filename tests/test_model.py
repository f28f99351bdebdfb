"""One training step and one inference call of the shapes models on CPU."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ood_det.config import load_config


def _batch(num_images=2, size=128):
    g = torch.Generator().manual_seed(0)
    batch = []
    for i in range(num_images):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 64.0, 110.0, 100.0]]))
        inst.gt_classes = torch.tensor([i % 4, (i + 1) % 4])
        image = (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8)
        batch.append({"image": image, "height": size, "width": size, "instances": inst})
    return batch


@pytest.mark.parametrize("config, ood_losses, fields", [
    ("shapes_vanilla", set(), ("energy", "msp")),
    ("shapes_energy_cfl", {"loss_cfl", "loss_energy", "loss_rep_out"}, ("energy", "msp", "rep_score")),
])
def test_one_training_step_and_inference(config, ood_losses, fields):
    torch.manual_seed(0)
    cfg = load_config(config)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    with EventStorage(0):
        losses = model(_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} | ood_losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt.zero_grad()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()

    model.eval()
    with torch.no_grad():
        out = model([{"image": b["image"], "height": 256, "width": 256} for b in _batch()])
    assert len(out) == 2
    inst = out[0]["instances"]
    assert inst.image_size == (256, 256)  # rescaled to the requested output size
    for field in ("pred_boxes", "scores", "pred_classes", *fields, "ood_score", "is_ood"):
        assert inst.has(field)
    assert inst.has("rep_score") == ("rep_score" in fields)
    assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
