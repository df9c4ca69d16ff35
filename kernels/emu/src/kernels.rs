//! The kernels' extern "C" entry points, as kernels/cuda/*.cu declare them (the emulated
//! build keeps their C names). Element pointers take f32, `half::bf16` or `half::f16` (the
//! CUDA headers' float, __nv_bfloat16 and __half: the same bits). [`Element`] picks a
//! kernel's entry point by element type. Call them only inside [`crate::launch`].

use half::{bf16, f16};
use helix_kernels::launch::{AdamWConstants, AdamWTensor, SquaresTensor, Strides};

extern "C" {
    pub fn rms_norm_fwd_f32(x: *const f32, w: *const f32, y: *mut f32, cols: i32, eps: f32);
    pub fn rms_norm_fwd_bf16(x: *const bf16, w: *const bf16, y: *mut bf16, cols: i32, eps: f32);
    pub fn rms_norm_bwd_dx_bf16(
        x: *const bf16,
        w: *const bf16,
        dy: *const bf16,
        dx: *mut bf16,
        cols: i32,
        eps: f32,
    );

    pub fn swiglu_fwd_bf16(gate: *const bf16, up: *const bf16, y: *mut bf16, n: i64);
    pub fn swiglu_bwd_bf16(
        gate: *const bf16,
        up: *const bf16,
        dy: *const bf16,
        d: *mut bf16,
        n: i64,
        with_output: i32,
    );

    pub fn nf4_quantize_f32(w: *const f32, absmax: *const f32, codes: *mut u8, pairs: i64);
    pub fn nf4_quantize_bf16(w: *const bf16, absmax: *const bf16, codes: *mut u8, pairs: i64);
    pub fn nf4_quantize_f16(w: *const f16, absmax: *const f16, codes: *mut u8, pairs: i64);
    pub fn nf4_dequantize_f32(
        codes: *const u8,
        scalers: *const u8,
        factors: *const f32,
        mean: f32,
        w: *mut f32,
        pairs: i64,
    );
    pub fn nf4_dequantize_bf16(
        codes: *const u8,
        scalers: *const u8,
        factors: *const bf16,
        mean: f32,
        w: *mut bf16,
        pairs: i64,
    );
    pub fn nf4_dequantize_f16(
        codes: *const u8,
        scalers: *const u8,
        factors: *const f16,
        mean: f32,
        w: *mut f16,
        pairs: i64,
    );

    pub fn dropout_f32(x: *const f32, y: *mut f32, n: i64, key: u64, threshold: u32, scale: f32);
    pub fn dropout_bf16(x: *const bf16, y: *mut bf16, n: i64, key: u64, threshold: u32, scale: f32);
    pub fn dropout_f16(x: *const f16, y: *mut f16, n: i64, key: u64, threshold: u32, scale: f32);

    pub fn rope_bf16(
        x: *const bf16,
        cos: *const bf16,
        sin: *const bf16,
        y: *mut bf16,
        n: i64,
        heads: i32,
        seq: i32,
        dim: i32,
        backward: i32,
        xs: Strides,
        merged: i32,
    );

    #[allow(clippy::too_many_arguments)]
    pub fn attn_row_stats_bf16(
        s: *const bf16,
        bias: *const bf16,
        stats: *mut f32,
        rows: i64,
        keys: i32,
        heads: i32,
        q_rows: i32,
        scale: f32,
    );
    #[allow(clippy::too_many_arguments)]
    pub fn attn_probs_bf16(
        s: *const bf16,
        bias: *const bf16,
        stats: *const f32,
        p: *mut bf16,
        rows: i64,
        keys: i32,
        heads: i32,
        q_rows: i32,
        scale: f32,
    );
    pub fn attn_softmax_grad_bf16(
        p: *const bf16,
        dp: *const bf16,
        d: *const f32,
        ds: *mut bf16,
        rows: i64,
        keys: i32,
        scale: f32,
    );

    pub fn logit_stats_f32(x: *const f32, targets: *const i64, stats: *mut f32, vocab: i32);
    pub fn logit_stats_bf16(x: *const bf16, targets: *const i64, stats: *mut f32, vocab: i32);
    pub fn logit_grad_f32(
        x: *const f32,
        targets: *const i64,
        terms: *const f32,
        g: *mut f32,
        vocab: i32,
    );
    pub fn logit_grad_bf16(
        x: *const bf16,
        targets: *const i64,
        terms: *const f32,
        g: *mut bf16,
        vocab: i32,
    );

    pub fn low_rank_project_f32(
        x: *const f32,
        m: *const f32,
        partial: *mut f32,
        n: i32,
        k: i32,
        r: i32,
    );
    pub fn low_rank_project_bf16(
        x: *const bf16,
        m: *const f32,
        partial: *mut f32,
        n: i32,
        k: i32,
        r: i32,
    );
    pub fn low_rank_add_product_f32(
        y: *const f32,
        l: *const f32,
        m: *const f32,
        out: *mut f32,
        n: i32,
        c: i32,
        r: i32,
    );
    pub fn low_rank_add_product_bf16(
        y: *const bf16,
        l: *const f32,
        m: *const f32,
        out: *mut bf16,
        n: i32,
        c: i32,
        r: i32,
    );
    pub fn low_rank_add_product_to_f32(
        y: *const f32,
        l: *const f32,
        m: *const f32,
        acc: *const f32,
        out: *mut f32,
        n: i32,
        c: i32,
        r: i32,
    );
    pub fn low_rank_add_product_to_bf16(
        y: *const bf16,
        l: *const f32,
        m: *const f32,
        acc: *const bf16,
        out: *mut bf16,
        n: i32,
        c: i32,
        r: i32,
    );
    pub fn low_rank_outer_partial_f32(
        l: *const f32,
        x: *const f32,
        partial: *mut f32,
        n: i32,
        r: i32,
        k: i32,
        rows_per_part: i32,
    );
    pub fn low_rank_outer_partial_bf16(
        l: *const f32,
        x: *const bf16,
        partial: *mut f32,
        n: i32,
        r: i32,
        k: i32,
        rows_per_part: i32,
    );
    pub fn low_rank_project_dropped_f32(
        x: *const f32,
        m: *const f32,
        partial: *mut f32,
        n: i32,
        k: i32,
        r: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_add_dropped_product_f32(
        y: *const f32,
        l: *const f32,
        m: *const f32,
        out: *mut f32,
        n: i32,
        c: i32,
        r: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_add_dropped_product_to_f32(
        y: *const f32,
        l: *const f32,
        m: *const f32,
        acc: *const f32,
        out: *mut f32,
        n: i32,
        c: i32,
        r: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_outer_partial_dropped_f32(
        l: *const f32,
        x: *const f32,
        partial: *mut f32,
        n: i32,
        r: i32,
        k: i32,
        rows_per_part: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_project_dropped_bf16(
        x: *const bf16,
        m: *const f32,
        partial: *mut f32,
        n: i32,
        k: i32,
        r: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_add_dropped_product_bf16(
        y: *const bf16,
        l: *const f32,
        m: *const f32,
        out: *mut bf16,
        n: i32,
        c: i32,
        r: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_add_dropped_product_to_bf16(
        y: *const bf16,
        l: *const f32,
        m: *const f32,
        acc: *const bf16,
        out: *mut bf16,
        n: i32,
        c: i32,
        r: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_outer_partial_dropped_bf16(
        l: *const f32,
        x: *const bf16,
        partial: *mut f32,
        n: i32,
        r: i32,
        k: i32,
        rows_per_part: i32,
        key: u64,
        threshold: u32,
        scale: f32,
    );
    pub fn low_rank_sum_parts_f32(partial: *const f32, out: *mut f32, parts: i32, len: i64);

    // The multi-tensor kernels take a table of helix_kernels::launch::AdamWTensor or
    // SquaresTensor entries (host addresses here).
    pub fn adamw_f32(list: *const AdamWTensor, count: i32, k: AdamWConstants);
    pub fn adamw_bf16(list: *const AdamWTensor, count: i32, k: AdamWConstants);

    pub fn sum_squares_f32(list: *const SquaresTensor, count: i32, partial: *mut f32);
}

/// The FlashAttention entry points of one storage type and head dimension.
#[derive(Clone, Copy)]
pub struct Flash<T> {
    /// 64 query rows a block ([`helix_kernels::launch::FlashKernel::Forward`]).
    pub forward: FlashForward<T>,
    /// 128 query rows a block ([`helix_kernels::launch::FlashKernel::ForwardWide`]).
    pub forward_wide: FlashForward<T>,
    pub dq: FlashDq<T>,
    pub dkdv: FlashDkDv<T>,
    pub delta: FlashDelta<T>,
}

pub type FlashForward<T> = unsafe extern "C" fn(
    q: *const T,
    k: *const T,
    v: *const T,
    seg: *const u32,
    ordered: i32,
    out: *mut T,
    lse: *mut f32,
    s: i32,
    hq: i32,
    hkv: i32,
    scale: f32,
    qs: Strides,
    ks: Strides,
    vs: Strides,
    os: Strides,
);

pub type FlashDq<T> = unsafe extern "C" fn(
    q: *const T,
    k: *const T,
    v: *const T,
    seg: *const u32,
    ordered: i32,
    dout: *const T,
    lse: *const f32,
    delta: *const f32,
    dq: *mut T,
    s: i32,
    hq: i32,
    hkv: i32,
    scale: f32,
    qs: Strides,
    ks: Strides,
    vs: Strides,
    dos: Strides,
    dqs: Strides,
);

pub type FlashDkDv<T> = unsafe extern "C" fn(
    q: *const T,
    k: *const T,
    v: *const T,
    seg: *const u32,
    ordered: i32,
    dout: *const T,
    lse: *const f32,
    delta: *const f32,
    dk: *mut T,
    dv: *mut T,
    s: i32,
    hq: i32,
    hkv: i32,
    scale: f32,
    qs: Strides,
    ks: Strides,
    vs: Strides,
    dos: Strides,
    dks: Strides,
    dvs: Strides,
);

pub type FlashDelta<T> = unsafe extern "C" fn(
    out: *const T,
    dout: *const T,
    delta: *mut f32,
    rows: i64,
    s: i32,
    hq: i32,
    d: i32,
    os: Strides,
    dos: Strides,
);

macro_rules! flash_entries {
    ($($fwd:ident $wide:ident $dq:ident $dkdv:ident : $t:ty),* ; $($delta:ident : $dt:ty),*) => {
        extern "C" {
            $(
                fn $fwd(
                    q: *const $t, k: *const $t, v: *const $t, seg: *const u32, ordered: i32,
                    out: *mut $t, lse: *mut f32, s: i32, hq: i32, hkv: i32, scale: f32,
                    qs: Strides, ks: Strides, vs: Strides, os: Strides,
                );
                fn $wide(
                    q: *const $t, k: *const $t, v: *const $t, seg: *const u32, ordered: i32,
                    out: *mut $t, lse: *mut f32, s: i32, hq: i32, hkv: i32, scale: f32,
                    qs: Strides, ks: Strides, vs: Strides, os: Strides,
                );
                fn $dq(
                    q: *const $t, k: *const $t, v: *const $t, seg: *const u32, ordered: i32,
                    dout: *const $t, lse: *const f32, delta: *const f32, dq: *mut $t, s: i32,
                    hq: i32, hkv: i32, scale: f32, qs: Strides, ks: Strides, vs: Strides,
                    dos: Strides, dqs: Strides,
                );
                fn $dkdv(
                    q: *const $t, k: *const $t, v: *const $t, seg: *const u32, ordered: i32,
                    dout: *const $t, lse: *const f32, delta: *const f32, dk: *mut $t,
                    dv: *mut $t, s: i32, hq: i32, hkv: i32, scale: f32, qs: Strides,
                    ks: Strides, vs: Strides, dos: Strides, dks: Strides, dvs: Strides,
                );
            )*
            $(
                fn $delta(
                    out: *const $dt, dout: *const $dt, delta: *mut f32, rows: i64, s: i32,
                    hq: i32, d: i32, os: Strides, dos: Strides,
                );
            )*
        }
    };
}

flash_entries!(
    flash_forward_bf16_d64 flash_forward_wide_bf16_d64 flash_backward_dq_bf16_d64 flash_backward_dkdv_bf16_d64 : bf16,
    flash_forward_bf16_d128 flash_forward_wide_bf16_d128 flash_backward_dq_bf16_d128 flash_backward_dkdv_bf16_d128 : bf16,
    flash_forward_f16_d64 flash_forward_wide_f16_d64 flash_backward_dq_f16_d64 flash_backward_dkdv_f16_d64 : f16,
    flash_forward_f16_d128 flash_forward_wide_f16_d128 flash_backward_dq_f16_d128 flash_backward_dkdv_f16_d128 : f16;
    flash_delta_bf16 : bf16, flash_delta_f16 : f16
);

/// A 16-bit storage type the FlashAttention kernels take.
pub trait FlashElement: Copy + Send + Sync + 'static {
    /// The entry points for head dimension 64 or 128.
    fn flash(head_dim: usize) -> Flash<Self>;
}

macro_rules! flash_element {
    ($t:ty, $delta:ident, $($d:literal => $fwd:ident $wide:ident $dq:ident $dkdv:ident),*) => {
        impl FlashElement for $t {
            fn flash(head_dim: usize) -> Flash<Self> {
                match head_dim {
                    $($d => Flash {
                        forward: $fwd,
                        forward_wide: $wide,
                        dq: $dq,
                        dkdv: $dkdv,
                        delta: $delta,
                    },)*
                    d => panic!("no FlashAttention kernel for head_dim {d}"),
                }
            }
        }
    };
}

flash_element!(bf16, flash_delta_bf16,
    64 => flash_forward_bf16_d64 flash_forward_wide_bf16_d64 flash_backward_dq_bf16_d64 flash_backward_dkdv_bf16_d64,
    128 => flash_forward_bf16_d128 flash_forward_wide_bf16_d128 flash_backward_dq_bf16_d128 flash_backward_dkdv_bf16_d128);
flash_element!(f16, flash_delta_f16,
    64 => flash_forward_f16_d64 flash_forward_wide_f16_d64 flash_backward_dq_f16_d64 flash_backward_dkdv_f16_d64,
    128 => flash_forward_f16_d128 flash_forward_wide_f16_d128 flash_backward_dq_f16_d128 flash_backward_dkdv_f16_d128);
