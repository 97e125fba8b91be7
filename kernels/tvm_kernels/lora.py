"""lora: each token's low-rank update from its own adapter slot (the cpu target's BGMV).

    x [T, K]   a [NL, R, K]   b [NL, N, R]   index [T] int32 (-1: no adapter)   base [T, N] (optional)
    y [T, N] = base[t] + b[index[t]] @ (a[index[t]] @ x[t]), base[t] where index[t] == -1

One task per token (a parallel loop over T, or the calling thread when the call moves at most
`ser` KiB of adapter rows: a decode step), reading only its slot's rows:

    shrink  v[R] = a[slot] @ x[t]: rb rows of a at a time, each a dot product accumulating vk
            float32 lanes along K (x's lanes loaded once for the rb rows), lanes summed at the
            end; v rounded to x's dtype, as the reference's bmm rounds it
    expand  y[t, n] = b[slot, n, :] . v for nb rows n at a time: each a dot product over R of
            w float32 lanes (w the widest power of two up to 16 dividing R), b's rows read
            contiguously, the lanes summed by a tree of vector adds, base[t, n] added to the
            float32 sum before y rounds once. Stepping down b's columns instead (vn rows of y
            in lanes, b read with stride R) ran 1.4x slower here (R 16, N 4096: 16.3 vs
            11.2 us), LLVM gathering each column

A token of slot -1 reads nothing of a or b and writes its base row (zeros without base); so
does one whose index is out of range (never a read past the slots; the reference would raise).
NL and T are symbolic: one function serves every slot count and step. Without base (the op's
4-operand form) the base param is dropped. Knobs (`KNOBS`): vk, rb, nb, ser.
"""

from __future__ import annotations

from collections.abc import Mapping

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import (
    AS_IS,
    FLOATS,
    MAT,
    Kernel,
    OpInfo,
    keep_params,
    name_of,
    short,
    vec_width,
)
from kiln.kernels.tvm_kernels.linear import _lane_sum
from kiln.kernels.tvm_kernels.tir import F32, SER, dtype_bytes, rounded_to

KNOBS = {"lora": {"vk": (4, 8, 16, 32), "rb": (1, 2, 4, 8), "nb": (1, 2, 4, 8), "ser": (0, 64, 256, 1024)}}
"""float32 lanes of the shrink's dot products along K (vk), rows of a per shrink pass (rb),
rows of b per expand step (nb), the most KiB of adapter rows times tokens run on the calling
thread (ser). A value that does not divide its axis is no schedule of the shape."""


def resolve(k: int, n: int, r: int, config: Mapping[str, int] | None) -> dict[str, int]:
    """The full config for this shape (defaults for missing knobs); ValueError when a value
    does not divide its axis."""
    c = {"vk": vec_width(k), "rb": vec_width(r, 4), "nb": vec_width(n, 4), "ser": SER}
    c.update({key: int(v) for key, v in (config or {}).items() if key in c})
    if k % c["vk"] or n % c["nb"] or r % c["rb"] or c["ser"] < 0 or min(c["vk"], c["nb"], c["rb"]) < 1:
        raise ValueError(f"lora k={k} n={n} r={r}: config {dict(config or {})} does not divide the shape")
    return c


