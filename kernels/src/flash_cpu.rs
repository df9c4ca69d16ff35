//! FlashAttention-2 for the CPU's training step: the algorithm of [`crate::flash_attention`]
//! (the reference the CUDA kernels and this file are checked against), on tiles of 64 queries
//! × 64 keys multiplied by register-blocked loops compiled for AVX2 where the CPU has it.
//!
//! Against the chunked matmuls (`helix_ops::causal_attention`) it skips the tiles above the
//! causal diagonal, about half the work, and never writes a score matrix to memory: at a
//! SmolLM2 layer's shape, forward and backward take 0.61 of the chunked matmuls' time
//! (`cargo bench --bench cpu_attention`, figures in kernels/README.md). `model.attention =
//! "flash"` runs it; `auto` keeps the chunked matmuls on the CPU, whose f32 gradients are
//! closer to f64 (kernels/README.md).
//!
//! The reference's layouts, and its results within 1e-5 (tests): q [b, hq, s, d], k and v [b, hkv, s, d], segment
//! ids [b, s]; the forward returns the output heads first and each query row's log-sum-exp,
//! the backward dq, dk, dv heads first. Work is split by (batch, head) and the tiles of a head
//! go in a fixed order, so results do not depend on the number of threads.

use rayon::prelude::*;

use crate::exp::{exp, max_of};
use crate::flash_attention::AttentionShape;
use crate::simd::with_avx2;
use crate::tile_matmul::{matmul_acc, Layout};

/// Queries and keys per tile.
const TILE: usize = 64;

/// f(x) where query `i` sees key j0 + c of a row of scores (j0 + c ≤ i, the same segment),
/// −∞ where not: a select over the segments' slice, which vectorises.
#[inline(always)]
fn mask_row(row: &mut [f32], segments: &[u32], i: usize, j0: usize, f: impl Fn(f32) -> f32) {
    let own = segments[i];
    for (c, (x, seg)) in row.iter_mut().zip(&segments[j0..]).enumerate() {
        let y = f(*x);
        *x = match j0 + c <= i && *seg == own {
            true => y,
            false => f32::NEG_INFINITY,
        };
    }
}

/// Σ x over a row in eight running sums.
#[inline(always)]
fn sum8(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for ch in chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [heads, s, d] → [heads, d, s]: keys (and values) laid out so that a tile's scores are
/// rows of a query tile times columns of this.
fn transposed_heads(x: &[f32], s: usize, d: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    t.par_chunks_mut((s * d).max(1))
        .zip(x.par_chunks((s * d).max(1)))
        .for_each(|(t, x)| {
            for (i, row) in x.chunks(d.max(1)).enumerate() {
                for (e, v) in row.iter().enumerate() {
                    t[e * s + i] = *v;
                }
            }
        });
    t
}

/// Output [b, hq, s, d] and log-sum-exp [b, hq, s], as [`crate::flash_attention::forward`].
pub fn forward(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let AttentionShape {
        q_heads: hq,
        kv_heads: hkv,
        seq: s,
        head_dim: d,
        ..
    } = shape;
    let group = shape.group();
    let kt = transposed_heads(k, s, d);
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; q.len() / d.max(1)];
    // One task per (batch, query head).
    out.par_chunks_mut((s * d).max(1))
        .zip(lse.par_chunks_mut(s.max(1)))
        .enumerate()
        .for_each_init(
            || vec![0f32; TILE * TILE],
            |scores, (bh, (out, lse))| {
                let (b, h) = (bh / hq, bh % hq);
                let kv = b * hkv + h / group;
                let head = Head {
                    q: &q[bh * s * d..][..s * d],
                    v: &v[kv * s * d..][..s * d],
                    keys: Keys::of(&kt, segments, shape, (b, kv)),
                };
                with_avx2(
                    #[inline(always)]
                    || {
                        for i0 in (0..s).step_by(TILE) {
                            head.forward_tile(i0, scores, out, lse);
                        }
                    },
                )
            },
        );
    (out, lse)
}

