//! Capacity assignment: which routed assignments are kept and their slots.
//!
//! Every policy is a fixed order over assignments; an assignment is kept if its
//! expert has fewer than `capacity` kept assignments before it in that order,
//! and its slot is that number. For a fixed order the slot of an assignment is
//! simply the count of earlier assignments to the same expert, so the parallel
//! version counts per chunk, takes an exclusive prefix over chunks and fills
//! each chunk independently: exactly the sequential result.
//!
//! - position: (token, rank);          rank: (rank, token);
//! - bpr: (top-1 score desc, token, rank), scores compared as float32;
//!   bpr_rank: (rank, top-1 score desc, token);
//! - probs: per expert, the `capacity` highest weights win (float32 weights,
//!   ties to the lower token); slots then in token order among the kept.

use rayon::prelude::*;

use crate::route::CHUNK_TOKENS;

/// The `[T, k]` arrays an assignment pass reads and writes.
pub(crate) struct Assignments<'a> {
    /// Tokens per chunk of the per-chunk counts (pass 1's chunking).
    pub chunk: usize,
    pub top_k: usize,
    pub num_experts: usize,
    pub experts: &'a [i32],
    /// In: routed. Out: kept.
    pub kept: &'a mut [bool],
    /// Out: slot or -1.
    pub slots: &'a mut [i32],
}

/// Chunks per task for the light per-assignment passes: enough tokens that a
/// fork costs less than the work it splits (small batches stay on one thread).
pub(crate) fn light_pass_min_chunks(chunk: usize) -> usize {
    (4096 / chunk.max(1)).max(1)
}

/// `offsets[c][i] = base[i] + sum_{c' < c} counts[c'][i]`.
pub(crate) fn exclusive_prefix(counts: &[Vec<u32>], base: &[u32]) -> Vec<Vec<u32>> {
    let mut running = base.to_vec();
    counts
        .iter()
        .map(|c| {
            let start = running.clone();
            for (r, &n) in running.iter_mut().zip(c) {
                *r += n;
            }
            start
        })
        .collect()
}

/// Token-major order (position policy, and the slot pass of `probs`):
/// `counts[c]` holds chunk c's routed assignments per expert, or per
/// `rank * E + expert` for the rank-major order, whose `base` then starts each
/// rank after all earlier ranks.
pub(crate) fn assign_in_token_order(a: Assignments, capacity: usize, counts: &[Vec<u32>], rank_major: bool) {
    let (k, e) = (a.top_k, a.num_experts);
    let base = if rank_major { rank_bases(counts, k, e) } else { vec![0u32; e] };
    let offsets = exclusive_prefix(counts, &base);
    let step = a.chunk * k;
    a.experts
        .par_chunks(step)
        .zip(a.kept.par_chunks_mut(step))
        .zip(a.slots.par_chunks_mut(step))
        .zip(offsets.into_par_iter())
        .with_min_len(light_pass_min_chunks(a.chunk))
        .for_each(|(((experts, kept), slots), mut next)| {
            let places = experts.iter().zip(kept.iter_mut()).zip(slots.iter_mut());
            if rank_major {
                // Rank j of every token counts in `next[j * E..]`.
                for (i, ((&x, kept), slot)) in places.enumerate() {
                    take_slot(&mut next[(i % k) * e..], x, capacity, kept, slot);
                }
            } else {
                for ((&x, kept), slot) in places {
                    take_slot(&mut next, x, capacity, kept, slot);
                }
            }
        });
}

/// The next slot of expert `x` (counter `next[x]`) for a routed assignment,
/// which stays kept if the slot is below `capacity`; -1 (and not kept) otherwise.
#[inline(always)]
fn take_slot(next: &mut [u32], x: i32, capacity: usize, kept: &mut bool, slot: &mut i32) {
    if !*kept {
        *slot = -1;
        return;
    }
    let counter = &mut next[x as usize];
    let pos = *counter;
    *counter += 1;
    if (pos as usize) < capacity {
        *slot = pos as i32;
    } else {
        *kept = false;
        *slot = -1;
    }
}

