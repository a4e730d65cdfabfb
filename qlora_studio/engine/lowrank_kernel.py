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
strips to fill the GPU (:func:`times_small_config`, :func:`small_t_times_config`); the parts are added in a fixed order (:func:`_sum_splits`), so results are
deterministic. Operands in the compute dtype (bf16 or fp16), sums in fp32, as cuBLAS does; only
the order of the sums differs. Strided operands are read in place (a transposed weight, a column
slice). CUDA only (imported there); lora_kernels.py falls back to torch's products elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: a part of a split sum is at least this long: shorter ones cost more in their sum than they gain
#: in programs (bench/lowrank_products.py, on an H200)
TIMES_SMALL_PART = 2048
SMALL_T_TIMES_PART = 1024


def times_small_config(tokens: int, k: int) -> tuple[int, int, int, int, int]:
    """(rows per program, summed elements per iteration, parts of the sum, warps, stages) for
    :func:`times_small`: the fastest of bench/lowrank_products.py's sweep on the 8B shape's
    products, 64 rows by 128, the sum in up to 4 parts of at least :data:`TIMES_SMALL_PART`."""
    return 64, 128, _parts(k, TIMES_SMALL_PART), 4, 4


def small_t_times_config(tokens: int, k: int) -> tuple[int, int, int, int, int]:
    """(columns per program, summed tokens per iteration, parts of the sum, warps, stages) for
    :func:`small_t_times`, from the same sweep: narrow outputs (k up to 1,024 or so) in 64 columns
    a program and wider ones in 128, the tokens in up to 4 parts of at least
    :data:`SMALL_T_TIMES_PART` where the programs are too few to fill an H200 (k below 8,192),
    8 warps where they are many."""
    if k >= 8192:
        return 128, 64, 1, 8, 4
    if k >= 4096:
        return 128, 64, _parts(tokens, SMALL_T_TIMES_PART), 4, 4
    return 64, 128, _parts(tokens, SMALL_T_TIMES_PART), 4, 3


def _parts(length: int, part: int) -> int:
    parts = 1
    while parts < 4 and length >= 2 * parts * part:
        parts *= 2
    return parts


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


def _splits(length: int, step: int, wanted: int) -> int:
    """``wanted`` parts, fewer where a part would be shorter than ``step``."""
    splits = max(1, wanted)
    while splits > 1 and length < splits * step:
        splits //= 2
    return splits


def _finish(parts: torch.Tensor, splits: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` (contiguous) as the sum of the ``splits`` parts in ``parts``."""
    n = out.numel()
    block = 1024
    _sum_splits[(triton.cdiv(n, block),)](parts, out, n, SPLITS=splits, BLOCK=block, num_warps=4)
    return out


def times_small(x: torch.Tensor, s: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """``x @ s`` for a tall ``x`` (tokens × k) and a thin ``s`` (k × r), in ``x``'s dtype, summed in fp32.
    ``config``: as :func:`times_small_config` gives it (the parts of the sum as asked, where long enough)."""
    T, K = x.shape
    K2, R = s.shape
    if K2 != K:
        raise ValueError(f"times_small: {tuple(x.shape)} @ {tuple(s.shape)}")
    BT, BK, wanted, warps, stages = config or times_small_config(T, K)
    RP = _rank_width(R)
    row_programs = triton.cdiv(T, BT)
    splits = _splits(K, BK, wanted)
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
    (tokens × r), ``x`` (tokens × k); r × k, or with ``transposed`` its transpose (k × r), contiguous.
    ``config``: as :func:`small_t_times_config` gives it."""
    T, R = u.shape
    T2, K = x.shape
    if T2 != T:
        raise ValueError(f"small_t_times: {tuple(u.shape)}^T @ {tuple(x.shape)}")
    BK, BT, wanted, warps, stages = config or small_t_times_config(T, K)
    RP = _rank_width(R)
    col_programs = triton.cdiv(K, BK)
    splits = _splits(T, BT, wanted)
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


__all__ = ["small_t_times", "small_t_times_config", "supported", "times_small", "times_small_config"]