def _func(k: int, n: int, r: int, dt: str, has_base: bool, c: Mapping[str, int]):
    vk, nb, rb = c["vk"], c["nb"], c["rb"]
    w = vec_width(r)
    rnd = rounded_to(dt)
    token_bytes = (k + n) * r * dtype_bytes(dt)  # a's and b's rows of one slot

    @T.macro
    def token(t, X, A, B, Slot, Z, Y, NL):
        if T.Or(Slot[t] < 0, T.Cast("int64", Slot[t]) >= NL):  # an index past the slots reads nothing
            for j in range(n):  # (a vectorized store of a 16-bit constant fails to legalize)
                if has_base:
                    Y[t, j] = Z[t, j]
                else:
                    Y[t, j] = T.Cast(dt, T.float32(0))
        else:
            s = T.meta_var(T.Cast("int64", Slot[t]))
            v = T.alloc_buffer((r,), F32, scope="global")
            acc = T.alloc_buffer((rb, 1, vk), F32, scope="global")
            racc = T.alloc_buffer((nb, 1, w), F32, scope="global")
            for j0 in range(r // rb):
                for i in T.unroll(rb):
                    for q in T.vectorized(vk):
                        acc[i, 0, q] = T.float32(0)
                for k0 in range(k // vk):
                    for i in T.unroll(rb):
                        for q in T.vectorized(vk):
                            acc[i, 0, q] = acc[i, 0, q] + T.Cast(F32, X[t, k0 * vk + q]) * T.Cast(
                                F32, A[s, j0 * rb + i, k0 * vk + q])
                for i in T.unroll(rb):
                    _lane_sum(acc, i, 0, vk)
                    v[j0 * rb + i] = rnd(acc[i, 0, 0])
            for n0 in range(n // nb):
                for i in T.unroll(nb):
                    for q in T.vectorized(w):
                        racc[i, 0, q] = T.float32(0)
                    for j0 in range(r // w):
                        for q in T.vectorized(w):
                            racc[i, 0, q] = racc[i, 0, q] + T.Cast(F32, B[s, n0 * nb + i, j0 * w + q]) * v[j0 * w + q]
                    _lane_sum(racc, i, 0, w)
                    if has_base:
                        Y[t, n0 * nb + i] = T.Cast(dt, racc[i, 0, 0] + T.Cast(F32, Z[t, n0 * nb + i]))
                    else:
                        Y[t, n0 * nb + i] = T.Cast(dt, racc[i, 0, 0])

    @T.prim_func(private=True)
    def func(x_h: T.handle, a_h: T.handle, b_h: T.handle, i_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})  # y never overlaps x, a, b, index or base
        M = T.int64()
        NL = T.int64()
        sx0, sa0, sa1, sb0, sb1, sz0, sy0 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, k), dt, strides=(sx0, 1), offset_factor=1)
        A = T.match_buffer(a_h, (NL, T.int64(r), T.int64(k)), dt, strides=(sa0, sa1, T.int64(1)), offset_factor=1)
        B = T.match_buffer(b_h, (NL, T.int64(n), T.int64(r)), dt, strides=(sb0, sb1, T.int64(1)), offset_factor=1)
        Slot = T.match_buffer(i_h, (M,), "int32", offset_factor=1)
        Z = T.match_buffer(z_h, (M, n), dt, strides=(sz0, 1), offset_factor=1)
        Y = T.match_buffer(y_h, (M, n), dt, strides=(sy0, 1), offset_factor=1)
        if M * token_bytes <= c["ser"] * 1024:
            for t in range(M):
                token(t, X, A, B, Slot, Z, Y, NL)
        else:
            for t in T.parallel(M):
                token(t, X, A, B, Slot, Z, Y, NL)

    return func


def lora(info: OpInfo, config: Mapping[str, int] | None = None) -> Kernel | None:
    """The kernel of a lora node with the schedule `config` (None: the default); None when K,
    N or R is symbolic or the dtypes are not x, a, b (and base) of one float dtype and an int32
    index."""
    x, a, b, index = info.inputs[:4]
    base = info.inputs[4] if len(info.inputs) > 4 else None
    if x is None or a is None or b is None or index is None or x.dtype not in FLOATS or index.dtype != "int32":
        return None
    k, r, n = a.shape[2], a.shape[1], b.shape[1]
    if not all(isinstance(d, int) for d in (k, r, n)) or a.dtype != x.dtype or b.dtype != x.dtype:
        return None
    if base is not None and base.dtype != x.dtype:
        return None
    c = resolve(k, n, r, config)
    name = name_of("lora", f"k{k}n{n}r{r}", short(x.dtype), "base" if base is not None else "")
    func = _func(k, n, r, x.dtype, base is not None, c)
    if base is not None:
        return Kernel(name, func, (0, 1, 2, 3, 4), (0,), (MAT, AS_IS, AS_IS, AS_IS, MAT, MAT))
    return Kernel(name, keep_params(func, (0, 1, 2, 3, 5)), (0, 1, 2, 3), (0,), (MAT, AS_IS, AS_IS, AS_IS, MAT))


BUILDERS = {"lora": lora}
