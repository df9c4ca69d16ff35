//! The rank-r products of a LoRA projection (`helix_ops::lora_linear`), r a handful of rows:
//! x Aᵀ, y + l Bᵀ, and the adapters' gradients lᵀ x. The large operand (x or y) is in the
//! storage type (f32, bf16, f16) and read as f32 exactly; the small ones (A, B, the rank-r
//! activation l) and the results other than y + l Bᵀ are f32, as PEFT keeps its adapters. So a
//! bf16 model's LoRA path reads its activations once, without an f32 copy of each.
//!
//! A matmul library tiles for large inner and outer sizes; with one of them 8 it runs these at
//! a third of its speed and adds the update in a separate pass. On the CPU they are loops over
//! rows that read the large operand once and keep the small one in cache (compiled for AVX2 +
//! FMA where the CPU has it); on a GPU the kernels of kernels/cuda/low_rank.cu, up to rank 64
//! (they take any rank, but re-read the large operand for every 16 ranks past the first; from
//! rank 64 up the products are wide enough for f32 matmuls). Sums over rows go in fixed blocks
//! added in order, so results do not depend on the number of threads.
//!
//! LoRA's dropout lies between the layer's input and A. The `_under` forms take its mask
//! ([`DropoutMask`], or none) and apply it as they read: x Aᵀ and lᵀ x read x under it,
//! y + l M multiplies the product l M by it before adding y (the input's gradient). Their values are
//! those of [`crate::dropout`] applied to x in f32 first (to l M in f32, for the sum), without a
//! dropped copy of either written and read back (but on a GPU above rank 64, whose f32 matmuls
//! take the dropped copy).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::dropout::{apply_mask, DropoutMask};
use crate::elem::{dispatch_cpu, packed, packed_as, row_f32, Elem};
use crate::simd::with_avx2;

/// Rows per block of the row sums in [`outer_sum`] on the CPU.
const BLOCK_ROWS: usize = 64;

/// The largest rank the CUDA kernels run; above it, f32 matmuls.
pub const MAX_GPU_RANK: usize = 64;

/// Whether the ops below run here, or fall back to f32 matmuls: a GPU kernel above its rank.
fn fused(x: &Tensor, r: usize) -> bool {
    x.device().is_cpu() || r <= MAX_GPU_RANK
}

/// The small operand, f32 (a no-op for LoRA's f32 adapters).
fn small(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// x in f32, dropped under `mask` when given: what the matmul fallbacks read.
fn x_f32(x: &Tensor, mask: Option<&DropoutMask>) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    match mask {
        Some(mask) => apply_mask(&x, mask),
        None => Ok(x),
    }
}

/// x Mᵀ for x [n, k] and M [r, k]: [n, r] in f32.
pub fn project(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    project_under(x, m, None)
}

/// [`project`] of x dropped under `mask` when given (as [`crate::dropout`] drops x in f32).
pub fn project_under(x: &Tensor, m: &Tensor, mask: Option<&DropoutMask>) -> Result<Tensor> {
    let ((n, k), (r, km)) = (x.dims2()?, m.dims2()?);
    if k != km {
        candle_core::bail!("low_rank::project: x [{n}, {k}] but M [{r}, {km}]");
    }
    let m = small(m)?;
    if !fused(x, r) {
        return x_f32(x, mask)?.matmul(&m.t()?);
    }
    let mask = mask.copied();
    x.contiguous()?
        .apply_op2_no_bwd(&m, &Project { n, k, r, mask })
}

/// y + l M for y [n, c], l [n, r] and M [r, c]: [n, c] in y's dtype, the product summed first,
/// then y added in f32 and the sum rounded once.
pub fn add_product(y: &Tensor, l: &Tensor, m: &Tensor) -> Result<Tensor> {
    add_product_under(y, l, m, None)
}

/// y + mask ⊙ (l M): [`add_product`] with the product dropped under `mask`, when given, before
/// y is added (LoRA's part of the input's gradient through its dropout, added to the base's).
pub fn add_product_under(
    y: &Tensor,
    l: &Tensor,
    m: &Tensor,
    mask: Option<&DropoutMask>,
) -> Result<Tensor> {
    sum_of_product("low_rank::add_product", y, l, m, None, mask)
}

/// acc + (y + l M): [`add_product`]'s sum, rounded to y's dtype, added to acc ([n, c], y's
/// dtype) and rounded again. The values of `acc + add_product(y, l, m)` in one pass instead of
/// two: for a residual (the output projection's, the down projection's), or for an input
/// gradient summed over projections that read the same input.
pub fn add_product_to(acc: &Tensor, y: &Tensor, l: &Tensor, m: &Tensor) -> Result<Tensor> {
    add_product_to_under(acc, y, l, m, None)
}

