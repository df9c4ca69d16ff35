//! The kernels of kernels/cuda other than FlashAttention run by the emulator with the CUDA
//! launchers' grids (helix_kernels::launch), against the CPU references the CPU path trains
//! with: LoRA's rank-r products, the LM head's cross-entropy statistics and gradient, the
//! multi-tensor AdamW (bit for bit: both sides round the same f32 operations) and sums of
//! squares, NF4's quantization and dequantization (bit for bit), and RMSNorm, SwiGLU, RoPE and
//! the chunked attention's softmax, which a device run has checked too (so they also check the
//! emulator). Shapes end mid-block
//! and mid-tile, and ranks pass the kernels' 16-rank steps.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, seeded, stored, tolerance, widen, Element};
use half::bf16;
use helix_kernels::launch::{self, Strides};
use helix_kernels_emu::kernels::*;
use helix_kernels_emu::Ptr;

fn cpu<T: candle_core::WithDType>(v: &[T], dims: &[usize]) -> Tensor {
    Tensor::from_slice(v, dims, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// (x [n, k] T, A [r, k] f32) → x Aᵀ; (y [n, c] T, l [n, r], Bᵀ [r, c]) → y + l Bᵀ;
/// (l, x) → lᵀ x: the emulated kernels against src/low_rank.rs, each sum's partial sums added
/// by `low_rank_sum_parts_f32` as the CUDA launcher adds them.
fn low_rank_case<T: Element + candle_core::WithDType>(
    [n, k, c, r]: [usize; 4],
    project: unsafe extern "C" fn(*const T, *const f32, *mut f32, i32, i32, i32),
    add_product: unsafe extern "C" fn(*const T, *const f32, *const f32, *mut T, i32, i32, i32),
    add_product_to: AddProductTo<T>,
    outer_partial: unsafe extern "C" fn(*const f32, *const T, *mut f32, i32, i32, i32, i32),
) {
    let label = format!("low_rank {} [{n}, {k}, {c}, {r}]", T::NAME);
    let (x, _) = stored::<T>(&seeded(21, n * k, 1.0));
    let a = seeded(22, r * k, 0.1);
    let bt = seeded(23, r * c, 0.1);
    let (y, _) = stored::<T>(&seeded(24, n * c, 1.0));
    let (xt, at, btt, yt) = (
        cpu(&x, &[n, k]),
        cpu(&a, &[r, k]),
        cpu(&bt, &[r, c]),
        cpu(&y, &[n, c]),
    );
    let want_low = helix_kernels::low_rank::project(&xt, &at).unwrap();
    let want_sum = helix_kernels::low_rank::add_product(&yt, &want_low, &btt).unwrap();
    let want_grad = helix_kernels::low_rank::outer_sum(&want_low, &xt).unwrap();

    let (xp, ap, btp, yp) = (Ptr::read(&x), Ptr::read(&a), Ptr::read(&bt), Ptr::read(&y));
    let geometry = launch::low_rank_project(n, k, r);
    let splits = geometry.grid.1 as usize;
    let mut partial = vec![f32::NAN; splits * n * r];
    let pp = Ptr::of(&mut partial);
    helix_kernels_emu::launch(geometry, || unsafe {
        project(xp.get(), ap.get(), pp.get(), n as i32, k as i32, r as i32)
    });
    let low = sum_parts(&partial, splits, n * r);
    // f32 sums in another order: kernel-check's f32 tolerance scaled by the depth k.
    assert_close(
        &format!("{label} x Aᵀ"),
        &low,
        &values(&want_low),
        1e-5 * (k as f32).sqrt(),
    );

    // The next two take the reference's l, so each kernel is checked on its own.
    let want_l = values(&want_low);
    let lp = Ptr::read(&want_l);
    let mut sum = vec![T::default(); n * c];
    let sump = Ptr::of(&mut sum);
    helix_kernels_emu::launch(launch::low_rank_add_product(n, c), || unsafe {
        add_product(
            yp.get(),
            lp.get(),
            btp.get(),
            sump.get(),
            n as i32,
            c as i32,
            r as i32,
        )
    });
    assert_close(
        &format!("{label} y + l Bᵀ"),
        &widen(&sum),
        &values(&want_sum),
        tolerance::<T>(),
    );

    // The same sum added to acc: against the reference's acc + (y + l Bᵀ).
    let (acc, _) = stored::<T>(&seeded(25, n * c, 1.0));
    let want_to =
        helix_kernels::low_rank::add_product_to(&cpu(&acc, &[n, c]), &yt, &want_low, &btt).unwrap();
    let want_added = (cpu(&acc, &[n, c]) + &want_sum).unwrap();
    assert_close(
        &format!("{label} reference: acc + (y + l Bᵀ) in one pass"),
        &values(&want_to),
        &values(&want_added),
        0.0,
    );
    let accp = Ptr::read(&acc);
    let mut sum_to = vec![T::default(); n * c];
    let sum_top = Ptr::of(&mut sum_to);
    helix_kernels_emu::launch(launch::low_rank_add_product(n, c), || unsafe {
        add_product_to(
            yp.get(),
            lp.get(),
            btp.get(),
            accp.get(),
            sum_top.get(),
            n as i32,
            c as i32,
            r as i32,
        )
    });
    assert_close(
        &format!("{label} acc + (y + l Bᵀ)"),
        &widen(&sum_to),
        &values(&want_to),
        tolerance::<T>(),
    );

    let geometry = launch::low_rank_outer_partial(n, k);
    let parts = geometry.grid.1 as usize;
    let rows_per_part = launch::low_rank_outer_rows_per_part(n);
    let mut partial = vec![f32::NAN; parts * r * k];
    let pp = Ptr::of(&mut partial);
    helix_kernels_emu::launch(geometry, || unsafe {
        outer_partial(
            lp.get(),
            xp.get(),
            pp.get(),
            n as i32,
            r as i32,
            k as i32,
            rows_per_part as i32,
        )
    });
    let grad = sum_parts(&partial, parts, r * k);
    assert_close(
        &format!("{label} lᵀ x"),
        &grad,
        &values(&want_grad),
        1e-5 * (n as f32).sqrt(),
    );
}

/// `low_rank_add_product_to_*`: (y, l, m, acc, out, n, c, r).
type AddProductTo<T> =
    unsafe extern "C" fn(*const T, *const f32, *const f32, *const T, *mut T, i32, i32, i32);

/// `low_rank_sum_parts_f32` over `parts` partial sums of `len` values each.
fn sum_parts(partial: &[f32], parts: usize, len: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; len];
    let (pp, op) = (Ptr::read(partial), Ptr::of(&mut out));
    helix_kernels_emu::launch(launch::elementwise(len), || unsafe {
        low_rank_sum_parts_f32(pp.get(), op.get(), parts as i32, len as i64)
    });
    out
}

#[test]
fn low_rank_products_match_the_reference() {
    // Odd sizes. Rows past a 32-row block; columns past a 64-column tile and a 512-column
    // span (three partial sums of x Aᵀ, the last cut mid-tile); rank 20 takes a second
    // 16-rank block of x Aᵀ and second passes of the other two; 2,500 rows make partial sums
    // of lᵀ x of 128 rows, each staged in two halves, the last part short.
    for dims in [
        [7, 13, 11, 3],
        [300, 1100, 70, 20],
        [40, 200, 600, 64],
        [2500, 9, 5, 2],
    ] {
        low_rank_case::<f32>(
            dims,
            low_rank_project_f32,
            low_rank_add_product_f32,
            low_rank_add_product_to_f32,
            low_rank_outer_partial_f32,
        );
        low_rank_case::<bf16>(
            dims,
            low_rank_project_bf16,
            low_rank_add_product_bf16,
            low_rank_add_product_to_bf16,
            low_rank_outer_partial_bf16,
        );
    }
}

/// The `_dropped` kernels of one storage type (LoRA's dropout between x and A).
struct DroppedKernels<T> {
    project: unsafe extern "C" fn(*const T, *const f32, *mut f32, i32, i32, i32, u64, u32, f32),
    add_product: unsafe extern "C" fn(
        *const T,
        *const f32,
        *const f32,
        *mut T,
        i32,
        i32,
        i32,
        u64,
        u32,
        f32,
    ),
    add_product_to: unsafe extern "C" fn(
        *const T,
        *const f32,
        *const f32,
        *const T,
        *mut T,
        i32,
        i32,
        i32,
        u64,
        u32,
        f32,
    ),
    outer_partial:
        unsafe extern "C" fn(*const f32, *const T, *mut f32, i32, i32, i32, i32, u64, u32, f32),
}

/// The `_dropped` forms: x read under the mask in x Aᵀ and lᵀ x, the product l M under it in
/// y + l M (alone and added to acc), each against src/low_rank.rs's, whose values are
/// `dropout` applied first (tests in kernels/src/tests.rs).
fn low_rank_dropped_case<T: Element + candle_core::WithDType>(
    [n, k, r]: [usize; 3],
    p: f64,
    kernels: DroppedKernels<T>,
) {
    use helix_kernels::dropout::{dropout_key, DropoutMask};
    use helix_kernels::low_rank::{
        add_product_to_under, add_product_under, outer_sum_under, project_under,
    };
    let label = format!("low_rank dropped {} [{n}, {k}, {r}] p {p}", T::NAME);
    let mask = DropoutMask::new(p, dropout_key(1234, 0, 3))
        .unwrap()
        .unwrap();
    let (key, threshold, scale) = (mask.key(), mask.threshold(), mask.scale());
    let (x, _) = stored::<T>(&seeded(31, n * k, 1.0));
    let a = seeded(32, r * k, 0.1);
    let l = seeded(33, n * r, 0.5);
    let (y, _) = stored::<T>(&seeded(34, n * k, 1.0));
    let (acc, _) = stored::<T>(&seeded(35, n * k, 1.0));
    let (xt, at, lt, yt, acct) = (
        cpu(&x, &[n, k]),
        cpu(&a, &[r, k]),
        cpu(&l, &[n, r]),
        cpu(&y, &[n, k]),
        cpu(&acc, &[n, k]),
    );
    let (xp, ap, lp, yp, accp) = (
        Ptr::read(&x),
        Ptr::read(&a),
        Ptr::read(&l),
        Ptr::read(&y),
        Ptr::read(&acc),
    );

    let geometry = launch::low_rank_project(n, k, r);
    let splits = geometry.grid.1 as usize;
    let mut partial = vec![f32::NAN; splits * n * r];
    let pp = Ptr::of(&mut partial);
    helix_kernels_emu::launch(geometry, || unsafe {
        (kernels.project)(
            xp.get(),
            ap.get(),
            pp.get(),
            n as i32,
            k as i32,
            r as i32,
            key,
            threshold,
            scale,
        )
    });
    assert_close(
        &format!("{label} (dropped x) Aᵀ"),
        &sum_parts(&partial, splits, n * r),
        &values(&project_under(&xt, &at, Some(&mask)).unwrap()),
        1e-5 * (k as f32).sqrt(),
    );

    // The input's gradient: y + mask ⊙ (l A), then added to acc.
    let mut sum = vec![T::default(); n * k];
    let sump = Ptr::of(&mut sum);
    helix_kernels_emu::launch(launch::low_rank_add_product(n, k), || unsafe {
        (kernels.add_product)(
            yp.get(),
            lp.get(),
            ap.get(),
            sump.get(),
            n as i32,
            k as i32,
            r as i32,
            key,
            threshold,
            scale,
        )
    });
    assert_close(
        &format!("{label} y + mask ⊙ (l A)"),
        &widen(&sum),
        &values(&add_product_under(&yt, &lt, &at, Some(&mask)).unwrap()),
        tolerance::<T>(),
    );
    let mut sum_to = vec![T::default(); n * k];
    let sum_top = Ptr::of(&mut sum_to);
    helix_kernels_emu::launch(launch::low_rank_add_product(n, k), || unsafe {
        (kernels.add_product_to)(
            yp.get(),
            lp.get(),
            ap.get(),
            accp.get(),
            sum_top.get(),
            n as i32,
            k as i32,
            r as i32,
            key,
            threshold,
            scale,
        )
    });
    assert_close(
        &format!("{label} acc + (y + mask ⊙ (l A))"),
        &widen(&sum_to),
        &values(&add_product_to_under(&acct, &yt, &lt, &at, Some(&mask)).unwrap()),
        tolerance::<T>(),
    );

    let geometry = launch::low_rank_outer_partial(n, k);
    let parts = geometry.grid.1 as usize;
    let rows_per_part = launch::low_rank_outer_rows_per_part(n);
    let mut partial = vec![f32::NAN; parts * r * k];
    let pp = Ptr::of(&mut partial);
    helix_kernels_emu::launch(geometry, || unsafe {
        (kernels.outer_partial)(
            lp.get(),
            xp.get(),
            pp.get(),
            n as i32,
            r as i32,
            k as i32,
            rows_per_part as i32,
            key,
            threshold,
            scale,
        )
    });
    assert_close(
        &format!("{label} lᵀ (dropped x)"),
        &sum_parts(&partial, parts, r * k),
        &values(&outer_sum_under(&lt, &xt, Some(&mask)).unwrap()),
        1e-5 * (n as f32).sqrt(),
    );
}

#[test]
fn dropped_low_rank_products_match_the_reference() {
    // A shape of remainders, one with two 512-column spans and a second 16-rank group, and
    // one of 2,500 rows (partial sums of lᵀ x over 128 rows, the last short).
    for (dims, p) in [
        ([7, 13, 3], 0.5),
        ([300, 1100, 20], 0.1),
        ([2500, 9, 2], 0.05),
    ] {
        low_rank_dropped_case::<f32>(
            dims,
            p,
            DroppedKernels {
                project: low_rank_project_dropped_f32,
                add_product: low_rank_add_dropped_product_f32,
                add_product_to: low_rank_add_dropped_product_to_f32,
                outer_partial: low_rank_outer_partial_dropped_f32,
            },
        );
        low_rank_dropped_case::<bf16>(
            dims,
            p,
            DroppedKernels {
                project: low_rank_project_dropped_bf16,
                add_product: low_rank_add_dropped_product_bf16,
                add_product_to: low_rank_add_dropped_product_to_bf16,
                outer_partial: low_rank_outer_partial_dropped_bf16,
            },
        );
    }
}

fn cross_entropy_case<T: Element + candle_core::WithDType>(
    n: usize,
    v: usize,
    stats_kernel: unsafe extern "C" fn(*const T, *const i64, *mut f32, i32),
    grad_kernel: unsafe extern "C" fn(*const T, *const i64, *const f32, *mut T, i32),
) {
    let label = format!("cross_entropy {} [{n}, {v}]", T::NAME);
    // Logits within ±12 (a peaked softmax), and kernel-check's targets: some elsewhere (−1),
    // some rows ignored (weight 0).
    let (x, _) = stored::<T>(&seeded(15, n * v, 12.0));
    let (targets, weights) = helix_kernels::check::cross_entropy_targets(n, v);
    let (xt, tt) = (cpu(&x, &[n, v]), cpu(&targets, &[n]));
    let want_stats = helix_kernels::cross_entropy::logit_stats(&xt, &tt).unwrap();
    let lse = (want_stats.narrow(1, 1, 1).unwrap().log().unwrap()
        + want_stats.narrow(1, 0, 1).unwrap())
    .unwrap();
    let terms = Tensor::cat(&[&lse, &cpu(&weights, &[n, 1])], 1).unwrap();
    let want_grad = helix_kernels::cross_entropy::logit_grad(&xt, &tt, &terms).unwrap();

    let (xp, tp) = (Ptr::read(&x), Ptr::read(&targets));
    let mut stats = vec![0f32; 3 * n];
    let sp = Ptr::of(&mut stats);
    helix_kernels_emu::launch(launch::wide_block_per_row(n), || unsafe {
        stats_kernel(xp.get(), tp.get(), sp.get(), v as i32)
    });
    let want = values(&want_stats);
    for (i, what) in ["row max", "Σ exp", "target logit"].iter().enumerate() {
        let pick = |s: &[f32]| s.iter().skip(i).step_by(3).copied().collect::<Vec<_>>();
        assert_close(
            &format!("{label} {what}"),
            &pick(&stats),
            &pick(&want),
            2e-5,
        );
    }
    let terms = values(&terms);
    let termsp = Ptr::read(&terms);
    let mut grad = vec![T::default(); n * v];
    let gp = Ptr::of(&mut grad);
    helix_kernels_emu::launch(launch::wide_block_per_row(n), || unsafe {
        grad_kernel(xp.get(), tp.get(), termsp.get(), gp.get(), v as i32)
    });
    assert_close(
        &format!("{label} dlogits"),
        &widen(&grad),
        &values(&want_grad),
        tolerance::<T>(),
    );
}

#[test]
fn cross_entropy_kernels_match_the_reference() {
    for (n, v) in [(5, 37), (31, 1000), (6, 4099)] {
        cross_entropy_case::<f32>(n, v, logit_stats_f32, logit_grad_f32);
        cross_entropy_case::<bf16>(n, v, logit_stats_bf16, logit_grad_bf16);
    }
}

/// One parameter's host buffers for the emulated AdamW: the parameter as f32 values (rounded
/// to bf16 when it has a master), the master, the moments.
struct HostParam {
    param: Vec<f32>,
    master: Option<Vec<f32>>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Three AdamW steps (the second with weight decay, the third on gradients scaled by 0.5) of
/// three parameters in one launch each, f32 and bf16 with f32 masters: the emulated kernel's
/// parameters, masters and moments against helix_kernels::adamw_step's CPU loop after every
/// step, bit for bit. 9,000 elements take three blocks, the last one partly.
#[test]
fn adamw_matches_the_reference_bit_for_bit() {
    let lens = [1001, 37, 9000];
    for with_master in [false, true] {
        let dtype = if with_master { DType::BF16 } else { DType::F32 };
        let start = |i: usize| {
            let w = seeded(11 + 10 * i as u64, lens[i], 1.0);
            let rounded: Vec<f32> = match with_master {
                true => w.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
                false => w.clone(),
            };
            HostParam {
                master: with_master.then(|| rounded.clone()),
                param: rounded,
                m: vec![0.0; lens[i]],
                v: vec![0.0; lens[i]],
            }
        };
        let mut emulated: Vec<HostParam> = (0..3).map(start).collect();
        let reference: Vec<HostParam> = (0..3).map(start).collect();
        let vars: Vec<candle_core::Var> = reference
            .iter()
            .map(|p| {
                candle_core::Var::from_tensor(
                    &cpu(&p.param, &[p.param.len()]).to_dtype(dtype).unwrap(),
                )
                .unwrap()
            })
            .collect();
        let mut masters: Vec<Option<Tensor>> = reference
            .iter()
            .map(|p| p.master.as_ref().map(|w| cpu(w, &[w.len()])))
            .collect();
        let mut moments: Vec<(Tensor, Tensor)> = reference
            .iter()
            .map(|p| (cpu(&p.m, &[p.m.len()]), cpu(&p.v, &[p.v.len()])))
            .collect();
        for t in 1..=3u64 {
            let decay = if t == 2 { 0.1 } else { 0.0 };
            let scale = if t == 3 { 0.5 } else { 1.0 };
            let st = helix_kernels::AdamWStep::new(t, 1e-3, [0.9, 0.95], 1e-8, decay)
                .with_grad_scale(scale);
            let grads: Vec<Vec<f32>> = (0..3)
                .map(|i| seeded(11 + 10 * i as u64 + t, lens[i], 0.1))
                .collect();
            let grad_tensors: Vec<Tensor> = grads.iter().map(|g| cpu(g, &[g.len()])).collect();
            let mut params: Vec<helix_kernels::AdamWParam> = vars
                .iter()
                .zip(masters.iter_mut())
                .zip(moments.iter_mut())
                .zip(&grad_tensors)
                .enumerate()
                .map(
                    |(i, (((param, master), (m, v)), grad))| helix_kernels::AdamWParam {
                        param,
                        master: master.as_mut(),
                        exp_avg: m,
                        exp_avg_sq: v,
                        grad,
                        decays: i != 1,
                    },
                )
                .collect();
            helix_kernels::adamw_step(&mut params, &st).unwrap();

            // The kernel's parameters in their storage type.
            let mut stored_params: Vec<Vec<bf16>> = emulated
                .iter()
                .map(|p| p.param.iter().map(|&x| bf16::from_f32(x)).collect())
                .collect();
            let (first_blocks, geometry) = launch::tensor_list(&lens).unwrap();
            let table: Vec<launch::AdamWTensor> = (0..3)
                .map(|i| {
                    let p = &mut emulated[i];
                    launch::AdamWTensor {
                        param: match with_master {
                            true => stored_params[i].as_mut_ptr() as u64,
                            false => p.param.as_mut_ptr() as u64,
                        },
                        master: p.master.as_mut().map_or(0, |w| w.as_mut_ptr() as u64),
                        m: p.m.as_mut_ptr() as u64,
                        v: p.v.as_mut_ptr() as u64,
                        g: grads[i].as_ptr() as u64,
                        n: lens[i] as i64,
                        first_block: first_blocks[i],
                        decay: if i == 1 { 1.0 } else { st.decay as f32 },
                        unused: 0,
                    }
                })
                .collect();
            let kernel = if with_master { adamw_bf16 } else { adamw_f32 };
            let (tp, constants) = (Ptr::read(&table), st.kernel_constants());
            helix_kernels_emu::launch(geometry, || unsafe { kernel(tp.get(), 3, constants) });
            for i in 0..3 {
                let p = &mut emulated[i];
                if with_master {
                    p.param = stored_params[i].iter().map(|x| x.to_f32()).collect();
                }
                let label = format!("{dtype:?} parameter {i} after step {t}");
                assert_eq!(p.param, values(vars[i].as_tensor()), "{label}: w");
                assert_eq!(p.m, values(&moments[i].0), "{label}: m");
                assert_eq!(p.v, values(&moments[i].1), "{label}: v");
                if let (Some(got), Some(want)) = (&p.master, &masters[i]) {
                    assert_eq!(*got, values(want), "{label}: master");
                }
            }
        }
    }
}

/// Σ x² of four tensors in one launch (one and a half blocks, five elements, one past a
/// block, three blocks) against helix_kernels::sums_of_squares on the CPU, which sums each
/// block in element order where the kernel sums thread by thread and then across the block.
#[test]
fn sums_of_squares_match_the_reference() {
    let lens = [6000, 5, 4097, 12288];
    let xs: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| seeded(41 + i as u64, n, 1.0 + i as f32))
        .collect();
    let tensors: Vec<Tensor> = xs.iter().map(|x| cpu(x, &[x.len()])).collect();
    let want = helix_kernels::sums_of_squares(&tensors.iter().collect::<Vec<_>>()).unwrap();
    let (first_blocks, geometry) = launch::tensor_list(&lens).unwrap();
    let table: Vec<launch::SquaresTensor> = (0..lens.len())
        .map(|i| launch::SquaresTensor {
            x: xs[i].as_ptr() as u64,
            n: lens[i] as i64,
            first_block: first_blocks[i],
        })
        .collect();
    let blocks = geometry.grid.0 as usize;
    let mut partial = vec![f32::NAN; blocks];
    let (tp, pp) = (Ptr::read(&table), Ptr::of(&mut partial));
    helix_kernels_emu::launch(geometry, || unsafe {
        sum_squares_f32(tp.get(), lens.len() as i32, pp.get())
    });
    for i in 0..lens.len() {
        let end = first_blocks.get(i + 1).map_or(blocks, |&b| b as usize);
        let got: f64 = partial[first_blocks[i] as usize..end]
            .iter()
            .map(|&p| p as f64)
            .sum();
        let rel = (got - want[i]).abs() / want[i];
        assert!(
            rel < 1e-6,
            "tensor {i}: {got} against {}, relative {rel:e}",
            want[i]
        );
    }
}

#[test]
fn rms_norm_swiglu_and_rope_match_the_reference() {
    // RMSNorm, bf16 and f32: 3 rows of 67 (a block of 96 threads) and 2 rows of 1,500 (1,024
    // threads looping).
    for (rows, cols) in [(3, 67), (2, 1500)] {
        let (x, _) = stored::<bf16>(&seeded(1, rows * cols, 2.0));
        let (w, _) = stored::<bf16>(&seeded(2, cols, 1.0));
        let (dy, _) = stored::<bf16>(&seeded(7, rows * cols, 1.0));
        let (xt, wt, dyt) = (
            cpu(&x, &[rows, cols]),
            cpu(&w, &[cols]),
            cpu(&dy, &[rows, cols]),
        );
        let want = helix_kernels::rms_norm(&xt, &wt, 1e-5).unwrap();
        let (want_dx, _) = helix_kernels::rms_norm_backward(&xt, &wt, &dyt, 1e-5, false).unwrap();
        let (xp, wp, dyp) = (Ptr::read(&x), Ptr::read(&w), Ptr::read(&dy));
        let mut y = vec![bf16::ZERO; rows * cols];
        let mut dx = vec![bf16::ZERO; rows * cols];
        let (yp, dxp) = (Ptr::of(&mut y), Ptr::of(&mut dx));
        let g = launch::block_per_row(rows, cols);
        helix_kernels_emu::launch(g, || unsafe {
            rms_norm_fwd_bf16(xp.get(), wp.get(), yp.get(), cols as i32, 1e-5)
        });
        helix_kernels_emu::launch(g, || unsafe {
            rms_norm_bwd_dx_bf16(xp.get(), wp.get(), dyp.get(), dxp.get(), cols as i32, 1e-5)
        });
        let tol = tolerance::<bf16>();
        assert_close(
            &format!("rms_norm bf16 [{rows}, {cols}] y"),
            &widen(&y),
            &values(&want),
            tol,
        );
        assert_close(
            &format!("rms_norm bf16 [{rows}, {cols}] dx"),
            &widen(&dx),
            &values(&want_dx),
            tol,
        );

        let xf = seeded(1, rows * cols, 2.0);
        let wf = seeded(2, cols, 1.0);
        let want =
            helix_kernels::rms_norm(&cpu(&xf, &[rows, cols]), &cpu(&wf, &[cols]), 1e-5).unwrap();
        let (xp, wp) = (Ptr::read(&xf), Ptr::read(&wf));
        let mut y = vec![0f32; rows * cols];
        let yp = Ptr::of(&mut y);
        helix_kernels_emu::launch(g, || unsafe {
            rms_norm_fwd_f32(xp.get(), wp.get(), yp.get(), cols as i32, 1e-5)
        });
        assert_close(
            &format!("rms_norm f32 [{rows}, {cols}] y"),
            &y,
            &values(&want),
            2e-5,
        );
    }

    // SwiGLU over 3 × 7 × 33 elements (one block, a ragged tail).
    let n = 3 * 7 * 33;
    let (gate, _) = stored::<bf16>(&seeded(3, n, 3.0));
    let (up, _) = stored::<bf16>(&seeded(4, n, 1.0));
    let (dy, _) = stored::<bf16>(&seeded(7, n, 1.0));
    let (gt, ut, dyt) = (cpu(&gate, &[n]), cpu(&up, &[n]), cpu(&dy, &[n]));
    let want = helix_kernels::swiglu(&gt, &ut).unwrap();
    let (want_dg, want_du) = helix_kernels::swiglu_backward(&gt, &ut, &dyt).unwrap();
    let (gp, up_, dyp) = (Ptr::read(&gate), Ptr::read(&up), Ptr::read(&dy));
    let mut y = vec![bf16::ZERO; n];
    let mut d = vec![bf16::ZERO; 2 * n];
    let mut d3 = vec![bf16::ZERO; 3 * n];
    let (yp, dp, d3p) = (Ptr::of(&mut y), Ptr::of(&mut d), Ptr::of(&mut d3));
    helix_kernels_emu::launch(launch::elementwise(n), || unsafe {
        swiglu_fwd_bf16(gp.get(), up_.get(), yp.get(), n as i64)
    });
    helix_kernels_emu::launch(launch::elementwise(n), || unsafe {
        swiglu_bwd_bf16(gp.get(), up_.get(), dyp.get(), dp.get(), n as i64, 0)
    });
    // With the output: the same gradients, and the forward's y after them.
    helix_kernels_emu::launch(launch::elementwise(n), || unsafe {
        swiglu_bwd_bf16(gp.get(), up_.get(), dyp.get(), d3p.get(), n as i64, 1)
    });
    let (_, _, want_y3) = helix_kernels::swiglu_backward_and_output(&gt, &ut, &dyt).unwrap();
    assert_close(
        "swiglu reference: y from the backward",
        &values(&want_y3),
        &values(&want),
        0.0,
    );
    assert_eq!(d3[..2 * n], d[..], "swiglu bf16: gradients with the output");
    assert_close(
        "swiglu bf16 y from the backward",
        &widen(&d3[2 * n..]),
        &values(&want),
        tolerance::<bf16>(),
    );
    let tol = tolerance::<bf16>();
    assert_close("swiglu bf16 y", &widen(&y), &values(&want), tol);
    assert_close(
        "swiglu bf16 d gate",
        &widen(&d[..n]),
        &values(&want_dg),
        tol,
    );
    assert_close("swiglu bf16 d up", &widen(&d[n..]), &values(&want_du), tol);

    // RoPE on [2, 3, 5, 8] with per-position angles, forward and backward (the inverse turn),
    // and from x laid out heads merged [B, S, H, D] (read through strides) into heads first
    // and into heads merged.
    let (b, h, s, dim) = (2, 3, 5, 8);
    let n = b * h * s * dim;
    let (x, _) = stored::<bf16>(&seeded(5, n, 1.0));
    let angles = seeded(6, b * s * dim / 2, 3.0);
    let full: Vec<f32> = (0..b * s)
        .flat_map(|p| {
            let half = &angles[p * dim / 2..(p + 1) * dim / 2];
            half.iter().chain(half).copied().collect::<Vec<_>>()
        })
        .collect();
    let (cos, _) = stored::<bf16>(&full.iter().map(|a| a.cos()).collect::<Vec<_>>());
    let (sin, _) = stored::<bf16>(&full.iter().map(|a| a.sin()).collect::<Vec<_>>());
    let (xt, ct, st) = (
        cpu(&x, &[b, h, s, dim]),
        cpu(&cos, &[b, 1, s, dim]),
        cpu(&sin, &[b, 1, s, dim]),
    );
    let want = helix_kernels::rope(&xt, &ct, &st).unwrap();
    let (cp, sp) = (Ptr::read(&cos), Ptr::read(&sin));
    let rope = |x: &[bf16], xs: Strides, backward: bool, merged: bool| {
        let mut y = vec![bf16::ZERO; n];
        let (xp, yp) = (Ptr::read(x), Ptr::of(&mut y));
        helix_kernels_emu::launch(launch::elementwise(n), || unsafe {
            rope_bf16(
                xp.get(),
                cp.get(),
                sp.get(),
                yp.get(),
                n as i64,
                h as i32,
                s as i32,
                dim as i32,
                backward as i32,
                xs,
                merged as i32,
            )
        });
        y
    };
    let heads_first = Strides::packed(h, s, dim);
    let y = rope(&x, heads_first, false, false);
    assert_close("rope bf16 y", &widen(&y), &values(&want), tol);
    // Turning y back by the same angles gives x again, to bf16 rounding.
    let back = rope(&y, heads_first, true, false);
    assert_close(
        "rope bf16 backward of y",
        &widen(&back),
        &widen(&x),
        2.0 * tol,
    );
    // x stored heads merged, read as [B, H, S, D]: the same rotation, heads first or merged.
    let x_merged = values(&xt.transpose(1, 2).unwrap().contiguous().unwrap());
    let (x_merged, _) = stored::<bf16>(&x_merged);
    let merged_in = Strides::merged(h, s, dim);
    let y = rope(&x_merged, merged_in, false, false);
    assert_close("rope bf16 y of a merged x", &widen(&y), &values(&want), tol);
    let y = rope(&x_merged, merged_in, false, true);
    let want_merged = helix_kernels::rope_merging_heads(&xt, &ct, &st).unwrap();
    assert_eq!(want_merged.dims(), [b, s, h, dim]);
    let want_moved = want.transpose(1, 2).unwrap().contiguous().unwrap();
    assert_close(
        "rope reference merging heads",
        &values(&want_merged),
        &values(&want_moved),
        0.0,
    );
    assert_close(
        "rope bf16 y merged of a merged x",
        &widen(&y),
        &values(&want_merged),
        tol,
    );
}

#[test]
fn attention_softmax_kernels_match_the_reference() {
    // Scores [b, h, r, k] under a causal mask (query i sees keys up to k − r + i), as
    // kernel-check's case; a warp per row, rows past the last block's eighth.
    for [b, h, r, k] in [[2, 3, 5, 37], [1, 4, 16, 300]] {
        let label = format!("attention_softmax bf16 [{b}, {h}, {r}, {k}]");
        let n = b * h * r * k;
        let (s, _) = stored::<bf16>(&seeded(8, n, 40.0));
        let (dp, _) = stored::<bf16>(&seeded(9, n, 1.0));
        let d = seeded(10, b * h * r, 0.5);
        let blocked: Vec<f32> = (0..b * r * k)
            .map(|i| match (i % k) <= k - r + (i / k) % r {
                true => 0.0,
                false => -1e30,
            })
            .collect();
        let (bias, _) = stored::<bf16>(&blocked);
        let scale = 1.0 / 128f64.sqrt();
        let (st, bt, dpt, dt) = (
            cpu(&s, &[b, h, r, k]),
            cpu(&bias, &[b, 1, r, k]),
            cpu(&dp, &[b, h, r, k]),
            cpu(&d, &[b, h, r, 1]),
        );
        use helix_kernels::attention_softmax as reference;
        let want_stats = reference::row_stats(&st, &bt, scale).unwrap();
        let want_p = reference::probs(&st, &bt, &want_stats, scale).unwrap();
        let want_ds = reference::softmax_grad(&want_p, &dpt, &dt, scale).unwrap();

        let rows = b * h * r;
        let g = launch::warp_per_row(rows);
        let (sp, bp, dpp, dptr) = (
            Ptr::read(&s),
            Ptr::read(&bias),
            Ptr::read(&dp),
            Ptr::read(&d),
        );
        let mut stats = vec![0f32; 2 * rows];
        let statsp = Ptr::of(&mut stats);
        let args = (rows as i64, k as i32, h as i32, r as i32, scale as f32);
        helix_kernels_emu::launch(g, || unsafe {
            attn_row_stats_bf16(
                sp.get(),
                bp.get(),
                statsp.get(),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
            )
        });
        assert_close(
            &format!("{label} stats"),
            &stats,
            &values(&want_stats),
            2e-5,
        );
        // The reference's statistics and probabilities in, so each kernel is checked alone.
        let want_stats = values(&want_stats);
        let wsp = Ptr::read(&want_stats);
        let mut p = vec![bf16::ZERO; n];
        let pp = Ptr::of(&mut p);
        helix_kernels_emu::launch(g, || unsafe {
            attn_probs_bf16(
                sp.get(),
                bp.get(),
                wsp.get(),
                pp.get(),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
            )
        });
        let tol = tolerance::<bf16>();
        assert_close(&format!("{label} p"), &widen(&p), &values(&want_p), tol);
        let want_pv: Vec<bf16> = values(&want_p).iter().map(|&x| bf16::from_f32(x)).collect();
        let wpp = Ptr::read(&want_pv);
        let mut ds = vec![bf16::ZERO; n];
        let dsp = Ptr::of(&mut ds);
        helix_kernels_emu::launch(g, || unsafe {
            attn_softmax_grad_bf16(
                wpp.get(),
                dpp.get(),
                dptr.get(),
                dsp.get(),
                args.0,
                args.1,
                args.4,
            )
        });
        assert_close(&format!("{label} ds"), &widen(&ds), &values(&want_ds), tol);
    }
}

#[test]
fn dropout_masks_match_the_reference_bit_for_bit() {
    // f32, bf16 and f16; 3,017 elements end mid-block, and the keys are a run's first masks.
    let n = 3017;
    let x = seeded(21, n, 2.0);
    let (xb, _) = stored::<bf16>(&x);
    for (p, call) in [(0.05, 0), (0.1, 1), (0.5, 7)] {
        let key = helix_kernels::dropout::dropout_key(1234, 0, call);
        let threshold = helix_kernels::dropout::keep_threshold(p);
        let scale = (1.0 / (1.0 - p)) as f32;
        let g = launch::elementwise(n);

        let want = values(&helix_kernels::dropout(&cpu(&x, &[n]), p, key).unwrap());
        let mut y = vec![0f32; n];
        let (xp, yp) = (Ptr::read(&x), Ptr::of(&mut y));
        helix_kernels_emu::launch(g, || unsafe {
            dropout_f32(xp.get(), yp.get(), n as i64, key, threshold, scale)
        });
        assert_close(&format!("dropout f32 p {p}"), &y, &want, 0.0);

        let want = values(&helix_kernels::dropout(&cpu(&xb, &[n]), p, key).unwrap());
        let mut y = vec![bf16::ZERO; n];
        let (xp, yp) = (Ptr::read(&xb), Ptr::of(&mut y));
        helix_kernels_emu::launch(g, || unsafe {
            dropout_bf16(xp.get(), yp.get(), n as i64, key, threshold, scale)
        });
        assert_close(&format!("dropout bf16 p {p}"), &widen(&y), &want, 0.0);

        let (xh, _) = stored::<half::f16>(&x);
        let want_h = values(&helix_kernels::dropout(&cpu(&xh, &[n]), p, key).unwrap());
        let mut y = vec![half::f16::ZERO; n];
        let (xp, yp) = (Ptr::read(&xh), Ptr::of(&mut y));
        helix_kernels_emu::launch(g, || unsafe {
            dropout_f16(xp.get(), yp.get(), n as i64, key, threshold, scale)
        });
        assert_close(&format!("dropout f16 p {p}"), &widen(&y), &want_h, 0.0);
        let dropped = want.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
        assert!(
            (dropped - p).abs() < 0.05,
            "p {p}: the reference dropped {dropped}"
        );
    }
}

type Nf4Quantize<T> = unsafe extern "C" fn(*const T, *const T, *mut u8, i64);
type Nf4Dequantize<T> = unsafe extern "C" fn(*const u8, *const u8, *const T, f32, *mut T, i64);

/// NF4 (kernels/cuda/nf4.cu) against src/nf4.rs, bit for bit: 300 blocks (a short last group
/// of scalers), one of them all zeros and one holding an outlier.
fn nf4_case<T: Element + candle_core::WithDType>(
    quantize: Nf4Quantize<T>,
    dequantize: Nf4Dequantize<T>,
) {
    use helix_kernels::nf4::{Nf4Weight, BLOCK};
    let (rows, cols) = (150, 2 * BLOCK);
    let n = rows * cols;
    let mut v = seeded(31, n, 0.02);
    v[5 * BLOCK..6 * BLOCK].fill(0.0);
    v[1000] = 0.7;
    let (w, _) = stored::<T>(&v);
    let q = Nf4Weight::quantize(&cpu(&w, &[rows, cols])).unwrap();
    let (codes, scalers, factors, mean) = q.parts();
    let want_codes: Vec<u8> = codes.to_vec1().unwrap();
    let scalers: Vec<u8> = scalers.to_vec1().unwrap();
    let factors: Vec<T> = factors.to_vec1().unwrap();
    let absmax: Vec<T> = cpu(&w, &[n / BLOCK, BLOCK])
        .abs()
        .unwrap()
        .max(1)
        .unwrap()
        .to_vec1()
        .unwrap();

    let pairs = n / 2;
    let g = launch::elementwise(pairs);
    let mut got_codes = vec![0u8; pairs];
    let (wp, ap, cp) = (Ptr::read(&w), Ptr::read(&absmax), Ptr::of(&mut got_codes));
    helix_kernels_emu::launch(g, || unsafe {
        quantize(wp.get(), ap.get(), cp.get(), pairs as i64)
    });
    assert_eq!(got_codes, want_codes, "nf4 {} codes", T::NAME);

    let want = values(&q.dequantize().unwrap());
    let mut got = vec![T::default(); n];
    let (cp, sp, fp, op) = (
        Ptr::read(&want_codes),
        Ptr::read(&scalers),
        Ptr::read(&factors),
        Ptr::of(&mut got),
    );
    helix_kernels_emu::launch(g, || unsafe {
        dequantize(cp.get(), sp.get(), fp.get(), mean, op.get(), pairs as i64)
    });
    assert_close(
        &format!("nf4 {} dequantized", T::NAME),
        &widen(&got),
        &want,
        0.0,
    );
}

#[test]
fn nf4_kernels_match_the_reference_bit_for_bit() {
    nf4_case::<f32>(nf4_quantize_f32, nf4_dequantize_f32);
    nf4_case::<bf16>(nf4_quantize_bf16, nf4_dequantize_bf16);
    nf4_case::<half::f16>(nf4_quantize_f16, nf4_dequantize_f16);
}
