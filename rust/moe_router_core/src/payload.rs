//! `Payload`: the element types of the token vectors a dispatch plan moves
//! (float32, float64, float16), and how `combine` accumulates them.

use half::f16;

use crate::row_moves;
use crate::simd::SimdLevel;

/// An element of hidden states or expert outputs.
///
/// Moving rows is a plain copy; `combine` widens each element to `Acc`
/// (float32 for float16, the type itself otherwise), adds the token's rows in
/// rank order there, and narrows once at the end (round to nearest). `level`
/// chooses the kernels (every level gives the same bits; one the CPU lacks is
/// lowered to one it has), `stream` asks for streaming stores.
pub trait Payload: Copy + Send + Sync + 'static {
    /// The accumulator type of `combine`.
    type Acc: Copy + Send + Sync + Default + std::fmt::Debug;
    /// Zero, for padding rows and dropped assignments.
    const ZERO: Self;
    /// `acc += weight * x`, elementwise.
    fn add_scaled(level: SimdLevel, acc: &mut [Self::Acc], x: &[Self], weight: f32);
    /// `acc += x`, elementwise.
    fn add(level: SimdLevel, acc: &mut [Self::Acc], x: &[Self]);
    /// `out = acc`, narrowed.
    fn store(level: SimdLevel, out: &mut [Self], acc: &[Self::Acc], stream: bool);
    /// `out = x`.
    fn copy(level: SimdLevel, out: &mut [Self], x: &[Self], stream: bool) {
        let _ = (level, stream);
        out.copy_from_slice(x);
    }
}

/// float32 and float64 accumulate in their own type with loops LLVM
/// vectorizes (explicit AVX versions were measured no faster).
macro_rules! float_payload {
    ($t:ty) => {
        impl Payload for $t {
            type Acc = $t;
            const ZERO: Self = 0.0;
            fn add_scaled(_: SimdLevel, acc: &mut [$t], x: &[$t], weight: f32) {
                let w = <$t>::from(weight);
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += w * v;
                }
            }
            fn add(_: SimdLevel, acc: &mut [$t], x: &[$t]) {
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += v;
                }
            }
            fn store(level: SimdLevel, out: &mut [$t], acc: &[$t], stream: bool) {
                row_moves::copy(level, out, acc, stream);
            }
            fn copy(level: SimdLevel, out: &mut [$t], x: &[$t], stream: bool) {
                row_moves::copy(level, out, x, stream);
            }
        }
    };
}

float_payload!(f32);
float_payload!(f64);

/// float16 is widened and narrowed by F16C / AVX-512 kernels (`row_moves`), or
/// `half`'s slice conversions at the portable level: the same rounding as
/// `f16::to_f32` / `f16::from_f32` either way.
impl Payload for f16 {
    type Acc = f32;
    const ZERO: Self = f16::ZERO;
    fn add_scaled(level: SimdLevel, acc: &mut [f32], x: &[f16], weight: f32) {
        row_moves::f16_accumulate(level, acc, x, Some(weight));
    }
    fn add(level: SimdLevel, acc: &mut [f32], x: &[f16]) {
        row_moves::f16_accumulate(level, acc, x, None);
    }
    fn store(level: SimdLevel, out: &mut [f16], acc: &[f32], stream: bool) {
        row_moves::f16_narrow(level, out, acc, stream);
    }
    fn copy(level: SimdLevel, out: &mut [f16], x: &[f16], stream: bool) {
        row_moves::copy(level, out, x, stream);
    }
}
