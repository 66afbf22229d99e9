//! The frameworks' own dispatch formats, built from a routing decision:
//! Megatron-Core's `[T, E]` routing map, DeepSpeed's dense `[T, E, C]` masks
//! and vLLM's block-aligned sorted token ids.

use rayon::prelude::*;

use crate::dispatch::Assignments;
use crate::error::{filled, Result, RouterError};

const TOKENS_PER_TASK: usize = 1024;

/// Megatron-Core's router outputs: `routing_map` bool `[T, E]` (true where the
/// token's assignment to the expert is kept) and `probs` float32 `[T, E]` (the
/// combine weight there, 0 elsewhere), as `TopKRouter.forward` returns them
/// after capacity (`moe_utils.topk_routing_with_score_function`,
/// `apply_router_token_dropping`). Megatron's `drop_and_pad` fills each
/// expert's unused capacity with further tokens at weight 0; this map holds the
/// kept assignments only.
pub fn megatron_routing_map(a: &Assignments<'_>) -> Result<(Vec<bool>, Vec<f32>)> {
    let (t, e, k) = (a.num_tokens, a.num_experts, a.top_k);
    let size = t.checked_mul(e).ok_or_else(|| RouterError::shape("routing_map", "[T, E]", "too large"))?;
    let mut map = filled(size, false, "routing_map")?;
    let mut probs = filled(size, 0f32, "routing_map")?;
    if e == 0 {
        return Ok((map, probs));
    }
    map.par_chunks_mut(TOKENS_PER_TASK * e).zip(probs.par_chunks_mut(TOKENS_PER_TASK * e)).enumerate().try_for_each(
        |(c, (map, probs))| -> Result<()> {
            for i in 0..map.len() / e {
                let tok = c * TOKENS_PER_TASK + i;
                for j in 0..k {
                    let flat = tok * k + j;
                    if a.kept[flat] {
                        let x = expert_in_range(a.expert_indices[flat], e, flat, k)?;
                        map[i * e + x] = true;
                        probs[i * e + x] = a.expert_weights[flat];
                    }
                }
            }
            Ok(())
        },
    )?;
    Ok((map, probs))
}

/// DeepSpeed's `combine_weights` float32 `[T, E, C]` (the weight of the kept
/// assignment of token t to expert e at its slot c) and `dispatch_mask`
/// (`combine_weights != 0`, DeepSpeed's `combine_weights.bool()`), with
/// `C = a.capacity` (`sharded_moe.top1gating`/`top2gating`/`topkgating`).
/// Memory O(T * E * C): for small inputs and for checking.
pub fn dense_masks(a: &Assignments<'_>) -> Result<(Vec<f32>, Vec<bool>)> {
    let (t, e, k, c) = (a.num_tokens, a.num_experts, a.top_k, a.capacity);
    let row = e.checked_mul(c).ok_or_else(|| RouterError::shape("combine_weights", "[T, E, C]", "too large"))?;
    let size = t.checked_mul(row).ok_or_else(|| RouterError::shape("combine_weights", "[T, E, C]", "too large"))?;
    let mut weights = filled(size, 0f32, "dense_masks")?;
    let mut mask_out = filled(0, false, "dense_masks")?;
    mask_out
        .try_reserve_exact(size)
        .map_err(|_| RouterError::TooLarge { argument: "dense_masks", bytes: size as u128 })?;
    if row > 0 {
        weights.par_chunks_mut(row).enumerate().try_for_each(|(tok, w)| -> Result<()> {
            for j in 0..k {
                let flat = tok * k + j;
                if a.kept[flat] {
                    let x = expert_in_range(a.expert_indices[flat], e, flat, k)?;
                    let slot = usize::try_from(a.expert_slots[flat]).ok().filter(|&s| s < c).ok_or_else(|| {
                        RouterError::Inconsistent {
                            argument: "expert_slots",
                            detail: format!("token {tok}, rank {j} has slot {} outside [0, {c})", a.expert_slots[flat]),
                        }
                    })?;
                    w[x * c + slot] = a.expert_weights[flat];
                }
            }
            Ok(())
        })?;
    }
    weights.par_iter().map(|&w| w != 0.0).collect_into_vec(&mut mask_out);
    Ok((weights, mask_out))
}

fn expert_in_range(x: i32, e: usize, flat: usize, k: usize) -> Result<usize> {
    usize::try_from(x).ok().filter(|&x| x < e).ok_or_else(|| RouterError::Inconsistent {
        argument: "expert_indices",
        detail: format!("token {}, rank {} has expert {x}, outside [0, {e})", flat / k.max(1), flat % k.max(1)),
    })
}