/// What a tile's scores need beside the queries, forward and backward: one KV head's keys
/// and its batch row's segment ids.
struct Keys<'a> {
    /// The keys transposed, [d, s].
    kt: &'a [f32],
    segments: &'a [u32],
    s: usize,
    d: usize,
    scale: f32,
}

impl<'a> Keys<'a> {
    /// KV head `kv` (its index among all batch rows' KV heads) of the transposed keys `kt`
    /// [b, hkv, d, s], with batch row `b`'s segment ids.
    fn of(
        kt: &'a [f32],
        segments: &'a [u32],
        shape: AttentionShape,
        (b, kv): (usize, usize),
    ) -> Self {
        let (s, d) = (shape.seq, shape.head_dim);
        Keys {
            kt: &kt[kv * s * d..][..s * d],
            segments: &segments[b * s..][..s],
            s,
            d,
            scale: shape.scale(),
        }
    }

    /// The tile of scores of queries i0.. (`q` from query i0 on) against keys j0..:
    /// tile[r, c] = q_{i0+r} · k_{j0+c} · scale − shift(i0 + r) where that query sees that
    /// key, −∞ where not; rows TILE apart, the tile mq × nk.
    #[inline(always)]
    fn scores(
        &self,
        tile: &mut [f32],
        q: &[f32],
        (i0, j0): (usize, usize),
        (mq, nk): (usize, usize),
        shift: impl Fn(usize) -> f32,
    ) {
        tile.fill(0.0);
        matmul_acc(
            (tile, TILE),
            (q, self.d, Layout::Rows),
            (&self.kt[j0..], self.s),
            (mq, nk, self.d),
        );
        for (r, row) in tile.chunks_mut(TILE).take(mq).enumerate() {
            let i = i0 + r;
            let shift = shift(i);
            mask_row(&mut row[..nk], self.segments, i, j0, |x| {
                x * self.scale - shift
            });
        }
    }
}

/// One query head's tensors for the forward.
struct Head<'a> {
    /// [s, d]
    q: &'a [f32],
    /// Its KV head's values, [s, d].
    v: &'a [f32],
    keys: Keys<'a>,
}

impl Head<'_> {
    /// The output rows and log-sum-exps of queries i0.. (a tile), over the key tiles up to
    /// the last of them, with the online softmax.
    #[inline(always)]
    fn forward_tile(&self, i0: usize, scores: &mut [f32], out: &mut [f32], lse: &mut [f32]) {
        let keys = &self.keys;
        let (s, d) = (keys.s, keys.d);
        let mq = TILE.min(s - i0);
        let o = &mut out[i0 * d..][..mq * d];
        let mut max = [f32::NEG_INFINITY; TILE];
        let mut sum = [0f32; TILE];
        for j0 in (0..i0 + mq).step_by(TILE) {
            let nk = TILE.min(i0 + mq - j0);
            keys.scores(scores, &self.q[i0 * d..], (i0, j0), (mq, nk), |_| 0.0);
            for r in 0..mq {
                let row = &mut scores[r * TILE..][..nk];
                let tile_max = max_of(row);
                if tile_max == f32::NEG_INFINITY {
                    row.fill(0.0); // nothing this query sees in the tile
                    continue;
                }
                let m = max[r].max(tile_max);
                let rescale = exp(max[r] - m);
                for x in row.iter_mut() {
                    *x = exp(*x - m);
                }
                sum[r] = sum[r] * rescale + sum8(row);
                max[r] = m;
                o[r * d..][..d].iter_mut().for_each(|x| *x *= rescale);
            }
            matmul_acc(
                (o, d),
                (scores, TILE, Layout::Rows),
                (&self.v[j0 * d..], d),
                (mq, d, nk),
            );
        }
        for r in 0..mq {
            // Every query sees itself, so the sum is positive.
            o[r * d..][..d].iter_mut().for_each(|x| *x /= sum[r]);
            lse[i0 + r] = max[r] + sum[r].ln();
        }
    }
}

