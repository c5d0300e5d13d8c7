"""The Affiner's training forward/backward without saving the pre-scale product W x.

Autograd's path for y = (1 + a) ⊙ (W x) + c + s · U relu(D x)  (c = b̂ + b) keeps p = W x alive
until the backward, only for a's gradient Σ_tokens g ⊙ p: one more activation of the layer's output
width for every adapted layer (DiT-XL/2, batch 128, bf16: ~20 GiB). But the layer's output y is kept
anyway by whatever consumes it (flash attention keeps q, k, v; GELU its input; the adaLN gates their
operand), and p follows from y:

    Σ_t g ⊙ p = (Σ_t g ⊙ y − c ⊙ Σ_t g − s · rowsum(U ⊙ M)) / (1 + a),    M = g^T relu(D x)  (out, r)

where M is the product U's gradient needs anyway. So this Function saves x (D's gradient needs it),
relu(D x) (rank r), y (shared with its consumer) and the parameters, never p. The frozen W is saved
as the parameter itself and cast again in the backward: autocast's bf16 copy of every frozen weight
is not kept either.

The division is ill-conditioned only where 1 + a ≈ 0 (a channel the task switched off). The k
channels with the smallest |1 + a| keep their columns of p (k = 16, a static size, so no host sync)
and get the direct sum; every other channel's |1 + a| is at least theirs (and is floored at 1e-3).

One Function serves three forms of the forward, all with the backward above:
- one task (a single-task batch, parameters with a leading 1): (1 + a) folded into the bf16 weight
  copy each step makes anyway, b̂ + b as the matmul's bias: one addmm, then the rank-r branch added
  by the matmul that computes it (its C operand); the backward's input gradient is one matmul too;
- a batch sorted by task (`AdapterBank.forward` sorts mixed batches; T folded weight copies): one grouped
  matmul, b̂ + b_t and the branch added together by one rank-(r + 1) batched matmul;
- per sample (parameters gathered by task id, (N, ...)): the plain epilogue p + p·a + c.
The parameters' gradients flow back through the gather (or the unsqueeze) by ordinary autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXACT_CHANNELS = 16  # channels per group whose a-gradient uses saved columns of p (see above)
MIN_DIVISOR = 1e-3  # |1 + a| floor for the other channels' division


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def folded_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1 + a) ⊙_rows W, formed in fp32 and rounded once: a weight-sized op, beside the cast to bf16
    that every step does anyway, instead of two passes over the (rows, out) output."""
    work = torch.promote_types(torch.promote_types(weight.dtype, scale.dtype), torch.float32)
    return (weight.to(work) * (1 + scale.to(work)).unsqueeze(-1)).to(dtype)  # (..., out, in)


_HOPPER_OR_NEWER: dict[int, bool] = {}  # CUDA device index -> compute capability >= 9.0


