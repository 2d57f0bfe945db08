"""Issue 18 (a training loop that keeps a GPU busy): the loss's device path, the leakage guard before the
transfer, pinned memory for CUDA runs, overlapped validation scoring, and the loop benchmark's numbers.
Speed is never asserted here: `make bench` measures it."""

import json

import pytest
import torch

from datamodules.label_policy import CLASS_INDEX, CLASSES, IGNORE
from lightning_modules import losses
from lightning_modules.losses import PartialDiceCELoss, merged_log_probs
from tests.args import base_args

C = len(CLASSES)


def _annotated(*names_per_sample) -> torch.Tensor:
    a = torch.zeros(len(names_per_sample), C, dtype=torch.bool)
    a[:, 0] = True
    for i, names in enumerate(names_per_sample):
        for n in names:
            a[i, CLASS_INDEX[n]] = True
    return a


LUNGS_LESION = ("lung_left", "lung_right", "lesion")
BATCHES = {
    "every class": _annotated(CLASSES[1:], CLASSES[1:]),                      # nothing to merge
    "lesion only + full": _annotated(("lesion",), LUNGS_LESION),              # merge into background
    "lung only (nested)": _annotated(("lung_left", "lung_right"), ("lesion",)),  # lesion moves into the lungs
    "typed + untyped": _annotated(("lesion", "ggo", "consolidation"), ("lesion",)),
    "background only": _annotated((), ()),                                    # no foreground class: Dice 1
}