/// Gradients (dq, dk, dv) as [`crate::flash_attention::backward`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: &[u32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape {
        q_heads: hq,
        kv_heads: hkv,
        seq: s,
        head_dim: d,
        ..
    } = shape;
    let group = shape.group();
    // D_i = dO_i · O_i: the row sum of P ∘ dP that softmax's backward subtracts.
    let mut delta = vec![0f32; lse.len()];
    delta
        .par_chunks_mut(s.max(1))
        .zip(
            d_out
                .par_chunks((s * d).max(1))
                .zip(out.par_chunks((s * d).max(1))),
        )
        .for_each(|(delta, (dout, out))| {
            with_avx2(
                #[inline(always)]
                || {
                    for (dl, (a, b)) in delta.iter_mut().zip(dout.chunks(d).zip(out.chunks(d))) {
                        *dl = a.iter().zip(b).map(|(x, y)| x * y).sum();
                    }
                },
            )
        });
    let (kt, vt) = (transposed_heads(k, s, d), transposed_heads(v, s, d));
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    // One task per (batch, KV head): it owns that head's dk and dv and its query heads' dq.
    dk.par_chunks_mut((s * d).max(1))
        .zip(dv.par_chunks_mut((s * d).max(1)))
        .zip(dq.par_chunks_mut((group * s * d).max(1)))
        .enumerate()
        .for_each_init(Tiles::new, |tiles, (bk, ((dk, dv), dq))| {
            let (b, kvh) = (bk / hkv, bk % hkv);
            let kv_head = KvHead {
                k: &k[bk * s * d..][..s * d],
                vt: &vt[bk * s * d..][..s * d],
                keys: Keys::of(&kt, segments, shape, (b, bk)),
            };
            with_avx2(
                #[inline(always)]
                || {
                    for j0 in (0..s).step_by(TILE) {
                        for g in 0..group {
                            let row = (b * hq + kvh * group + g) * s;
                            let query = QueryHead {
                                q: &q[row * d..][..s * d],
                                d_out: &d_out[row * d..][..s * d],
                                lse: &lse[row..][..s],
                                delta: &delta[row..][..s],
                            };
                            let dq = &mut dq[g * s * d..][..s * d];
                            // Queries before the key tile see none of it.
                            for i0 in (j0..s).step_by(TILE) {
                                kv_head.backward_tile(
                                    &query,
                                    (i0, j0),
                                    tiles,
                                    (&mut *dq, &mut *dk, &mut *dv),
                                );
                            }
                        }
                    }
                },
            )
        });
    (dq, dk, dv)
}

/// One KV head's tensors for the backward.
struct KvHead<'a> {
    /// [s, d]
    k: &'a [f32],
    /// The values transposed, [d, s].
    vt: &'a [f32],
    keys: Keys<'a>,
}

/// One query head's tensors for the backward, each [s, d] or [s].
struct QueryHead<'a> {
    q: &'a [f32],
    d_out: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

/// A task's tile buffers: P, and dP (then dS).
struct Tiles {
    p: Vec<f32>,
    ds: Vec<f32>,
}

impl Tiles {
    fn new() -> Self {
        Self {
            p: vec![0f32; TILE * TILE],
            ds: vec![0f32; TILE * TILE],
        }
    }
}