/// vLLM's `moe_align_block_size` result: the flattened assignment ids
/// (`t * k + j`) grouped by expert, each expert's group padded to a multiple
/// of the block size with the sentinel `T * k`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAlignment {
    /// `[max_padded]` ids, expert-major, ascending within an expert; the
    /// sentinel `T * k` after each group and in the unused tail.
    pub sorted_token_ids: Vec<i32>,
    /// `[ceil(max_padded / block_size)]` the expert of each block; 0 for the
    /// unused blocks past `num_tokens_post_padded`.
    pub expert_ids: Vec<i32>,
    /// `sum_e ceil(count_e / block_size) * block_size`.
    pub num_tokens_post_padded: usize,
}

/// vLLM `moe_align_block_size(topk_ids, block_size, num_experts,
/// pad_sorted_ids)` on `[T, k]` expert ids (row-major): the length of
/// `sorted_token_ids` is `T*k + E*(block_size-1)` (rounded up to the block
/// size when `pad_sorted_ids`; at most `T*k*block_size` when `T*k < E`), as
/// vLLM allocates it. Unlike vLLM's kernels, the order within an expert is
/// fixed (ascending id), so results are reproducible.
///
/// Errors: `block_size` 0 (`InvalidConfig`); an id outside `[0, E)`
/// (`BadValue`); sizes beyond int32 (`Shape`).
pub fn moe_align_block_size(
    expert_indices: &[i64],
    top_k: usize,
    num_experts: usize,
    block_size: usize,
    pad_sorted_ids: bool,
) -> Result<BlockAlignment> {
    if block_size == 0 {
        return Err(RouterError::config("block_size", 0, "must be an integer >= 1"));
    }
    if num_experts == 0 {
        return Err(RouterError::config("num_experts", 0, "must be an integer >= 1"));
    }
    let numel = expert_indices.len();
    let too_large = || {
        RouterError::config(
            "block_size",
            block_size,
            "the padded ids (T*k + E*(block_size - 1)) must fit vLLM's int32 (2**31 - 1)",
        )
    };
    let mut max_padded =
        num_experts.checked_mul(block_size - 1).and_then(|p| p.checked_add(numel)).ok_or_else(too_large)?;
    if pad_sorted_ids {
        max_padded = max_padded.div_ceil(block_size).checked_mul(block_size).ok_or_else(too_large)?;
    }
    if numel < num_experts {
        max_padded = max_padded.min(numel.saturating_mul(block_size));
    }
    if i32::try_from(max_padded).is_err() {
        return Err(too_large());
    }
    let mut counts = filled(num_experts, 0usize, "num_experts")?;
    for (flat, &x) in expert_indices.iter().enumerate() {
        let x = usize::try_from(x).ok().filter(|&x| x < num_experts).ok_or(RouterError::BadValue {
            argument: "expert_indices",
            problem: "holds an expert id outside [0, num_experts)",
            token: flat / top_k.max(1),
            hint: "ids come from a routing decision's expert_indices",
        })?;
        counts[x] += 1;
    }
    let mut starts = Vec::with_capacity(num_experts);
    let mut total = 0usize;
    for &c in &counts {
        starts.push(total);
        total += c.div_ceil(block_size) * block_size;
    }
    let sentinel = numel as i32;
    let mut sorted_token_ids = filled(max_padded, sentinel, "block_size")?;
    let mut cursor = starts.clone();
    for (flat, &x) in expert_indices.iter().enumerate() {
        let x = x as usize;
        sorted_token_ids[cursor[x]] = flat as i32;
        cursor[x] += 1;
    }
    let mut expert_ids = filled(max_padded.div_ceil(block_size), 0i32, "block_size")?;
    for (x, (&start, &c)) in starts.iter().zip(&counts).enumerate() {
        let blocks = c.div_ceil(block_size);
        expert_ids[start / block_size..start / block_size + blocks].fill(x as i32);
    }
    Ok(BlockAlignment { sorted_token_ids, expert_ids, num_tokens_post_padded: total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_alignment_matches_the_definition() {
        // T = 3, k = 2, E = 3, block 4: expert 0 gets ids 0, 3; expert 2 gets 1, 2, 4, 5.
        let ids = [0i64, 2, 2, 0, 2, 2];
        let b = moe_align_block_size(&ids, 2, 3, 4, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.num_tokens_post_padded, 8);
        assert_eq!(b.sorted_token_ids.len(), 6 + 3 * 3);
        assert_eq!(&b.sorted_token_ids[..8], &[0, 3, 6, 6, 1, 2, 4, 5]);
        assert!(b.sorted_token_ids[8..].iter().all(|&s| s == 6));
        assert_eq!(&b.expert_ids[..2], &[0, 2]);
        assert!(moe_align_block_size(&[3], 1, 3, 4, false).is_err());
        assert!(moe_align_block_size(&[0], 1, 3, 0, false).is_err());
    }
}
