"""The PrimFunc of the cpu paged-attention kernel (kiln.kernels.tvm_kernels.attention): its
buffers, and the parallel loop over (token row, KV head) items that finds each row's sequence
and sends it down the row path (attention_rows) or, leading a tile, the tile path
(attention_tiles)."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import keep_params
from kiln.kernels.tvm_kernels.attention_rows import make_row
from kiln.kernels.tvm_kernels.attention_spec import AttentionSpec
from kiln.kernels.tvm_kernels.attention_tiles import make_tile


def make_func(spec: AttentionSpec) -> tvm.tirx.PrimFunc:
    """The destination-passing PrimFunc (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens,
    [sinks,] out) of spec; symbolic in T, S, NB and MB (int64)."""
    dtype, hq, hkv, d, dv, bs = spec.dtype, spec.hq, spec.hkv, spec.d, spec.dv, spec.bs
    g_heads, kb, ml, kh, rows = spec.g_heads, spec.kb, spec.ml, spec.kh, spec.rows
    tiled, tile_min = spec.tiled, spec.min_tile_rows
    sinks_dtype, has_sinks = spec.sinks_dtype, spec.sinks
    row, tile = make_row(spec), make_tile(spec) if tiled else None  # no tile vectors without tiles

    @T.macro
    def body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq):
        for p in T.parallel(n_tok * hkv):
            h: T.let = p % hkv
            r: T.let = p // hkv
            t: T.let = T.if_then_else(r % 2 == 0, r // 2, n_tok - 1 - r // 2)
            bnd = T.alloc_buffer((2,), "int64", scope="global")
            bnd[0] = T.int64(0)
            bnd[1] = n_seq
            if t >= T.Cast("int64", cu[0]) and t < T.Cast("int64", cu[n_seq]):
                # s: the last sequence whose first row is <= t (empty ones before it share it).
                while bnd[0] < bnd[1]:
                    mid: T.let = (bnd[0] + bnd[1]) // 2
                    if T.Cast("int64", cu[mid]) <= t:
                        bnd[0] = mid + 1
                    else:
                        bnd[1] = mid
            else:
                bnd[0] = T.int64(0)
            s: T.let = bnd[0] - 1
            if s < 0:  # a padding row
                for g, c in T.grid(g_heads, dv):
                    out[t, h * g_heads + g, c] = T.Cast(dtype, T.float32(0))
            else:
                # Stack buffers (under 1 KiB each) where LLVM may keep them in registers.
                qf = T.alloc_buffer((g_heads, d), "float32", scope="global")  # row path: q * scale
                sc = T.alloc_buffer((g_heads, kb), "float32", scope="global")  # scores, weights
                acc = T.alloc_buffer((g_heads, dv), "float32", scope="global")
                m = T.alloc_buffer((g_heads,), "float32", scope="global")
                den = T.alloc_buffer((g_heads,), "float32", scope="global")
                red = T.alloc_buffer((2,), "float32", scope="global")
                alpha = T.alloc_buffer((g_heads,), "float32", scope="global")
                q_len: T.let = T.Cast("int64", cu[s + 1]) - T.Cast("int64", cu[s])
                rel: T.let = t - T.Cast("int64", cu[s])
                if not tiled or q_len < tile_min:  # static: no tile code without tiles
                    row(
                        q,
                        k_cache,
                        v_cache,
                        tables,
                        seq_lens,
                        cu,
                        snk,
                        out,
                        t,
                        s,
                        h,
                        qf,
                        sc,
                        acc,
                        m,
                        den,
                        red,
                        alpha,
                    )
                elif rel % rows == 0:  # row t leads the tile of rows t .. t + rows - 1
                    n_r: T.let = T.min(q_len - rel, T.int64(rows))
                    if n_r >= tile_min:
                        qT = T.alloc_buffer((d, ml), "float32", scope="global")  # q^T * scale
                        kbuf = T.alloc_buffer((kb, d), "float32", scope="global")
                        vbuf = T.alloc_buffer((kb, dv), "float32", scope="global")
                        sa = T.alloc_buffer((kh, ml), "float32", scope="global")  # scores, weights
                        sb = T.alloc_buffer((kh, ml), "float32", scope="global")  # of kb keys
                        oT = T.alloc_buffer((dv, ml), "float32", scope="global")  # out^T
                        mv = T.alloc_buffer((ml,), "float32", scope="global")
                        dn = T.alloc_buffer((ml,), "float32", scope="global")
                        av = T.alloc_buffer((ml,), "float32", scope="global")
                        mn = T.alloc_buffer((ml,), "float32", scope="global")
                        lov = T.alloc_buffer((ml,), "int32", scope="global")
                        hiv = T.alloc_buffer((ml,), "int32", scope="global")
                        tile(
                            q,
                            k_cache,
                            v_cache,
                            tables,
                            seq_lens,
                            cu,
                            snk,
                            out,
                            t,
                            n_r,
                            s,
                            h,
                            qT,
                            kbuf,
                            vbuf,
                            sa,
                            sb,
                            oT,
                            mv,
                            dn,
                            av,
                            mn,
                            lov,
                            hiv,
                        )
                    else:
                        for i in range(n_r):
                            row(
                                q,
                                k_cache,
                                v_cache,
                                tables,
                                seq_lens,
                                cu,
                                snk,
                                out,
                                t + i,
                                s,
                                h,
                                qf,
                                sc,
                                acc,
                                m,
                                den,
                                red,
                                alpha,
                            )

    @T.prim_func(private=True)
    def func(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        bt_h: T.handle,
        sl_h: T.handle,
        cu_h: T.handle,
        sk_h: T.handle,
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        # Dims and strides all int64: the stride binder compares a stride with the product of
        # the dims inside it, and a mismatch of int32 and int64 fails the build.
        n_tok, n_seq, n_blk, n_tab = T.int64(), T.int64(), T.int64(), T.int64()
        sq0, sq1, so0, so1, sb0 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        sk0, sk1, sk2, sv0, sv1, sv2 = (
            T.int64(),
            T.int64(),
            T.int64(),
            T.int64(),
            T.int64(),
            T.int64(),
        )
        q = T.match_buffer(
            q_h,
            (n_tok, T.int64(hq), T.int64(d)),
            dtype,
            strides=(sq0, sq1, T.int64(1)),
            offset_factor=1,
        )
        k_cache = T.match_buffer(
            k_h,
            (n_blk, T.int64(bs), T.int64(hkv), T.int64(d)),
            dtype,
            strides=(sk0, sk1, sk2, T.int64(1)),
            offset_factor=1,
        )
        v_cache = T.match_buffer(
            v_h,
            (n_blk, T.int64(bs), T.int64(hkv), T.int64(dv)),
            dtype,
            strides=(sv0, sv1, sv2, T.int64(1)),
            offset_factor=1,
        )
        tables = T.match_buffer(
            bt_h, (n_seq, n_tab), "int32", strides=(sb0, T.int64(1)), offset_factor=1
        )
        seq_lens = T.match_buffer(sl_h, (n_seq,), "int32", offset_factor=1)
        cu = T.match_buffer(cu_h, (n_seq + 1,), "int32", offset_factor=1)
        snk = T.match_buffer(sk_h, (T.int64(hq),), sinks_dtype, offset_factor=1)
        out = T.match_buffer(
            o_h,
            (n_tok, T.int64(hq), T.int64(dv)),
            dtype,
            strides=(so0, so1, T.int64(1)),
            offset_factor=1,
        )
        body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq)

    # One body for both signatures: without sinks the sinks param (never read) is dropped.
    keep = (0, 1, 2, 3, 4, 5, 6, 7) if has_sinks else (0, 1, 2, 3, 4, 5, 7)
    return keep_params(func, keep)