def _target(annotated: torch.Tensor, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for a in annotated:
        allowed = torch.nonzero(a).flatten()
        t = allowed[torch.randint(len(allowed), shape, generator=g)]
        t[torch.rand(shape, generator=g) < 0.05] = IGNORE
        rows.append(t)
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(BATCHES))
def test_loss_device_path_gives_the_host_path_values_and_gradients(monkeypatch, name):
    """On a GPU the loss branches on no tensor value (no host sync): it computes every branch and selects
    with torch.where. Forced here on the CPU, it must give the host path's loss and gradients."""
    annotated = BATCHES[name]
    shape = (6, 5, 4)
    target = _target(annotated, shape, seed=len(name))
    logits0 = torch.randn((len(annotated), C, *shape), generator=torch.Generator().manual_seed(1)) * 3
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce"))
    results = []
    for host in (True, False):
        monkeypatch.setattr(losses, "host_decides", lambda t, host=host: host)
        x = logits0.clone().requires_grad_(True)
        value = loss(x, target, annotated)
        value.backward()
        results.append((value.detach(), x.grad, merged_log_probs(logits0, annotated, target.masked_fill(target == IGNORE, 0))))
    (v_host, g_host, m_host), (v_dev, g_dev, m_dev) = results
    torch.testing.assert_close(v_dev, v_host, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_dev, g_host, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(m_dev, m_host, rtol=0, atol=0)  # the same merged log-probabilities, exactly


def test_device_path_visits_every_container_a_batch_can_move_into():
    # nested_moves only ever names lungs (CONTAINERS); the device path visits exactly those, ascending
    assert losses._container_classes(C) == [CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"]]
    assert losses._container_classes(3) == []  # no opacity channel: nothing can be nested


def _dice_ce_by_gather(logits, target, annotated, ce_weight=1.0, dice_weight=1.0, smooth=1e-5):
    """dice_ce written the way it was before the uint8 path: int64 target, gather for CE, scatter for the
    one-hot. Independent of losses.target_onehot, so the two must agree."""
    t = target.long()
    valid = t != IGNORE
    t = t.masked_fill(~valid, 0)
    logq = merged_log_probs(logits, annotated, t)
    ce = (-torch.gather(logq, 1, t[:, None])[:, 0] * valid).sum() / valid.sum().clamp(min=1)
    w = valid.float()[:, None]
    q = logq.exp() * w
    onehot = torch.zeros_like(q).scatter_(1, t[:, None], 1.0) * w
    dims = tuple(range(2, logits.dim()))
    use = annotated.clone()
    use[:, 0] = False
    inter, denom = ((q * onehot).sum(dims) * use).sum(0), ((q + onehot).sum(dims) * use).sum(0)
    dice_c = (2 * inter + smooth) / (denom + smooth)
    dice = dice_c[use.any(0)].mean() if use.any() else torch.tensor(1.0)
    return ce_weight * ce + dice_weight * (1 - dice)


@pytest.mark.parametrize("name", list(BATCHES))
def test_dice_ce_on_uint8_labels_gives_the_int64_values_and_gradients(name):
    """Patches arrive as uint8 and the loss takes them so (no int64 widening per step): the same loss and
    gradients as an int64 label, and as dice_ce computed by gather/scatter on int64 (the former code)."""
    annotated = BATCHES[name]
    shape = (6, 5, 4)
    target = _target(annotated, shape, seed=len(name) + 7)
    logits0 = torch.randn((len(annotated), C, *shape), generator=torch.Generator().manual_seed(2)) * 3
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce", ce_weight=1.0, dice_weight=1.0, smooth=1e-5))
    out = []
    for t in (target.to(torch.uint8), target.long(), target.to(torch.uint8)[:, None]):
        x = logits0.clone().requires_grad_(True)
        value = loss(x, t, annotated)
        value.backward()
        out.append((value.detach(), x.grad))
    x = logits0.clone().requires_grad_(True)
    ref = _dice_ce_by_gather(x, target, annotated)
    ref.backward()
    for value, grad in out:
        torch.testing.assert_close(value, out[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, out[0][1], rtol=0, atol=0)
    torch.testing.assert_close(out[0][0], ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[0][1], x.grad, rtol=1e-5, atol=1e-8)


def test_dice_ce_names_a_code_that_is_no_class_and_rejects_float_labels():
    annotated = BATCHES["every class"]
    logits = torch.zeros(2, C, 2, 2, 1)
    target = torch.zeros(2, 2, 2, 1, dtype=torch.uint8)
    target[1, 0, 0, 0] = C  # one past the last channel, not IGNORE: gather used to fail with an index error
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce"))
    with pytest.raises(ValueError, match=rf"code\(s\) \[{C}\]: no class of the {C} channels"):
        loss(logits, target, annotated)
    target[1, 0, 0, 0] = IGNORE  # IGNORE is not an error
    assert torch.isfinite(loss(logits, target, annotated))
    with pytest.raises(ValueError, match="integer class codes"):
        loss(logits, target.float(), annotated)
    lesion_only = BATCHES["lesion only + full"]
    target[0, 0, 0, 0] = CLASS_INDEX["lung_left"]  # sample 0 annotates lesion only
    with pytest.raises(ValueError, match="does not annotate"):
        loss(logits, target, lesion_only)


# ------------------------------------------------------------------------------ the module's loop hooks
def _module(overlap: bool = True, test_sources=("mosmed",)):
    from lightning_modules.segmentation import SegmentationModule

    ev = {"space": "harmonized", "val_surface": True, "save_predictions": False, "overlap_scoring": overlap,
          "classes": {"lesion": {"values": [3, 6, 7], "tolerance_mm": 3.0},
                      "lung": {"values": [1, 2, 3, 6, 7], "tolerance_mm": 1.0, "requires": [1, 2]}}}
    torch.manual_seed(0)
    return SegmentationModule(network={"name": "unet", **base_args("networks", "unet", channels=[4, 8], strides=[2],
                                                                        num_res_units=0)},
                              loss={"name": "dice_ce", **base_args("losses", "dice_ce")},
                              optim={"lr": 1e-3, "weight_decay": 0.0},
                              inference={"roi_size": [8, 8, 8], "sw_batch_size": 1, "overlap": 0.0, "mode": "constant"},
                              evaluation=ev, test_sources=list(test_sources))


def test_leakage_guard_runs_on_the_host_batch_before_any_transfer():
    """A training batch holding a held-out source is refused in on_before_batch_transfer, from its list of
    source names: the tensors are on the meta device, so reading any value would fail instead."""
    from types import SimpleNamespace

    from datamodules.splits import LeakageError

    module = _module(test_sources=("mosmed",))
    module._trainer = SimpleNamespace(training=True)
    batch = {"image": torch.empty(2, 1, 8, 8, 8, device="meta"), "label": torch.empty(2, 1, 8, 8, 8, device="meta"),
             "annotated": torch.empty(2, C, dtype=torch.bool, device="meta"), "source": ["ctseg", "mosmed"]}
    with pytest.raises(LeakageError, match="mosmed"):
        module.on_before_batch_transfer(batch, 0)
    assert module.on_before_batch_transfer(dict(batch, source=["ctseg", "ctseg"]), 0)["source"] == ["ctseg", "ctseg"]
    module._trainer = SimpleNamespace(training=False)  # validation batches are the held-out source's own
    module.on_before_batch_transfer(batch, 0)


def test_training_loss_hands_the_uint8_label_to_the_loss(monkeypatch):
    """No int64 copy of the label per step (docs/gpu.md: it was most of the loop's overhead): the loss gets
    the patches' uint8 label as it came, and the step's loss is the one of the int64 label."""
    module = _module(test_sources=("mosmed",))
    g = torch.Generator().manual_seed(5)
    annotated = _annotated(LUNGS_LESION, ("lesion",))
    label = _target(annotated, (16, 16, 8), seed=5).to(torch.uint8)[:, None]
    batch = {"image": torch.rand(2, 1, 16, 16, 8, generator=g), "label": label, "annotated": annotated,
             "source": ["ctseg", "ctseg"]}
    seen = []
    forward = module.loss_fn.forward
    monkeypatch.setattr(module.loss_fn, "forward", lambda h, y, a: (seen.append(y.dtype), forward(h, y, a))[1])
    value = module.training_loss(batch)
    assert seen == [torch.uint8]
    torch.testing.assert_close(value, module.training_loss(dict(batch, label=label.long())), rtol=0, atol=0)


def _volumes(n: int):
    from datamodules.sources import SOURCES

    g = torch.Generator().manual_seed(3)
    for i in range(n):
        src = ("ctseg", "covid19_20")[i % 2]
        policy = next(iter(SOURCES[src].POLICIES.values()))
        label = torch.randint(0, 4, (1, 1, 16, 16, 8), generator=g, dtype=torch.uint8)
        annotated = torch.tensor(policy.annotated_vector())[None]
        label[~annotated[0, label.long()]] = 0  # only classes the source annotates
        yield {"image": torch.rand(1, 1, 16, 16, 8, generator=g), "label": label, "annotated": annotated,
               "case": [f"c{i}"], "source": [src], "spacing": torch.tensor([[1.5, 1.5, 5.0]], dtype=torch.float64)}


def test_overlapped_validation_scoring_gives_the_sequential_rows():
    """Scoring case i in a thread while case i+1 is predicted: the same rows, in the same order, as scoring
    each case in turn (both stages, surface metrics on)."""
    rows = {}
    for overlap in (False, True):
        module = _module(overlap).eval()
        with torch.no_grad():
            for i, batch in enumerate(_volumes(5)):
                module._eval_step(batch, "val" if i % 3 else "oracle")
        rows[overlap] = {stage: module.scored_rows(stage) for stage in ("val", "oracle")}
        assert module.scoring._pool is None  # no thread outlives the evaluation
    assert len(rows[True]["val"]) > 3 and rows[True]["oracle"]
    assert json.dumps(rows[True], sort_keys=True) == json.dumps(rows[False], sort_keys=True)


def test_in_order_thread_keeps_submission_order_and_raises_a_job_error():
    import time

    from evaluation.background import InOrderThread

    work = InOrderThread(True, max_pending=1)
    for i in range(5):  # later jobs faster than earlier ones: the order is still the submission order
        work.submit("a", lambda i=i: (time.sleep(0.01 * (5 - i)), i)[1])
    work.submit("b", lambda: "b0")
    assert work.collect("a") == [0, 1, 2, 3, 4] and work._pool is not None  # "b" still pending
    assert work.collect("b") == ["b0"] and work._pool is None

    def bad():
        raise ValueError("broken case")

    work.submit("val", lambda: 1)
    work.submit("val", bad)
    with pytest.raises(ValueError, match="broken case"):
        work.collect("val")
    assert work._pool is None


# ------------------------------------------------------------------------------ speed switches for CUDA runs
@pytest.mark.parametrize("accelerator,pin,expected", [("cpu", None, False), ("gpu", None, True), ("cuda", False, False),
                                                      ("cpu", True, True),
                                                      ("auto", None, torch.cuda.is_available())])
def test_pin_memory_follows_the_accelerator_unless_set(tmp_path, accelerator, pin, expected):
    from experiments.build import build_datamodule
    from experiments.config import load_config

    cfg = load_config([f"trainer.accelerator={accelerator}", f"data.pin_memory={'null' if pin is None else pin}"])
    dm = build_datamodule(cfg, tmp_path, holdout="mosmed")
    assert dm.pin_memory is expected
    dm.cached = {"test": []}
    assert dm.test_dataloader().pin_memory is expected


def test_cudnn_benchmark_is_set_only_for_cuda_runs(monkeypatch):
    from experiments.build import configure_backends
    from experiments.config import load_config

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(load_config(["trainer.accelerator=cpu", "trainer.cudnn_benchmark=true"]))
    assert torch.backends.cudnn.benchmark is False  # a CPU run leaves the process's cuDNN alone
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    configure_backends(load_config(["trainer.accelerator=auto"]))
    assert torch.backends.cudnn.benchmark is True
    configure_backends(load_config(["trainer.accelerator=gpu", "trainer.deterministic=true"]))
    assert torch.backends.cudnn.benchmark is False


# ------------------------------------------------------------------------------ the loop benchmark
TINY = ["data.batch_size=2", "data.patch_size=[32,32,16]", "data.num_workers=0", "data.target_spacing=[6.0,6.0,8.0]",
        "data.find_duplicates=false"]


def test_loop_bench_breaks_a_real_epoch_into_its_parts(phantom_root, tmp_path):
    from benchmarks import bench_loop

    res = bench_loop.run(tmp_path, overrides=[f"paths.data_root={phantom_root}", *TINY], steps=4)
    assert res["steps"] == 3 and res["device"] == "cpu" and res["epoch_start_ms"] > 0  # steps after the first
    assert list(res["breakdown"]) == list(bench_loop.PARTS)
    b = res["breakdown"]
    for part in ("loader_wait", "transfer", "forward", "loss", "backward", "optimizer", "logging"):
        assert b[part] > 0, part
    assert all(v >= 0 for v in b.values())
    # the parts account for the step: measured pieces plus the un-instrumented rest (lightning)
    assert sum(b.values()) == pytest.approx(res["step_ms"], rel=0.02, abs=0.05)
    assert res["loop_overhead_ms_per_step"] == pytest.approx(
        res["step_ms"] - sum(b[k] for k in bench_loop.COMPUTE), abs=0.01)
    # reported beside the breakdown, not subtracted from it (a cost a CPU run pays)
    assert isinstance(res["logits_free_ms"], float) and res["logits_free_ms"] >= 0


def test_pointwise_network_is_a_one_by_one_convolution():
    from benchmarks.bench_loop import pointwise_network

    net = pointwise_network(C)
    x = torch.randn(2, 1, 4, 4, 3)
    conv = torch.nn.Conv3d(1, C, 1)
    with torch.no_grad():
        conv.weight.copy_(net.net.weight.reshape(C, 1, 1, 1, 1))
        conv.bias.copy_(net.net.bias.flatten())
        torch.testing.assert_close(net(x), conv(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_bench_says_gpu_null_without_cuda(tmp_path):
    from benchmarks import run

    assert run.main(["--only", "gpu", "--out", str(tmp_path / "bench"), "--workdir", str(tmp_path / "w")]) == 0
    res = json.loads((tmp_path / "bench" / "results.json").read_text(encoding="utf-8"))
    assert "gpu" in res and res["gpu"] is None
    assert "no CUDA device" in (tmp_path / "bench" / "results.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_gpu_bench_section_code_runs_on_the_cpu(phantom_root, tmp_path):
    """The GPU section's code path, on the CPU (its sliding window on the quick 512x512x120 case is slow):
    every key present, busy share absent without CUDA."""
    from benchmarks import bench_loop

    g = bench_loop.run_gpu(tmp_path, quick=True, overrides=[f"paths.data_root={phantom_root}", *TINY], device="cpu",
                           networks=("unet",), steps=3)
    assert g["device"] == "cpu" and g["gpu_busy_percent"] is None and g["steps"] == 2
    assert g["gpu_step_patches_per_s"]["unet"]["fp32"] > 0 and g["gpu_loop_patches_per_s"] > 0
    assert g["gpu_loop_efficiency"] > 0 and g["gpu_sliding_window_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bench_section_measures_every_key(phantom_root, tmp_path):
    from benchmarks import bench_loop

    g = bench_loop.run_gpu(tmp_path, quick=True, overrides=[f"paths.data_root={phantom_root}"])
    assert set(g["gpu_step_patches_per_s"]) == set(bench_loop.GPU_NETWORKS)
    assert all(v["fp32"] > 0 and v["bf16"] > 0 for v in g["gpu_step_patches_per_s"].values())
    assert g["gpu_loop_patches_per_s"] > 0 and g["gpu_loop_efficiency"] > 0 and g["gpu_sliding_window_s"] > 0
    assert g["gpu_busy_percent"] is None or 0 <= g["gpu_busy_percent"]["median"] <= 100


def test_case_writer_beside_the_device_writes_what_writing_in_turn_writes(tmp_path):
    """The predict stage restores and writes case i in a thread while case i+1 is predicted: the same
    predictions and probabilities, and every case listed in prediction order."""
    import nibabel as nib
    import numpy as np

    from experiments.stages.predict import CaseWriter

    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "meta.json").write_text(json.dumps({"affine": np.diag([1.5, 1.5, 5.0, 1.0]).tolist()}), encoding="utf-8")
    g = torch.Generator().manual_seed(0)
    cases = [(f"s{i % 2}", f"c{i}", torch.randn(1, C, 6, 5, 4, generator=g)) for i in range(5)]
    out = {}
    for overlap in (False, True):
        writer = CaseWriter(tmp_path / str(overlap), "harmonized", probabilities=True, overlap=overlap)
        for i, (src, case, logits) in enumerate(cases):
            writer.write_on_batch_end(None, None, logits, None, {"meta_path": [str(entry)], "source": [src],
                                                                 "case": [case]}, i)
        writer.on_predict_epoch_end(None, None)
        assert writer.written == [f"{s}/{c}" for s, c, _ in cases]
        out[overlap] = {p.relative_to(tmp_path / str(overlap)).as_posix(): nib.load(p) for p in
                        sorted((tmp_path / str(overlap)).rglob("*.nii.gz"))}
    assert list(out[True]) == list(out[False]) and len(out[True]) == 2 * len(cases)
    for key, img in out[True].items():
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(out[False][key].dataobj))
        np.testing.assert_array_equal(img.affine, out[False][key].affine)