/// acc + (y + mask ⊙ (l M)): [`add_product_under`] added to acc in the same pass, as
/// [`add_product_to`] adds [`add_product`].
pub fn add_product_to_under(
    acc: &Tensor,
    y: &Tensor,
    l: &Tensor,
    m: &Tensor,
    mask: Option<&DropoutMask>,
) -> Result<Tensor> {
    let what = "low_rank::add_product_to";
    if acc.shape() != y.shape() || acc.dtype() != y.dtype() {
        candle_core::bail!(
            "{what}: acc {:?} {:?} but y {:?} {:?}",
            acc.dims(),
            acc.dtype(),
            y.dims(),
            y.dtype()
        );
    }
    sum_of_product(what, y, l, m, Some(acc), mask)
}

/// y + l M (its product dropped under `mask` when given), added to acc when given: the public
/// forms above.
fn sum_of_product(
    what: &str,
    y: &Tensor,
    l: &Tensor,
    m: &Tensor,
    acc: Option<&Tensor>,
    mask: Option<&DropoutMask>,
) -> Result<Tensor> {
    let ((n, c), (nl, r), (rm, cm)) = (y.dims2()?, l.dims2()?, m.dims2()?);
    if nl != n || rm != r || cm != c {
        candle_core::bail!("{what}: y [{n}, {c}], l [{nl}, {r}], M [{rm}, {cm}]");
    }
    let (l, m) = (small(l)?, small(m)?);
    if !fused(y, r) {
        let product = l.matmul(&m)?;
        let product = match mask {
            Some(mask) => apply_mask(&product, mask)?,
            None => product,
        };
        let sum = (y.to_dtype(DType::F32)? + product)?.to_dtype(y.dtype())?;
        return match acc {
            Some(acc) => acc + sum,
            None => Ok(sum),
        };
    }
    let acc = acc.map(|a| a.contiguous()).transpose()?;
    let mask = mask.copied();
    y.contiguous()?
        .apply_op3_no_bwd(&l, &m, &AddProduct { c, r, acc, mask })
}

/// lᵀ x for l [n, r] and x [n, k]: [r, k] in f32, the sum over the n rows.
pub fn outer_sum(l: &Tensor, x: &Tensor) -> Result<Tensor> {
    outer_sum_under(l, x, None)
}

/// [`outer_sum`] over x dropped under `mask` when given (as [`crate::dropout`] drops x in f32).
pub fn outer_sum_under(l: &Tensor, x: &Tensor, mask: Option<&DropoutMask>) -> Result<Tensor> {
    let ((n, r), (nx, k)) = (l.dims2()?, x.dims2()?);
    if nx != n {
        candle_core::bail!("low_rank::outer_sum: l [{n}, {r}] but x [{nx}, {k}]");
    }
    let l = small(l)?;
    if !fused(x, r) {
        return l.t()?.matmul(&x_f32(x, mask)?);
    }
    let mask = mask.copied();
    l.apply_op2_no_bwd(&x.contiguous()?, &OuterSum { n, r, k, mask })
}

/// A row (or block of rows) of x in f32, starting at element `first` of x, under `mask`:
/// `row_f32` when there is none, else each value times its element's factor.
#[inline(always)]
fn masked_f32<'a, T: Elem>(
    x: &'a [T],
    first: usize,
    mask: Option<&DropoutMask>,
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    match mask {
        None => row_f32(x, buf),
        Some(mask) => {
            buf.clear();
            buf.extend(
                x.iter()
                    .enumerate()
                    .map(|(i, v)| v.to_f32() * mask.factor((first + i) as u64)),
            );
            buf
        }
    }
}

/// Σ_i x_i m_gi for the G rows of m (each x's length), each in eight running sums, then the
/// tail. The G sums are independent, so they overlap, where one sum at a time waited on its
/// own additions; and x is read once for them.
#[inline(always)]
fn dots<const G: usize>(x: &[f32], m: &[f32]) -> [f32; G] {
    let k = x.len();
    let rows: [&[f32]; G] = std::array::from_fn(|g| &m[g * k..][..k]);
    let mut acc = [[0f32; 8]; G];
    let full = k / 8 * 8;
    for base in (0..full).step_by(8) {
        let xc = &x[base..][..8];
        for (acc, row) in acc.iter_mut().zip(rows) {
            let mc = &row[base..][..8];
            for lane in 0..8 {
                acc[lane] += xc[lane] * mc[lane];
            }
        }
    }
    std::array::from_fn(|g| {
        let tail: f32 = x[full..]
            .iter()
            .zip(&rows[g][full..])
            .map(|(a, b)| a * b)
            .sum();
        acc[g].iter().sum::<f32>() + tail
    })
}