def grouping_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm runs bf16 on Hopper-class GPUs (and newer) and bf16 or fp32 on the CPU, where
    its compile-time shape function still demands bf16."""
    if device.type == "cpu":
        return dtype == torch.bfloat16 or (dtype == torch.float32 and not torch.compiler.is_compiling())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _HOPPER_OR_NEWER:  # filled on the first, uncompiled call (AdapterBank.forward's)
            _HOPPER_OR_NEWER[index] = torch.cuda.get_device_capability(index) >= (9, 0)
        return dtype == torch.bfloat16 and _HOPPER_OR_NEWER[index]
    return False


def grouped_scaled_linear(
    xc: torch.Tensor, weight: torch.Tensor, task_scale: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """((1 + a_t) ⊙_rows W) x for a batch sorted by task: one grouped matmul over the T folded weights.

    xc (N, L, in) in `dtype`; task_scale (T, out); offsets (T,) int32 end row of each task's run in the
    (N * L, in) view. The T folded copies cost T weight-sized passes, which is why callers group only
    when T * in <= N * L; the per-sample alternative costs two passes over the (N, L, out) output.
    """
    n, length, in_f = xc.shape
    stack = folded_weight(weight, task_scale, dtype)  # (T, out, in)
    y = torch._grouped_mm(xc.reshape(n * length, in_f), stack.transpose(1, 2), offs=offsets)  # (N*L, out)
    return y.view(n, length, -1)


def add_shift_and_branch_(
    y: torch.Tensor, c: torch.Tensor, relu_h: torch.Tensor | None = None, up_scaled: torch.Tensor | None = None
) -> torch.Tensor:
    """y += c (N, out) [+ s U relu(D x)] in place; with a branch, c rides in the branch's matmul as one
    more column ([relu(h) | 1] @ [s U | c]^T), so adding it is no extra pass over y."""
    if relu_h is None:
        return y.add_(c.unsqueeze(1))
    ones = torch.ones_like(relu_h[..., :1])
    return y.baddbmm_(torch.cat([relu_h, ones], dim=2), torch.cat([up_scaled, c.unsqueeze(2)], dim=2).transpose(1, 2))


class _LeanAffineLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, down, up, branch_scale, task_scale, offsets):
        # x (G, L, in): G groups (samples, or 1 for a single task) of L rows
        # weight (out, in), bias (out,): frozen; scale, shift (G, out); down (G, r, in), up (G, out, r),
        # branch_scale (G,) or all three None (difffit: no rank-r branch); task_scale (T, out) and
        # offsets (T,) for a batch sorted by task (grouped matmul), else None
        dtype = compute_dtype(x)
        branch = down is not None
        fold = x.shape[0] == 1  # one task: (1 + a) goes into W; per-sample scales stay an epilogue
        grouped = offsets is not None and not fold  # sorted batch: each task's (1 + a_t) goes into its W copy
        out_f = weight.shape[0]
        k = min(EXACT_CHANNELS, out_f)
        fold_done = False  # the branch already inside y's matmul
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            c = (bias.to(shift.dtype) + shift).to(dtype)  # (G, out): b̂ + b
            exact_idx = (1 + scale.detach()).abs().topk(k, dim=1, largest=False).indices  # (G, k)
            up_scaled = (up * branch_scale.view(-1, 1, 1)).to(dtype) if branch else None  # s · U, (G, out, r)
            relu_h = None
            if fold:
                # [relu(D x) | p's exact columns] from one thin product: x is read once for both
                thin = weight[exact_idx[0]] if not branch else torch.cat([down[0], weight[exact_idx[0]]])
                hp = F.linear(xc, thin.to(dtype))  # (1, L, r + k)
                exact_p = hp[..., -k:].clone()  # (1, L, k); a copy, so hp itself is not kept
                w_fold = folded_weight(weight, scale[0], dtype)  # (out, in)
                if branch:
                    relu_h = F.relu(hp[..., :-k])  # (1, L, r)
                if branch and weight.shape[1] < out_f:
                    # [x | relu(D x)] @ [(1 + a) W | s U]^T + c: the branch rides in the main matmul's
                    # contraction (in + r); copying x costs less than a second pass over the wider
                    # (L, out) output (bench/RESULTS.md, issue 26: kept only where in < out)
                    r = relu_h.shape[-1]
                    xa = torch.cat([xc[0], relu_h[0]], dim=1)  # (L, in + r)
                    y = torch.addmm(c[0], xa, torch.cat([w_fold, up_scaled[0]], dim=1).t()).unsqueeze(0)
                    xc, relu_h = xa[:, :-r].unsqueeze(0), xa[:, -r:].unsqueeze(0)  # views: nothing saved twice
                    fold_done = True
                else:
                    y = torch.addmm(c[0], xc[0], w_fold.t()).unsqueeze(0)
            elif grouped:
                thin = weight[exact_idx]  # (G, k, in): each sample's exact channels
                if branch:
                    thin = torch.cat([down, thin], dim=1)  # (G, r + k, in)
                hp = torch.bmm(xc, thin.to(dtype).transpose(1, 2))  # (G, L, r + k)
                exact_p = hp[..., -k:].clone()
                y = grouped_scaled_linear(xc, weight, task_scale, offsets, dtype)  # (G, L, out)
                relu_h = F.relu(hp[..., :-k]) if branch else None
                add_shift_and_branch_(y, c, relu_h, up_scaled)
            else:
                p = F.linear(xc, weight.to(dtype))  # (G, L, out)
                exact_p = p.gather(2, exact_idx.unsqueeze(1).expand(-1, p.shape[1], -1))  # (G, L, k)
                y = p + p * scale.to(dtype).unsqueeze(1) + c.unsqueeze(1)  # y + y·a keeps a's precision in bf16
                del p
                if branch:
                    relu_h = F.relu(torch.bmm(xc, down.to(dtype).transpose(1, 2)))  # (G, L, r)
            if branch and not grouped and not fold_done:
                y.baddbmm_(relu_h, up_scaled.transpose(1, 2))  # + s · U relu(D x), accumulated in the matmul
        ctx.has_branch, ctx.fold, ctx.grouped, ctx.input_dtype = branch, fold, grouped, x.dtype
        # x only for D's gradient: without a branch the input gradient needs W alone
        saved = (xc if branch else None, weight, bias, scale, shift, y, exact_idx, exact_p)
        grouping = (task_scale, offsets) if grouped else ()
        ctx.save_for_backward(*saved, *grouping, *((relu_h, down, up, branch_scale) if branch else ()))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors  # read once: activation checkpointing allows a single unpack
        xc, weight, bias, scale, shift, y, exact_idx, exact_p = saved[:8]
        task_scale, offsets = saved[8:10] if ctx.grouped else (None, None)
        rest = saved[10:] if ctx.grouped else saved[8:]
        dtype = y.dtype
        acc = torch.promote_types(dtype, torch.float32)  # sums in fp32 (fp64 stays fp64)
        g = grad_y.to(dtype)  # (G, L, out)
        g_sum = g.sum(1, dtype=acc)  # (G, out): b's gradient
        # Σ_t g ⊙ y with fp32 accumulation, less the terms y holds beyond (1 + a) ⊙ p, each rounded to
        # the compute dtype as the forward used it.
        c = (bias.to(shift.dtype) + shift).to(dtype).to(acc)  # (G, out)
        numerator = (g * y).sum(1, dtype=acc) - c * g_sum
        grad_x = grad_down = grad_up = grad_branch_scale = None
        grad_h = None
        if ctx.has_branch:
            relu_h, down, up, branch_scale = rest
            up_scaled = (up * branch_scale.view(-1, 1, 1)).to(dtype)  # s · U as the forward used it
            # (G, L, r) = g (s U), computed as ((s U)^T g^T)^T: a wide output instead of a tall-skinny one
            grad_h = torch.bmm(up_scaled.transpose(1, 2), g.transpose(1, 2)).transpose(1, 2).mul_(relu_h > 0)
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                grad_x = F.linear(g, folded_weight(weight, scale[0], dtype).t())  # (1, L, in)
            elif ctx.grouped:
                stack = folded_weight(weight, task_scale, dtype)  # (T, out, in)
                n, length, out_f = g.shape
                grad_x = torch._grouped_mm(g.reshape(n * length, out_f), stack, offs=offsets).view(n, length, -1)
            else:
                grad_x = F.linear(torch.addcmul(g, g, scale.to(dtype).unsqueeze(1)), weight.to(dtype).t())
        if ctx.has_branch:
            # (G, out, r) = g^T relu(h), computed as (relu(h)^T g)^T: the same product, but a wide output
            # instead of a (out x r) one reduced over all rows (11x faster on the CPU, where BLAS
            # handles the tall-skinny case badly)
            m = torch.bmm(relu_h.transpose(1, 2), g).transpose(1, 2).to(acc)
            grad_up = m * branch_scale.view(-1, 1, 1).to(acc)
            grad_branch_scale = (up.to(acc) * m).sum((1, 2))
            numerator = numerator - (up_scaled.to(acc) * m).sum(2)  # Σ_t g ⊙ z
            grad_down = torch.bmm(grad_h.transpose(1, 2), xc)  # (G, r, in)
            if grad_x is not None:
                grad_x.baddbmm_(grad_h, down.to(dtype))
        # 1 + a as the forward applied it: folded into W in fp32, or p + p·a with a in the compute dtype
        one_plus_a = 1 + (scale if ctx.fold or ctx.grouped else scale.to(dtype)).to(acc)
        # Beyond the k exact channels, |1 + a| < MIN_DIVISOR would need more than k switched-off channels
        # in one layer; there the gradient keeps its sign and shrinks instead of amplifying rounding.
        sign = torch.where(one_plus_a < 0, -1.0, 1.0).to(acc)
        grad_scale = numerator / torch.where(one_plus_a.abs() < MIN_DIVISOR, sign * MIN_DIVISOR, one_plus_a)
        exact_g = g.gather(2, exact_idx.unsqueeze(1).expand(-1, g.shape[1], -1))  # (G, L, k)
        grad_scale = grad_scale.scatter(1, exact_idx, (exact_g * exact_p).sum(1, dtype=acc))
        return (
            None if grad_x is None else grad_x.to(ctx.input_dtype),
            None,
            None,
            grad_scale.to(scale.dtype),
            g_sum.to(shift.dtype),
            None if grad_down is None else grad_down.to(down.dtype),
            None if grad_up is None else grad_up.to(up.dtype),
            None if grad_branch_scale is None else grad_branch_scale.to(branch_scale.dtype),
            None,
            None,
        )


def lean_affine_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    down: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    branch_scale: torch.Tensor | None = None,
    task_scale: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """(1 + a) ⊙ (W x) + b̂ + b [+ s · U relu(D x)] for a frozen W, b̂, with a's gradient from y.

    Per-sample parameters (scale, shift (N, out); down (N, r, in); up (N, out, r); branch_scale (N,))
    apply to x (N, ..., in) sample by sample; one task's (scale (out,), down (r, in), ...) to every
    row of x (..., in). For a batch sorted by task, `task_scale` (T, out) (the stacked parameter the
    per-sample `scale` rows were gathered from) and `offsets` (see `grouped_scaled_linear`) select
    one grouped matmul over the tasks' folded weights instead of the per-sample epilogue.
    """
    if weight.requires_grad or bias.requires_grad:
        raise ValueError("lean_affine_linear is for a frozen base layer; W and b̂ must not require grad")
    per_sample = scale.dim() == 2
    if per_sample:
        groups = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, L, in)
    else:
        groups = x.reshape(1, -1, x.shape[-1])  # (1, M, in)
        scale, shift = scale.unsqueeze(0), shift.unsqueeze(0)
        if down is not None:
            down, up, branch_scale = down.unsqueeze(0), up.unsqueeze(0), branch_scale.reshape(1)
    if per_sample and task_scale is not None:
        task_scale = task_scale.detach()  # its gradient reaches it through the gathered `scale`
    else:
        task_scale = offsets = None
    y = _LeanAffineLinear.apply(groups, weight, bias, scale, shift, down, up, branch_scale, task_scale, offsets)
    return y.reshape(*x.shape[:-1], y.shape[-1])
