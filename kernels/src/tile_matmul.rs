//! C += A B on small f32 tiles for the CPU's FlashAttention ([`crate::flash_cpu`]): blocks of
//! 4 rows × 16 columns summed in registers, with A read row-major or transposed so that Pᵀ dO
//! and dSᵀ Q need no transposed copy. Compiled for AVX where the caller runs under
//! [`crate::simd::with_avx2`]; the same products and sums in the same order on every path, so
//! results do not depend on the CPU.

/// The (rows, columns) of C [m × n] a [`matmul_acc`] call writes, and the inner size k.
pub(crate) type Dims = (usize, usize, usize);

/// How A is stored for [`matmul_acc`].
#[derive(Clone, Copy)]
pub(crate) enum Layout {
    /// Row-major, row stride `lda`.
    Rows,
    /// Aᵀ [k × m] row-major, row stride `lda` (for Pᵀ dO and dSᵀ Q, without a transposed copy).
    Transposed,
}

/// C += A B for A [m × k] (stored as `layout` says), row-major B [k × n] and C [m × n], with
/// row strides lda, ldb, ldc: blocks of 4 rows × 16 columns summed in registers (eight
/// vectors), then added to C.
#[inline(always)]
pub(crate) fn matmul_acc(
    (c, ldc): (&mut [f32], usize),
    (a, lda, layout): (&[f32], usize, Layout),
    (b, ldb): (&[f32], usize),
    (m, n, k): Dims,
) {
    let mut i = 0;
    while i + 4 <= m {
        rows_times::<4>((c, ldc), (a, lda, layout), (b, ldb), i, (n, k));
        i += 4;
    }
    for i in i..m {
        rows_times::<1>((c, ldc), (a, lda, layout), (b, ldb), i, (n, k));
    }
}

/// Rows i..i + R of [`matmul_acc`].
#[inline(always)]
fn rows_times<const R: usize>(
    (c, ldc): (&mut [f32], usize),
    (a, lda, layout): (&[f32], usize, Layout),
    (b, ldb): (&[f32], usize),
    i: usize,
    (n, k): (usize, usize),
) {
    // A's R rows interleaved, [k][R], so the inner loop reads them in fixed-size chunks: with
    // an index into each row it kept bounds checks, its sums on the stack and ran scalar.
    let mut at = vec![0f32; R * k];
    match layout {
        Layout::Rows => {
            for r in 0..R {
                for (p, x) in a[(i + r) * lda..][..k].iter().enumerate() {
                    at[p * R + r] = *x;
                }
            }
        }
        Layout::Transposed => {
            for (p, at) in at.chunks_exact_mut(R).enumerate() {
                at.copy_from_slice(&a[p * lda + i..][..R]);
            }
        }
    }
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if R == 4 && std::is_x86_feature_detected!("avx") {
        while j + 16 <= n {
            // SAFETY: the CPU was just found to have AVX.
            let acc = unsafe { block_4x16_avx(&at, (b, ldb), j) };
            add_block((c, ldc), &acc, (i, j));
            j += 16;
        }
    }
    while j + 16 <= n {
        block::<R, 16>((c, ldc), &at, (b, ldb), (i, j));
        j += 16;
    }
    while j + 8 <= n {
        block::<R, 8>((c, ldc), &at, (b, ldb), (i, j));
        j += 8;
    }
    for j in j..n {
        block::<R, 1>((c, ldc), &at, (b, ldb), (i, j));
    }
}

/// C[i..i + R, j..j + W] += Σ_p A[i + r, p] B[p, j..j + W], with A's rows interleaved.
#[inline(always)]
fn block<const R: usize, const W: usize>(
    (c, ldc): (&mut [f32], usize),
    at: &[f32],
    (b, ldb): (&[f32], usize),
    (i, j): (usize, usize),
) {
    let mut acc = [[0f32; W]; R];
    for (ap, bp) in at.chunks_exact(R).zip(b.chunks(ldb)) {
        let bp: &[f32; W] = bp[j..j + W].try_into().expect("W columns");
        for r in 0..R {
            let x = ap[r];
            for t in 0..W {
                acc[r][t] += x * bp[t];
            }
        }
    }
    add_block((c, ldc), &acc, (i, j));
}

