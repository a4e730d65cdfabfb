"""Triton kernels for the LoRA layer's thin matrix products: a tall matrix times a rank-r one.

Each fused LoRA projection (lora_kernels.py) does, besides its large product with the frozen weight,
four products with one side only r (16 to 64) wide, in every forward pass and backward pass:

    x A^T   (tokens × r)   the adapter's input, forward and recomputation      :func:`times_small`
    g B     (tokens × r)   the output gradient through B, backward             :func:`times_small`
    g^T xA  (out × r)      B's gradient, backward                              :func:`small_t_times`
    gB^T x  (r × in)       A's gradient, backward                              :func:`small_t_times`

Each reads one tall operand once (32 MB for an 8B model's 4,096 × 4,096 activations, 117 MB for its
MLP's) and computes little: they are bound by memory bandwidth. cuBLAS splits them into tiles made
for large products; bench/lowrank_products.py measured them on an H200 at a fraction of the memory
bandwidth. These kernels stream the tall operand in row (or column) strips, each program keeping its
rank-r accumulator in registers, and split the long sum in a few parts where there are too few
strips to fill the GPU; the parts are added in a fixed order (:func:`_sum_splits`), so results are
deterministic. Operands in the compute dtype (bf16 or fp16), sums in fp32, as cuBLAS does; only
the order of the sums differs. Strided operands are read in place (a transposed weight, a column
slice). CUDA only (imported there); lora_kernels.py falls back to torch's products elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: (rows or columns per program, summed elements per iteration, parts of the sum, warps, stages) by
#: kind; bench/lowrank_products.py sweeps them on the 8B and 1B shapes
TIMES_SMALL = (64, 128, 2, 4, 4)
SMALL_T_TIMES = (128, 64, 2, 4, 4)
#: split a sum only while there are fewer programs than this many per multiprocessor
PROGRAMS_PER_SM = 1


@triton.jit
def _times_small(x, s, out, T, K, R, sxt, sxk, ssk, ssr, sop, sot, sor, k_per_split,
                 BT: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
    """out[split, t, r] = sum over this split's k of x[t, k] s[k, r]."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, RP)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BT, RP), dtype=tl.float32)
    for k in range(k_start, k_end, BK):
        ks = k + tl.arange(0, BK)
        xt = tl.load(x + rows[:, None] * sxt + ks[None, :] * sxk, mask=(rows[:, None] < T) & (ks[None, :] < k_end),
                     other=0.0)
        st = tl.load(s + ks[:, None] * ssk + cols[None, :] * ssr, mask=(ks[:, None] < k_end) & (cols[None, :] < R),
                     other=0.0)
        acc = tl.dot(xt, st, acc)
    tl.store(out + pid_s * sop + rows[:, None] * sot + cols[None, :] * sor, acc.to(out.dtype.element_ty),
             mask=(rows[:, None] < T) & (cols[None, :] < R))


@triton.jit
def _small_t_times(u, x, out, T, K, R, sut, sur, sxt, sxk, sop, sok, sor, t_per_split, scale,
                   BK: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr):
    """out[split, k, r] = scale × sum over this split's t of x[t, k] u[t, r]."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    ks = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    cols = tl.arange(0, RP)
    t_start = pid_s * t_per_split
    t_end = tl.minimum(t_start + t_per_split, T)
    acc = tl.zeros((BK, RP), dtype=tl.float32)
    for t in range(t_start, t_end, BT):
        ts = (t + tl.arange(0, BT)).to(tl.int64)
        xt = tl.load(x + ts[:, None] * sxt + ks[None, :] * sxk, mask=(ts[:, None] < t_end) & (ks[None, :] < K),
                     other=0.0)
        ut = tl.load(u + ts[:, None] * sut + cols[None, :] * sur, mask=(ts[:, None] < t_end) & (cols[None, :] < R),
                     other=0.0)
        acc = tl.dot(tl.trans(xt), ut, acc)
    acc = acc * scale
    tl.store(out + pid_s * sop + ks[:, None] * sok + cols[None, :] * sor, acc.to(out.dtype.element_ty),
             mask=(ks[:, None] < K) & (cols[None, :] < R))


@triton.jit
def _sum_splits(parts, out, n, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = parts[0, i] + parts[1, i] + ... in that order (parts: SPLITS × n, contiguous fp32)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    total = tl.load(parts + offs, mask=mask, other=0.0)
    for i in tl.static_range(1, SPLITS):
        total += tl.load(parts + i * n + offs, mask=mask, other=0.0)
    tl.store(out + offs, total.to(out.dtype.element_ty), mask=mask)


def _rank_width(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _splits(programs: int, length: int, step: int, wanted: int, device: torch.device) -> int:
    """How many parts to sum ``length`` in: ``wanted`` at most, only while the programs do not fill
    the GPU, and each part at least ``step`` long."""
    if wanted <= 1:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    splits = 1
    while splits < wanted and programs * splits < PROGRAMS_PER_SM * sms and length >= 2 * splits * step:
        splits *= 2
    return splits


def _finish(parts: torch.Tensor, splits: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` (contiguous) as the sum of the ``splits`` parts in ``parts``."""
    n = out.numel()
    block = 1024
    _sum_splits[(triton.cdiv(n, block),)](parts, out, n, SPLITS=splits, BLOCK=block, num_warps=4)
    return out