/// For rank-major order: rank j of expert e starts after every earlier rank's
/// assignments to e.
fn rank_bases(counts: &[Vec<u32>], k: usize, e: usize) -> Vec<u32> {
    let mut totals = vec![0u32; k * e];
    for c in counts {
        for (t, &n) in totals.iter_mut().zip(c) {
            *t += n;
        }
    }
    let mut base = vec![0u32; k * e];
    for j in 1..k {
        for x in 0..e {
            base[j * e + x] = base[(j - 1) * e + x] + totals[(j - 1) * e + x];
        }
    }
    base
}

/// Batch-prioritized routing: tokens ordered by top-1 score (float32,
/// descending, ties to the lower token), then token-major, or rank-major
/// (`rank_major`: every first choice in that order before any second choice).
pub(crate) fn assign_batch_prioritized(a: Assignments, capacity: usize, top1: &[f32], rank_major: bool) {
    let (k, e) = (a.top_k, a.num_experts);
    let t = top1.len();
    let mut order: Vec<u32> = (0..t as u32).collect();
    order.par_sort_unstable_by(|&x, &y| top1[y as usize].total_cmp(&top1[x as usize]).then(x.cmp(&y)));

    // Counts per chunk of the priority order, per expert or per `rank * E + expert`.
    let counter = |j: usize, x: i32| if rank_major { j * e } else { 0 } + x as usize;
    let width = if rank_major { k * e } else { e };
    let counts: Vec<Vec<u32>> = order
        .par_chunks(CHUNK_TOKENS)
        .map(|toks| {
            let mut c = vec![0u32; width];
            for &tok in toks {
                let r = tok as usize * k..(tok as usize + 1) * k;
                for (j, (&x, &kept)) in a.experts[r.clone()].iter().zip(&a.kept[r]).enumerate() {
                    if kept {
                        c[counter(j, x)] += 1;
                    }
                }
            }
            c
        })
        .collect();
    let base = if rank_major { rank_bases(&counts, k, e) } else { vec![0u32; e] };
    let offsets = exclusive_prefix(&counts, &base);

    // Slots in priority order, then gathered back to token order.
    let mut ordered_slots = vec![-1i32; t * k];
    let experts = a.experts;
    let routed: &[bool] = a.kept;
    order
        .par_chunks(CHUNK_TOKENS)
        .zip(ordered_slots.par_chunks_mut(CHUNK_TOKENS * k))
        .zip(offsets.into_par_iter())
        .for_each(|((toks, out), mut next)| {
            for (i, &tok) in toks.iter().enumerate() {
                for j in 0..k {
                    let src = tok as usize * k + j;
                    if !routed[src] {
                        continue;
                    }
                    let x = counter(j, experts[src]);
                    let pos = next[x];
                    next[x] += 1;
                    if (pos as usize) < capacity {
                        out[i * k + j] = pos as i32;
                    }
                }
            }
        });
    let mut rank_of = vec![0u32; t];
    for (i, &tok) in order.iter().enumerate() {
        rank_of[tok as usize] = i as u32;
    }
    a.slots.par_chunks_mut(k.max(1)).zip(a.kept.par_chunks_mut(k.max(1))).zip(rank_of.par_iter()).for_each(
        |((slots, kept), &r)| {
            let src = &ordered_slots[r as usize * k..(r as usize + 1) * k];
            slots.copy_from_slice(src);
            for (kp, &s) in kept.iter_mut().zip(src) {
                *kp = s >= 0;
            }
        },
    );
}

