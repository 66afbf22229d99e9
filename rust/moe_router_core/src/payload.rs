//! `Payload`: the element types of the token vectors a dispatch plan moves
//! (float32, float64, float16), and how `combine` accumulates them.

use std::ops::{Add, Mul};

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::combine_kernel;
use crate::row_moves;
use crate::simd::SimdLevel;

/// An element of hidden states or expert outputs.
///
/// Moving rows is a plain copy; `combine` widens each element to `Acc`
/// (float32 for float16, the type itself otherwise), adds the token's rows in
/// rank order there, and narrows once at the end (round to nearest even).
/// `level` chooses the kernels (every level gives the same bits; one the CPU
/// lacks is lowered to one it has), `stream` asks for streaming stores.
pub trait Payload: Copy + Send + Sync + 'static {
    /// The accumulator type of `combine`.
    type Acc: Copy + Default + Add<Output = Self::Acc> + Mul<Output = Self::Acc> + From<f32>;
    /// Zero, for padding rows and dropped assignments.
    const ZERO: Self;
    /// `x` as accumulators: `x` itself, or widened into `buf` (at least as long).
    fn widened<'a>(x: &'a [Self], buf: &'a mut [Self::Acc]) -> &'a [Self::Acc];
    /// `out = acc`, narrowed (round to nearest even).
    fn narrow(out: &mut [Self], acc: &[Self::Acc]);
    /// One token of `combine`: `out = sum_i weights[i] * rows[i]` (`rows[i]`
    /// unscaled without weights), accumulated in rank order in `Acc`.
    fn combine(level: SimdLevel, out: &mut [Self], rows: &[&[Self]], weights: Option<&[f32]>, stream: bool);
    /// `out = x`.
    fn copy(level: SimdLevel, out: &mut [Self], x: &[Self], stream: bool) {
        row_moves::copy(level, out, x, stream);
    }
}

/// float32 and float64 accumulate in their own type.
macro_rules! float_payload {
    ($t:ty, $combine:ident) => {
        impl Payload for $t {
            type Acc = $t;
            const ZERO: Self = 0.0;
            fn widened<'a>(x: &'a [$t], _: &'a mut [$t]) -> &'a [$t] {
                x
            }
            fn narrow(out: &mut [$t], acc: &[$t]) {
                out.copy_from_slice(acc);
            }
            fn combine(level: SimdLevel, out: &mut [$t], rows: &[&[$t]], weights: Option<&[f32]>, stream: bool) {
                combine_kernel::$combine(level, out, rows, weights, stream);
            }
        }
    };
}

float_payload!(f32, combine_f32);
float_payload!(f64, combine_f64);

/// float16 accumulates in float32: `half`'s conversions (IEEE, round to
/// nearest even) in the portable loop, F16C / AVX-512 ones in the vector
/// kernels, the same bits either way.
impl Payload for f16 {
    type Acc = f32;
    const ZERO: Self = f16::ZERO;
    fn widened<'a>(x: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        let wide = &mut buf[..x.len()];
        x.convert_to_f32_slice(wide);
        wide
    }
    fn narrow(out: &mut [f16], acc: &[f32]) {
        out.convert_from_f32_slice(acc);
    }
    fn combine(level: SimdLevel, out: &mut [f16], rows: &[&[f16]], weights: Option<&[f32]>, stream: bool) {
        combine_kernel::combine_f16(level, out, rows, weights, stream);
    }
}