/// Σ_j w_j M[j · stride + col..][..W] over the weights w_j in order, from zero: W columns of
/// a weighted sum of rows kept in registers across the rows, instead of a row of sums stored
/// and reloaded once per row. l M (the weights a row of l, M [r, c]) and lᵀ x (the weights a
/// column of l, x a block of rows).
#[inline(always)]
fn weighted_columns<const W: usize>(
    weights: impl Iterator<Item = f32>,
    m: &[f32],
    stride: usize,
    col: usize,
) -> [f32; W] {
    let mut sum = [0f32; W];
    for (j, wj) in weights.enumerate() {
        let mj = &m[j * stride + col..][..W];
        for t in 0..W {
            sum[t] += wj * mj[t];
        }
    }
    sum
}

/// Columns a pass of [`weighted_columns`] keeps in registers (four
/// AVX2 vectors).
const COLUMNS: usize = 32;

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
    mask: Option<DropoutMask>,
}

impl Project {
    fn cpu<T: Elem>(&self, x: &[T], m: &[f32]) -> Vec<f32> {
        let (k, r) = (self.k, self.r);
        let mut out = vec![0f32; self.n * r];
        out.par_chunks_mut(r.max(1))
            .zip(x.par_chunks(k.max(1)))
            .enumerate()
            .for_each_init(Vec::new, |buf, (i, (o, xi))| {
                let xi = masked_f32(xi, i * k, self.mask.as_ref(), buf);
                with_avx2(
                    #[inline(always)]
                    || {
                        // Four ranks a pass, then one at a time.
                        let mut j = 0;
                        while j + 4 <= r {
                            o[j..j + 4].copy_from_slice(&dots::<4>(xi, &m[j * k..]));
                            j += 4;
                        }
                        for j in j..r {
                            o[j] = dots::<1>(xi, &m[j * k..])[0];
                        }
                    },
                )
            });
        out
    }
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
        let m = packed_as::<f32>(s2, l2, "low_rank: M")?;
        let out = dispatch_cpu!("low_rank: x", (s1), |T, (x)| -> f32 Ok::<
            _,
            candle_core::Error,
        >(
            self.cpu::<T>(packed(x, l1, "low_rank: x")?, m)
        ))?;
        Ok((out, Shape::from((self.n, self.r))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::low_rank(
            crate::cuda::LowRankKernel::Project,
            &[(s1, l1), (s2, l2)],
            [self.n, self.k, self.r],
            self.mask.as_ref(),
        )?;
        Ok((out, Shape::from((self.n, self.r))))
    }
}

struct AddProduct {
    c: usize,
    r: usize,
    /// What the sum is added to ([`add_product_to`]), packed, y's shape and dtype.
    acc: Option<Tensor>,
    /// The mask the product is multiplied by before y is added ([`add_product_under`]).
    mask: Option<DropoutMask>,
}

impl AddProduct {
    fn cpu<T: Elem>(&self, y: &[T], l: &[f32], m: &[f32], acc: Option<&[T]>) -> Vec<T> {
        let (c, r) = (self.c, self.r);
        let mut out = vec![T::from_f32(0.0); y.len()];
        out.par_chunks_mut(c.max(1))
            .zip(y.par_chunks(c.max(1)).zip(l.par_chunks(r.max(1))))
            .enumerate()
            .for_each_init(Vec::new, |sum: &mut Vec<f32>, (i, (o, (yi, li)))| {
                sum.clear();
                sum.resize(c, 0.0);
                let acc_i = acc.map(|a| &a[i * c..(i + 1) * c]);
                with_avx2(
                    #[inline(always)]
                    || {
                        // Σ_j l_ij M_j, then + y_i, rounded once; then + acc_i, rounded again.
                        let full = c / COLUMNS * COLUMNS;
                        for col in (0..full).step_by(COLUMNS) {
                            sum[col..col + COLUMNS].copy_from_slice(&weighted_columns::<COLUMNS>(
                                li.iter().copied(),
                                m,
                                c,
                                col,
                            ));
                        }
                        for (col, s) in sum.iter_mut().enumerate().skip(full) {
                            *s = weighted_columns::<1>(li.iter().copied(), m, c, col)[0];
                        }
                        if let Some(mask) = &self.mask {
                            for (col, s) in sum.iter_mut().enumerate() {
                                *s *= mask.factor((i * c + col) as u64);
                            }
                        }
                        match acc_i {
                            None => {
                                for ((o, y), s) in o.iter_mut().zip(yi).zip(sum.iter()) {
                                    *o = T::from_f32(s + y.to_f32());
                                }
                            }
                            Some(acc_i) => {
                                for (((o, y), s), a) in
                                    o.iter_mut().zip(yi).zip(sum.iter()).zip(acc_i)
                                {
                                    *o = T::from_f32(a.to_f32() + T::round(s + y.to_f32()));
                                }
                            }
                        }
                    },
                )
            });
        out
    }
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
        let (l, m) = (
            packed_as::<f32>(s2, l2, "low_rank: l")?,
            packed_as::<f32>(s3, l3, "low_rank: M")?,
        );
        let acc = self.acc.as_ref().map(|a| a.storage_and_layout());
        let acc = match &acc {
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cpu(s) => Some((s, *layout)),
                _ => candle_core::bail!("low_rank: acc is not on the CPU"),
            },
            None => None,
        };
        let out = dispatch_cpu!("low_rank: y", (s1), |T, (y)| {
            let acc = acc
                .map(|(s, l)| packed_as::<T>(s, l, "low_rank: acc"))
                .transpose()?;
            Ok::<_, candle_core::Error>(self.cpu::<T>(packed(y, l1, "low_rank: y")?, l, m, acc))
        })?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count() / self.c.max(1);
        let acc = self.acc.as_ref().map(|a| a.storage_and_layout());
        let mut inputs = vec![(s1, l1), (s2, l2), (s3, l3)];
        if let Some((storage, layout)) = &acc {
            match &**storage {
                candle_core::Storage::Cuda(s) => inputs.push((s, *layout)),
                _ => candle_core::bail!("low_rank: acc is not on the GPU"),
            }
        }
        let out = crate::cuda::low_rank(
            crate::cuda::LowRankKernel::AddProduct,
            &inputs,
            [n, self.c, self.r],
            self.mask.as_ref(),
        )?;
        Ok((out, l1.shape().clone()))
    }
}

