//! Multi-process training for helix: where a process stands in a job ([`env`]), the rank-0
//! rendezvous store and failure detector ([`store`]), the collectives of the CPU backend over
//! TCP ([`tcp`]), data-parallel gradient reduction ([`Job::all_reduce_tensors`]) and the
//! torchrun-style launcher ([`launch`]); with the `nccl` feature, the GPU backend (`nccl`).
//! See docs/architecture.md.

pub mod env;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod store;
pub mod tcp;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

pub use env::ProcessEnv;
pub use store::{Heartbeat, StoreClient, StoreServer};
pub use tcp::TcpRing;

/// This process's place in the job and its communicators, on a grid of `tp × dp` ranks:
/// tensor-parallel groups are consecutive ranks (inside a node, where NVSwitch is), data-parallel
/// groups take one rank of each. A single process is a job of one, whose collectives return
/// their input.
pub struct Job {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// The ranks splitting one model (Megatron tensor parallelism).
    pub tp: Arc<TcpRing>,
    /// The ranks holding the same shards and different data.
    pub dp: TcpRing,
    store: Option<StoreClient>,
    server: Option<StoreServer>,
    heartbeat: Option<Heartbeat>,
    timeout: Duration,
    token: String,
    /// With NCCL, the same groups on the GPU, after [`Self::use_device`].
    #[cfg(feature = "nccl")]
    nccl: Option<nccl::NcclGroups>,
}

impl Job {
    /// Joins the job the environment describes (none: a single process) with tensor-parallel
    /// groups of `tp` ranks; `timeout` bounds every wait on another rank.
    pub fn from_env(timeout: Duration, tp: usize) -> Result<Self> {
        match ProcessEnv::from_env()? {
            None if tp > 1 => bail!(
                "parallel.tensor_parallel = {tp} needs {tp} ranks or a multiple (launch with \
                 --nproc-per-node, srun, or torchrun's variables)"
            ),
            None => Ok(Self::single(timeout)),
            Some(env) => Self::join(&env, timeout, tp),
        }
    }

    pub fn single(timeout: Duration) -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            tp: Arc::new(TcpRing::solo()),
            dp: TcpRing::solo(),
            store: None,
            server: None,
            heartbeat: None,
            timeout,
            token: String::new(),
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    pub fn join(env: &ProcessEnv, timeout: Duration, tp: usize) -> Result<Self> {
        if tp == 0 || !env.world_size.is_multiple_of(tp) {
            bail!(
                "parallel.tensor_parallel = {tp} does not divide the {} ranks of the job",
                env.world_size
            );
        }
        let server = if env.rank == 0 {
            Some(
                StoreServer::start(env.master_port, &env.token, timeout).with_context(|| {
                    format!("rank 0 serves the rendezvous on port {}", env.master_port)
                })?,
            )
        } else {
            None
        };
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let store = StoreClient::connect(&addr, &env.token, env.rank, timeout)
            .with_context(|| format!("joining the job at {addr} ({} variables)", env.source))?;
        let heartbeat = store.start_heartbeat(
            &env.token,
            server.as_ref().map(|s| s.told_waiter(env.world_size)),
        )?;
        // The heartbeat names a silent rank after `timeout`; the rings' own timeout is a
        // backstop that must not fire first with a vaguer message.
        let [(tp_name, tp_ranks), (dp_name, dp_ranks)] =
            grid_groups(env.rank, tp, env.world_size / tp);
        let join = |name: &str, ranks: &[usize]| {
            TcpRing::join(
                &store,
                name,
                ranks,
                env.rank,
                &env.token,
                &env.master_addr,
                2 * timeout,
            )
        };
        let tp_ring = join(&tp_name, &tp_ranks)?;
        let dp = join(&dp_name, &dp_ranks)?;
        store.barrier("joined", env.world_size)?;
        Ok(Self {
            rank: env.rank,
            world: env.world_size,
            local_rank: env.local_rank,
            tp: Arc::new(tp_ring),
            dp,
            store: Some(store),
            server,
            heartbeat: Some(heartbeat),
            timeout,
            token: env.token.clone(),
            #[cfg(feature = "nccl")]
            nccl: None,
        })
    }

