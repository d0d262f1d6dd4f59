"""Training losses: DINO self-distillation (teacher centre, collapse watch) and CLIP's InfoNCE.

Semantics follow facebookresearch/dino (v1): the teacher's global-crop outputs are centred and
sharpened (softmax at a scheduled temperature), and every student crop is trained by cross-entropy
against every teacher global crop except its own view, averaged over those pairs.
DINOv2's Sinkhorn-Knopp centring (`centering="sinkhorn_knopp"`) and KoLeo regulariser
(`koleo_loss`) are options. Two deliberate differences from v1: the centre's all-reduce runs only when a process group exists (v1 calls
it unconditionally and so cannot run single-process), and the arithmetic is forced to fp32 under
autocast (fp16 softmax/centring is the commonest source of NaN reports).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


__all__ = ["ClipLoss", "DINOLoss", "IBOTPatchLoss", "koleo_loss", "sinkhorn_knopp", "collapse_warnings", "UNIFORM_COLLAPSE_FRACTION", "ONE_PROTOTYPE_COLLAPSE_FRACTION"]

# Collapse thresholds, as fractions of ln(out_dim) (the entropy of the uniform distribution).
# Uniform collapse: the per-sample teacher distribution is almost flat (loss stuck near ln K).
UNIFORM_COLLAPSE_FRACTION = 0.95
# One-prototype collapse: the batch-mean teacher distribution uses about K**0.1 prototypes or fewer
# (3 of 65536, 2.3 of 4096), i.e. every image is sent to the same few outputs.
ONE_PROTOTYPE_COLLAPSE_FRACTION = 0.1


def _process_group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if _process_group_ready():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, temperature: float, n_iterations: int = 3,
                   counts_differ: bool = False) -> torch.Tensor:
    """DINOv2's teacher targets: the ``N × K`` logits turned into soft assignments whose prototypes
    are used equally over the global batch (rows sum to 1, columns to N_global / K).

    As DINOv2: ``exp(logits / T)`` normalised to sum 1, then ``n_iterations`` rounds of dividing each
    prototype's total by K and each sample's by N, with the prototype totals and the grand total
    all-reduced across ranks, in fp32. One difference: the all-reduced maximum is subtracted before
    ``exp`` (a constant factor, which the first normalisation removes), so large logits (e.g.
    ``norm_last_layer: false``) cannot overflow. ``counts_differ``: ranks may hold different numbers
    of rows (iBOT's masked patches; a rank may hold none), so N is all-reduced rather than assumed.
    """
    with torch.autocast(device_type=teacher_output.device.type, enabled=False):
        logits = teacher_output.detach().float() / temperature
        local_max = logits.max() if logits.numel() else logits.new_full((), float("-inf"))
        q = torch.exp(logits - _all_reduce(local_max.clone(), dist.ReduceOp.MAX)).t()  # K × N
        n_prototypes = q.shape[0]
        if counts_differ:
            n_samples = _all_reduce(logits.new_full((), float(q.shape[1])))
        else:
            n_samples = q.shape[1] * (dist.get_world_size() if _process_group_ready() else 1)
        tiny = torch.finfo(torch.float32).tiny  # a prototype whose weights all underflow keeps 0, not NaN
        q /= _all_reduce(q.sum())
        for _ in range(n_iterations):
            q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype's total weight: 1 / K
            q /= n_prototypes
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample's total weight: 1 / N
            q /= n_samples
        return (q * n_samples).t()  # each row an assignment summing to 1


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over the L2-normalised rows,
    ``nn(i)`` the nearest other row of the same (local) batch. Spreads the embeddings out; fp32."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs a B × D batch with B >= 2, got {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # never one's own neighbour (cosines are >= -1)
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over crop pairs.

    Inputs are crop-major concatenations: `student_output` is `(n_crops·B) × K` (all images of crop
    0, then crop 1, ...; the first `n_global_crops` crops are the global ones) and `teacher_output`
    is `(n_global_crops·B) × K`. The teacher temperature is handed in per call: the training loop
    owns its schedule (`schedules.Schedules.at`), as DINOv2's does.
    `centering="center"` (DINO v1): the teacher is centred by an EMA `1 × K` buffer (saved in
    `state_dict()`); `"sinkhorn_knopp"` (DINOv2): the teacher's targets are `sinkhorn_knopp`
    assignments over all its global crops, and the centre is not used.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        *,
        n_global_crops: int = 2,
        n_local_crops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(f"DINOLoss 'centering' must be 'center' or 'sinkhorn_knopp', got {centering!r}")
        if n_global_crops < 1:
            raise ValueError(f"DINOLoss 'n_global_crops' must be >= 1, got {n_global_crops}")
        if n_local_crops < 0:
            raise ValueError(f"DINOLoss 'n_local_crops' must be >= 0, got {n_local_crops}")
        if n_global_crops + n_local_crops < 2:
            raise ValueError(
                "DINOLoss needs at least two crops to form a pair, got "
                f"n_global_crops={n_global_crops}, n_local_crops={n_local_crops}"
            )
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss 'center_momentum' must be in [0, 1], got {center_momentum}")
        if student_temp <= 0:
            raise ValueError(f"DINOLoss 'student_temp' must be > 0, got {student_temp}")
        self.out_dim = out_dim
        self.n_global_crops = n_global_crops
        self.n_local_crops = n_local_crops
        self.n_crops = n_global_crops + n_local_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        # kept (and saved) with Sinkhorn-Knopp too, so both kinds of checkpoint have the same keys
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict[str, torch.Tensor] = {}

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> int:
        if student_output.dim() != 2 or student_output.shape[1] != self.out_dim:
            raise ValueError(
                f"DINOLoss student_output must be (n_crops·B) × {self.out_dim}, got {tuple(student_output.shape)}"
            )
        if teacher_output.dim() != 2 or teacher_output.shape[1] != self.out_dim:
            raise ValueError(
                f"DINOLoss teacher_output must be (n_global_crops·B) × {self.out_dim}, "
                f"got {tuple(teacher_output.shape)}"
            )
        batch, rest = divmod(teacher_output.shape[0], self.n_global_crops)
        if rest or student_output.shape[0] != self.n_crops * batch:
            raise ValueError(
                f"DINOLoss expects teacher_output with {self.n_global_crops}·B rows and student_output with "
                f"{self.n_crops}·B rows (crop-major), got {teacher_output.shape[0]} and {student_output.shape[0]}"
            )
        return batch

    def forward(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        return_stats: bool = False,
        update_center: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (0-dim fp32 tensor); with `return_stats`, also the collapse-watch statistics.

        The loss uses the centre from before this batch; the centre is then updated from
        `teacher_output` (as DINO does) unless `update_center=False`. Statistics are detached
        0-dim tensors (no host sync), also kept in `self.last_stats`:
        `teacher_entropy` (mean per-sample entropy of the centred, sharpened teacher, nats),
        `teacher_mean_entropy` (entropy of the batch-mean teacher distribution),
        `kl_teacher_student` (KL(teacher || student) averaged over the same pairs as the loss).
        """
        batch = self._check_shapes(student_output, teacher_output)
        if not teacher_temp > 0:
            raise ValueError(f"DINOLoss teacher_temp must be > 0, got {teacher_temp}")
        temp = float(teacher_temp)
        n_global, n_crops = self.n_global_crops, self.n_crops
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            student_log_probs = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
            student_log_probs = student_log_probs.view(n_crops, batch, self.out_dim)  # C × B × K
            with torch.no_grad():
                if self.centering == "sinkhorn_knopp":
                    teacher_probs = sinkhorn_knopp(teacher_output, temp, self.sinkhorn_iterations)
                    teacher_log_probs = torch.log(teacher_probs.clamp_min(torch.finfo(torch.float32).tiny))
                else:
                    teacher_log_probs = F.log_softmax((teacher_output.detach().float() - self.center) / temp, dim=-1)
                    teacher_probs = teacher_log_probs.exp()
                teacher_log_probs = teacher_log_probs.view(n_global, batch, self.out_dim)  # G × B × K
                teacher_probs = teacher_probs.view(n_global, batch, self.out_dim)
            # cross_entropy[g, c] = mean_b  -sum_k q[g, b, k] · log p[c, b, k]; element-wise products
            # rather than a matmul, so TF32 settings cannot lower the loss precision.
            cross_entropy = torch.stack(
                [-(teacher_probs[g] * student_log_probs).sum(dim=-1).mean(dim=-1) for g in range(n_global)]
            )  # G × C
            # Float mask instead of boolean indexing: no host sync.
            pair_mask = torch.ones(n_global, n_crops, device=cross_entropy.device)
            pair_mask[:, :n_global] -= torch.eye(n_global, device=cross_entropy.device)  # skip same view
            n_pairs = n_global * (n_crops - 1)
            loss = (cross_entropy * pair_mask).sum() / n_pairs

            with torch.no_grad():
                per_sample_entropy = -(teacher_probs * teacher_log_probs).sum(-1)  # G × B
                crop_entropy = per_sample_entropy.mean(dim=1)  # G
                mean_probs = teacher_probs.mean(dim=(0, 1))  # K
                stats = {
                    "teacher_entropy": crop_entropy.mean(),
                    "teacher_mean_entropy": -torch.xlogy(mean_probs, mean_probs).sum(),
                    # KL(q_g || p_c) = CE(q_g, p_c) - H(q_g), averaged over the loss pairs
                    "kl_teacher_student": ((cross_entropy.detach() - crop_entropy[:, None]) * pair_mask).sum()
                    / n_pairs,
                }
        self.last_stats = stats
        if update_center and self.centering == "center":
            self.update_center(teacher_output)
        if return_stats:
            return loss, stats
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the mean teacher output: `c <- m·c + (1 - m)·mean(teacher_output)`.

        The batch mean is over all ranks when a process group is initialised, else local.
        Runs in place on the buffer, with no host synchronisation.
        """
        with torch.autocast(device_type=teacher_output.device.type, enabled=False):
            batch_center = teacher_output.detach().float().sum(dim=0, keepdim=True)  # 1 × K
            count = teacher_output.shape[0]
            if _process_group_ready():
                dist.all_reduce(batch_center)
                count *= dist.get_world_size()
            batch_center = batch_center / count
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class IBOTPatchLoss(nn.Module):
    """iBOT's masked-patch loss, as DINOv2 computes it: over the masked patches of the student's
    global crops, the cross-entropy between the teacher's (centred, sharpened) distribution of the
    same patch in the unmasked crop and the student's, each patch weighted by ``1 / (masked patches
    of its crop)`` and the sum divided by the number of crops: the mean over crops of each crop's
    mean over its masked patches (crops without a mask count as 0).

    Inputs are the head outputs of the masked patches only (``M × K``, the same order for student
    and teacher). Centring follows ``dino.centering``: an EMA ``1 × K`` centre of the teacher's masked
    patch outputs (saved in ``state_dict()``), or Sinkhorn–Knopp over all ranks' masked patches.
    fp32 under autocast; no host synchronisation (a rank or a batch with no masked patch is fine).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(f"IBOTPatchLoss 'centering' must be 'center' or 'sinkhorn_knopp', got {centering!r}")
        if student_temp <= 0:
            raise ValueError(f"IBOTPatchLoss 'student_temp' must be > 0, got {student_temp}")
        self.out_dim, self.student_temp, self.center_momentum = out_dim, student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher's targets (``M × K``, rows summing to 1)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_output, teacher_temp, self.sinkhorn_iterations, counts_differ=True)
        return F.softmax((teacher_output.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, weight: torch.Tensor,
                n_crops: int, teacher_temp: float, return_stats: bool = False, update_center: bool = True):
        """Loss over ``M`` masked patches; ``weight`` (``M``) is each patch's ``1 / (masked patches of
        its crop)``, ``n_crops`` the number of global crops of this rank's batch (masked or not)."""
        if student_output.shape != teacher_output.shape or student_output.shape[-1] != self.out_dim:
            raise ValueError(f"IBOTPatchLoss needs student and teacher outputs of M × {self.out_dim}, got "
                             f"{tuple(student_output.shape)} and {tuple(teacher_output.shape)}")
        if not teacher_temp > 0:
            raise ValueError(f"IBOTPatchLoss teacher_temp must be > 0, got {teacher_temp}")
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            log_p = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
            with torch.no_grad():
                q = self.teacher_probs(teacher_output, float(teacher_temp))
            per_patch = -(q * log_p).sum(dim=-1)  # M
            loss = (per_patch * weight.float()).sum() / n_crops
            with torch.no_grad():
                stats = self._stats(q)
        if update_center and self.centering == "center":
            self.update_center(teacher_output)
        return (loss, stats) if return_stats else loss

    @staticmethod
    def _stats(q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The collapse watch's two entropies over this rank's masked patches (0 when there are none)."""
        count = q.new_full((), float(q.shape[0])).clamp_min(1.0)
        mean_q = q.sum(dim=0) / count
        return {"ibot_teacher_entropy": -torch.xlogy(q, q).sum() / count,
                "ibot_teacher_mean_entropy": -torch.xlogy(mean_q, mean_q).sum()}

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the mean teacher output over all ranks' masked patches; kept when there are none."""
        with torch.autocast(device_type=teacher_output.device.type, enabled=False):
            total = _all_reduce(teacher_output.detach().float().sum(dim=0, keepdim=True))
            count = _all_reduce(teacher_output.new_full((), float(teacher_output.shape[0]), dtype=torch.float32))
            batch_center = total / count.clamp_min(1.0)
            new = self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum)
            self.center.copy_(torch.where(count > 0, new, self.center))


def collapse_warnings(stats: dict[str, torch.Tensor | float], out_dim: int, prefix: str = "") -> list[str]:
    """Readable warnings when the teacher statistics look collapsed; empty when healthy.
    ``prefix`` picks another loss' statistics (``"ibot_"``: iBOT's patch targets), named in the warnings.

    Thresholds (fractions of ln K, K = out_dim): uniform collapse when the mean per-sample teacher
    entropy exceeds `UNIFORM_COLLAPSE_FRACTION` (0.95) · ln K; one-prototype collapse when the
    entropy of the batch-mean teacher distribution is below `ONE_PROTOTYPE_COLLAPSE_FRACTION`
    (0.1) · ln K. A freshly initialised teacher is often near uniform: judge the first check after
    the warm-up, when it persists. Reads the values to the host, so call it at logging intervals.
    """
    max_entropy = math.log(out_dim)
    values = {key: float(stats[prefix + key]) for key in ("teacher_entropy", "teacher_mean_entropy")
              if prefix + key in stats}
    if "kl_teacher_student" in stats:
        values["kl_teacher_student"] = float(stats["kl_teacher_student"])
    warnings: list[str] = []
    bad = [key for key, value in values.items() if not math.isfinite(value)]
    if bad:
        warnings.append(
            f"non-finite DINO statistics ({', '.join(bad)}): the teacher or student outputs contain NaN/Inf; "
            "usually a too high learning rate, fp16 overflow (prefer bf16), or missing gradient clipping."
        )
        return [f"iBOT patch targets: {w}" for w in warnings] if prefix else warnings
    entropy = values.get("teacher_entropy")
    if entropy is not None and entropy > UNIFORM_COLLAPSE_FRACTION * max_entropy:
        warnings.append(
            f"uniform collapse: teacher entropy {entropy:.3f} is {entropy / max_entropy:.0%} of "
            f"ln(K)={max_entropy:.3f} (K={out_dim}); the teacher output is nearly flat, "
            "so the loss sits near ln(K) and carries no signal. "
            "Centring dominates sharpening: lower the teacher temperature (e.g. 0.04) or shorten its warm-up, "
            "lower the learning rate or lengthen its warm-up, and check the teacher is an EMA copy of the student."
        )
    mean_entropy = values.get("teacher_mean_entropy")
    if mean_entropy is not None:
        mean_entropy = max(mean_entropy, 0.0)  # rounding can give -0.000
    if mean_entropy is not None and mean_entropy < ONE_PROTOTYPE_COLLAPSE_FRACTION * max_entropy:
        warnings.append(
            f"one-prototype collapse: the batch-mean teacher distribution has entropy {mean_entropy:.3f} "
            f"(< {ONE_PROTOTYPE_COLLAPSE_FRACTION} · ln(K) = {ONE_PROTOTYPE_COLLAPSE_FRACTION * max_entropy:.3f}), "
            f"i.e. every image goes to about {math.exp(mean_entropy):.1f} of {out_dim} outputs. "
            "Sharpening dominates centring: lower the centre momentum so the centre follows the batch faster "
            "(e.g. 0.9), raise the teacher temperature slightly, or lower the learning rate."
        )
    return [f"iBOT patch targets: {w}" for w in warnings] if prefix else warnings


# --------------------------------------------------------------------------------------------
# CLIP: symmetric InfoNCE over the global batch


def gather_features(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' rows of ``features`` (``B × E``), rank-major, as one ``(W·B) × E`` tensor.

    ``with_grad``: gradients flow back to every rank's features (the backward pass sums them
    across ranks); otherwise this rank's own rows keep their gradient and the others are constants.
    The identity without a process group.
    """
    if not _process_group_ready() or dist.get_world_size() == 1:
        return features
    if with_grad:
        import torch.distributed.nn.functional as dist_fn  # noqa: PLC0415 (loaded only when needed)

        return torch.cat(dist_fn.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[dist.get_rank()] = features
    return torch.cat(gathered, dim=0)


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss: cross-entropy of image→text and text→image logits
    ``exp(s) · cos``, the matching pair being the positive, averaged over both directions.

    Features are gathered from all ranks so every row sees the whole global batch's negatives.
    ``local_loss``: each rank scores only its own rows against all columns (``B × W·B`` logits
    instead of ``W·B × W·B``; open_clip's variant that scales) and the loss is this rank's share,
    whose mean over ranks is the global loss. ``gather_with_grad``: gradients also flow through the
    gathered features; then the gradients averaged across ranks (as DDP does) equal those of one
    process on the whole batch, with or without ``local_loss``. Without it, the non-local loss gives
    that gradient divided by the world size, and the local loss drops the terms where this rank's
    rows serve as negatives elsewhere (prefer ``local_loss`` together with ``gather_with_grad``).
    Works in a single process without a process group. Arithmetic in fp32 under autocast.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False) -> None:
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image→text and text→image logits of this rank's loss, and the target column of each row."""
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(f"ClipLoss needs image and text features of the same shape B × E, got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            image, text, scale = image_features.float(), text_features.float(), logit_scale.float()
            all_image = gather_features(image, self.gather_with_grad)  # (W·B) × E
            all_text = gather_features(text, self.gather_with_grad)
            batch = image.shape[0]
            if self.local_loss:
                rank = dist.get_rank() if _process_group_ready() else 0
                per_image = scale * image @ all_text.T  # B × (W·B)
                per_text = scale * text @ all_image.T
                targets = torch.arange(batch, device=image.device) + rank * batch
            else:
                per_image = scale * all_image @ all_text.T  # (W·B) × (W·B)
                per_text = per_image.T
                targets = torch.arange(all_image.shape[0], device=image.device)
        return per_image, per_text, targets

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
                ) -> torch.Tensor:
        """``image_features``, ``text_features``: ``B × E``, L2-normalised; ``logit_scale``: exp(s)
        (0-dim). Returns the 0-dim fp32 loss."""
        per_image, per_text, targets = self.logits(image_features, text_features, logit_scale)
        with torch.autocast(device_type=per_image.device.type, enabled=False):
            return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2