def times_small(x: torch.Tensor, s: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """``x @ s`` for a tall ``x`` (tokens × k) and a thin ``s`` (k × r), in ``x``'s dtype, summed in fp32."""
    T, K = x.shape
    K2, R = s.shape
    if K2 != K:
        raise ValueError(f"times_small: {tuple(x.shape)} @ {tuple(s.shape)}")
    BT, BK, wanted, warps, stages = config or TIMES_SMALL
    RP = _rank_width(R)
    row_programs = triton.cdiv(T, BT)
    splits = _splits(row_programs, K, BK, wanted, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, splits), BK) * BK
    out = torch.empty((T, R), dtype=x.dtype, device=x.device)
    target = out if splits == 1 else torch.empty((splits, T, R), dtype=torch.float32, device=x.device)
    _times_small[(row_programs, splits)](
        x, s, target, T, K, R, x.stride(0), x.stride(1), s.stride(0), s.stride(1), T * R, R, 1, k_per_split,
        BT=BT, BK=BK, RP=RP, num_warps=warps, num_stages=stages)
    return out if splits == 1 else _finish(target, splits, out)


def small_t_times(u: torch.Tensor, x: torch.Tensor, scale: float = 1.0, transposed: bool = False,
                  config: tuple | None = None) -> torch.Tensor:
    """``scale * (u^T @ x)`` in fp32 for two tall operands with the same rows (tokens): ``u`` thin
    (tokens × r), ``x`` (tokens × k); r × k, or with ``transposed`` its transpose (k × r), contiguous."""
    T, R = u.shape
    T2, K = x.shape
    if T2 != T:
        raise ValueError(f"small_t_times: {tuple(u.shape)}^T @ {tuple(x.shape)}")
    BK, BT, wanted, warps, stages = config or SMALL_T_TIMES
    RP = _rank_width(R)
    col_programs = triton.cdiv(K, BK)
    splits = _splits(col_programs, T, BT, wanted, x.device)
    t_per_split = triton.cdiv(triton.cdiv(T, splits), BT) * BT
    out = torch.empty((K, R) if transposed else (R, K), dtype=torch.float32, device=x.device)
    target = out if splits == 1 else torch.empty((splits, *out.shape), dtype=torch.float32, device=x.device)
    sok, sor = (R, 1) if transposed else (1, K)
    _small_t_times[(col_programs, splits)](
        u, x, target, T, K, R, u.stride(0), u.stride(1), x.stride(0), x.stride(1), K * R, sok, sor, t_per_split,
        float(scale), BK=BK, BT=BT, RP=RP, num_warps=warps, num_stages=stages)
    return out if splits == 1 else _finish(target, splits, out)


def supported(*tensors: torch.Tensor) -> bool:
    """Whether these operands suit the kernels: CUDA, 2-D, one 16-bit floating dtype."""
    dtype = tensors[0].dtype
    return all(t.is_cuda and t.dim() == 2 and t.dtype == dtype for t in tensors) and dtype in (
        torch.bfloat16, torch.float16)


__all__ = ["small_t_times", "supported", "times_small"]
