//! The GPU backend: NCCL through cudarc (features `cuda,nccl`), for a group of ranks each with
//! one GPU. The group's first rank makes NCCL's unique id and shares it through the rendezvous
//! store; NCCL itself reads its usual environment (NCCL_IB_HCA, NCCL_SOCKET_IFNAME,
//! NCCL_DEBUG…). Collectives run on the device's stream as candle custom ops, so tensors never
//! leave the GPU.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::store::StoreClient;

/// A communicator over NCCL.
pub struct NcclGroup {
    comm: Mutex<SendComm>,
    rank: usize,
    size: usize,
}

/// cudarc's `Comm` holds NCCL's raw handle, so it is neither Send nor Sync; NCCL allows a
/// communicator to be used from any thread as long as calls are not concurrent, which the
/// mutex around it guarantees.
struct SendComm(Comm);
unsafe impl Send for SendComm {}

impl NcclGroup {
    /// Joins the NCCL group `name` of the global `ranks` (this process is `me`, computing on
    /// `device`).
    pub fn join(
        store: &StoreClient,
        name: &str,
        ranks: &[usize],
        me: usize,
        device: &Device,
    ) -> Result<Self> {
        let rank = ranks
            .iter()
            .position(|&r| r == me)
            .with_context(|| format!("rank {me} is not in NCCL group {name} {ranks:?}"))?;
        let Device::Cuda(cuda) = device else {
            bail!("the NCCL backend needs a CUDA device");
        };
        let key = format!("nccl/{name}/id");
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL unique id: {e:?}"))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes)?;
            id
        } else {
            let bytes = store.get(&key)?;
            if bytes.len() != 128 {
                bail!(
                    "NCCL unique id for {name} has {} bytes, expected 128",
                    bytes.len()
                );
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(&bytes) {
                *d = *s as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, ranks.len(), id).map_err(|e| {
            anyhow::anyhow!(
                "NCCL init of group {name} (rank {rank} of {}): {e:?}",
                ranks.len()
            )
        })?;
        Ok(Self {
            comm: Mutex::new(SendComm(comm)),
            rank,
            size: ranks.len(),
        })
    }

    /// Sums a flat f32 bucket over the group.
    pub fn all_reduce_flat(&self, flat: &Tensor) -> candle_core::Result<Tensor> {
        self.run(flat, Kind::Sum)
    }

    /// ZeRO-1's reduce-scatter of a flat f32 bucket whose rank `r` owns `parts[r]` (parts
    /// adjacent, of any lengths): this rank's part comes back summed over the group, the rest
    /// as it was. NCCL scatters equal pieces, so each part travels padded to the longest.
    pub fn reduce_scatter_parts(
        &self,
        flat: &Tensor,
        parts: &[Range<usize>],
    ) -> candle_core::Result<Tensor> {
        let Some(longest) = longest_part(parts) else {
            return Ok(flat.clone());
        };
        let padded = parts
            .iter()
            .map(|p| pad_to(&flat.narrow(0, p.start, p.len())?, longest))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mine = self.run(&Tensor::cat(&padded, 0)?, Kind::ReduceScatter)?;
        let own = &parts[self.rank];
        let summed = mine.narrow(0, 0, own.len())?;
        let before = flat.narrow(0, 0, own.start)?;
        let after = flat.narrow(0, own.end, flat.dim(0)? - own.end)?;
        Tensor::cat(&[before, summed, after], 0)
    }

    /// After a ZeRO-1 step: the flat f32 bucket with every rank's part `parts[r]` as that
    /// rank holds it (padded to the longest part on the wire, as above).
    pub fn all_gather_parts(
        &self,
        flat: &Tensor,
        parts: &[Range<usize>],
    ) -> candle_core::Result<Tensor> {
        let Some(longest) = longest_part(parts) else {
            return Ok(flat.clone());
        };
        let own = &parts[self.rank];
        let send = pad_to(&flat.narrow(0, own.start, own.len())?, longest)?;
        let all = self.run(&send, Kind::Gather)?;
        let pieces = parts
            .iter()
            .enumerate()
            .map(|(r, p)| all.narrow(0, r * longest, p.len()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&pieces, 0)
    }

    fn run(&self, t: &Tensor, kind: Kind) -> candle_core::Result<Tensor> {
        let dtype = t.dtype();
        // NCCL sums f32 here; 16-bit tensors travel widened (exact for bf16 values).
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        let comm = self.comm.lock().expect("NCCL lock");
        let out = t.apply_op1_no_bwd(&NcclOp {
            comm: &comm.0,
            kind,
            size: self.size,
        })?;
        out.to_dtype(dtype)
    }
}

/// The longest of `parts`, the length each travels padded to; `None` when all are empty.
fn longest_part(parts: &[Range<usize>]) -> Option<usize> {
    parts.iter().map(|p| p.len()).max().filter(|&n| n > 0)
}

/// `t` (1-D) followed by zeros up to `len` elements.
fn pad_to(t: &Tensor, len: usize) -> candle_core::Result<Tensor> {
    let n = t.dim(0)?;
    if n == len {
        return Ok(t.clone());
    }
    let zeros = Tensor::zeros(len - n, t.dtype(), t.device())?;
    Tensor::cat(&[t, &zeros], 0)
}

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Max,
    /// Every rank's tensor stacked along dimension 0.
    Gather,
    /// The sum over the group of this rank's 1/size of the tensor (a flat tensor).
    ReduceScatter,
}

struct NcclOp<'a> {
    comm: &'a Comm,
    kind: Kind,
    size: usize,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "helix-nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take tensors on the GPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL needs a contiguous tensor".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        let n = end - start;
        let nccl = |e| candle_core::Error::Msg(format!("NCCL: {e:?}"));
        match self.kind {
            Kind::Sum | Kind::Max => {
                let op = match self.kind {
                    Kind::Max => ReduceOp::Max,
                    _ => ReduceOp::Sum,
                };
                // SAFETY: every element is written by the all-reduce before it is read.
                let mut out = unsafe { dev.alloc::<f32>(n)? };
                self.comm.all_reduce(&src, &mut out, &op).map_err(nccl)?;
                Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
            }
            Kind::Gather => {
                // SAFETY: the all-gather writes every element.
                let mut out = unsafe { dev.alloc::<f32>(n * self.size)? };
                self.comm.all_gather(&src, &mut out).map_err(nccl)?;
                let mut dims = l.shape().dims().to_vec();
                dims[0] *= self.size;
                Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
            }
            Kind::ReduceScatter => {
                if n % self.size != 0 {
                    candle_core::bail!("reduce-scatter of {n} elements over {} ranks", self.size);
                }
                // SAFETY: the reduce-scatter writes every element of this rank's piece.
                let mut out = unsafe { dev.alloc::<f32>(n / self.size)? };
                self.comm
                    .reduce_scatter(&src, &mut out, &ReduceOp::Sum)
                    .map_err(nccl)?;
                Ok((
                    CudaStorage::wrap_cuda_slice(out, dev),
                    Shape::from(n / self.size),
                ))
            }
        }
    }
}