/// Probability priority (Megatron "probs"): each over-full expert keeps its
/// `capacity` assignments of highest float32 weight, ties to the lower token;
/// slots are then given in token order among the kept assignments.
pub(crate) fn assign_by_weight(a: Assignments, capacity: usize, weights: &[f32], counts: &[Vec<u32>]) {
    let (k, e) = (a.top_k, a.num_experts);
    let mut totals = vec![0u32; e];
    for c in counts {
        for (t, &n) in totals.iter_mut().zip(c) {
            *t += n;
        }
    }
    let full: Vec<bool> = totals.iter().map(|&n| n as usize > capacity).collect();
    if full.iter().any(|&f| f) {
        let thresholds = weight_thresholds(&a, capacity, weights, counts, &totals, &full);
        // Drop every assignment of a full expert that ranks below its threshold.
        let step = a.chunk * k;
        a.experts.par_chunks(step).zip(a.kept.par_chunks_mut(step)).zip(weights.par_chunks(step)).enumerate().for_each(
            |(c, ((experts, kept), w))| {
                for i in 0..experts.len() {
                    let x = experts[i] as usize;
                    if kept[i] && full[x] {
                        let token = (c * a.chunk + i / k) as u32;
                        kept[i] = match thresholds[x] {
                            // The same total order as the selection below.
                            Some((tw, tt)) => w[i].total_cmp(&tw).then(tt.cmp(&token)).is_ge(),
                            None => false,
                        };
                    }
                }
            },
        );
    }
    // Slots in token order among the kept.
    let step = a.chunk * k;
    let kept_counts: Vec<Vec<u32>> = a
        .experts
        .par_chunks(step)
        .zip(a.kept.par_chunks(step))
        .map(|(experts, kept)| {
            let mut c = vec![0u32; e];
            for (&x, &kp) in experts.iter().zip(kept) {
                if kp {
                    c[x as usize] += 1;
                }
            }
            c
        })
        .collect();
    assign_in_token_order(a, usize::MAX, &kept_counts, false);
}

/// For each full expert, the (weight, token) of its `capacity`-th best
/// assignment (`None` if capacity is 0). Gathers the full experts'
/// assignments expert-major, O(their count) memory, then selects in parallel.
fn weight_thresholds(
    a: &Assignments,
    capacity: usize,
    weights: &[f32],
    counts: &[Vec<u32>],
    totals: &[u32],
    full: &[bool],
) -> Vec<Option<(f32, u32)>> {
    let (k, e) = (a.top_k, a.num_experts);
    // Expert-major layout of the full experts only; within an expert, chunk
    // by chunk. Each chunk gets its own `&mut` part of each full expert's
    // segment (`counts[c][x]` entries), so the parallel fill is safe by
    // construction: a chunk that met more assignments than pass 1 counted
    // would run out of its part and panic, never write into another's.
    let size: usize = (0..e).filter(|&x| full[x]).map(|x| totals[x] as usize).sum();
    let mut entries = vec![(0f32, 0u32); size];
    let mut parts: Vec<Vec<&mut [(f32, u32)]>> =
        counts.iter().map(|_| (0..e).map(|_| Default::default()).collect()).collect();
    {
        let mut rest: &mut [(f32, u32)] = &mut entries;
        for x in (0..e).filter(|&x| full[x]) {
            let (mut seg, tail) = rest.split_at_mut(totals[x] as usize);
            rest = tail;
            for (chunk_parts, chunk_counts) in parts.iter_mut().zip(counts) {
                let (part, more) = seg.split_at_mut(chunk_counts[x] as usize);
                chunk_parts[x] = part;
                seg = more;
            }
        }
        let step = a.chunk * k;
        a.experts
            .par_chunks(step)
            .zip(a.kept.par_chunks(step))
            .zip(weights.par_chunks(step))
            .zip(parts.par_iter_mut())
            .enumerate()
            .for_each(|(c, (((experts, kept), w), mine))| {
                for i in 0..experts.len() {
                    let x = experts[i] as usize;
                    if kept[i] && full[x] {
                        let token = (c * a.chunk + i / k) as u32;
                        let (slot, rest) =
                            std::mem::take(&mut mine[x]).split_first_mut().expect("pass 1 counted this assignment");
                        *slot = (w[i], token);
                        mine[x] = rest;
                    }
                }
            });
    }
    drop(parts);
    let mut segments: Vec<(usize, &mut [(f32, u32)])> = Vec::new();
    let mut rest: &mut [(f32, u32)] = &mut entries;
    for x in 0..e {
        if full[x] {
            let (seg, tail) = rest.split_at_mut(totals[x] as usize);
            segments.push((x, seg));
            rest = tail;
        }
    }
    let mut thresholds = vec![None; e];
    let found: Vec<(usize, Option<(f32, u32)>)> = segments
        .into_par_iter()
        .map(|(x, seg)| {
            if capacity == 0 {
                return (x, None);
            }
            let (_, nth, _) = seg.select_nth_unstable_by(capacity - 1, |p, q| q.0.total_cmp(&p.0).then(p.1.cmp(&q.1)));
            (x, Some(*nth))
        })
        .collect();
    for (x, t) in found {
        thresholds[x] = t;
    }
    thresholds
}
