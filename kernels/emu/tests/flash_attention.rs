//! kernels/cuda/flash_attention.cu (forward, delta, dq, dk / dv) run by the emulator on the
//! layouts and grids the CUDA launcher uses, against the tile-by-tile CPU reference
//! (helix_kernels::flash_attention, itself checked against the full score matrix in f64):
//! grouped-query heads, packed documents with padding, sequences that end mid-tile, and
//! segment ids out of order (no tile skipping).

mod common;

use common::{assert_close, seeded, stored, tolerance, widen, Element};
use half::{bf16, f16};
use helix_kernels::check::flash_segments;
use helix_kernels::flash_attention::{self as reference, AttentionShape};
use helix_kernels::launch::{flash_tiles, warp_per_row, FlashKernel, Strides};
use helix_kernels_emu::kernels::FlashElement;
use helix_kernels_emu::{launch, Ptr};

/// [b, s, h, d] (the projections' layout the kernels read) to [b, h, s, d] (the reference's).
fn heads_first(v: &[f32], b: usize, s: usize, h: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for bi in 0..b {
        for i in 0..s {
            for hi in 0..h {
                let from = ((bi * s + i) * h + hi) * d;
                let to = ((bi * h + hi) * s + i) * d;
                out[to..to + d].copy_from_slice(&v[from..from + d]);
            }
        }
    }
    out
}

/// Ids that alternate in runs of 5 (documents interleaved): nothing may be skipped.
fn interleaved(b: usize, s: usize) -> Vec<u32> {
    (0..b * s).map(|i| ((i % s) / 5 % 3) as u32).collect()
}

