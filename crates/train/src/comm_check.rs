//! `helix-train comm-check`: every collective the trainer uses, on the job's own groups and
//! backend (NCCL on GPUs, TCP on CPUs), against values each rank can work out alone; then the
//! all-reduce bandwidth in nccl-tests' terms (algorithm and bus bandwidth). Run it through the
//! launcher or srun like training: `helix-train --nproc-per-node 8 comm-check --tp 8`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use helix_ops::Collective;
use helix_parallel::Job;

pub struct CommCheckOptions {
    /// Tensor-parallel group size (the rest of the world is data-parallel).
    pub tp: usize,
    /// Size of the timed all-reduce, in MiB of f32.
    pub megabytes: f64,
    /// Timed all-reduces per group (0: no timing).
    pub repeats: usize,
    pub timeout: Duration,
}

/// Runs the checks on this rank; every rank prints its own mismatches, rank 0 the summary.
/// Returns whether every result was exact.
pub fn comm_check(opts: &CommCheckOptions) -> Result<bool> {
    if opts.tp == 0 {
        anyhow::bail!("--tp must be at least 1");
    }
    Job::from_env(opts.timeout, opts.tp)?.run(|job| check_rank(opts, job))
}

/// This rank's part of [`comm_check`].
fn check_rank(opts: &CommCheckOptions, job: &mut Job) -> Result<bool> {
    let device = crate::device(job.local_rank)?;
    job.use_device(&device)?;
    let main = job.is_main();
    if main {
        println!(
            "{} rank(s): tensor parallel {} × data parallel {}, collectives over {}",
            job.world,
            job.tp.size,
            job.dp.size,
            job.backend()
        );
    }
    let mut failures = Vec::new();
    for (name, group) in job.tensor_groups() {
        for dtype in [DType::F32, DType::BF16] {
            failures.extend(check_group(name, group, dtype, &device)?);
        }
    }
    failures.extend(check_buckets(job, &device)?);
    for f in &failures {
        eprintln!("rank {}: {f}", job.rank);
    }
    let mut bad = [failures.len() as f64];
    job.sum_all_f64(&mut bad)?;
    if main {
        println!(
            "all-reduce (sum, max), all-gather, reduce-scatter, bucketed all-reduce, \
             reduce-scatter and all-gather by owner: {}",
            match bad[0] {
                0.0 => "every result exact".to_string(),
                n => format!("{n} mismatch(es), listed by rank above"),
            }
        );
    }
    if opts.repeats > 0 {
        for (name, group) in job.tensor_groups() {
            if group.size() == 1 && job.backend() != "nccl" {
                if main {
                    println!("{name}: one rank, nothing to time");
                }
                continue;
            }
            let (seconds, bytes) = time_all_reduce(group, opts, &device)?;
            if main {
                let n = group.size() as f64;
                let algbw = bytes / seconds / 1e9;
                println!(
                    "{name} all-reduce of {:.1} MiB over {} rank(s): median {:.3} ms, \
                     algbw {algbw:.2} GB/s, busbw {:.2} GB/s",
                    bytes / (1 << 20) as f64,
                    group.size(),
                    seconds * 1e3,
                    algbw * 2.0 * (n - 1.0) / n
                );
            }
        }
    }
    Ok(bad[0] == 0.0)
}

/// The tensor-parallel collectives (the model's `Collective`) on one group, in `dtype`; small
/// integers, so sums are exact in bf16 too.
fn check_group(
    name: &str,
    g: &dyn Collective,
    dtype: DType,
    device: &Device,
) -> Result<Vec<String>> {
    let (r, n) = (g.rank() as f32, g.size() as f32);
    let mut out = Vec::new();
    let base: Vec<f32> = (0..15).map(|i| (i % 7 + 1) as f32).collect();
    let make = |v: Vec<f32>, shape: (usize, usize)| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    };

    let mine = make(base.iter().map(|b| (r + 1.0) * b).collect(), (3, 5))?;
    let want: Vec<f32> = base.iter().map(|b| n * (n + 1.0) / 2.0 * b).collect();
    out.extend(differs(
        &format!("{name} all-reduce sum {dtype:?}"),
        &g.all_reduce_sum(&mine)?,
        &want,
    )?);

    let mine = make((0..15).map(|i| r * 10.0 + i as f32).collect(), (3, 5))?;
    let want: Vec<f32> = (0..15).map(|i| (n - 1.0) * 10.0 + i as f32).collect();
    out.extend(differs(
        &format!("{name} all-reduce max {dtype:?}"),
        &g.all_reduce_max(&mine)?,
        &want,
    )?);

    // Gathered along dimension 1 of (2, 3) pieces: row i holds every rank's row i in turn.
    let mine = make((0..6).map(|i| r * 100.0 + i as f32).collect(), (2, 3))?;
    let mut want = Vec::new();
    for row in 0..2 {
        for rank in 0..g.size() {
            want.extend((0..3).map(|c| rank as f32 * 100.0 + (row * 3 + c) as f32));
        }
    }
    out.extend(differs(
        &format!("{name} all-gather {dtype:?}"),
        &g.all_gather(&mine, 1)?,
        &want,
    )?);

    // Sequence parallelism's reduce-scatter: (2n, 3) rows, rank k keeping rows 2k and 2k + 1
    // summed; every rank sends (rank + 1) × the row's index and column.
    let rows = 2 * g.size();
    let value = |row: usize, c: usize| (row * 3 + c + 1) as f32;
    let all = (0..rows * 3).map(|i| (r + 1.0) * value(i / 3, i % 3));
    let mine = make(all.collect(), (rows, 3))?;
    let rank = g.rank();
    let want: Vec<f32> = (2 * rank..2 * rank + 2)
        .flat_map(|row| (0..3).map(move |c| n * (n + 1.0) / 2.0 * value(row, c)))
        .collect();
    out.extend(differs(
        &format!("{name} reduce-scatter {dtype:?}"),
        &g.reduce_scatter_sum(&mine)?,
        &want,
    )?);
    Ok(out)
}

