"""Rotary embedding and the K/V cache write.

    rope            x [T, H, D] (strided), positions [T], cos/sin [P, R] -> out [T, H, D]
    kv_cache_write  k [T, Hkv, D], v [T, Hkv, Dv], caches [NB, BS, Hkv, D|Dv], slots [T]
                    in place; slot -1 (a padded row) writes nothing
    rope_kv_cache_write  both in one pass: rope(q) -> q_rot [T, Hq, D]; rope(k), v -> caches

rope: one task per (token, head) row; the R rotary features as x * cos + rotate(x) * sin in
float32 (neox rotates halves, interleaved rotates pairs), the rest copied. Longrope (a second
table pair chosen per sequence) stays with the torch reference. kv_cache_write and
rope_kv_cache_write: one task per token.

A call that moves at most `ser` KiB (config key, default tir.SER; a decode step) runs its tasks on
the calling thread, no fork and join of TVM's pool; the task body is one `T.macro` that the
serial and the parallel loop both call. Per-task indices are `T.meta_var` (an assigned name
is a heap scalar in TVM 0.27: a TVMBackendAllocWorkspace per task). No `KNOBS`: `kiln tune`
times kernels on random inputs, which are no positions or slots.
"""

from __future__ import annotations

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import AS_IS, FLOATS, Kernel, OpInfo, last_dim, name_of, short
from kiln.kernels.tvm_kernels.tir import F32, dtype_bytes, rounded_to, serial_bytes


def _rope_func(d: int, r: int, dt: str, tdt: str, pdt: str, odt: str, style: str, ser_bytes: int):
    # torch computes x*cos and rotate(x)*sin in the promoted dtype, rounding each product there
    rnd = rounded_to(odt)
    h2 = r // 2
    row_bytes = d * (dtype_bytes(dt) + dtype_bytes(odt))  # x read, y written

    @T.macro
    def row_body(row, X, Pos, C, S, Y, H):
        t = T.meta_var(row // H)
        h = T.meta_var(row % H)
        p = T.meta_var(T.Cast("int64", Pos[t]))
        if style == "neox":
            for j in T.vectorized(h2):
                Y[t, h, j] = T.Cast(odt, rnd(T.Cast(F32, X[t, h, j]) * T.Cast(F32, C[p, j]))
                                    - rnd(T.Cast(F32, X[t, h, j + h2]) * T.Cast(F32, S[p, j])))
            for j in T.vectorized(h2):
                Y[t, h, j + h2] = T.Cast(odt, rnd(T.Cast(F32, X[t, h, j + h2]) * T.Cast(F32, C[p, j + h2]))
                                         + rnd(T.Cast(F32, X[t, h, j]) * T.Cast(F32, S[p, j + h2])))
        else:
            for j in range(h2):
                Y[t, h, 2 * j] = T.Cast(odt, rnd(T.Cast(F32, X[t, h, 2 * j]) * T.Cast(F32, C[p, 2 * j]))
                                        - rnd(T.Cast(F32, X[t, h, 2 * j + 1]) * T.Cast(F32, S[p, 2 * j])))
                Y[t, h, 2 * j + 1] = T.Cast(odt, rnd(T.Cast(F32, X[t, h, 2 * j + 1]) * T.Cast(F32, C[p, 2 * j + 1]))
                                            + rnd(T.Cast(F32, X[t, h, 2 * j]) * T.Cast(F32, S[p, 2 * j + 1])))
        if r < d:
            for j in T.vectorized(d - r):
                Y[t, h, r + j] = T.Cast(odt, X[t, h, r + j])

    @T.prim_func(private=True)
    def func(x_h: T.handle, p_h: T.handle, c_h: T.handle, s_h: T.handle, y_h: T.handle):
        N = T.int64()
        H = T.int64()
        P = T.int64()
        sx0, sx1, sy0, sy1 = T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (N, H, d), dt, strides=(sx0, sx1, 1), offset_factor=1)
        Pos = T.match_buffer(p_h, (N,), pdt, offset_factor=1)
        C = T.match_buffer(c_h, (P, r), tdt, offset_factor=1)
        S = T.match_buffer(s_h, (P, r), tdt, offset_factor=1)
        Y = T.match_buffer(y_h, (N, H, d), odt, strides=(sy0, sy1, 1), offset_factor=1)
        if N * H * row_bytes <= ser_bytes:
            for row in range(N * H):
                row_body(row, X, Pos, C, S, Y, H)
        else:
            for row in T.parallel(N * H):
                row_body(row, X, Pos, C, S, Y, H)

    return func


