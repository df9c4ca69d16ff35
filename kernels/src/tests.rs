//! The CPU references against the unfused definition (plain candle ops, which the parity tests
//! compare with transformers): forward and gradients, f32 and bf16.

use candle_core::Device;

use crate::check::{cases, compare, run, tolerance, Implementation};

#[test]
fn cpu_references_match_the_unfused_ops() {
    for case in cases() {
        let want = run(&case, Implementation::Unfused, &Device::Cpu).unwrap();
        let got = run(&case, Implementation::Fused, &Device::Cpu).unwrap();
        for (name, diff, scale) in compare(&want, &got).unwrap() {
            println!("{} {name}: max |Δ| {diff:.3e} of {scale:.3e}", case.label());
            assert!(scale > 0.0, "{}: {name} is zero", case.label());
            assert!(
                diff <= tolerance(case.dtype) * scale,
                "{} {name}: differs by {diff} of {scale}",
                case.label()
            );
        }
    }
}

#[test]
fn a_storage_of_the_wrong_type_is_named_in_the_error() {
    use candle_core::{CpuStorage, Layout};
    let storage = CpuStorage::BF16(vec![half::bf16::ONE; 4]);
    let layout = Layout::contiguous(4);
    let err = crate::elem::packed_as::<f32>(&storage, &layout, "probs: stats").unwrap_err();
    assert_eq!(err.to_string(), "probs: stats must be F32, not BF16");
    let ok = crate::elem::packed_as::<half::bf16>(&storage, &layout, "x").unwrap();
    assert_eq!(ok.len(), 4);
}

#[test]
fn the_automatic_forward_tile_is_wide_only_on_a_grid_that_fills_the_gpu_twice() {
    use crate::launch::{FlashKernel, ForwardTile};
    // An H100's 132 SMs. A Llama-2-7B layer at 2,048 tokens: 32 heads × 16 wide tiles = 512.
    assert_eq!(
        ForwardTile::Auto.kernel(2048, 32, 132),
        FlashKernel::ForwardWide
    );
    // A SmolLM2 batch: 4 × 9 heads × 2 wide tiles = 72 blocks, under 264.
    assert_eq!(ForwardTile::Auto.kernel(256, 36, 132), FlashKernel::Forward);
    // 264 exactly is two a SM.
    assert_eq!(
        ForwardTile::Auto.kernel(256, 132, 132),
        FlashKernel::ForwardWide
    );
    assert_eq!(
        ForwardTile::Rows64.kernel(2048, 32, 132),
        FlashKernel::Forward
    );
    assert_eq!(
        ForwardTile::Rows128.kernel(256, 1, 132),
        FlashKernel::ForwardWide
    );
}
