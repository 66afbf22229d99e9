//! `Payload`: the element types of the token vectors a dispatch plan moves
//! (float32, float64, float16), and how `combine` accumulates them.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// An element of hidden states or expert outputs.
///
/// Moving rows is a plain copy; `combine` widens each element to `Acc`
/// (float32 for float16, the type itself otherwise), adds the token's rows in
/// rank order there, and narrows once at the end (round to nearest).
pub trait Payload: Copy + Send + Sync + 'static {
    /// The accumulator type of `combine`.
    type Acc: Copy + Send + Sync + Default + std::fmt::Debug;
    /// Zero, for padding rows and dropped assignments.
    const ZERO: Self;
    /// `acc += weight * x`, elementwise.
    fn add_scaled(acc: &mut [Self::Acc], x: &[Self], weight: f32);
    /// `acc += x`, elementwise.
    fn add(acc: &mut [Self::Acc], x: &[Self]);
    /// `out = acc`, narrowed.
    fn store(out: &mut [Self], acc: &[Self::Acc]);
}

macro_rules! float_payload {
    ($t:ty) => {
        impl Payload for $t {
            type Acc = $t;
            const ZERO: Self = 0.0;
            fn add_scaled(acc: &mut [$t], x: &[$t], weight: f32) {
                let w = <$t>::from(weight);
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += w * v;
                }
            }
            fn add(acc: &mut [$t], x: &[$t]) {
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += v;
                }
            }
            fn store(out: &mut [$t], acc: &[$t]) {
                out.copy_from_slice(acc);
            }
        }
    };
}

float_payload!(f32);
float_payload!(f64);

/// float16 elements widened per step of `combine` (a stack buffer of float32).
const F16_BLOCK: usize = 256;

/// float16 goes through `half`'s slice conversions, which use the CPU's F16C
/// instructions (8 lanes) when it has them and the same rounding as
/// `f16::to_f32` / `f16::from_f32` otherwise: the same bits as converting one
/// element at a time, several times faster.
impl Payload for f16 {
    type Acc = f32;
    const ZERO: Self = f16::ZERO;
    fn add_scaled(acc: &mut [f32], x: &[f16], weight: f32) {
        let mut wide = [0f32; F16_BLOCK];
        for (acc, x) in acc.chunks_mut(F16_BLOCK).zip(x.chunks(F16_BLOCK)) {
            let wide = &mut wide[..x.len()];
            x.convert_to_f32_slice(wide);
            for (a, &v) in acc.iter_mut().zip(wide.iter()) {
                *a += weight * v;
            }
        }
    }
    fn add(acc: &mut [f32], x: &[f16]) {
        let mut wide = [0f32; F16_BLOCK];
        for (acc, x) in acc.chunks_mut(F16_BLOCK).zip(x.chunks(F16_BLOCK)) {
            let wide = &mut wide[..x.len()];
            x.convert_to_f32_slice(wide);
            for (a, &v) in acc.iter_mut().zip(wide.iter()) {
                *a += v;
            }
        }
    }
    fn store(out: &mut [f16], acc: &[f32]) {
        out.convert_from_f32_slice(acc);
    }
}
