"""What a first multi-GPU run relies on and a CPU can show: the generator state a checkpoint keeps (one
GPU's, so a run resumes on fewer visible GPUs), batch norm synchronised under several processes, and
the xformers report that decides the attention kernel. CUDA's generator calls are replaced where a
CPU has none; the logic around them is the real one."""

import logging

import pytest
import torch
from torch import nn

from dino_sparo import runtime
from dino_sparo.train import sync_batchnorms


class FakeCudaGenerators:
    """Per-device generator states of ``count`` GPUs, with ``current`` the process' device."""

    def __init__(self, monkeypatch, count: int, current: int) -> None:
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        self.current, self.restored = current, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.current].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.restored.append(state))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: [self.states[i].clone() for i in range(count)])

        def refuse_all(states):  # as torch does when the list is longer than the visible devices
            if len(states) > count:
                raise IndexError("list index out of range")
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse_all)


def test_a_checkpoint_keeps_its_own_gpu_generator_and_resumes_on_fewer_gpus(monkeypatch):
    eight = FakeCudaGenerators(monkeypatch, count=8, current=5)
    state = runtime.rng_state()
    assert "cuda" not in state and torch.equal(state["cuda_device"], eight.states[5])
    one = FakeCudaGenerators(monkeypatch, count=1, current=0)  # resumed where one GPU is visible
    runtime.set_rng_state(state)
    assert len(one.restored) == 1 and torch.equal(one.restored[0], eight.states[5])


def test_older_checkpoints_with_every_gpus_state_restore_the_current_devices(monkeypatch, caplog):
    old = {"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state(),
           "torch": torch.get_rng_state(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]}
    two = FakeCudaGenerators(monkeypatch, count=2, current=1)
    runtime.set_rng_state(old)
    assert len(two.restored) == 1 and torch.equal(two.restored[0], old["cuda"][1])
    far = FakeCudaGenerators(monkeypatch, count=8, current=6)
    with caplog.at_level(logging.WARNING):
        runtime.set_rng_state(old)
    assert not far.restored and "none for device 6" in caplog.text


class TinyMethod:
    """The part of a method ``sync_batchnorms`` uses: its modules, one with a batch-norm head."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3))
        self.teacher = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3))

    def modules(self):
        return {"student": self.student, "teacher": self.teacher}


def test_batch_norm_is_synchronised_under_several_gpu_processes_in_place():
    method = TinyMethod()
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in method.modules().items()}
    student = method.student
    sync_batchnorms(method, torch.device("cuda"), world_size=2)  # converting needs no GPU
    assert method.student is student  # changed in place: the optimiser and the EMA see the same modules
    for name, module in method.modules().items():
        assert isinstance(module[1], nn.SyncBatchNorm)
        after = module.state_dict()
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after)


@pytest.mark.parametrize("device, world", [("cuda", 1), ("cpu", 2)])
def test_batch_norm_stays_where_it_cannot_or_need_not_be_synchronised(device, world, caplog):
    method = TinyMethod()
    with caplog.at_level(logging.WARNING):
        sync_batchnorms(method, torch.device(device), world_size=world)
    assert all(type(m[1]) is nn.BatchNorm1d for m in method.modules().values())
    assert ("separately" in caplog.text) == (world > 1)


def test_the_xformers_report_says_why_it_does_not_serve(monkeypatch):
    import importlib
    import sys

    attention = importlib.import_module("dino_sparo.layers.attention")
    attention.xformers_report.cache_clear()
    try:
        report = attention.xformers_report()
        if not torch.cuda.is_available():
            assert not report["runs"] and report["reason"]
            assert not attention.xformers_available()
        monkeypatch.setitem(sys.modules, "xformers", None)  # as where it is not installed
        attention.xformers_report.cache_clear()
        missing = attention.xformers_report()
        assert not missing["imports"] and not missing["runs"] and "does not import" in missing["reason"]
    finally:
        attention.xformers_report.cache_clear()


@pytest.mark.gpu
def test_xformers_runs_every_call_the_training_makes():
    import importlib

    attention = importlib.import_module("dino_sparo.layers.attention")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("xformers.ops")
    report = attention.xformers_report()
    assert report["runs"], report["reason"]
    assert set(report["checks"]) == {"bf16_block_diagonal_backward", "bf16_dense_backward", "fp32_tensor_bias"}


def test_fp32_means_fp32_unless_tf32_is_asked_for():
    from dino_sparo.config import load_config
    from dino_sparo.runtime import set_tf32

    assert load_config(None, []).tf32 is False
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" == torch.backends.cudnn.conv.fp32_precision
        set_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" == torch.backends.cudnn.conv.fp32_precision
    finally:
        set_tf32(False)
