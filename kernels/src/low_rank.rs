//! The rank-r products of a LoRA projection (`helix_ops::lora_linear`), r a handful of rows:
//! x Aᵀ, y + l Bᵀ, and the adapters' gradients lᵀ x. A matmul library tiles for large inner
//! and outer sizes; with one of them 8 it runs these at a third of its speed and adds the
//! update in a separate pass. On the CPU they are loops over rows that read the large operand
//! once and keep the small one in cache (compiled for AVX2 + FMA where the CPU has it); on a GPU
//! and for other dtypes, cuBLAS / candle matmuls.
//!
//! All in f32 (LoRA's path is f32 whatever the base dtype). Sums over rows go in fixed blocks
//! added in order, so results do not depend on the number of threads.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::packed_as;
use crate::simd::with_avx2;

/// Rows per block of the row sums in [`outer_sum`].
const BLOCK_ROWS: usize = 64;

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// x Mᵀ for x [n, k] and M [r, k]: [n, r].
pub fn project(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[x, m]) {
        return x.matmul(&m.t()?);
    }
    let ((n, k), (r, km)) = (x.dims2()?, m.dims2()?);
    if k != km {
        candle_core::bail!("low_rank::project: x [{n}, {k}] but M [{r}, {km}]");
    }
    x.contiguous()?
        .apply_op2_no_bwd(&m.contiguous()?, &Project { n, k, r })
}

/// y + l M for y [n, c], l [n, r] and M [r, c]: [n, c], the product summed first and then
/// added, as a matmul followed by an add rounds it.
pub fn add_product(y: &Tensor, l: &Tensor, m: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[y, l, m]) {
        return y + l.matmul(m)?;
    }
    let ((n, c), (nl, r), (rm, cm)) = (y.dims2()?, l.dims2()?, m.dims2()?);
    if nl != n || rm != r || cm != c {
        candle_core::bail!("low_rank::add_product: y [{n}, {c}], l [{nl}, {r}], M [{rm}, {cm}]");
    }
    y.contiguous()?
        .apply_op3_no_bwd(&l.contiguous()?, &m.contiguous()?, &AddProduct { c, r })
}

/// lᵀ x for l [n, r] and x [n, k]: [r, k], the sum over the n rows.
pub fn outer_sum(l: &Tensor, x: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[l, x]) {
        return l.t()?.matmul(x);
    }
    let ((n, r), (nx, k)) = (l.dims2()?, x.dims2()?);
    if nx != n {
        candle_core::bail!("low_rank::outer_sum: l [{n}, {r}] but x [{nx}, {k}]");
    }
    l.contiguous()?
        .apply_op2_no_bwd(&x.contiguous()?, &OuterSum { n, r, k })
}

/// Σ a_i b_i in eight running sums.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for lane in 0..8 {
            acc[lane] += x[lane] * y[lane];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// y += s · x over a row.
#[inline(always)]
fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += s * x;
    }
}

struct Project {
    n: usize,
    k: usize,
    r: usize,
}

impl CustomOp2 for Project {
    fn name(&self) -> &'static str {
        "helix-low-rank-project"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m) = (
            packed_as::<f32>(s1, l1, "low_rank: x")?,
            packed_as::<f32>(s2, l2, "low_rank: M")?,
        );
        let (k, r) = (self.k, self.r);
        let mut out = vec![0f32; self.n * r];
        out.par_chunks_mut(r.max(1))
            .zip(x.par_chunks(k.max(1)))
            .for_each(|(o, xi)| {
                with_avx2(
                    #[inline(always)]
                    || {
                        for (o, mj) in o.iter_mut().zip(m.chunks(k.max(1))) {
                            *o = dot(xi, mj);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), Shape::from((self.n, r))))
    }
}

struct AddProduct {
    c: usize,
    r: usize,
}

impl CustomOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "helix-low-rank-add-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, l, m) = (
            packed_as::<f32>(s1, l1, "low_rank: y")?,
            packed_as::<f32>(s2, l2, "low_rank: l")?,
            packed_as::<f32>(s3, l3, "low_rank: M")?,
        );
        let (c, r) = (self.c, self.r);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(c.max(1))
            .zip(y.par_chunks(c.max(1)).zip(l.par_chunks(r.max(1))))
            .for_each(|(o, (yi, li))| {
                with_avx2(
                    #[inline(always)]
                    || {
                        // o = Σ_j l_ij M_j, then o += y_i.
                        for (&s, mj) in li.iter().zip(m.chunks(c.max(1))) {
                            axpy(o, s, mj);
                        }
                        for (o, y) in o.iter_mut().zip(yi) {
                            *o += y;
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct OuterSum {
    n: usize,
    r: usize,
    k: usize,
}

impl CustomOp2 for OuterSum {
    fn name(&self) -> &'static str {
        "helix-low-rank-outer-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (l, x) = (
            packed_as::<f32>(s1, l1, "low_rank: l")?,
            packed_as::<f32>(s2, l2, "low_rank: x")?,
        );
        let (r, k) = (self.r, self.k);
        let blocks = self.n.div_ceil(BLOCK_ROWS);
        // Each block of rows sums into its own [r, k]; the blocks are then added in order.
        let mut partial = vec![0f32; blocks * r * k];
        partial
            .par_chunks_mut((r * k).max(1))
            .enumerate()
            .for_each(|(b, acc)| {
                with_avx2(
                    #[inline(always)]
                    || {
                        let rows = b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(self.n);
                        for i in rows {
                            let xi = &x[i * k..(i + 1) * k];
                            for (j, accj) in acc.chunks_mut(k.max(1)).enumerate() {
                                axpy(accj, l[i * r + j], xi);
                            }
                        }
                    },
                )
            });
        let mut out = vec![0f32; r * k];
        for p in partial.chunks((r * k).max(1)) {
            with_avx2(
                #[inline(always)]
                || axpy(&mut out, 1.0, p),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((r, k))))
    }
}