    /// Makes the job's tensor collectives run where `device` is. On a GPU of a build with the
    /// `nccl` feature, NCCL groups over the same ranks take over every tensor (tensor-parallel
    /// activations, data-parallel gradient buckets) while host scalars keep the TCP rings.
    /// Otherwise, a no-op: tensors travel through host memory over TCP.
    pub fn use_device(&mut self, device: &Device) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let (true, Some(store)) = (device.is_cuda(), &self.store) {
            let [(tp_name, tp_ranks), (dp_name, dp_ranks)] =
                grid_groups(self.rank, self.tp.size, self.dp.size);
            let groups = nccl::NcclGroups::join(
                store,
                (&tp_name, &tp_ranks),
                (&dp_name, &dp_ranks),
                self.rank,
                device,
            )
            .with_context(|| format!("rank {} joins its NCCL groups", self.rank))?;
            self.nccl = Some(groups);
        }
        let _ = device;
        Ok(())
    }

    /// What carries tensors between ranks: "nccl", "tcp", or "none" for a job of one.
    pub fn backend(&self) -> &'static str {
        #[cfg(feature = "nccl")]
        if self.nccl.is_some() {
            return "nccl";
        }
        if self.store.is_some() {
            "tcp"
        } else {
            "none"
        }
    }

    /// The tensor collectives of the tensor-parallel and data-parallel groups, whatever
    /// their size (for `helix-train comm-check`).
    pub fn tensor_groups(&self) -> [(&'static str, &dyn helix_ops::Collective); 2] {
        #[cfg(feature = "nccl")]
        if let Some(g) = &self.nccl {
            return [("tp", g.tp.as_ref()), ("dp", &g.dp)];
        }
        [("tp", self.tp.as_ref()), ("dp", &self.dp)]
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Sums f64 scalars (losses, token counts) over the data-parallel group.
    pub fn sum_f64(&self, xs: &mut [f64]) -> Result<()> {
        self.dp.all_reduce_sum(xs)
    }

    /// Sums f64 scalars over every rank of the job.
    pub fn sum_all_f64(&self, xs: &mut [f64]) -> Result<()> {
        self.dp.all_reduce_sum(xs)?;
        self.tp.all_reduce_sum(xs)
    }

    /// The tensor-parallel group as the model takes it (`None` without tensor parallelism).
    pub fn tensor_parallel(&self) -> Option<helix_ops::SharedCollective> {
        if self.tp.size == 1 {
            return None;
        }
        #[cfg(feature = "nccl")]
        if let Some(g) = &self.nccl {
            return Some(g.tp.clone() as helix_ops::SharedCollective);
        }
        Some(self.tp.clone() as helix_ops::SharedCollective)
    }

    /// Sums `tensors` (f32) over the data-parallel group in buckets of at most
    /// `bucket_elems` elements: few large messages instead of one per tensor.
    pub fn all_reduce_tensors(&self, tensors: &mut [Tensor], bucket_elems: usize) -> Result<()> {
        self.bucketed(tensors, bucket_elems, BucketOp::AllReduce)
    }

    /// ZeRO-1's gradient reduction: `tensors` (f32) are sorted by their owner `owners[i]` (a
    /// data-parallel rank); each rank ends with the full sums of the tensors it owns, the
    /// others hold partial sums. Half the traffic of an all-reduce.
    pub fn reduce_scatter_tensors(
        &self,
        tensors: &mut [Tensor],
        owners: &[usize],
        bucket_elems: usize,
    ) -> Result<()> {
        self.bucketed(tensors, bucket_elems, BucketOp::ReduceScatter(owners))
    }

    /// After a ZeRO-1 step: every tensor (f32, sorted by owner as for
    /// [`Self::reduce_scatter_tensors`]) as its owner holds it, on every data-parallel rank.
    pub fn all_gather_tensors(
        &self,
        tensors: &mut [Tensor],
        owners: &[usize],
        bucket_elems: usize,
    ) -> Result<()> {
        self.bucketed(tensors, bucket_elems, BucketOp::AllGather(owners))
    }

    /// Runs `op` on the data-parallel group over buckets of consecutive tensors of at most
    /// `bucket_elems` elements (one tensor may exceed it), each flattened to one f32 message:
    /// on the GPU with NCCL, or through host memory over TCP.
    fn bucketed(&self, tensors: &mut [Tensor], bucket_elems: usize, op: BucketOp) -> Result<()> {
        if self.dp.size == 1 {
            return Ok(());
        }
        if let Some(t) = tensors.iter().find(|t| t.dtype() != DType::F32) {
            bail!(
                "data-parallel collectives take f32 tensors, got {:?}",
                t.dtype()
            );
        }
        for range in buckets(tensors, bucket_elems) {
            let counts: Vec<usize> = tensors[range.clone()]
                .iter()
                .map(|t| t.elem_count())
                .collect();
            let parts = match op {
                BucketOp::AllReduce => Vec::new(),
                BucketOp::ReduceScatter(owners) | BucketOp::AllGather(owners) => {
                    owner_parts(&counts, &owners[range.clone()], self.dp.size)?
                }
            };
            let bucket = &mut tensors[range];
            #[cfg(feature = "nccl")]
            if let Some(g) = &self.nccl {
                let flat = bucket
                    .iter()
                    .map(|t| t.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let flat = Tensor::cat(&flat, 0)?;
                let out = match op {
                    BucketOp::AllReduce => g.dp.all_reduce_flat(&flat)?,
                    BucketOp::ReduceScatter(_) => g.dp.reduce_scatter_parts(&flat, &parts)?,
                    BucketOp::AllGather(_) => g.dp.all_gather_parts(&flat, &parts)?,
                };
                unflatten(&out, bucket)?;
                continue;
            }
            let mut flat = Vec::with_capacity(counts.iter().sum());
            for t in bucket.iter() {
                flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
            }
            match op {
                BucketOp::AllReduce => self.dp.all_reduce_sum(&mut flat)?,
                BucketOp::ReduceScatter(_) => self.dp.reduce_scatter_sum(&mut flat, &parts)?,
                BucketOp::AllGather(_) => self.dp.all_gather_parts(&mut flat, &parts)?,
            }
            unflatten(
                &Tensor::from_vec(flat, counts.iter().sum::<usize>(), bucket[0].device())?,
                bucket,
            )?;
        }
        Ok(())
    }

    /// Rank 0's `text` on every rank (e.g. which checkpoint to resume from): along rank 0's
    /// data-parallel group, then along every tensor-parallel group.
    pub fn broadcast_text(&self, text: &str) -> Result<String> {
        let mut text = text.to_string();
        if self.tp.index == 0 {
            text = broadcast_on(&self.dp, &text)?;
        }
        broadcast_on(&self.tp, &text)
    }

    /// A new connection to the job's store for a thread of this rank (`None` alone), whose
    /// waits may last `timeout`.
    pub fn store_connection(&self, timeout: Duration) -> Result<Option<StoreClient>> {
        self.store
            .as_ref()
            .map(|s| s.another(&self.token, timeout))
            .transpose()
    }

    /// Waits for every rank.
    pub fn barrier(&self, name: &str) -> Result<()> {
        match &self.store {
            Some(s) => s.barrier(name, self.world),
            None => Ok(()),
        }
    }

    /// Runs `work`, this rank's part of the job, then ends the job: cleanly ([`Self::finish`])
    /// when it succeeds; on its error, by failing the job with it, so every rank's log names
    /// the rank and the cause (a missing path on one node, say), not only a lost connection.
    pub fn run<T>(mut self, work: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        match work(&mut self) {
            Ok(t) => {
                self.finish();
                Ok(t)
            }
            Err(e) if self.world > 1 => {
                let rank = self.rank;
                let mine = format!("{e:#}");
                Err(match self.fail(&mine) {
                    // Another rank's failure came first: this error is its echo (a ring
                    // peer gone, a wait cut short), so the cause is what every rank says.
                    Some(first) if !mine.contains(&first) => {
                        anyhow!("rank {rank}: the job failed: {first} (here: {mine})")
                    }
                    _ => e.context(format!("rank {rank}")),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Fails the job with this rank's `error` (see [`Self::run`]), unless it has already
    /// failed: then that first failure is returned. Rank 0, whose exit takes the store and
    /// the message with it, first waits briefly for the others to hear it.
    fn fail(mut self, error: &str) -> Option<String> {
        const MAX_MESSAGE: usize = 16 * 1024;
        let store = self.store.as_ref()?;
        // This rank reports its own error; its heartbeat must not exit with an echo of it.
        if let Some(h) = &self.heartbeat {
            h.silence();
        }
        // A peer that died (killed, out of memory) fails the job as its connection drops, at
        // about the moment this rank's ring to it breaks: give the store that moment, so the
        // symptom is not recorded as the cause.
        let mut first = None;
        for _ in 0..5 {
            first = store.failure().ok().flatten();
            if first.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if first.is_none() {
            let mut end = error.len().min(MAX_MESSAGE);
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            let _ = store.fail(&error[..end]);
        }
        if let Some(h) = self.heartbeat.take() {
            h.goodbye();
        }
        if let Some(server) = self.server.take() {
            server.wait_until_told(self.world, store::TELL_TIMEOUT);
        }
        first
    }

    /// Ends the job cleanly: this rank says goodbye to the store, and rank 0 keeps serving it
    /// until every rank has.
    pub fn finish(mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.goodbye();
        }
        if let Some(server) = self.server.take() {
            server.wait_for_goodbyes(self.world, self.timeout);
        }
    }
}

/// A data-parallel collective over gradient buckets; ZeRO-1's carry each tensor's owner.
#[derive(Clone, Copy)]
enum BucketOp<'a> {
    AllReduce,
    ReduceScatter(&'a [usize]),
    AllGather(&'a [usize]),
}

/// The rank lists and names of `rank`'s tensor-parallel and data-parallel groups on a grid of
/// `tp` × `dp` ranks (tensor-parallel ranks adjacent): what the TCP rings and the NCCL groups
/// both join.
fn grid_groups(rank: usize, tp: usize, dp: usize) -> [(String, Vec<usize>); 2] {
    let (tp_index, dp_index) = (rank % tp, rank / tp);
    [
        (
            format!("tp{dp_index}"),
            (0..tp).map(|i| dp_index * tp + i).collect(),
        ),
        (
            format!("dp{tp_index}"),
            (0..dp).map(|d| d * tp + tp_index).collect(),
        ),
    ]
}

/// Puts a bucket's collective result `flat` back into its tensors, each its own shape.
fn unflatten(flat: &Tensor, bucket: &mut [Tensor]) -> Result<()> {
    let mut at = 0;
    for t in bucket.iter_mut() {
        let n = t.elem_count();
        *t = flat.narrow(0, at, n)?.reshape(t.shape())?;
        at += n;
    }
    Ok(())
}

/// Consecutive runs of `tensors` of at most `bucket_elems` elements (a larger tensor alone).
fn buckets(tensors: &[Tensor], bucket_elems: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < tensors.len() {
        let mut end = start;
        let mut elems = 0;
        while end < tensors.len()
            && (end == start || elems + tensors[end].elem_count() <= bucket_elems)
        {
            elems += tensors[end].elem_count();
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Each rank's range of a bucket whose tensors have `elems` elements and the given owners
/// (ascending): empty for a rank that owns none of them.
fn owner_parts(
    elems: &[usize],
    owners: &[usize],
    ranks: usize,
) -> Result<Vec<std::ops::Range<usize>>> {
    if owners.windows(2).any(|w| w[0] > w[1]) || owners.iter().any(|&o| o >= ranks) {
        bail!("tensors must be sorted by owner, each owner below {ranks}");
    }
    let mut parts = Vec::with_capacity(ranks);
    let mut at = 0;
    for r in 0..ranks {
        let len: usize = elems
            .iter()
            .zip(owners)
            .filter(|(_, &o)| o == r)
            .map(|(n, _)| n)
            .sum();
        parts.push(at..at + len);
        at += len;
    }
    Ok(parts)
}

fn broadcast_on(ring: &TcpRing, text: &str) -> Result<String> {
    let mut len = [text.len() as u64];
    ring.broadcast(&mut len, 0)?;
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(len[0] as usize, 0);
    ring.broadcast(&mut bytes, 0)?;
    String::from_utf8(bytes).context("a broadcast text is not UTF-8")
}
