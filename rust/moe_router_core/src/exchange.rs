//! The all-to-all exchange of expert parallelism, planned from a dispatch
//! plan and an expert placement: what each rank sends to each other rank, in
//! which order, and how a rank orders what it receives so that each local
//! expert's rows are contiguous (Megatron-Core's "permutation 2",
//! `sort_chunks_by_idxs`).
//!
//! Send side: the plan's real rows (padding does not travel), ordered by
//! destination rank, then the destination's local expert, then slot.
//! Receive side: the buffer arrives ordered by source rank, then local expert;
//! [`ReceivePlan::order`] regroups it by local expert, then source rank.

use crate::dispatch::DispatchPlan;
use crate::error::{Result, RouterError};
use crate::placement::ExpertPlacement;

/// What one rank sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendPlan {
    /// R.
    pub num_ranks: usize,
    /// L: the most local experts on any rank (width of `expert_counts`).
    pub max_local_experts: usize,
    /// `[R]` rows sent to each rank.
    pub send_counts: Vec<i64>,
    /// `[M]` plan rows in send order (M = real rows of the plan).
    pub send_rows: Vec<i64>,
    /// `[M]` source token of each sent row.
    pub send_tokens: Vec<i64>,
    /// `[N]` position in send order of each plan row; -1 for padding rows.
    pub send_position: Vec<i64>,
    /// `[R, L]` rows sent to rank r for its local expert l (0 beyond its experts).
    pub expert_counts: Vec<i64>,
}

/// How one rank orders what it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivePlan {
    /// `[R]` rows received from each rank.
    pub recv_counts: Vec<i64>,
    /// `[L_r + 1]` first row of each local expert in expert-major order.
    pub expert_offsets: Vec<i64>,
    /// `[M_r]` for each expert-major row, its position in the received buffer.
    pub order: Vec<i64>,
    /// `[M_r]` the inverse: for each received row, its expert-major position.
    pub inverse: Vec<i64>,
}

impl DispatchPlan {
    /// The send side of the exchange for `placement` (its E must be the plan's).
    pub fn all_to_all(&self, placement: &ExpertPlacement) -> Result<SendPlan> {
        if placement.num_experts() != self.num_experts {
            return Err(RouterError::config(
                "placement",
                format!("num_experts = {}", placement.num_experts()),
                format!("the decision routes to {} experts", self.num_experts),
            ));
        }
        let (r, l) = (placement.num_ranks(), placement.max_local_experts());
        // Bucket (destination, local expert) of each real row, counted then placed
        // in row order, which keeps slot order within a bucket.
        let mut bucket = vec![usize::MAX; self.num_rows];
        let mut counts = vec![0i64; r * l];
        for e in 0..self.num_experts {
            let (lo, hi) = (self.expert_offsets[e] as usize, self.expert_offsets[e + 1] as usize);
            for (row, b) in bucket.iter_mut().enumerate().take(hi).skip(lo) {
                if let Ok(token) = usize::try_from(self.token_ids[row]) {
                    let (dest, local) = placement.destination(e, token);
                    *b = dest * l + local;
                    counts[*b] += 1;
                }
            }
        }
        let mut start = Vec::with_capacity(r * l);
        let mut total = 0i64;
        for &c in &counts {
            start.push(total);
            total += c;
        }
        let m = total as usize;
        let mut send_rows = vec![0i64; m];
        let mut send_tokens = vec![0i64; m];
        let mut send_position = vec![-1i64; self.num_rows];
        for (row, &b) in bucket.iter().enumerate() {
            if b != usize::MAX {
                let at = start[b] as usize;
                start[b] += 1;
                send_rows[at] = row as i64;
                send_tokens[at] = self.token_ids[row];
                send_position[row] = at as i64;
            }
        }
        let send_counts = counts.chunks(l.max(1)).map(|c| c.iter().sum()).collect();
        let send_counts = if l == 0 { vec![0; r] } else { send_counts };
        Ok(SendPlan {
            num_ranks: r,
            max_local_experts: l,
            send_counts,
            send_rows,
            send_tokens,
            send_position,
            expert_counts: counts,
        })
    }
}

impl ReceivePlan {
    /// The receive side, from the `[R, L]` counts every rank sent this one
    /// (row s: what rank s sends for each of this rank's local experts;
    /// `num_local` of the L columns are used).
    pub fn new(received_counts: &[i64], num_ranks: usize, max_local: usize, num_local: usize) -> Result<Self> {
        if received_counts.len() != num_ranks * max_local || num_local > max_local {
            return Err(RouterError::shape(
                "received_counts",
                format!("[{num_ranks}, {max_local}]"),
                format!("{} values", received_counts.len()),
            ));
        }
        if let Some(i) = received_counts
            .iter()
            .enumerate()
            .position(|(i, &c)| c < 0 || (i % max_local.max(1) >= num_local && c != 0))
        {
            return Err(RouterError::Inconsistent {
                argument: "received_counts",
                detail: format!(
                    "rank {} sends {} rows for local expert {} of this rank, which holds {num_local}",
                    i / max_local.max(1),
                    received_counts[i],
                    i % max_local.max(1)
                ),
            });
        }
        let at = |s: usize, e: usize| received_counts[s * max_local + e];
        let recv_counts: Vec<i64> = (0..num_ranks).map(|s| (0..num_local).map(|e| at(s, e)).sum()).collect();
        // Position in the received buffer of block (s, e).
        let mut block_start = vec![0i64; num_ranks * num_local.max(1)];
        let mut pos = 0i64;
        for s in 0..num_ranks {
            for e in 0..num_local {
                block_start[s * num_local + e] = pos;
                pos += at(s, e);
            }
        }
        let total = pos as usize;
        let mut order = Vec::with_capacity(total);
        let mut expert_offsets = vec![0i64];
        for e in 0..num_local {
            for s in 0..num_ranks {
                let first = block_start[s * num_local + e];
                order.extend(first..first + at(s, e));
            }
            expert_offsets.push(order.len() as i64);
        }
        let mut inverse = vec![0i64; total];
        for (target, &source) in order.iter().enumerate() {
            inverse[source as usize] = target as i64;
        }
        Ok(ReceivePlan { recv_counts, expert_offsets, order, inverse })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_order_regroups_by_local_expert() {
        // two sources, two local experts: source 0 sends 2 + 1 rows, source 1 sends 1 + 3
        let plan = ReceivePlan::new(&[2, 1, 1, 3], 2, 2, 2).expect("valid");
        assert_eq!(plan.recv_counts, vec![3, 4]);
        assert_eq!(plan.expert_offsets, vec![0, 3, 7]);
        assert_eq!(plan.order, vec![0, 1, 3, 2, 4, 5, 6]);
        for (t, &s) in plan.order.iter().enumerate() {
            assert_eq!(plan.inverse[s as usize], t as i64);
        }
        assert!(ReceivePlan::new(&[1, 1], 2, 1, 0).is_err());
    }
}
