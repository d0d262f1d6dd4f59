"""Fast paths keep the numbers: activation checkpointing, packed multi-crop, per-image stochastic
depth, the fast clipping, the fused optimiser, torch.compile; GPU: packing with xformers, no host
synchronisation inside a step."""

import importlib
import logging
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from dino_sparo.methods.dino import DinoMethod
from dino_sparo.schedules import cosine_schedule, method_schedules
from dino_sparo.layers.block import drop_path_per_image
from dino_sparo.models.vit import vit
from dino_sparo.train import apply_speed_options, build_optimizer, clip_gradients, train_step

from conftest import TINY_MODEL, tiny_config

TINY = [
    *TINY_MODEL, "model.depth=3", "model.embed_dim=48", "model.img_size=16", "model.attn_backend=sdpa",
    "crops.global_crops_size=16", "crops.local_crops_number=3", "crops.local_crops_size=8",
    "optim.epochs=1", "optim.freeze_last_layer=0", "optim.lr=0.01",
]


def tiny_cfg(*extra):
    return tiny_config(*extra, base=TINY)


def make_crops(cfg, batch=4, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [cfg.crops.global_crops_size] * 2 + [cfg.crops.local_crops_size] * cfg.crops.local_crops_number
    return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in sizes]


def step_values(cfg, step):
    """The scheduled values the loop would hand the method at ``step`` of a run of 10 steps per epoch."""
    return method_schedules(cfg, 10, cfg.optim.epochs).at(step, step // 10)


def build(cfg, device="cpu", seed=0, autocast_dtype=None):
    torch.manual_seed(seed)
    method = DinoMethod(cfg, torch.device(device))
    apply_speed_options(method, cfg)
    groups = method.param_groups()
    for group in groups:
        group["lr"] = 1e-3
    optimizer = build_optimizer(groups, cfg, torch.device(device))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
        if group["apply_wd"]:
            group["weight_decay"] = 0.04
    scaler = torch.amp.GradScaler(device, enabled=autocast_dtype == torch.float16)
    params = [p for g in groups for p in g["params"]]
    return method, optimizer, scaler, params


def run_steps(cfg, n_steps=2, device="cpu", autocast_dtype=None, seed=0):
    method, optimizer, scaler, params = build(cfg, device, seed, autocast_dtype)
    losses = []
    torch.manual_seed(seed + 1)
    for step in range(n_steps):
        batch = (make_crops(cfg, device=device, seed=step), None)
        loss, _ = train_step(method, batch, step, 0, step_values(cfg, step), optimizer, scaler, params, cfg.optim, autocast_dtype)
        losses.append(loss.detach().float())
    return torch.stack(losses), method


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------

def test_activation_checkpointing_gives_the_same_gradients_and_steps():
    cfg_plain = tiny_cfg("model.drop_path_rate=0.2")  # random drop paths must be replayed identically
    cfg_ckpt = tiny_cfg("model.drop_path_rate=0.2", "grad_checkpointing=true")
    losses_a, a = run_steps(cfg_plain)
    losses_b, b = run_steps(cfg_ckpt)
    assert b.student.backbone.grad_checkpointing and not a.student.backbone.grad_checkpointing
    torch.testing.assert_close(losses_a, losses_b, rtol=0, atol=1e-6)
    for (name, pa), pb in zip(a.student.named_parameters(), b.student.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=name)
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_saves_activation_memory():
    # fewer tensors kept for backward: count the bytes autograd saves during the forward
    def saved_bytes(checkpointing):
        model = vit("vit_pico", depth=4, patch_size=4, img_size=32, readout="cls", attn_backend="sdpa")
        model.grad_checkpointing = checkpointing
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(8, 3, 32, 32)).sum().backward()
        return total[0]

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


# --------------------------------------------------------------------------------------------
# The clipping and the EMA written with foreach/fused kernels against DINO's plain loops
# --------------------------------------------------------------------------------------------

def test_per_param_clipping_matches_dino_v1_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 10, 50, 7)]
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) * (0.1 if i % 2 else 10.0)  # some clipped, some not
    expected = []
    for p in params:  # facebookresearch/dino utils.clip_gradients, written out
        g = p.grad.clone()
        clip_coef = 3.0 / (g.norm(2) + 1e-6)
        expected.append(g * clip_coef if clip_coef < 1 else g)
    clip_gradients(params, 3.0, "per_param")
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)


