//! exp for the CPU loops of the softmax kernels: branch-free, so the compiler vectorises the
//! loops that call it, where libm's `expf` is a call per element and takes a slow path (it
//! sets errno) for every underflowing argument, as the −1e30 of a masked score is. On the
//! SmolLM2 step the libm calls were 9 % of the time.
//!
//! Cody–Waite range reduction x = n ln 2 + r, |r| ≤ ln 2 / 2, then a degree-6 polynomial
//! for exp(r) (the classic Cephes coefficients) scaled by 2ⁿ, built in exponent bits as two
//! halves so that subnormal results (x below −87.3) and the top binade (up to ln f32::MAX)
//! come out right: within 2 units in the last place of the correctly rounded value
//! (`tests`). Arguments below −104 give 0, above ln f32::MAX infinity.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: the high one has few enough bits that n · LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x in f32 (see the module notes for its accuracy and range).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // ln f32::MAX: above it e^x is not finite.
    const LN_MAX: f32 = 88.722_84;
    let overflow = x > LN_MAX;
    // Below −104 every result rounds to 0; n stays within [−150, 128].
    let xc = x.clamp(-104.0, LN_MAX);
    // n = round(x log2 e) by the float trick (adding 1.5 · 2²³ leaves the integer part in
    // the low mantissa bits): plain SSE2 arithmetic, where floor is a libm call without SSE4.1.
    const ROUND: f32 = 12_582_912.0;
    let t = xc * LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r2 + r + 1.0;
    // 2ⁿ as 2ʰ · 2ⁿ⁻ʰ, h = ⌊n / 2⌋, each a normal power of two built from its exponent bits
    // (the second product rounds once into the subnormals); n is read from t's low mantissa
    // bits: integer arithmetic that vectorises.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let h = n_int >> 1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = e * pow2(h) * pow2(n_int - h);
    // NaN stays NaN through the arithmetic above.
    if overflow {
        f32::INFINITY
    } else {
        y
    }
}

/// Σ_j exp(x_j − m) over a row, in eight running sums (the lanes a vectorised loop adds in),
/// then the tail. On a slice, not a closure over indices: an indexed read the compiler could
/// not prove in bounds kept the loop scalar (3 ns per score element on the attention softmax).
#[inline(always)]
pub(crate) fn sum_exp(xs: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|x| exp(x - m)).sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += exp(x - m);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The maximum of a row (−∞ for none), in eight running maxima like [`sum_exp`].
#[inline(always)]
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.max(*x);
        }
    }
    tail.iter()
        .copied()
        .chain(acc)
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::exp;

    /// Units in the last place between `got` and the f64 value rounded to f32.
    fn ulps(got: f32, x: f32) -> i64 {
        let want = (x as f64).exp() as f32;
        (got.to_bits() as i64 - want.to_bits() as i64).abs()
    }

    #[test]
    fn within_two_ulps_over_the_whole_range() {
        let mut worst = (0, 0f32);
        let mut x = -103.5f32;
        while x < 88.72 {
            let u = ulps(exp(x), x);
            if u > worst.0 {
                worst = (u, x);
            }
            x += 0.000_731;
        }
        println!("worst: {} ulps at x = {}", worst.0, worst.1);
        assert!(worst.0 <= 2, "{} ulps at x = {}", worst.0, worst.1);
    }

    #[test]
    fn edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-110.0), 0.0);
        assert!(exp(-100.0) > 0.0 && exp(-100.0) < f32::MIN_POSITIVE);
        assert!(exp(88.72).is_finite() && exp(88.72) > 3.3e38);
        assert_eq!(exp(88.73), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.0).is_finite() && exp(88.0) > 1.6e38);
    }
}