fn check<T: Element + FlashElement>(shape: AttentionShape, segments: Vec<u32>, ordered: bool) {
    let AttentionShape {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        seq: s,
        head_dim: d,
    } = shape;
    let label = format!(
        "{} b{b} hq{hq} hkv{hkv} s{s} d{d} ordered={ordered}",
        T::NAME
    );
    // Scores of a few units: a softmax far from uniform (as kernel-check's inputs).
    let (q, qf) = stored::<T>(&seeded(31, b * s * hq * d, 2.0));
    let (k, kf) = stored::<T>(&seeded(32, b * s * hkv * d, 2.0));
    let (v, vf) = stored::<T>(&seeded(33, b * s * hkv * d, 1.0));
    let (dout, doutf) = stored::<T>(&seeded(34, b * s * hq * d, 1.0));

    let rq = heads_first(&qf, b, s, hq, d);
    let rk = heads_first(&kf, b, s, hkv, d);
    let rv = heads_first(&vf, b, s, hkv, d);
    let (want_out, want_lse) = reference::forward(shape, &rq, &rk, &rv, &segments);
    let rdout = heads_first(&doutf, b, s, hq, d);
    let (want_dq, want_dk, want_dv) = reference::backward(
        shape, &rq, &rk, &rv, &segments, &want_out, &want_lse, &rdout,
    );

    let kernels = T::flash(d);
    let elem = std::mem::size_of::<T>();
    let scale = 1.0 / (d as f32).sqrt();
    let (s32, hq32, hkv32) = (s as i32, hq as i32, hkv as i32);
    let ordered = i32::from(ordered);
    // q, k, v, the output and its gradient as [b, s, h, d] read as [b, h, s, d] (the
    // launcher's views of the projections); dq, dk, dv packed [b, h, s, d].
    let (qs, kvs) = (Strides::merged(hq, s, d), Strides::merged(hkv, s, d));
    let (qp, kp, vp, dp) = (
        Ptr::read(&q),
        Ptr::read(&k),
        Ptr::read(&v),
        Ptr::read(&dout),
    );
    let seg = Ptr::read(&segments);

    // Both forward kernels (64 and 128 query rows a block); the backward reads the last's.
    let tol = tolerance::<T>();
    let mut out = vec![T::default(); b * s * hq * d];
    let mut lse = vec![0f32; b * hq * s];
    let (op, lp) = (Ptr::of(&mut out), Ptr::of(&mut lse));
    for (kernel, entry) in [
        (FlashKernel::Forward, kernels.forward),
        (FlashKernel::ForwardWide, kernels.forward_wide),
    ] {
        // Nothing of the previous kernel's output left for this one to pass on.
        // SAFETY: no launch is running; the pointers are to `out` and `lse`, alive here.
        unsafe {
            std::ptr::write_bytes(op.get(), 0, out.len());
            std::ptr::write_bytes(lp.get(), 0, lse.len());
        }
        launch(
            flash_tiles(kernel, s, b * hq, d, elem).unwrap(),
            || unsafe {
                entry(
                    qp.get(),
                    kp.get(),
                    vp.get(),
                    seg.get(),
                    ordered,
                    op.get(),
                    lp.get(),
                    s32,
                    hq32,
                    hkv32,
                    scale,
                    qs,
                    kvs,
                    kvs,
                    qs,
                )
            },
        );
        assert_close(
            &format!("{label} {kernel:?} out"),
            &heads_first(&widen(&out), b, s, hq, d),
            &want_out,
            tol,
        );
        assert_close(&format!("{label} {kernel:?} lse"), &lse, &want_lse, 1e-5);
    }

    let rows = b * hq * s;
    let mut delta = vec![0f32; rows];
    let deltap = Ptr::of(&mut delta);
    launch(warp_per_row(rows), || unsafe {
        (kernels.delta)(
            op.get(),
            dp.get(),
            deltap.get(),
            rows as i64,
            s32,
            hq32,
            d as i32,
            qs,
            qs,
        )
    });

    let mut dq = vec![T::default(); b * hq * s * d];
    let dqp = Ptr::of(&mut dq);
    let geometry = flash_tiles(FlashKernel::BackwardDq, s, b * hq, d, elem).unwrap();
    launch(geometry, || unsafe {
        (kernels.dq)(
            qp.get(),
            kp.get(),
            vp.get(),
            seg.get(),
            ordered,
            dp.get(),
            lp.get(),
            deltap.get(),
            dqp.get(),
            s32,
            hq32,
            hkv32,
            scale,
            qs,
            kvs,
            kvs,
            qs,
            Strides::packed(hq, s, d),
        )
    });
    let mut dk = vec![T::default(); b * hkv * s * d];
    let mut dv = vec![T::default(); b * hkv * s * d];
    let (dkp, dvp) = (Ptr::of(&mut dk), Ptr::of(&mut dv));
    let geometry = flash_tiles(FlashKernel::BackwardDkDv, s, b * hkv, d, elem).unwrap();
    let packed = Strides::packed(hkv, s, d);
    launch(geometry, || unsafe {
        (kernels.dkdv)(
            qp.get(),
            kp.get(),
            vp.get(),
            seg.get(),
            ordered,
            dp.get(),
            lp.get(),
            deltap.get(),
            dkp.get(),
            dvp.get(),
            s32,
            hq32,
            hkv32,
            scale,
            qs,
            kvs,
            kvs,
            qs,
            packed,
            packed,
        )
    });
    assert_close(&format!("{label} dq"), &widen(&dq), &want_dq, tol);
    assert_close(&format!("{label} dk"), &widen(&dk), &want_dk, tol);
    assert_close(&format!("{label} dv"), &widen(&dv), &want_dv, tol);
}

fn shape(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
) -> AttentionShape {
    AttentionShape {
        batch,
        q_heads,
        kv_heads,
        seq,
        head_dim,
    }
}

#[test]
fn bf16_head_dim_64_matches_the_reference() {
    let sh = shape(2, 4, 2, 150, 64);
    check::<bf16>(sh, flash_segments(2, 150), true);
}

#[test]
fn f16_head_dim_128_matches_the_reference() {
    let sh = shape(1, 2, 1, 100, 128);
    check::<f16>(sh, flash_segments(1, 100), true);
}

#[test]
fn interleaved_documents_are_masked_without_skipping() {
    // Three tiles: the last query tile reads every key tile, so each double buffer is
    // reused (and a barrier missing before a reuse shows).
    let sh = shape(1, 2, 2, 150, 64);
    check::<bf16>(sh, interleaved(1, 150), false);
}

/// kernel-check's larger shape: 600 rows (ten tiles, the last ending mid-tile), 8 query heads
/// over 2 KV heads (groups of 4), head_dim 128. About a minute in the emulator, so .ci/run runs
/// it rather than every `cargo test`: `cargo test -p helix-kernels-emu --test flash_attention
/// -- --ignored`.
#[test]
#[ignore]
fn kernel_check_shape_matches_the_reference() {
    let sh = shape(1, 8, 2, 600, 128);
    check::<bf16>(sh, flash_segments(1, 600), true);
}