struct OuterSum {
    n: usize,
    r: usize,
    k: usize,
    mask: Option<DropoutMask>,
}

impl OuterSum {
    fn cpu<T: Elem>(&self, l: &[f32], x: &[T]) -> Vec<f32> {
        let (r, k) = (self.r, self.k);
        let blocks = self.n.div_ceil(BLOCK_ROWS);
        // Each block of rows sums into its own [r, k]; the blocks are then added in order.
        let mut partial = vec![0f32; blocks * r * k];
        partial
            .par_chunks_mut((r * k).max(1))
            .enumerate()
            .for_each_init(Vec::new, |buf, (b, acc)| {
                let rows = b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(self.n);
                let xb = masked_f32(
                    &x[rows.start * k..rows.end * k],
                    rows.start * k,
                    self.mask.as_ref(),
                    buf,
                );
                let lb = &l[rows.start * r..rows.end * r];
                with_avx2(
                    #[inline(always)]
                    || {
                        // A block of columns at a time over every rank, so the block's rows
                        // of x stay in L1 while the ranks read them.
                        let full = k / COLUMNS * COLUMNS;
                        for col in (0..full).step_by(COLUMNS) {
                            for j in 0..r {
                                let lj = lb.iter().skip(j).step_by(r).copied();
                                acc[j * k + col..][..COLUMNS].copy_from_slice(&weighted_columns::<
                                    COLUMNS,
                                >(
                                    lj, xb, k, col
                                ));
                            }
                        }
                        for col in full..k {
                            for j in 0..r {
                                let lj = lb.iter().skip(j).step_by(r).copied();
                                acc[j * k + col] = weighted_columns::<1>(lj, xb, k, col)[0];
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
        out
    }
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
        let l = packed_as::<f32>(s1, l1, "low_rank: l")?;
        let out = dispatch_cpu!("low_rank: x", (s2), |T, (x)| -> f32 Ok::<
            _,
            candle_core::Error,
        >(
            self.cpu::<T>(l, packed(x, l2, "low_rank: x")?)
        ))?;
        Ok((out, Shape::from((self.r, self.k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::low_rank(
            crate::cuda::LowRankKernel::OuterSum,
            &[(s1, l1), (s2, l2)],
            [self.n, self.r, self.k],
            self.mask.as_ref(),
        )?;
        Ok((out, Shape::from((self.r, self.k))))
    }
}
