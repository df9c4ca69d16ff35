//! What the CPU references need of a storage type, and getting packed slices out of candle's
//! storage.

use candle_core::{Layout, Result};
use half::{bf16, f16};

/// A row in f32: the row itself when it is f32, else converted into `buf`.
#[inline(always)]
pub(crate) fn row_f32<'a, T: Elem>(row: &'a [T], buf: &'a mut Vec<f32>) -> &'a [f32] {
    match T::as_f32_slice(row) {
        Some(r) => r,
        None => {
            buf.clear();
            buf.extend(row.iter().map(|v| v.to_f32()));
            buf
        }
    }
}

/// A storage element, computed on in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Rounds `v` through this type (storing an intermediate in it and reading it back).
    fn round(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
    /// The slice itself when the type is f32 (no conversion needed).
    fn as_f32_slice(_s: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// The elements `layout` covers, which must be packed (contiguous).
pub(crate) fn packed<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The packed elements of a storage that must hold `T` whatever the op's float type (f32 row
/// statistics, i64 targets), named `what` in the error otherwise.
pub(crate) fn packed_as<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    use candle_core::backend::BackendStorage;
    let data = storage.as_slice::<T>().map_err(|_| {
        candle_core::Error::Msg(format!(
            "{what} must be {:?}, not {:?}",
            T::DTYPE,
            storage.dtype()
        ))
    })?;
    packed(data, layout, what)
}

/// Runs `$body` with `$t` bound to the element type of the CPU storages, which must agree; its
/// `Vec<$t>` becomes the output storage. With `-> f32` the body returns a `Vec<f32>` whatever
/// the inputs' type (per-row statistics), with `-> u8` a `Vec<u8>` (NF4's codes).
macro_rules! dispatch_cpu {
    ($what:expr, ($($s:ident),+), |$t:ident, ($($v:ident),+)| -> f32 $body:expr) => {
        $crate::elem::dispatch_cpu!(@wrap $what, ($($s),+), |$t, ($($v),+)| $body,
            (F32, F32, F32))
    };
    ($what:expr, ($($s:ident),+), |$t:ident, ($($v:ident),+)| -> u8 $body:expr) => {
        $crate::elem::dispatch_cpu!(@wrap $what, ($($s),+), |$t, ($($v),+)| $body,
            (U8, U8, U8))
    };
    ($what:expr, ($($s:ident),+), |$t:ident, ($($v:ident),+)| $body:expr) => {
        $crate::elem::dispatch_cpu!(@wrap $what, ($($s),+), |$t, ($($v),+)| $body,
            (F32, BF16, F16))
    };
    (@wrap $what:expr, ($($s:ident),+), |$t:ident, ($($v:ident),+)| $body:expr,
        ($w32:ident, $wbf16:ident, $wf16:ident)) => {{
        use candle_core::CpuStorage as S;
        // Tuples with a trailing comma, so one storage is a 1-tuple rather than parentheses.
        match ($($s,)+) {
            ($(S::F32($v),)+) => { type $t = f32; $body.map(S::$w32) }
            ($(S::BF16($v),)+) => { type $t = half::bf16; $body.map(S::$wbf16) }
            ($(S::F16($v),)+) => { type $t = half::f16; $body.map(S::$wf16) }
            _ => candle_core::bail!("{}: inputs must share one float dtype (f32, bf16, f16)", $what),
        }
    }};
}
pub(crate) use dispatch_cpu;

/// Runs `f` on the packed f32 elements of CPU tensors, read in place (no copy out of candle's
/// storage); `what` names them in errors.
pub(crate) fn with_cpu_f32<R, const N: usize>(
    tensors: [&candle_core::Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut slices = [&[][..]; N];
    for (slice, (storage, layout)) in slices.iter_mut().zip(&guards) {
        let candle_core::Storage::Cpu(s) = &**storage else {
            candle_core::bail!("{what}: a tensor is not on the CPU");
        };
        *slice = packed_as::<f32>(s, layout, what)?;
    }
    Ok(f(slices))
}