impl helix_ops::Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        self.run(t, Kind::Sum)
    }

    fn all_reduce_max(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        self.run(t, Kind::Max)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
        // NCCL stacks ranks along the flat buffer, i.e. dimension 0: move `dim` there and back.
        let moved = t.transpose(0, dim)?.contiguous()?;
        self.run(&moved, Kind::Gather)?
            .transpose(0, dim)?
            .contiguous()
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = t.dims().to_vec();
        if dims.is_empty() || !dims[0].is_multiple_of(self.size) {
            candle_core::bail!("reduce-scatter of {dims:?} over {} ranks", self.size);
        }
        dims[0] /= self.size;
        // Rank r's part of the flat buffer is its rows, dimension 0 being the outermost.
        self.run(&t.flatten_all()?, Kind::ReduceScatter)?
            .reshape(dims)
    }
}

/// A rank's NCCL communicators on the job's grid: the same tensor-parallel and data-parallel
/// groups as the TCP rings of [`crate::Job`], for tensors that live on the GPU.
pub struct NcclGroups {
    pub tp: Arc<NcclGroup>,
    pub dp: NcclGroup,
}

impl NcclGroups {
    /// Joins both groups (every rank joins its tensor-parallel group first, so the blocking
    /// NCCL inits pair up).
    pub fn join(
        store: &StoreClient,
        (tp_name, tp_ranks): (&str, &[usize]),
        (dp_name, dp_ranks): (&str, &[usize]),
        me: usize,
        device: &Device,
    ) -> Result<Self> {
        let tp = NcclGroup::join(store, tp_name, tp_ranks, me, device)?;
        let dp = NcclGroup::join(store, dp_name, dp_ranks, me, device)?;
        Ok(Self {
            tp: Arc::new(tp),
            dp,
        })
    }
}