impl KvHead<'_> {
    /// The gradients from one (query tile i0.., key tile j0..) pair: P rebuilt from the
    /// log-sum-exps, dV += Pᵀ dO, dS = P ∘ (dO Vᵀ − D) · scale, dK += dSᵀ Q, dQ += dS K.
    #[inline(always)]
    fn backward_tile(
        &self,
        qh: &QueryHead<'_>,
        (i0, j0): (usize, usize),
        t: &mut Tiles,
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let keys = &self.keys;
        let (s, d) = (keys.s, keys.d);
        let (mq, nk) = (TILE.min(s - i0), TILE.min(s - j0));
        let (q, d_out) = (&qh.q[i0 * d..], &qh.d_out[i0 * d..]);
        keys.scores(&mut t.p, q, (i0, j0), (mq, nk), |i| qh.lse[i]);
        // exp on its own pass (exp(−∞) = 0): a branch around it kept the loop scalar.
        for row in t.p.chunks_mut(TILE).take(mq) {
            row[..nk].iter_mut().for_each(|x| *x = exp(*x));
        }
        matmul_acc(
            (&mut dv[j0 * d..], d),
            (&t.p, TILE, Layout::Transposed),
            (d_out, d),
            (nk, d, mq),
        );
        t.ds.fill(0.0);
        matmul_acc(
            (&mut t.ds, TILE),
            (d_out, d, Layout::Rows),
            (&self.vt[j0..], s),
            (mq, nk, d),
        );
        for r in 0..mq {
            let delta = qh.delta[i0 + r];
            let (ds, p) = (&mut t.ds[r * TILE..][..nk], &t.p[r * TILE..][..nk]);
            for (ds, p) in ds.iter_mut().zip(p) {
                *ds = p * (*ds - delta) * keys.scale;
            }
        }
        matmul_acc(
            (&mut dk[j0 * d..], d),
            (&t.ds, TILE, Layout::Transposed),
            (q, d),
            (nk, d, mq),
        );
        matmul_acc(
            (&mut dq[i0 * d..], d),
            (&t.ds, TILE, Layout::Rows),
            (&self.k[j0 * d..], d),
            (mq, d, nk),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash_attention as reference;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// max |a − b| over max |b|.
    fn relative(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        diff / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
    }

    /// The reference's results, forward and backward, at shapes that end mid-tile, with GQA,
    /// head dims that leave remainders of the 16- and 8-wide column blocks, and packed rows.
    #[test]
    fn matches_the_reference() {
        let cases = [
            // (batch, q heads, kv heads, seq, head_dim, packed)
            (2, 4, 2, 150, 64, false),
            (1, 3, 1, 64, 16, false),
            (2, 2, 2, 131, 20, true),
            (1, 6, 3, 7, 9, true),
            (1, 2, 1, 200, 128, true),
        ];
        for (batch, q_heads, kv_heads, seq, head_dim, packed) in cases {
            let sh = AttentionShape {
                batch,
                q_heads,
                kv_heads,
                seq,
                head_dim,
            };
            let (nq, nkv) = (
                batch * q_heads * seq * head_dim,
                batch * kv_heads * seq * head_dim,
            );
            let (q, k, v) = (values(nq, 1), values(nkv, 2), values(nkv, 3));
            // Packed: documents of 37 tokens, the last ten of each row padding (a segment of
            // their own each, as helix_ops marks padding).
            let segments: Vec<u32> = (0..batch * seq)
                .map(|t| match packed {
                    true if t % seq >= seq.saturating_sub(10) => u32::MAX,
                    true => (t % seq / 37) as u32,
                    false => 0,
                })
                .collect();
            let (out, lse) = forward(sh, &q, &k, &v, &segments);
            let (want_out, want_lse) = reference::forward(sh, &q, &k, &v, &segments);
            let label = format!("{batch}×{q_heads}/{kv_heads}×{seq}×{head_dim}");
            assert!(relative(&out, &want_out) < 1e-5, "{label} out");
            assert!(relative(&lse, &want_lse) < 1e-5, "{label} lse");
            let d_out = values(nq, 4);
            let got = backward(sh, &q, &k, &v, &segments, &out, &lse, &d_out);
            let want = reference::backward(sh, &q, &k, &v, &segments, &out, &lse, &d_out);
            for (name, g, w) in [
                ("dq", &got.0, &want.0),
                ("dk", &got.1, &want.1),
                ("dv", &got.2, &want.2),
            ] {
                let rel = relative(g, w);
                assert!(rel < 1e-5, "{label} {name}: {rel}");
            }
        }
    }
}
