"""Step 6 of ``make gpu-check`` (the real configs' training step and its ratio to the plain
detector's), run for real on the CPU at a small image size."""
import math

import pytest

from ood_det.cli import gpu_check


@pytest.fixture(scope="module")
def real_step():
    return gpu_check.real_config_step("cpu", size=(128, 160), iters=1, repeats=1, inference_repeats=1)


def test_real_config_step_times_the_ood_detector_against_the_plain_one(real_step):
    r = real_step
    assert r["config"] == "voc_energy_cfl.yaml" and r["image_size"] == [128, 160]
    for key in ("fp32_ms_per_step", "plain_fp32_ms_per_step", "fp32_ratio"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    # both detectors do the same backbone and RPN work: the ratio is near 1, not a unit slip
    assert 0.5 < r["fp32_ratio"] < 3
    assert r["fp32_peak_mem_mib"] is None  # the CPU keeps no peak
    assert "amp_ratio" not in r  # mixed precision only on CUDA
    # inference, one image at a time, every image keeping its 100 boxes, scored as the config says
    assert r["inference_boxes_per_image"] == 100
    assert r["inference_score"] == "combined" and r["knn_bank_rows"] == 0
    assert math.isfinite(r["plain_fp32_ms_per_image"]) and 0.5 < r["fp32_inference_ratio"] < 3
    assert "amp_inference_ratio" not in r
    assert r["fp32_graph_inference_ratio"] is None  # CUDA graphs only on CUDA
    assert r["fp32_compiled_ratio"] is None and "fp32_compiled_error" not in r  # compiled losses timed on CUDA
    rows = gpu_check.estimates({**r, "amp_ms_per_step": r["fp32_ms_per_step"]})
    assert {row["config"] for row in rows} == {"voc", "bdd"}


def test_gpu_check_summary_reports_the_real_config_ratio(real_step):
    rc = {**real_step, "amp_ms_per_step": 50.0, "amp_peak_mem_mib": 1600, "amp_ratio": 1.0234,
          "plain_amp_ms_per_step": 48.9, "fp32_ratio": 1.0456, "plain_fp32_ms_per_step": 53.7,
          "fp32_inference_ratio": 1.0123, "amp_inference_ratio": 1.0087, "plain_fp32_ms_per_image": 21.4,
          "plain_amp_ms_per_image": 17.2, "fp32_graph_inference_ratio": 1.0041, "amp_graph_inference_ratio": 1.0032,
          "fp32_compiled_ratio": 1.0312, "amp_compiled_ratio": 1.0287}
    summary = {"gpu": "a GPU", "torch": "2.x", "detectron2": "0.6", "device": "cuda", "wall_time_s": 1.0,
               "all_passed": True, "real_config": rc}
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- voc_energy_cfl.yaml"))
    assert "1.046x (fp32) and 1.023x (AMP) the plain detector's step" in line
    assert "53.7 / 48.9 ms; 1.031x with compiled losses (fp32) and 1.029x with compiled losses (AMP))" in line
    assert "1.012x (fp32) and 1.009x (AMP) the plain detector's 21.4 / 17.2 ms per image" in line
    assert "1.004x with CUDA graph scoring (fp32) and 1.003x with CUDA graph scoring (AMP)" in line
    rc.update(amp_graph_inference_ratio=None, amp_graph_inference_error="capture refused")
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- voc_energy_cfl.yaml"))
    assert "not timed with CUDA graph scoring: capture refused (AMP)" in line
    rc.update(fp32_compiled_ratio=None, fp32_compiled_error="torch.compile failed (no triton)")
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- voc_energy_cfl.yaml"))
    assert "not timed with compiled losses: torch.compile failed (no triton) (fp32)" in line


def test_gpu_check_summary_reports_the_cost_with_compiled_losses_and_cuda_graphs():
    cost = {"passed": True, "train_step_ratio": 1.1412, "compiled_train_step_ratio": 1.0813, "inference_ratio": 1.0523,
            "graph_inference_ratio": 1.0187, "synthesis_speedup": 131.2, "peak_gpu_memory_bytes": {}}
    summary = {"gpu": "a GPU", "torch": "2.x", "detectron2": "0.6", "device": "cuda", "wall_time_s": 1.0,
               "all_passed": True, "cost": cost}
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- cost on"))
    assert ("training step 1.141x (1.081x with compiled losses), inference 1.052x (1.019x with CUDA graph "
            "scoring) of StandardROIHeads") in line
    cost.update(compiled_train_step_ratio=None, compiled_train_step_error="torch.compile failed (no triton)")
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- cost on"))
    assert "training step 1.141x (not timed with compiled losses: torch.compile failed (no triton))" in line


def test_gpu_check_writes_the_summary_after_each_step(tmp_path, monkeypatch):
    """A run cut off (a machine's time limit) keeps the steps it finished in summary.json; all_passed
    comes with the last step."""
    import json

    import torch

    seen = {}

    def step(name):
        def run(*args):
            seen[name] = json.loads((tmp_path / "summary.json").read_text()) if name != "tests" else None
            return {"passed": True, "step": name}
        return run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    for name in ("tests", "visualize", "cost", "profile"):
        monkeypatch.setattr(gpu_check, f"{name}_step", step(name))
    monkeypatch.setattr(gpu_check, "train_step", lambda out, device: (step("train")(), out / "run"))

    def real_config_step(device):
        seen["real_config"] = json.loads((tmp_path / "summary.json").read_text())
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gpu_check, "real_config_step", real_config_step)
    monkeypatch.setattr(gpu_check, "markdown", lambda summary: "summary\n")
    assert gpu_check.main(["--output", str(tmp_path)]) == 1
    order = ["train", "visualize", "cost", "profile", "real_config"]
    done = ["tests"]
    for name in order:  # what each step found written: every step before it, and no verdict yet
        assert [k for k in ("tests", *order) if k in seen[name]] == done and "all_passed" not in seen[name]
        assert seen[name]["gpu"] == "a GPU"
        done.append(name)
    final = json.loads((tmp_path / "summary.json").read_text())
    assert final["real_config"] == {"passed": False, "error": "CUDA out of memory"}
    assert final["all_passed"] is False and final["profile"] == {"passed": True, "step": "profile"}
    assert (tmp_path / "summary.md").read_text() == "summary\n"
