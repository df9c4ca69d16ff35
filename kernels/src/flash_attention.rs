//! Causal attention in the FlashAttention-2 manner, the CPU reference the CUDA kernel will be
//! checked against: keys visited in tiles with an online softmax, so no S × S matrix exists,
//! forward or backward; grouped-query heads (each key/value head serves `hq / hkv` query heads);
//! packed rows masked by segment id (a query sees the keys at or before it in its own segment;
//! padding gets a segment of its own, so every query sees at least itself).
//!
//! Layout: q [b, hq, s, d], k and v [b, hkv, s, d], segment ids [b, s], all row-major f32.
//! The forward also returns each query row's log-sum-exp of its scores, which the backward
//! uses to rebuild the probabilities tile by tile (FlashAttention-2, Dao 2023, algorithm 2).

use rayon::prelude::*;

/// Keys per tile: the width of the scores a query holds at once.
const KEY_TILE: usize = 64;

/// The shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub(crate) fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    pub(crate) fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Offset of row `i` of head `h` of batch `b` in a [b, heads, s, d] tensor.
    fn at(&self, heads: usize, b: usize, h: usize, i: usize) -> usize {
        ((b * heads + h) * self.seq + i) * self.head_dim
    }
}

/// Whether query `i` sees key `j` of the same batch row.
fn visible(segments: &[u32], i: usize, j: usize) -> bool {
    j <= i && segments[i] == segments[j]
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Output [b, hq, s, d] and log-sum-exp [b, hq, s].
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
    let scale = shape.scale();
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; q.len() / d];
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(row, (o, lse))| {
            let (b, h, i) = (row / (hq * s), row / s % hq, row % s);
            let seg = &segments[b * s..(b + 1) * s];
            let qi = &q[shape.at(hq, b, h, i)..][..d];
            let kvh = h / shape.group();
            // Running maximum, running sum of exp(score − max), and the unnormalised output.
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            let mut scores = [0f32; KEY_TILE];
            for start in (0..=i).step_by(KEY_TILE) {
                let end = (start + KEY_TILE).min(i + 1);
                let mut tile_max = f32::NEG_INFINITY;
                for j in start..end {
                    let sc = match visible(seg, i, j) {
                        true => dot(qi, &k[shape.at(hkv, b, kvh, j)..][..d]) * scale,
                        false => f32::NEG_INFINITY,
                    };
                    scores[j - start] = sc;
                    tile_max = tile_max.max(sc);
                }
                if tile_max == f32::NEG_INFINITY {
                    continue; // nothing visible in this tile
                }
                let m_new = m.max(tile_max);
                let rescale = (m - m_new).exp();
                l *= rescale;
                o.iter_mut().for_each(|x| *x *= rescale);
                for j in start..end {
                    let p = (scores[j - start] - m_new).exp();
                    l += p;
                    let vj = &v[shape.at(hkv, b, kvh, j)..][..d];
                    o.iter_mut().zip(vj).for_each(|(x, y)| *x += p * y);
                }
                m = m_new;
            }
            o.iter_mut().for_each(|x| *x /= l);
            *lse = m + l.ln();
        });
    (out, lse)
}