def rope(info: OpInfo, config=None) -> Kernel | None:
    if len(info.inputs) != 4:
        return None  # longrope: a per-sequence table choice, left to the reference
    x, pos, cos, sin = info.inputs
    d, r, style = last_dim(x), int(info.attrs["rotary_dim"]), info.attrs["style"]
    out = info.outputs[0]
    if (d is None or x.rank != 3 or r % 2 or r > d or style not in ("neox", "interleaved") or pos is None
            or cos is None or sin is None or cos.dtype != sin.dtype or cos.rank != 2 or cos.shape[1] != r
            or not pos.dtype.startswith("int") or x.dtype not in FLOATS or cos.dtype not in FLOATS):
        return None
    name = name_of("rope", style, f"d{d}r{r}", short(x.dtype), short(cos.dtype), short(pos.dtype), short(out.dtype))
    func = _rope_func(d, r, x.dtype, cos.dtype, pos.dtype, out.dtype, style, serial_bytes(config))
    return Kernel(name, func, (0, 1, 2, 3), (0,), (AS_IS,) * 5)


def _cache_write_func(d: int, dv: int, hkv: int, dt: str, cdt: str, sdt: str, ser_bytes: int):
    row_bytes = hkv * (d + dv) * (dtype_bytes(dt) + dtype_bytes(cdt))  # k, v read, their cache rows written

    @T.macro
    def token(t, K, V, KC, VC, Slots, BS):
        slot = T.meta_var(T.Cast("int64", Slots[t]))
        if slot >= T.int64(0):
            for h in range(hkv):
                for j in T.vectorized(d):
                    KC[slot // BS, slot % BS, h, j] = T.Cast(cdt, K[t, h, j])
                for j in T.vectorized(dv):
                    VC[slot // BS, slot % BS, h, j] = T.Cast(cdt, V[t, h, j])

    @T.prim_func(private=True)
    def func(k_h: T.handle, v_h: T.handle, kc_h: T.handle, vc_h: T.handle, s_h: T.handle):
        N = T.int64()
        NB = T.int64()
        BS = T.int64()
        sk0, sk1, sv0, sv1 = T.int64(), T.int64(), T.int64(), T.int64()
        kc0, kc1, kc2, vc0, vc1, vc2 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        K = T.match_buffer(k_h, (N, T.int64(hkv), T.int64(d)), dt, strides=(sk0, sk1, T.int64(1)), offset_factor=1)
        V = T.match_buffer(v_h, (N, T.int64(hkv), T.int64(dv)), dt, strides=(sv0, sv1, T.int64(1)), offset_factor=1)
        KC = T.match_buffer(kc_h, (NB, BS, T.int64(hkv), T.int64(d)), cdt, strides=(kc0, kc1, kc2, T.int64(1)), offset_factor=1)
        VC = T.match_buffer(vc_h, (NB, BS, T.int64(hkv), T.int64(dv)), cdt, strides=(vc0, vc1, vc2, T.int64(1)), offset_factor=1)
        Slots = T.match_buffer(s_h, (N,), sdt, offset_factor=1)
        if N * row_bytes <= ser_bytes:
            for t in range(N):
                token(t, K, V, KC, VC, Slots, BS)
        else:
            for t in T.parallel(N):
                token(t, K, V, KC, VC, Slots, BS)

    return func


def kv_cache_write(info: OpInfo, config=None) -> Kernel | None:
    k, v, kc, vc, slots = info.inputs
    if any(t is None for t in info.inputs) or k.rank != 3 or v.rank != 3 or kc.rank != 4 or kc.dtype != vc.dtype:
        return None
    d, dv, hkv = k.shape[2], v.shape[2], k.shape[1]
    if not all(isinstance(x, int) for x in (d, dv, hkv)) or not slots.dtype.startswith("int"):
        return None
    name = name_of("kv_cache_write", f"h{hkv}d{d}v{dv}", short(k.dtype), short(kc.dtype), short(slots.dtype))
    func = _cache_write_func(d, dv, hkv, k.dtype, kc.dtype, slots.dtype, serial_bytes(config))
    return Kernel(name, func, (0, 1, 2, 3, 4), (), (AS_IS,) * 5)


def _rope_write_func(d: int, r: int, hq: int, hkv: int, dv: int, dt: str, tdt: str, pdt: str, odt: str,
                     cdt: str, sdt: str, style: str, ser_bytes: int):
    rnd = rounded_to(odt)
    h2 = r // 2
    neox = style == "neox"
    # q read, q_rot written; k, v read, their cache rows written
    row_bytes = hq * d * (dtype_bytes(dt) + dtype_bytes(odt)) + hkv * (d + dv) * (dtype_bytes(dt) + dtype_bytes(cdt))

    def term(X, C, S, t, h, p, a, b, sign):
        """Feature a of rope(x): x[a] * cos[a] + sign * x[b] * sin[a], b its rotation partner."""
        x_a, x_b = T.Cast(F32, X[t, h, a]), T.Cast(F32, X[t, h, b])
        if sign < 0:
            return rnd(x_a * T.Cast(F32, C[p, a])) - rnd(x_b * T.Cast(F32, S[p, a]))
        return rnd(x_a * T.Cast(F32, C[p, a])) + rnd(x_b * T.Cast(F32, S[p, a]))

    @T.macro
    def token(t, Q, K, V, Pos, C, S, KC, VC, Slots, Y, BS):
        p = T.meta_var(T.Cast("int64", Pos[t]))
        slot = T.meta_var(T.Cast("int64", Slots[t]))
        for h in range(hq):
            if neox:
                for j in T.vectorized(h2):
                    Y[t, h, j] = T.Cast(odt, term(Q, C, S, t, h, p, j, j + h2, -1))
                for j in T.vectorized(h2):
                    Y[t, h, j + h2] = T.Cast(odt, term(Q, C, S, t, h, p, j + h2, j, 1))
            else:
                for j in range(h2):
                    Y[t, h, 2 * j] = T.Cast(odt, term(Q, C, S, t, h, p, 2 * j, 2 * j + 1, -1))
                    Y[t, h, 2 * j + 1] = T.Cast(odt, term(Q, C, S, t, h, p, 2 * j + 1, 2 * j, 1))
            if r < d:
                for j in T.vectorized(d - r):
                    Y[t, h, r + j] = T.Cast(odt, Q[t, h, r + j])
        if slot >= T.int64(0):
            for h in range(hkv):
                if neox:
                    for j in T.vectorized(h2):
                        KC[slot // BS, slot % BS, h, j] = T.Cast(cdt, T.Cast(odt, term(K, C, S, t, h, p, j, j + h2, -1)))
                    for j in T.vectorized(h2):
                        KC[slot // BS, slot % BS, h, j + h2] = T.Cast(cdt, T.Cast(odt, term(K, C, S, t, h, p, j + h2, j, 1)))
                else:
                    for j in range(h2):
                        KC[slot // BS, slot % BS, h, 2 * j] = T.Cast(
                            cdt, T.Cast(odt, term(K, C, S, t, h, p, 2 * j, 2 * j + 1, -1)))
                        KC[slot // BS, slot % BS, h, 2 * j + 1] = T.Cast(
                            cdt, T.Cast(odt, term(K, C, S, t, h, p, 2 * j + 1, 2 * j, 1)))
                if r < d:
                    for j in T.vectorized(d - r):
                        KC[slot // BS, slot % BS, h, r + j] = T.Cast(cdt, T.Cast(odt, K[t, h, r + j]))
                for j in T.vectorized(dv):
                    VC[slot // BS, slot % BS, h, j] = T.Cast(cdt, V[t, h, j])

    @T.prim_func(private=True)
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, p_h: T.handle, c_h: T.handle, s_h: T.handle,
             kc_h: T.handle, vc_h: T.handle, sl_h: T.handle, y_h: T.handle):
        N = T.int64()
        P = T.int64()
        NB = T.int64()
        BS = T.int64()
        sq0, sq1, sk0, sk1, sv0, sv1, sy0, sy1 = (T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(),
                                                  T.int64(), T.int64())
        kc0, kc1, kc2, vc0, vc1, vc2 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q_h, (N, T.int64(hq), T.int64(d)), dt, strides=(sq0, sq1, T.int64(1)), offset_factor=1)
        K = T.match_buffer(k_h, (N, T.int64(hkv), T.int64(d)), dt, strides=(sk0, sk1, T.int64(1)), offset_factor=1)
        V = T.match_buffer(v_h, (N, T.int64(hkv), T.int64(dv)), dt, strides=(sv0, sv1, T.int64(1)), offset_factor=1)
        Pos = T.match_buffer(p_h, (N,), pdt, offset_factor=1)
        C = T.match_buffer(c_h, (P, T.int64(r)), tdt, offset_factor=1)
        S = T.match_buffer(s_h, (P, T.int64(r)), tdt, offset_factor=1)
        KC = T.match_buffer(kc_h, (NB, BS, T.int64(hkv), T.int64(d)), cdt, strides=(kc0, kc1, kc2, T.int64(1)),
                            offset_factor=1)
        VC = T.match_buffer(vc_h, (NB, BS, T.int64(hkv), T.int64(dv)), cdt, strides=(vc0, vc1, vc2, T.int64(1)),
                            offset_factor=1)
        Slots = T.match_buffer(sl_h, (N,), sdt, offset_factor=1)
        Y = T.match_buffer(y_h, (N, T.int64(hq), T.int64(d)), odt, strides=(sy0, sy1, T.int64(1)), offset_factor=1)
        if N * row_bytes <= ser_bytes:
            for t in range(N):
                token(t, Q, K, V, Pos, C, S, KC, VC, Slots, Y, BS)
        else:
            for t in T.parallel(N):
                token(t, Q, K, V, Pos, C, S, KC, VC, Slots, Y, BS)

    return func


def rope_kv_cache_write(info: OpInfo, config=None) -> Kernel | None:
    q, k, v, pos, cos, sin, kc, vc, slots = info.inputs
    if any(t is None for t in info.inputs) or q.rank != 3 or k.rank != 3 or v.rank != 3 or kc.rank != 4:
        return None
    d, r, style = q.shape[2], int(info.attrs["rotary_dim"]), info.attrs["style"]
    hq, hkv, dv = q.shape[1], k.shape[1], v.shape[2]
    out = info.outputs[2]
    if (not all(isinstance(x, int) for x in (d, hq, hkv, dv)) or k.shape[2] != d or r % 2 or r > d
            or style not in ("neox", "interleaved") or k.dtype != q.dtype or v.dtype != q.dtype
            or cos.dtype != sin.dtype or cos.rank != 2 or cos.shape[1] != r or kc.dtype != vc.dtype
            or q.dtype not in FLOATS or cos.dtype not in FLOATS or not pos.dtype.startswith("int")
            or not slots.dtype.startswith("int")):
        return None
    name = name_of("rope_kv_cache_write", style, f"h{hq}k{hkv}d{d}r{r}v{dv}", short(q.dtype), short(cos.dtype),
                   short(pos.dtype), short(out.dtype), short(kc.dtype), short(slots.dtype))
    func = _rope_write_func(d, r, hq, hkv, dv, q.dtype, cos.dtype, pos.dtype, out.dtype, kc.dtype, slots.dtype, style,
                            serial_bytes(config))
    return Kernel(name, func, tuple(range(9)), (2,), (AS_IS,) * 10)


BUILDERS = {"rope": rope, "kv_cache_write": kv_cache_write, "rope_kv_cache_write": rope_kv_cache_write}