/// [`block`]'s sums for 4 rows × 16 columns in eight AVX registers: the compiler left the
/// generic loop's sums on the stack, one scalar at a time. The same products and additions in
/// the same order (no fused multiply-add), so the results equal the generic loop's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn block_4x16_avx(at: &[f32], (b, ldb): (&[f32], usize), j: usize) -> [[f32; 16]; 4] {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };
    let mut acc = [_mm256_setzero_ps(); 8];
    for (ap, bp) in at.chunks_exact(4).zip(b.chunks(ldb)) {
        let bp = &bp[j..j + 16];
        // SAFETY: bp holds 16 values, two unaligned loads of 8.
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(bp.as_ptr()),
                _mm256_loadu_ps(bp[8..].as_ptr()),
            )
        };
        for r in 0..4 {
            let x = _mm256_set1_ps(ap[r]);
            acc[2 * r] = _mm256_add_ps(acc[2 * r], _mm256_mul_ps(x, b0));
            acc[2 * r + 1] = _mm256_add_ps(acc[2 * r + 1], _mm256_mul_ps(x, b1));
        }
    }
    let mut out = [[0f32; 16]; 4];
    for (r, row) in out.iter_mut().enumerate() {
        let (lo, hi) = row.split_at_mut(8);
        // SAFETY: each half holds 8 values.
        unsafe {
            _mm256_storeu_ps(lo.as_mut_ptr(), acc[2 * r]);
            _mm256_storeu_ps(hi.as_mut_ptr(), acc[2 * r + 1]);
        }
    }
    out
}

/// C[i..i + R, j..j + W] += acc.
#[inline(always)]
fn add_block<const R: usize, const W: usize>(
    (c, ldc): (&mut [f32], usize),
    acc: &[[f32; W]; R],
    (i, j): (usize, usize),
) {
    for (r, acc) in acc.iter().enumerate() {
        let cr = &mut c[(i + r) * ldc + j..][..W];
        for t in 0..W {
            cr[t] += acc[t];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts against the triple loop, at sizes that leave every remainder (rows past
    /// the 4-row blocks, columns past the 16- and 8-wide ones) and with strides wider than
    /// the rows, adding into a C that already holds values.
    #[test]
    fn matches_the_triple_loop() {
        let value = |i: usize| ((i * 7919 % 263) as f32 - 131.0) / 97.0;
        for (m, n, k) in [(7, 29, 13), (4, 16, 64), (1, 1, 1), (64, 64, 64), (9, 8, 3)] {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let a: Vec<f32> = (0..m * lda).map(value).collect();
            let at: Vec<f32> = (0..k * (m + 1)).map(|i| value(i + 11)).collect();
            let b: Vec<f32> = (0..k * ldb).map(|i| value(i + 5)).collect();
            for (layout, a, lda) in [(Layout::Rows, &a, lda), (Layout::Transposed, &at, m + 1)] {
                let mut c: Vec<f32> = (0..m * ldc).map(|i| value(i + 3)).collect();
                let mut want = c.clone();
                for i in 0..m {
                    for j in 0..n {
                        let a_ip = |p: usize| match layout {
                            Layout::Rows => a[i * lda + p],
                            Layout::Transposed => a[p * lda + i],
                        };
                        let dot: f64 = (0..k).map(|p| (a_ip(p) * b[p * ldb + j]) as f64).sum();
                        want[i * ldc + j] = (want[i * ldc + j] as f64 + dot) as f32;
                    }
                }
                matmul_acc((&mut c, ldc), (a, lda, layout), (&b, ldb), (m, n, k));
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                        "{m}×{n}×{k}: {x} vs {y}"
                    );
                }
            }
        }
    }
}
