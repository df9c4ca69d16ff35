//! Attaching a hand-written backward pass to a value computed outside the autograd graph.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
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
        value: Mutex::new(Some(packed(value)?)),
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
        value: Mutex::new(Some(packed(value)?)),
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
        value: Mutex::new(Some(packed(value)?)),
        bwd: Box::new(move |g| bwd(g, need)),
    };
    a.apply_op3_arc(b, c, Arc::new(Box::new(op)))
}

/// The n-input form of [`with_backward`], for an op with more inputs than candle's custom ops
/// take (a decoder layer differentiated by hand: its input and every trainable tensor in it).
/// `bwd` gets the output's gradient and which inputs need one, and returns one entry per input.
///
/// The graph gets one node per input past the first tracked one, beside the op's own: each
/// such node joins up to three tracked inputs into a scalar that the op takes as its second
/// input, and its backward hands its inputs the gradients the op's backward left for them.
/// candle differentiates a node before its inputs, so the op's backward always runs first.
pub fn with_backward_n(
    inputs: &[Tensor],
    value: Tensor,
    bwd: impl Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let need: Vec<bool> = inputs.iter().map(|t| t.track_op()).collect();
    let tracked: Vec<usize> = (0..inputs.len()).filter(|&i| need[i]).collect();
    let Some((&carrier, rest)) = tracked.split_first() else {
        return Ok(value);
    };
    let slots: Slots = Arc::new((0..inputs.len()).map(|_| Mutex::new(None)).collect());
    let run = {
        let slots = slots.clone();
        move |g: &Tensor| -> Result<Tensor> {
            let mut grads = bwd(g, &need)?;
            if grads.len() != need.len() {
                candle_core::bail!("{} gradients for {} inputs", grads.len(), need.len());
            }
            for (i, slot) in slots.iter().enumerate() {
                if i != carrier {
                    *slot.lock().expect("not poisoned") = grads[i].take();
                }
            }
            grads[carrier]
                .take()
                .ok_or_else(|| candle_core::Error::Msg("no gradient for a tracked input".into()))
        }
    };
    if rest.is_empty() {
        return with_backward(&inputs[carrier], value, run);
    }
    let device = value.device().clone();
    let zero = move || Tensor::zeros((), DType::F32, &device);
    // Join the other tracked inputs: the first node takes three, each next one the node
    // before it and two more.
    let mut joined: Option<Tensor> = None;
    let mut pending = rest.iter().copied().peekable();
    while pending.peek().is_some() {
        let take = if joined.is_none() { 3 } else { 2 };
        let members: Vec<usize> = pending.by_ref().take(take).collect();
        joined = Some(join(joined.take(), &members, inputs, &slots, zero()?)?);
    }
    let joined = joined.expect("rest is not empty");
    let z = zero()?;
    with_backward2(&inputs[carrier], &joined, value, move |g, _, _| {
        Ok((Some(run(g)?), Some(z.clone())))
    })
}

/// The gradients [`with_backward_n`]'s op leaves for the inputs it does not carry.
type Slots = Arc<Vec<Mutex<Option<Tensor>>>>;

/// A scalar node over `previous` (the node before, if any) and the inputs `members`, whose
/// backward gives each member its gradient from `slots`.
fn join(
    previous: Option<Tensor>,
    members: &[usize],
    inputs: &[Tensor],
    slots: &Slots,
    zero: Tensor,
) -> Result<Tensor> {
    // Each operand, with where its gradient comes from (`None`: the node before, whose
    // gradient is a zero scalar).
    let mut operands: Vec<(Tensor, Option<usize>)> =
        previous.into_iter().map(|p| (p, None)).collect();
    operands.extend(members.iter().map(|&m| (inputs[m].clone(), Some(m))));
    let sources: Vec<Option<usize>> = operands.iter().map(|(_, s)| *s).collect();
    let slots = slots.clone();
    let value = zero.zeros_like()?;
    let grad = move |k: usize| -> Option<Tensor> {
        match sources[k] {
            None => Some(zero.clone()),
            Some(m) => slots[m].lock().expect("not poisoned").take(),
        }
    };
    match operands.as_slice() {
        [(a, _)] => with_backward(a, value, move |_| {
            grad(0).ok_or_else(|| candle_core::Error::Msg("no gradient for a tracked input".into()))
        }),
        [(a, _), (b, _)] => with_backward2(a, b, value, move |_, _, _| Ok((grad(0), grad(1)))),
        [(a, _), (b, _), (c, _)] => with_backward3((a, b, c), value, move |_, _| {
            Ok((grad(0), grad(1), grad(2)))
        }),
        _ => candle_core::bail!("a join takes one to three operands"),
    }
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

/// `value` laid out from the start of its own storage, as the ops hand it over: a view
/// (a narrowed chunk of rows) is copied.
fn packed(value: Tensor) -> Result<Tensor> {
    let offset = value.layout().start_offset();
    match value.is_contiguous() && offset == 0 {
        true => Ok(value),
        false => value.force_contiguous(),
    }
}

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
