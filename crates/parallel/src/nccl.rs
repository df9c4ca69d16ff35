//! The GPU backend: NCCL through cudarc (features `cuda,nccl`), for a group of ranks each with
//! one GPU. The group's first rank makes NCCL's unique id and shares it through the rendezvous
//! store; NCCL itself reads its usual environment (NCCL_IB_HCA, NCCL_SOCKET_IFNAME,
//! NCCL_DEBUG…). Collectives run on the device's stream as candle custom ops, so tensors never
//! leave the GPU.

use std::sync::Mutex;

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

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Max,
    /// Every rank's tensor stacked along dimension 0.
    Gather,
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
}
