"""`precision: auto`: bf16 on GPU and on CPUs with native bf16, read from the CPU's flags."""

import torch

from dino_sparo import runtime
from dino_sparo.runtime import cpu_has_native_bf16, resolve_precision


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return str(path)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni"))
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu avx2 amx_bf16 amx_tile"))
    # avx512f alone, or a flag that merely contains the name, is not native bf16
    assert not cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512bw"))
    assert not cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu xavx512_bf16x"))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_auto_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    assert resolve_precision("fp32", cpu) is None
    assert "native bf16" in runtime.precision_reason("auto", cpu)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert "avx512_bf16" in runtime.precision_reason("auto", cpu)
    assert runtime.precision_reason("bf16", cpu) == ""
