//! Each token's kept assignments in CSR form: the per-token view of a
//! decision whose tokens have a variable number of experts (expert choice),
//! or of any decision (the dropped and filler choices left out).

use crate::error::{Result, RouterError};

/// Token t's kept experts and weights are `experts[offsets[t]..offsets[t + 1]]`
/// and `weights[...]`, in the decision's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenExperts {
    /// `[T + 1]` start of each token's entries, then their total N.
    pub offsets: Vec<i64>,
    /// `[N]` expert ids.
    pub experts: Vec<i32>,
    /// `[N]` combine weights.
    pub weights: Vec<f32>,
}

/// The CSR view of the `[T, k]` row-major arrays of a decision; `T` is their
/// length divided by `top_k`. Error: lengths that disagree (`Shape`).
pub fn token_experts(top_k: usize, experts: &[i32], weights: &[f32], kept: &[bool]) -> Result<TokenExperts> {
    let k = top_k.max(1);
    let n = experts.len();
    for (name, len) in [("expert_weights", weights.len()), ("kept", kept.len())] {
        if len != n || !n.is_multiple_of(k) {
            return Err(RouterError::shape(
                name,
                format!("[T, {k}] like expert_indices ({n} values)"),
                format!("{len} values"),
            ));
        }
    }
    let mut offsets = Vec::with_capacity(n / k + 1);
    offsets.push(0i64);
    let (mut xs, mut ws) = (Vec::new(), Vec::new());
    for ((x, w), kp) in experts.chunks(k).zip(weights.chunks(k)).zip(kept.chunks(k)) {
        for j in (0..k).filter(|&j| kp[j]) {
            xs.push(x[j]);
            ws.push(w[j]);
        }
        offsets.push(xs.len() as i64);
    }
    Ok(TokenExperts { offsets, experts: xs, weights: ws })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_kept_entries_in_column_order() {
        let r = token_experts(
            2,
            &[3, 1, 0, 2, 1, 0],
            &[0.5, 0.25, 0.0, 0.0, 1.0, 0.0],
            &[true, true, false, false, true, false],
        )
        .expect("consistent");
        assert_eq!(r.offsets, vec![0, 2, 2, 3]);
        assert_eq!(r.experts, vec![3, 1, 1]);
        assert_eq!(r.weights, vec![0.5, 0.25, 1.0]);
        assert!(token_experts(2, &[0, 1], &[0.0], &[true, true]).is_err());
    }
}