/// The data-parallel gradient paths: bucketed all-reduce, and ZeRO-1's reduce-scatter then
/// all-gather by owner, with buckets small enough that each holds a few tensors.
fn check_buckets(job: &Job, device: &Device) -> Result<Vec<String>> {
    let (r, n) = (job.dp.index as f32, job.dp.size as f32);
    let sizes = [5usize, 1, 12, 7, 3, 9, 4];
    let grads = || -> Result<Vec<Tensor>> {
        sizes
            .iter()
            .enumerate()
            .map(|(k, &len)| {
                let v: Vec<f32> = (0..len)
                    .map(|i| (r + 1.0) * (k + 1) as f32 + i as f32)
                    .collect();
                Ok(Tensor::from_vec(v, len, device)?)
            })
            .collect()
    };
    // Summed over ranks: n(n+1)/2 · (k+1) + n · i.
    let sum = |k: usize, len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| n * (n + 1.0) / 2.0 * (k + 1) as f32 + n * i as f32)
            .collect()
    };
    let mut out = Vec::new();
    let mut tensors = grads()?;
    job.all_reduce_tensors(&mut tensors, 16)?;
    for (k, t) in tensors.iter().enumerate() {
        out.extend(differs(
            &format!("bucketed all-reduce, tensor {k}"),
            t,
            &sum(k, sizes[k]),
        )?);
    }
    // Owners ascending, as the optimizer sorts them; with more ranks than tensors some own none.
    let owners: Vec<usize> = (0..sizes.len())
        .map(|k| k * job.dp.size / sizes.len())
        .collect();
    let mut tensors = grads()?;
    job.reduce_scatter_tensors(&mut tensors, &owners, 16)?;
    for (k, t) in tensors.iter().enumerate() {
        if owners[k] == job.dp.index {
            out.extend(differs(
                &format!("reduce-scatter, owned tensor {k}"),
                t,
                &sum(k, sizes[k]),
            )?);
        }
    }
    job.all_gather_tensors(&mut tensors, &owners, 16)?;
    for (k, t) in tensors.iter().enumerate() {
        out.extend(differs(
            &format!("all-gather by owner, tensor {k}"),
            t,
            &sum(k, sizes[k]),
        )?);
    }
    Ok(out)
}

/// A mismatch message if `got` is not exactly `want`.
fn differs(what: &str, got: &Tensor, want: &[f32]) -> Result<Option<String>> {
    let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if got.len() != want.len() {
        return Ok(Some(format!(
            "{what}: {} elements, expected {}",
            got.len(),
            want.len()
        )));
    }
    Ok(got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .map(|i| format!("{what}: element {i} is {}, expected {}", got[i], want[i])))
}

/// Median seconds of one all-reduce of `opts.megabytes` MiB on `g`, and its bytes.
fn time_all_reduce(
    g: &dyn Collective,
    opts: &CommCheckOptions,
    device: &Device,
) -> Result<(f64, f64)> {
    let elems = ((opts.megabytes * (1 << 20) as f64) / 4.0).round() as usize;
    if elems == 0 {
        bail!("--megabytes {} is less than one f32", opts.megabytes);
    }
    let x = Tensor::ones(elems, DType::F32, device)?;
    g.all_reduce_sum(&x)?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(opts.repeats);
    for _ in 0..opts.repeats {
        let t = Instant::now();
        g.all_reduce_sum(&x)?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let median = crate::progress::median(times).context("no timed all-reduce")?;
    Ok((median, (elems * 4) as f64))
}
