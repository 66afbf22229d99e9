//! The dispatch plan: where each kept assignment sits in an expert-major
//! buffer of rows, and the parallel gathers and scatters that move token
//! vectors into that buffer (`permute`) and the experts' outputs back
//! (`combine`, `unpermute`).
//!
//! Layout (Megatron-Core `permute`, DeepSpeed/Tutel `[E, C, D]` buffers): the
//! rows of expert `e` are `expert_offsets[e] .. expert_offsets[e + 1]`, and the
//! assignment in slot `s` of expert `e` is row `expert_offsets[e] + s`. Each
//! expert's segment may be padded (to a multiple of `alignment`, or to the
//! capacity); padding rows have token -1 and weight 0.
//!
//! Every pass writes disjoint rows or tokens from one thread each, so results
//! are the same at any thread count; `combine` adds a token's rows in rank
//! order, never with atomics. Outputs larger than the caches are written with
//! streaming stores (`row_moves`).

use rayon::prelude::*;

use crate::error::{filled, Result, RouterError};
use crate::payload::Payload;
use crate::row_moves::{prefetch, Writes, PREFETCH_AHEAD};

/// Rows handled by one task of the parallel passes (a few hundred KiB of data
/// for typical widths: enough to amortize scheduling, small enough to balance).
const ROWS_PER_TASK: usize = 256;

/// A routing decision as the plan reads it: `[T, k]` row-major arrays plus the
/// per-expert counts and the capacity.
#[derive(Debug, Clone, Copy)]
pub struct Assignments<'a> {
    /// T.
    pub num_tokens: usize,
    /// E.
    pub num_experts: usize,
    /// k.
    pub top_k: usize,
    /// `[T, k]` chosen experts.
    pub expert_indices: &'a [i32],
    /// `[T, k]` slot of each kept assignment in its expert's buffer.
    pub expert_slots: &'a [i32],
    /// `[T, k]` combine weights.
    pub expert_weights: &'a [f32],
    /// `[T, k]` whether the assignment survived capacity.
    pub kept: &'a [bool],
    /// `[E]` kept assignments per expert.
    pub tokens_per_expert: &'a [i64],
    /// Per-expert capacity (for dropless decisions, the largest kept count).
    pub capacity: usize,
    /// True when no capacity limit applied.
    pub dropless: bool,
}

/// How each expert's segment of rows is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLayout {
    /// Each segment is padded to a multiple of this (1: no padding). vLLM's
    /// `block_size`, torchtitan's 8/16/32 for grouped GEMMs.
    pub alignment: usize,
    /// Every expert gets exactly `capacity` rows (rounded up to `alignment`):
    /// the `[E, C, D]` buffer of DeepSpeed, Tutel and Megatron `drop_and_pad`.
    pub pad_to_capacity: bool,
}

impl Default for PlanLayout {
    fn default() -> Self {
        PlanLayout { alignment: 1, pad_to_capacity: false }
    }
}

/// Rows of an expert-major buffer and the assignment each row holds.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchPlan {
    /// T.
    pub num_tokens: usize,
    /// E.
    pub num_experts: usize,
    /// k.
    pub top_k: usize,
    /// N: rows, padding included.
    pub num_rows: usize,
    /// `[E + 1]` first row of each expert's segment; the last entry is N.
    pub expert_offsets: Vec<i64>,
    /// `[N]` source token of each row; -1 for padding.
    pub token_ids: Vec<i64>,
    /// `[N]` which of the token's k choices the row is; -1 for padding.
    pub ranks: Vec<i32>,
    /// `[N]` combine weight of each row; 0 for padding.
    pub weights: Vec<f32>,
    /// `[T, k]` row of each kept assignment; -1 where it was dropped.
    pub row_of: Vec<i64>,
    /// `[E]` real (not padding) rows per expert.
    pub tokens_per_expert: Vec<i64>,
}

fn inconsistent(argument: &'static str, detail: String) -> RouterError {
    RouterError::Inconsistent { argument, detail: format!("with the decision: {detail}") }
}

fn check_len<T>(argument: &'static str, data: &[T], want: usize, what: &str) -> Result<()> {
    if data.len() == want {
        Ok(())
    } else {
        Err(RouterError::shape(argument, what.to_string(), format!("{} values", data.len())))
    }
}

