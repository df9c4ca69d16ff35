//! The CPU references against the unfused definition (plain candle ops, which the parity tests
//! compare with transformers): forward and gradients, f32 and bf16.

use candle_core::Device;

use crate::check::{cases, compare, run, Implementation};

#[test]
fn cpu_references_match_the_unfused_ops() {
    for case in cases() {
        let want = run(&case, Implementation::Unfused, &Device::Cpu).unwrap();
        let got = run(&case, Implementation::Fused, &Device::Cpu).unwrap();
        for (name, diff, scale) in compare(&want, &got).unwrap() {
            println!("{} {name}: max |Δ| {diff:.3e} of {scale:.3e}", case.label());
            assert!(scale > 0.0, "{}: {name} is zero", case.label());
            assert!(
                diff <= case.tolerance() * scale,
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

#[test]
fn dropped_low_rank_products_equal_the_products_of_dropped_inputs() -> candle_core::Result<()> {
    use crate::dropout::{dropout, dropout_key, DropoutMask};
    use crate::low_rank::*;
    use candle_core::{DType, Tensor};
    let dev = Device::Cpu;
    // Rows past a 64-row block, columns past the 8- and 32-wide passes, ranks past four.
    let (n, k, r) = (70, 45, 6);
    let (p, key) = (0.3, dropout_key(9, 0, 2));
    let mask = DropoutMask::new(p, key)?.expect("p > 0");
    let a = Tensor::randn(0f32, 0.1, (r, k), &dev)?;
    let l = Tensor::randn(0f32, 0.5, (n, r), &dev)?;
    for dtype in [DType::F32, DType::BF16] {
        let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?;
        let y = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?;
        // x dropped in f32 first, as the layer's LoRA path dropped it: the same values, bit
        // for bit (the same loops read the same numbers).
        let x_dropped = dropout(&x.to_dtype(DType::F32)?, p, key)?;
        let same = |what: &str, got: Tensor, want: Tensor| -> candle_core::Result<()> {
            let (got, want) = (
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
            );
            assert_eq!(got, want, "{dtype:?} {what}");
            Ok(())
        };
        same(
            "x Aᵀ",
            project_under(&x, &a, Some(&mask))?,
            project(&x_dropped, &a)?,
        )?;
        same(
            "lᵀ x",
            outer_sum_under(&l, &x, Some(&mask))?,
            outer_sum(&l, &x_dropped)?,
        )?;
        // y + mask ⊙ (l A): y itself where the mask drops, and within rounding of the sum
        // with the product dropped first where it keeps.
        let got = add_product_under(&y, &l, &a, Some(&mask))?.to_dtype(DType::F32)?;
        let product = dropout(&l.matmul(&a)?, p, key)?;
        let want = (y.to_dtype(DType::F32)? + &product)?;
        let (got, want, y32, product) = (
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?,
            y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            product.flatten_all()?.to_vec1::<f32>()?,
        );
        let tol = match dtype {
            DType::F32 => 1e-6,
            _ => 1e-2,
        };
        for i in 0..got.len() {
            match product[i] == 0.0 {
                true => assert_eq!(got[i], y32[i], "{dtype:?} dropped element {i}"),
                false => assert!(
                    (got[i] - want[i]).abs() <= tol * want[i].abs().max(1.0),
                    "{dtype:?} element {i}: {} vs {}",
                    got[i],
                    want[i]
                ),
            }
        }
        let dropped = product.iter().filter(|v| **v == 0.0).count();
        assert!(
            dropped > 0 && dropped < product.len(),
            "{dtype:?}: {dropped} dropped"
        );
    }
    Ok(())
}
