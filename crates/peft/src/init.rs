//! Parameter initialisation with the distributions PyTorch uses, from helix's own seeded RNG
//! (the values differ from torch's; the distributions do not).

use candle_core::{Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generator per parameter, from the run's seed and the parameter's name, so values do not
/// depend on the order in which layers are built.
pub fn rng_for(seed: u64, name: &str) -> StdRng {
    StdRng::seed_from_u64(seed ^ fnv1a(name))
}

pub use helix_model::weights::fnv1a;

/// U(−bound, bound): `nn.Linear` weights and biases use bound = 1/√fan_in (Kaiming-uniform with
/// a = √5), `nn.LSTM` uses 1/√hidden, PEFT's `lora_A` 1/√in.
pub fn uniform(rng: &mut StdRng, shape: &[usize], bound: f64, dev: &Device) -> Result<Var> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
}

/// N(0, 1), as `nn.Embedding` (Box–Muller).
pub fn standard_normal(rng: &mut StdRng, shape: &[usize], dev: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        v.push((r * t.cos()) as f32);
        v.push((r * t.sin()) as f32);
    }
    v.truncate(n);
    Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_have_their_moments() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = rng_for(3, "x");
        let n = standard_normal(&mut rng, &[20_000], &dev)?
            .as_tensor()
            .to_vec1::<f32>()?;
        let mean = n.iter().sum::<f32>() / n.len() as f32;
        let var = n.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n.len() as f32;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        let u = uniform(&mut rng, &[20_000], 0.5, &dev)?
            .as_tensor()
            .to_vec1::<f32>()?;
        assert!(u.iter().all(|x| x.abs() < 0.5));
        let var = u.iter().map(|x| x * x).sum::<f32>() / u.len() as f32;
        assert!((var - 0.25 / 3.0).abs() < 0.005, "{var}");
        // Same name, same values; another name, others.
        let a = uniform(&mut rng_for(1, "a"), &[4], 1.0, &dev)?;
        let a2 = uniform(&mut rng_for(1, "a"), &[4], 1.0, &dev)?;
        let b = uniform(&mut rng_for(1, "b"), &[4], 1.0, &dev)?;
        let v = |x: &Var| x.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&a2));
        assert_ne!(v(&a), v(&b));
        Ok(())
    }
}