impl Assignments<'_> {
    /// The shapes agree with T, E and k.
    fn check_shapes(&self) -> Result<()> {
        let (t, e, k) = (self.num_tokens, self.num_experts, self.top_k);
        let tk = t.checked_mul(k).ok_or_else(|| RouterError::shape("expert_indices", "[T, k]", "too large"))?;
        let what = format!("[{t}, {k}]");
        check_len("expert_indices", self.expert_indices, tk, &what)?;
        check_len("expert_slots", self.expert_slots, tk, &what)?;
        check_len("expert_weights", self.expert_weights, tk, &what)?;
        check_len("kept", self.kept, tk, &what)?;
        check_len("tokens_per_expert", self.tokens_per_expert, e, &format!("[{e}]"))
    }

    /// Kept assignments per expert, counted from the `[T, k]` arrays; refuses
    /// an expert or slot outside its range.
    fn count_kept(&self) -> Result<Vec<i64>> {
        let (e, k) = (self.num_experts, self.top_k);
        let per_task = ROWS_PER_TASK * 16 * k.max(1);
        let partial: Result<Vec<Vec<i64>>> = self
            .expert_indices
            .par_chunks(per_task)
            .zip(self.expert_slots.par_chunks(per_task))
            .zip(self.kept.par_chunks(per_task))
            .enumerate()
            .map(|(c, ((experts, slots), kept))| {
                let mut counts = vec![0i64; e];
                for (i, ((&x, &s), &keep)) in experts.iter().zip(slots).zip(kept).enumerate() {
                    if !keep {
                        continue;
                    }
                    // The position is only formatted for an error: this loop runs T*k times.
                    let at = || {
                        let flat = c * per_task + i;
                        format!("token {}, rank {}", flat / k, flat % k)
                    };
                    let x = usize::try_from(x).ok().filter(|&x| x < e).ok_or_else(|| {
                        inconsistent("expert_indices", format!("{} is kept with expert {x}, outside [0, {e})", at()))
                    })?;
                    if s < 0 {
                        return Err(inconsistent("expert_slots", format!("{} is kept with slot {s}", at())));
                    }
                    counts[x] += 1;
                }
                Ok(counts)
            })
            .collect();
        let mut total = vec![0i64; e];
        for counts in partial? {
            for (t, c) in total.iter_mut().zip(counts) {
                *t += c;
            }
        }
        Ok(total)
    }
}

impl DispatchPlan {
    /// Lay out the kept assignments of `a` expert-major (see the module docs).
    ///
    /// Errors: `alignment` 0 or `pad_to_capacity` on a dropless decision
    /// (`InvalidConfig`); arrays whose lengths disagree with T, E, k (`Shape`);
    /// a kept assignment with an expert or slot out of range, counts that
    /// disagree with `tokens_per_expert`, or two assignments in one slot
    /// (`Inconsistent`).
    pub fn new(a: &Assignments<'_>, layout: PlanLayout) -> Result<DispatchPlan> {
        if layout.alignment == 0 {
            return Err(RouterError::config("alignment", 0, "must be an integer >= 1"));
        }
        if layout.pad_to_capacity && a.dropless {
            return Err(RouterError::config(
                "pad_to_capacity",
                "True",
                "a dropless decision has no capacity to pad to; use alignment, or route with a capacity_factor",
            ));
        }
        a.check_shapes()?;
        let (t, e, k) = (a.num_tokens, a.num_experts, a.top_k);
        let counted = a.count_kept()?;
        if let Some(x) = (0..e).find(|&x| counted[x] != a.tokens_per_expert[x]) {
            return Err(inconsistent(
                "tokens_per_expert",
                format!(
                    "expert {x} has {} kept assignments, tokens_per_expert says {}",
                    counted[x], a.tokens_per_expert[x]
                ),
            ));
        }
        let segment = |real: i64| -> Result<usize> {
            let real = real as usize;
            let wanted = if layout.pad_to_capacity {
                if real > a.capacity {
                    return Err(inconsistent(
                        "tokens_per_expert",
                        format!("{real} kept rows exceed capacity {}", a.capacity),
                    ));
                }
                a.capacity
            } else {
                real
            };
            wanted
                .div_ceil(layout.alignment)
                .checked_mul(layout.alignment)
                .ok_or_else(|| RouterError::config("alignment", layout.alignment, "the padded rows overflow"))
        };
        let mut expert_offsets = Vec::with_capacity(e + 1);
        let mut rows = 0usize;
        expert_offsets.push(0i64);
        for &real in &counted {
            rows = rows
                .checked_add(segment(real)?)
                .ok_or_else(|| RouterError::config("alignment", layout.alignment, "the padded rows overflow"))?;
            expert_offsets.push(rows as i64);
        }

        let mut row_of = vec![-1i64; t * k];
        let offsets = &expert_offsets;
        row_of.par_chunks_mut(ROWS_PER_TASK * k.max(1)).enumerate().try_for_each(|(c, out)| -> Result<()> {
            let start = c * ROWS_PER_TASK * k.max(1);
            for (i, r) in out.iter_mut().enumerate() {
                let flat = start + i;
                if a.kept[flat] {
                    let x = a.expert_indices[flat] as usize;
                    let slot = a.expert_slots[flat] as i64;
                    if slot >= counted[x] {
                        return Err(inconsistent(
                            "expert_slots",
                            format!(
                                "token {}, rank {} is in slot {slot} of expert {x}, which has {} kept assignments",
                                flat / k,
                                flat % k,
                                counted[x]
                            ),
                        ));
                    }
                    *r = offsets[x] + slot;
                }
            }
            Ok(())
        })?;

        let argument = if layout.pad_to_capacity { "pad_to_capacity" } else { "alignment" };
        let mut token_ids = filled(rows, -1i64, argument)?;
        let mut ranks = filled(rows, -1i32, argument)?;
        let mut weights = filled(rows, 0f32, argument)?;
        for (flat, &r) in row_of.iter().enumerate() {
            if r < 0 {
                continue;
            }
            let r = r as usize;
            if token_ids[r] >= 0 {
                return Err(inconsistent(
                    "expert_slots",
                    format!(
                        "tokens {} and {} share a slot of expert {}",
                        token_ids[r],
                        flat / k,
                        a.expert_indices[flat]
                    ),
                ));
            }
            token_ids[r] = (flat / k) as i64;
            ranks[r] = (flat % k) as i32;
            weights[r] = a.expert_weights[flat];
        }
        Ok(DispatchPlan {
            num_tokens: t,
            num_experts: e,
            top_k: k,
            num_rows: rows,
            expert_offsets,
            token_ids,
            ranks,
            weights,
            row_of,
            tokens_per_expert: counted,
        })
    }