/// Gradients (dq, dk, dv) from the forward's output and log-sum-exp and the output's gradient.
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
    let scale = shape.scale();
    // D_i = dO_i · O_i: the row sum of P ∘ dP that softmax's backward subtracts.
    let delta: Vec<f32> = d_out
        .chunks(d)
        .zip(out.chunks(d))
        .map(|(a, b)| dot(a, b))
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    // One task per (batch, kv head): it owns that head's dk and dv and its query heads' dq.
    let kv_block = s * d;
    let q_block = shape.group() * s * d;
    dk.par_chunks_mut(kv_block)
        .zip(dv.par_chunks_mut(kv_block))
        .zip(dq.par_chunks_mut(q_block))
        .enumerate()
        .for_each(|(task, ((dk, dv), dq))| {
            let (b, kvh) = (task / hkv, task % hkv);
            let seg = &segments[b * s..(b + 1) * s];
            for g in 0..shape.group() {
                let h = kvh * shape.group() + g;
                for i in 0..s {
                    let row = (b * hq + h) * s + i;
                    let qi = &q[shape.at(hq, b, h, i)..][..d];
                    let doi = &d_out[shape.at(hq, b, h, i)..][..d];
                    let dqi = &mut dq[(g * s + i) * d..][..d];
                    for j in 0..=i {
                        if !visible(seg, i, j) {
                            continue;
                        }
                        let kj = &k[shape.at(hkv, b, kvh, j)..][..d];
                        let vj = &v[shape.at(hkv, b, kvh, j)..][..d];
                        let p = (dot(qi, kj) * scale - lse[row]).exp();
                        let dp = dot(doi, vj);
                        let ds = p * (dp - delta[row]) * scale;
                        dv[j * d..][..d]
                            .iter_mut()
                            .zip(doi)
                            .for_each(|(x, y)| *x += p * y);
                        dqi.iter_mut().zip(kj).for_each(|(x, y)| *x += ds * y);
                        dk[j * d..][..d]
                            .iter_mut()
                            .zip(qi)
                            .for_each(|(x, y)| *x += ds * y);
                    }
                }
            }
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention the textbook way in f64: the whole score matrix, softmax, and its backward
    /// through the explicit Jacobian-vector products.
    struct Naive {
        out: Vec<f64>,
        dq: Vec<f64>,
        dk: Vec<f64>,
        dv: Vec<f64>,
    }

    #[allow(clippy::needless_range_loop)] // the textbook's index loops are the point
    fn naive(
        sh: AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        seg: &[u32],
        dout: &[f32],
    ) -> Naive {
        let (s, d) = (sh.seq, sh.head_dim);
        let scale = 1.0 / (d as f64).sqrt();
        let mut r = Naive {
            out: vec![0.0; q.len()],
            dq: vec![0.0; q.len()],
            dk: vec![0.0; k.len()],
            dv: vec![0.0; v.len()],
        };
        for b in 0..sh.batch {
            for h in 0..sh.q_heads {
                let kvh = h / sh.group();
                let qa = |i: usize| sh.at(sh.q_heads, b, h, i);
                let ka = |j: usize| sh.at(sh.kv_heads, b, kvh, j);
                let mut p = vec![vec![0f64; s]; s];
                for i in 0..s {
                    let mut row: Vec<f64> = (0..s)
                        .map(|j| {
                            if j <= i && seg[b * s + i] == seg[b * s + j] {
                                (0..d)
                                    .map(|c| q[qa(i) + c] as f64 * k[ka(j) + c] as f64)
                                    .sum::<f64>()
                                    * scale
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    row.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = row.iter().sum();
                    row.iter_mut().for_each(|x| *x /= z);
                    p[i] = row;
                }
                for i in 0..s {
                    for j in 0..s {
                        for c in 0..d {
                            r.out[qa(i) + c] += p[i][j] * v[ka(j) + c] as f64;
                        }
                    }
                }
                for i in 0..s {
                    let dp: Vec<f64> = (0..s)
                        .map(|j| {
                            (0..d)
                                .map(|c| dout[qa(i) + c] as f64 * v[ka(j) + c] as f64)
                                .sum()
                        })
                        .collect();
                    let rowdot: f64 = (0..s).map(|j| p[i][j] * dp[j]).sum();
                    for j in 0..s {
                        let ds = p[i][j] * (dp[j] - rowdot) * scale;
                        for c in 0..d {
                            r.dv[ka(j) + c] += p[i][j] * dout[qa(i) + c] as f64;
                            r.dq[qa(i) + c] += ds * k[ka(j) + c] as f64;
                            r.dk[ka(j) + c] += ds * q[qa(i) + c] as f64;
                        }
                    }
                }
            }
        }
        r
    }

    /// Values in [-1, 1): the kernel checks' own seeded generator.
    fn random(n: usize, seed: u64) -> Vec<f32> {
        crate::check::seeded(seed, n)
            .into_iter()
            .map(|x| x as f32)
            .collect()
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs()));
        diff / scale
    }

    /// Two packed rows of 150 tokens (three key tiles) with segments and trailing padding, four
    /// query heads over two key/value heads.
    #[test]
    fn tiled_online_softmax_matches_the_whole_score_matrix_forward_and_backward() {
        let sh = AttentionShape {
            batch: 2,
            q_heads: 4,
            kv_heads: 2,
            seq: 150,
            head_dim: 16,
        };
        let nq = sh.batch * sh.q_heads * sh.seq * sh.head_dim;
        let nk = sh.batch * sh.kv_heads * sh.seq * sh.head_dim;
        let (q, k, v, dout) = (random(nq, 1), random(nk, 2), random(nk, 3), random(nq, 4));
        // Row 0: segments of 70, 60 and 20 tokens; row 1: one of 120, then 30 of padding.
        let mut seg: Vec<u32> = (0..150)
            .map(|i| {
                if i < 70 {
                    0
                } else if i < 130 {
                    1
                } else {
                    2
                }
            })
            .collect();
        seg.extend((0..150).map(|i| if i < 120 { 0 } else { u32::MAX }));
        let (out, lse) = forward(sh, &q, &k, &v, &seg);
        let (dq, dk, dv) = backward(sh, &q, &k, &v, &seg, &out, &lse, &dout);
        let want = naive(sh, &q, &k, &v, &seg, &dout);
        for (name, got, want) in [
            ("out", &out, &want.out),
            ("dq", &dq, &want.dq),
            ("dk", &dk, &want.dk),
            ("dv", &dv, &want.dv),
        ] {
            let rel = max_rel(got, want);
            assert!(rel < 1e-5, "{name}: max |Δ| {rel:.2e} of the largest value");
        }
    }

    /// A query sees nothing past itself or outside its segment: changing such keys leaves its
    /// output alone.
    #[test]
    fn keys_after_a_query_or_in_another_segment_do_not_reach_it() {
        let sh = AttentionShape {
            batch: 1,
            q_heads: 2,
            kv_heads: 1,
            seq: 100,
            head_dim: 8,
        };
        let (q, mut k, mut v) = (
            random(2 * 100 * 8, 5),
            random(100 * 8, 6),
            random(100 * 8, 7),
        );
        let seg: Vec<u32> = (0..100).map(|i| (i >= 40) as u32).collect();
        let (before, _) = forward(sh, &q, &k, &v, &seg);
        // Disturb keys 0..40 (segment 0) and 80..100: queries 40..80 see only keys 40..=i.
        for j in (0..40).chain(80..100) {
            for c in 0..8 {
                k[j * 8 + c] += 3.0;
                v[j * 8 + c] -= 2.0;
            }
        }
        let (after, _) = forward(sh, &q, &k, &v, &seg);
        for h in 0..2 {
            for i in 40..80 {
                let at = (h * 100 + i) * 8;
                assert_eq!(before[at..at + 8], after[at..at + 8], "head {h} query {i}");
            }
        }
        assert_ne!(before[..8], after[..8], "query 0 sees key 0");
    }
}
