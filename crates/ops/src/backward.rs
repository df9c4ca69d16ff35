//! Attaching a hand-written backward pass to a value computed outside the autograd graph.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};

/// Computes the gradient of the input from the gradient of the output.
pub type BackwardFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Returns `value` as a tensor whose gradient flows back to `input` through `bwd`.
///
/// `value` must have been computed from `input` without tracking (e.g. from `input.detach()`).
/// This is how a fused forward (a candle kernel, a chunked loop, later a CUDA kernel) gets an
/// exact, memory-frugal backward without candle recording every intermediate.
pub fn with_backward(
    input: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(value);
    }
    let op = Precomputed {
        value: Mutex::new(Some(value.contiguous()?)),
        bwd: Arc::new(bwd),
    };
    input.apply_op1_arc(Arc::new(Box::new(op)))
}

/// Two-input form of [`with_backward`]: `bwd` returns the gradients of `(a, b)`; it is told
/// which inputs need one, so it can skip work for frozen ones (e.g. a frozen LM head).
pub fn with_backward2(
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, bool, bool) -> Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let (need_a, need_b) = (a.track_op(), b.track_op());
    if !need_a && !need_b {
        return Ok(value);
    }
    let op = Precomputed2 {
        value: Mutex::new(Some(value.contiguous()?)),
        bwd: Box::new(move |g| bwd(g, need_a, need_b)),
    };
    a.apply_op2_arc(b, Arc::new(Box::new(op)))
}

/// Three-input form of [`with_backward`]: `bwd` gets the output's gradient and which of
/// `(a, b, c)` need one, and returns their gradients (e.g. attention's q, k and v; a LoRA
/// projection's input and its two adapter matrices).
pub fn with_backward3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    value: Tensor,
    bwd: impl Fn(&Tensor, [bool; 3]) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    let need = [a.track_op(), b.track_op(), c.track_op()];
    if need == [false; 3] {
        return Ok(value);
    }
    let op = Precomputed3 {
        value: Mutex::new(Some(value.contiguous()?)),
        bwd: Box::new(move |g| bwd(g, need)),
    };
    a.apply_op3_arc(b, c, Arc::new(Box::new(op)))
}

/// The gradients of a three-input op; `None` for an input that needs none.
pub type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

type Backward3Fn = Box<dyn Fn(&Tensor) -> Result<Grads3> + Send + Sync>;

struct Precomputed3 {
    value: PrecomputedValue,
    bwd: Backward3Fn,
}

impl CustomOp3 for Precomputed3 {
    fn name(&self) -> &'static str {
        "helix-precomputed3"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        _s3: &candle_core::CudaStorage,
        _l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&self.value)
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _c: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<Grads3> {
        (self.bwd)(grad_res)
    }
}

type Backward2Fn = Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;

struct Precomputed2 {
    value: PrecomputedValue,
    bwd: Backward2Fn,
}

/// The forward's result, handed over once: the op must not keep it alive for the whole life
/// of the graph (that would hold every such activation twice).
type PrecomputedValue = Mutex<Option<Tensor>>;

fn take(value: &PrecomputedValue) -> Result<Tensor> {
    value
        .lock()
        .expect("not poisoned")
        .take()
        .ok_or_else(|| candle_core::Error::Msg("a precomputed value is used once".into()))
}

fn cpu_copy(value: &PrecomputedValue) -> Result<(CpuStorage, Shape)> {
    let value = take(value)?;
    let (storage, layout) = value.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) if layout.is_contiguous() && layout.start_offset() == 0 => {
            Ok((s.clone(), value.shape().clone()))
        }
        Storage::Cpu(_) => candle_core::bail!("precomputed value is not a packed tensor"),
        _ => candle_core::bail!("precomputed value is not on the cpu"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_copy(value: &PrecomputedValue) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let value = take(value)?;
    let (storage, layout) = value.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, value.shape().clone())),
        _ => candle_core::bail!("precomputed value is not on the gpu"),
    }
}

impl CustomOp2 for Precomputed2 {
    fn name(&self) -> &'static str {
        "helix-precomputed2"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&self.value)
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(grad_res)
    }
}

struct Precomputed {
    value: PrecomputedValue,
    bwd: BackwardFn,
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        "helix-precomputed"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&self.value)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(grad_res)?))
    }
}