    /// Rows of each expert's segment, padding included.
    pub fn rows_per_expert(&self) -> Vec<i64> {
        self.expert_offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Gather: row `r` of `out` (`[N, d]`) is token `token_ids[r]` of `hidden`
    /// (`[T, d]`); padding rows are zero.
    pub fn permute<P: Payload>(&self, hidden: &[P], d: usize, out: &mut [P]) -> Result<()> {
        check_len("hidden", hidden, self.num_tokens * d, &format!("[{}, {d}]", self.num_tokens))?;
        check_len("out", out, self.num_rows * d, &format!("[{}, {d}]", self.num_rows))?;
        if d == 0 {
            return Ok(());
        }
        gather(Writes::for_output::<P>(out.len()), out, d, hidden, &self.token_ids);
        Ok(())
    }

    /// Scatter-add: token `t` of `out` (`[T, d]`) is the sum over its kept
    /// rows, in rank order, of `weight * expert_out[row]` (`weighted`) or of
    /// `expert_out[row]`; accumulated in `P::Acc` (float32 for float16).
    /// Tokens with no kept row are zero.
    pub fn combine<P: Payload>(&self, expert_out: &[P], d: usize, weighted: bool, out: &mut [P]) -> Result<()> {
        check_len("expert_out", expert_out, self.num_rows * d, &format!("[{}, {d}]", self.num_rows))?;
        check_len("out", out, self.num_tokens * d, &format!("[{}, {d}]", self.num_tokens))?;
        if d == 0 {
            return Ok(());
        }
        self.combine_into(Writes::for_output::<P>(out.len()), expert_out, d, weighted, out);
        Ok(())
    }

    /// [`DispatchPlan::combine`] on checked arguments: one fused kernel call
    /// per token over its kept rows, in rank order.
    fn combine_into<P: Payload>(&self, w: Writes, expert_out: &[P], d: usize, weighted: bool, out: &mut [P]) {
        let k = self.top_k;
        out.par_chunks_mut(ROWS_PER_TASK * d).enumerate().for_each_init(
            || (Vec::with_capacity(k), Vec::with_capacity(k)),
            |(rows, weights), (c, block)| {
                for (i, y) in block.chunks_exact_mut(d).enumerate() {
                    let t = c * ROWS_PER_TASK + i;
                    rows.clear();
                    weights.clear();
                    for &r in &self.row_of[t * k..(t + 1) * k] {
                        let Ok(r) = usize::try_from(r) else { continue };
                        rows.push(&expert_out[r * d..(r + 1) * d]);
                        weights.push(self.weights[r]);
                    }
                    P::combine(w.level, y, rows, weighted.then_some(&weights[..]), w.stream);
                }
                w.fence();
            },
        );
    }

    /// Scatter without summing: `out[t, j]` (`[T, k, d]`) is the row of the
    /// token's j-th choice, zero where that assignment was dropped.
    pub fn unpermute<P: Payload>(&self, expert_out: &[P], d: usize, out: &mut [P]) -> Result<()> {
        check_len("expert_out", expert_out, self.num_rows * d, &format!("[{}, {d}]", self.num_rows))?;
        let k = self.top_k;
        check_len("out", out, self.num_tokens * k * d, &format!("[{}, {k}, {d}]", self.num_tokens))?;
        if d == 0 {
            return Ok(());
        }
        gather(Writes::for_output::<P>(out.len()), out, d, expert_out, &self.row_of);
        Ok(())
    }
}

/// Row `i` of `out` (rows of `d` elements) is row `index[i]` of `src`, or zero
/// where `index[i] < 0`: the one data movement of the plan, the exchange and
/// their inverses. Errors: lengths that disagree, an index past `src`.
pub fn gather_rows<P: Payload>(src: &[P], d: usize, index: &[i64], out: &mut [P]) -> Result<()> {
    check_len("out", out, index.len() * d, &format!("[{}, {d}]", index.len()))?;
    if d == 0 {
        return Ok(());
    }
    if !src.len().is_multiple_of(d) {
        return Err(RouterError::shape("src", format!("[rows, {d}]"), format!("{} values", src.len())));
    }
    let rows = (src.len() / d) as i64;
    if let Some(i) = index.iter().position(|&r| r >= rows) {
        return Err(RouterError::shape(
            "index",
            format!("values below {rows} (the rows of src)"),
            format!("index[{i}] = {}", index[i]),
        ));
    }
    gather(Writes::for_output::<P>(out.len()), out, d, src, index);
    Ok(())
}

/// [`gather_rows`] on checked arguments.
fn gather<P: Payload>(w: Writes, out: &mut [P], d: usize, src: &[P], index: &[i64]) {
    out.par_chunks_mut(ROWS_PER_TASK * d).enumerate().for_each(|(c, block)| {
        let index = &index[c * ROWS_PER_TASK..c * ROWS_PER_TASK + block.len() / d];
        for (i, (row, &from)) in block.chunks_exact_mut(d).zip(index).enumerate() {
            if let Some(ahead) = index.get(i + PREFETCH_AHEAD).and_then(|&r| usize::try_from(r).ok()) {
                prefetch(&src[ahead * d..(ahead + 1) * d]);
            }
            match usize::try_from(from) {
                Ok(from) => P::copy(w.level, row, &src[from * d..(from + 1) * d], w.stream),
                Err(_) => row.fill(P::ZERO),
            }
        }
        w.fence();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{route_logits, CapacityFactor, Decimal, RouteCall, RouterConfig};
    use ndarray::Array2;

    /// A decision on deterministic logits; `percent` is the capacity factor in percent (None: dropless).
    fn decision(t: usize, e: usize, k: usize, percent: Option<u128>) -> crate::Routing {
        let logits = Array2::from_shape_fn((t, e), |(i, j)| ((i * 7 + j * 13) % 11) as f32 - (j as f32) * 0.01);
        let mut options = RouterConfig::new(e, k);
        options.capacity_factor = match percent {
            Some(p) => CapacityFactor::Factor(Decimal::from_parts(p, -2)),
            None => CapacityFactor::Dropless,
        };
        route_logits(logits.view(), &options, &RouteCall::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn view(r: &crate::Routing) -> Assignments<'_> {
        Assignments {
            num_tokens: r.num_tokens,
            num_experts: r.num_experts,
            top_k: r.top_k,
            expert_indices: &r.expert_indices,
            expert_slots: &r.expert_slots,
            expert_weights: &r.expert_weights,
            kept: &r.kept,
            tokens_per_expert: &r.tokens_per_expert,
            capacity: r.capacity,
            dropless: r.dropless,
        }
    }

    #[test]
    fn rows_follow_expert_then_slot_and_round_trip() {
        let r = decision(50, 6, 2, Some(100));
        let plan = DispatchPlan::new(&view(&r), PlanLayout { alignment: 4, pad_to_capacity: false }).unwrap();
        for x in 0..6 {
            let rows = (plan.expert_offsets[x + 1] - plan.expert_offsets[x]) as usize;
            assert_eq!(rows % 4, 0);
            assert!(rows >= r.tokens_per_expert[x] as usize && rows < r.tokens_per_expert[x] as usize + 4);
        }
        let d = 3;
        let hidden: Vec<f32> = (0..50 * d).map(|v| v as f32).collect();
        let mut rows = vec![0f32; plan.num_rows * d];
        plan.permute(&hidden, d, &mut rows).unwrap();
        let mut back = vec![0f32; 50 * d];
        plan.combine(&rows, d, false, &mut back).unwrap();
        for t in 0..50 {
            let kept = (0..2).filter(|&j| r.kept[t * 2 + j]).count() as f32;
            for c in 0..d {
                assert_eq!(back[t * d + c], kept * hidden[t * d + c]);
            }
        }
    }

    /// Every move at every SIMD level, streaming or not, at 1 and 2 threads,
    /// gives the bits of the portable single-threaded pass.
    fn levels_agree<P: Payload>(of: impl Fn(f32) -> P, bits: impl Fn(&[P]) -> Vec<u64> + Sync) {
        let special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0, 3e38, 65504.0, 1e-40];
        let r = decision(300, 8, 2, Some(125));
        let plan = DispatchPlan::new(&view(&r), PlanLayout { alignment: 4, pad_to_capacity: false }).unwrap();
        let portable = Writes { level: crate::SimdLevel::Portable, stream: false };
        for d in [1, 37, 64, 300] {
            let value = |i: usize| {
                if i.is_multiple_of(23) {
                    special[i / 23 % special.len()]
                } else {
                    (i as f32 * 0.61).sin() * 7.0
                }
            };
            let hidden: Vec<P> = (0..300 * d).map(|i| of(value(i))).collect();
            let rows: Vec<P> = (0..plan.num_rows * d).map(|i| of(value(i * 3 + 1))).collect();
            let run = |w: Writes| {
                let mut permuted = vec![P::ZERO; plan.num_rows * d];
                gather(w, &mut permuted, d, &hidden, &plan.token_ids);
                let mut unpermuted = vec![P::ZERO; 300 * 2 * d];
                gather(w, &mut unpermuted, d, &rows, &plan.row_of);
                let mut sums = Vec::new();
                for weighted in [true, false] {
                    let mut y = vec![P::ZERO; 300 * d];
                    plan.combine_into(w, &rows, d, weighted, &mut y);
                    sums.push(bits(&y));
                }
                (bits(&permuted), bits(&unpermuted), sums)
            };
            let want = run(portable);
            for simd in crate::simd::Simd::all() {
                for stream in [false, true] {
                    for threads in [1, 2] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        let got = pool.install(|| run(Writes { level: simd.level(), stream }));
                        assert!(got == want, "d={d} {:?} stream={stream} threads={threads}", simd.level());
                    }
                }
            }
        }
    }

    #[test]
    fn every_simd_level_and_streaming_give_the_same_bits() {
        levels_agree(|v| v, |x: &[f32]| x.iter().map(|v| v.to_bits() as u64).collect());
        levels_agree(f64::from, |x: &[f64]| x.iter().map(|v| v.to_bits()).collect());
        levels_agree(half::f16::from_f32, |x: &[half::f16]| x.iter().map(|v| v.to_bits() as u64).collect());
    }

    #[test]
    fn bad_layouts_and_tampered_slots_are_errors() {
        let r = decision(20, 4, 2, Some(100));
        assert!(DispatchPlan::new(&view(&r), PlanLayout { alignment: 0, pad_to_capacity: false }).is_err());
        let dropless = decision(20, 4, 2, None);
        assert!(DispatchPlan::new(&view(&dropless), PlanLayout { alignment: 1, pad_to_capacity: true }).is_err());
        let mut slots = r.expert_slots.clone();
        let first = r.kept.iter().position(|&k| k).unwrap_or(0);
        let second = (first + 1..r.kept.len())
            .find(|&i| r.kept[i] && r.expert_indices[i] == r.expert_indices[first])
            .unwrap_or(first);
        slots[second] = slots[first];
        let mut a = view(&r);
        a.expert_slots = &slots;
        assert!(matches!(DispatchPlan::new(&a, PlanLayout::default()), Err(RouterError::Inconsistent { .. })));
    }
}