def test_teacher_ema_matches_the_python_loop():
    cfg = tiny_cfg()
    method, *_ = build(cfg)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in method.student.parameters()]
    teacher = [p.detach().clone() for p in method.teacher.parameters()]
    m = step_values(cfg, 3).teacher_momentum
    assert m == pytest.approx(float(cosine_schedule(cfg.dino.momentum_teacher, 1.0, cfg.optim.epochs, 10)[3]))
    method.after_optimizer_step(3, m)
    for s, t, new in zip(student, teacher, method.teacher.parameters()):
        torch.testing.assert_close(new, t * m + (1 - m) * s, rtol=1e-6, atol=1e-7)


def test_fused_adamw_takes_the_same_step_as_the_loop():
    cfg_on, cfg_off = tiny_cfg("optim.fused=on"), tiny_cfg("optim.fused=off")
    try:
        losses_on, a = run_steps(cfg_on, n_steps=3)
    except RuntimeError as exc:  # a torch build without fused CPU AdamW
        pytest.skip(f"fused AdamW unavailable on CPU: {exc}")
    losses_off, b = run_steps(cfg_off, n_steps=3)
    torch.testing.assert_close(losses_on, losses_off, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(a.student.parameters(), b.student.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)  # lr 1e-3: 1 % of a step


# --------------------------------------------------------------------------------------------
# Packed multi-crop: exercised on the CPU through a reference kernel standing in for xformers
# --------------------------------------------------------------------------------------------

def reference_memory_efficient_attention(q, k, v, attn_bias=None, scale=None, **_):
    """xformers' contract (``B × N × H × D``, bias object) written as plain softmax attention."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B × H × N × D
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_bias is not None:
        scores = scores + attn_bias.materialize(scores.shape[-2:], dtype=scores.dtype, device=scores.device)
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.fixture
def emulated_xformers(monkeypatch):
    fmha = pytest.importorskip("xformers.ops.fmha")
    import xformers.ops

    # by module path: the package ``dino_sparo.layers`` re-exports the function ``attention`` under the
    # module's name, so ``import dino_sparo.layers.attention as m`` would bind the function
    attention_module = importlib.import_module("dino_sparo.layers.attention")
    dino_module = importlib.import_module("dino_sparo.methods.dino")

    assert hasattr(fmha, "BlockDiagonalMask")

    def resolve(backend, device, dtype=None):  # explicit requests for the math path keep it
        return "math" if backend == "math" else "xformers"

    monkeypatch.setattr(xformers.ops, "memory_efficient_attention", reference_memory_efficient_attention)
    monkeypatch.setattr(attention_module, "resolve_attention_backend", resolve)
    monkeypatch.setattr(dino_module, "resolve_attention_backend", resolve)


@pytest.mark.parametrize("readout", ["sparo", "cls"])
def test_packed_forward_equals_one_forward_per_size(readout, emulated_xformers):
    torch.manual_seed(0)
    model = vit("vit_pico", depth=3, patch_size=4, img_size=16, readout=readout,
                sparo=dict(num_slots=4, slot_dim=8), attn_backend="sdpa").eval()
    batches = [torch.randn(3, 3, 16, 16), torch.randn(5, 3, 8, 8), torch.randn(2, 3, 12, 12)]
    with torch.no_grad():
        expected = []
        for x in batches:  # independent reference: per-size forwards with dense attention
            tokens = model.prepare_tokens(x)
            for block in model.blocks:
                h = block.norm1(tokens)
                qkv = block.attn.qkv(h).reshape(*h.shape[:2], 3, model.num_heads, -1).permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).flatten(2)
                tokens = tokens + block.attn.proj(y)
                tokens = tokens + block.mlp(block.norm2(tokens))
            normed = model.norm(tokens)
            expected.append(normed[:, 0] if readout == "cls" else model.sparo(normed, return_attn=False).embedding)
        packed = model.forward_packed(batches)
    assert [p.shape for p in packed] == [e.shape for e in expected]
    for p, e in zip(packed, expected):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)


def assert_same_gradients(a, b, rtol):
    """Gradients equal up to ``rtol`` of each tensor's largest entry (Adam would amplify noise in
    near-zero entries, so parameters after a step are not the measure)."""
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        scale = pa.grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(pa.grad / scale, pb.grad / scale, rtol=0, atol=rtol, msg=name)


def test_packed_step_equals_unpacked_step(emulated_xformers):
    losses_a, a = run_steps(tiny_cfg(), n_steps=2)
    losses_b, b = run_steps(tiny_cfg("model.pack_crops=true"), n_steps=2)
    torch.testing.assert_close(losses_a, losses_b, rtol=1e-5, atol=1e-5)
    assert_same_gradients(a.student, b.student, rtol=1e-4)


def test_packing_without_xformers_falls_back_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        losses_packed, _ = run_steps(tiny_cfg("model.pack_crops=true"), n_steps=1)
    assert any("pack_crops needs the xformers" in r.getMessage() for r in caplog.records)
    losses_plain, _ = run_steps(tiny_cfg(), n_steps=1)
    torch.testing.assert_close(losses_packed, losses_plain, rtol=0, atol=0)


def test_packed_drop_path_draws_once_per_image():
    from timm.layers import DropPath

    torch.manual_seed(0)
    starts = [0, 5, 10, 15, 18, 21, 24, 27]  # three images of 5 tokens, then four of 3
    y = torch.ones(1, 27, 4)
    drop = DropPath(0.5).train()
    seen = set()
    for _ in range(20):
        out = drop_path_per_image(y, drop, starts)
        for s, e in zip(starts[:-1], starts[1:]):
            values = out[0, s:e].unique()
            assert values.numel() == 1  # one decision for all of an image's tokens
            seen.add(float(values))
    assert seen == {0.0, 2.0}  # dropped, or kept and scaled by 1 / keep_prob
    assert torch.equal(drop_path_per_image(y, drop.eval(), starts), y)


# --------------------------------------------------------------------------------------------
# torch.compile: a smoke test (compiling costs tens of seconds on a small CPU)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DINO_SPARO_SLOW_TESTS") != "1",
                    reason="compiling takes minutes on a 2-core CPU; set DINO_SPARO_SLOW_TESTS=1")
def test_compiled_student_gives_the_same_loss():
    losses_a, _ = run_steps(tiny_cfg(), n_steps=2)
    start = time.perf_counter()
    losses_b, method = run_steps(tiny_cfg("compile=true"), n_steps=2)
    print(f"compile + 2 steps: {time.perf_counter() - start:.1f} s")
    assert type(method.train_module).__name__ == "OptimizedModule"
    torch.testing.assert_close(losses_a, losses_b, rtol=1e-4, atol=1e-5)


def test_bf16_step_on_cpu_tracks_the_fp32_step():
    """bf16 autocast on CPU (explicit attention under ``auto``) keeps the numbers of the fp32 step."""
    cfg = tiny_cfg("model.attn_backend=auto")
    losses_a, a = run_steps(cfg, n_steps=1)
    losses_b, b = run_steps(cfg, n_steps=1, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(losses_a, losses_b, rtol=2e-2, atol=2e-2)
    assert_same_gradients(a.student, b.student, rtol=5e-2)
    losses_a, _ = run_steps(cfg, n_steps=4)
    losses_b, _ = run_steps(cfg, n_steps=4, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(losses_a, losses_b, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

def _xformers_on_gpu():
    from dino_sparo.layers.attention import xformers_available

    if not xformers_available():
        pytest.skip("xformers does not run on this GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_gpu_packed_loss_equals_per_size_loss(dtype):
    _xformers_on_gpu()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype is None else dict(rtol=2e-2, atol=2e-2)
    base = ["device=cuda", "model.attn_backend=xformers"]  # no drop path: both draw nothing random
    losses_a, a = run_steps(tiny_cfg(*base), n_steps=3, device="cuda", autocast_dtype=dtype)
    losses_b, b = run_steps(tiny_cfg(*base, "model.pack_crops=true"), n_steps=3, device="cuda",
                            autocast_dtype=dtype)
    torch.testing.assert_close(losses_a, losses_b, **tol)
    assert_same_gradients(a.student, b.student, rtol=1e-3 if dtype is None else 5e-2)
    # with drop paths the packed step runs and stays finite
    losses_c, _ = run_steps(tiny_cfg(*base, "model.pack_crops=true", "model.drop_path_rate=0.2"), n_steps=2,
                            device="cuda", autocast_dtype=dtype)
    assert torch.isfinite(losses_c).all()


@pytest.mark.gpu
@pytest.mark.parametrize("pack,dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (False, torch.float16)])
def test_gpu_step_has_no_host_synchronisation(pack, dtype):
    extra = ["device=cuda", "model.drop_path_rate=0.1", "optim.fused=auto"]
    if pack:
        _xformers_on_gpu()
        extra += ["model.attn_backend=xformers", "model.pack_crops=true"]
    else:
        extra += ["model.attn_backend=sdpa"]
    cfg = tiny_cfg(*extra)
    method, optimizer, scaler, params = build(cfg, "cuda", autocast_dtype=dtype)  # fp16: a GradScaler too
    batches = [(make_crops(cfg, device="cuda", seed=s), None) for s in range(5)]
    for step in range(2):  # warm-up: lazy initialisation (kernels, optimiser state) may synchronise
        train_step(method, batches[step], step, 0, step_values(cfg, step), optimizer, scaler, params, cfg.optim, dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            loss, metrics = train_step(method, batches[step], step, 0, step_values(cfg, step), optimizer, scaler, params, cfg.optim, dtype)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(loss))
