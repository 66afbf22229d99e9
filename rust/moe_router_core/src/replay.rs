//! Router replay (Megatron-Core `router_replay.py`; Rollout Routing Replay,
//! R3, for reinforcement learning on MoE models): route with the experts of a
//! recording instead of a fresh top-k. The rows are scored as usual; only the
//! selection comes from the recording, and the weights are the new scores at
//! the recorded experts (Megatron: `probs = scores.gather(1, idx)`), then
//! normalized and scaled as configured. Capacity and the drop policy apply
//! afterwards, as to any selection.

use crate::error::{Result, RouterError};

/// A recorded selection: the experts of every token, by rank, and which tokens were routed.
#[derive(Debug, Clone, Copy)]
pub struct Replay<'a> {
    /// `[T, k]` row-major recorded experts by rank, each in `[0, E)`, distinct within a token.
    pub experts: &'a [i32],
    /// `[T]` whether the token was routed (not padding) when recorded.
    pub active: &'a [bool],
    /// E of the recording.
    pub num_experts: usize,
    /// k of the recording.
    pub top_k: usize,
}

impl Replay<'_> {
    /// Check the recording against a call of `tokens` x `experts` with k = `top_k`:
    /// its shape, its expert ids (in range, distinct within a token) and the
    /// call's `token_mask` (it may not route a token the recording did not; no
    /// mask routes every token).
    /// Every error names `replay`.
    pub fn check(&self, tokens: usize, experts: usize, top_k: usize, token_mask: Option<&[bool]>) -> Result<()> {
        let recorded = (self.active.len(), self.top_k, self.num_experts);
        if recorded != (tokens, top_k, experts) || self.experts.len() != tokens * top_k {
            return Err(RouterError::shape(
                "replay",
                format!("[{tokens}, {top_k}] choices among {experts} experts (the call's T, top_k, num_experts)"),
                format!("[{}, {}] choices among {} experts", recorded.0, recorded.1, recorded.2),
            ));
        }
        for (t, row) in self.experts.chunks(top_k.max(1)).enumerate() {
            for (j, &x) in row.iter().enumerate() {
                if x < 0 || x as usize >= experts {
                    return Err(RouterError::InvalidEntry {
                        argument: "replay",
                        index: format!("[{t}, {j}]"),
                        value: x.to_string(),
                        allowed: format!("expert ids must be in [0, {experts})"),
                    });
                }
                if row[..j].contains(&x) {
                    return Err(RouterError::InvalidEntry {
                        argument: "replay",
                        index: format!("[{t}, {j}]"),
                        value: x.to_string(),
                        allowed: "a token's recorded experts must be distinct".into(),
                    });
                }
            }
        }
        // Without a mask every token is routed, so the recording must have routed every token.
        if let Some(t) = (0..tokens).find(|&t| token_mask.is_none_or(|m| m[t]) && !self.active[t]) {
            return Err(RouterError::InvalidEntry {
                argument: "replay",
                index: format!(" token {t}"),
                value: "padding in the recording".into(),
                allowed: "token_mask may only route tokens the recording routed (pass the recording's \
                          token mask)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Token `token`'s recorded experts into `experts`; `routed[j]` is whether
    /// the choice is eligible under the new logits (`logits[x] > -inf`): an
    /// ineligible recorded expert gets weight 0 and no capacity, like a filler choice.
    pub(crate) fn choices(&self, token: usize, logits: &[f64], experts: &mut [i32], routed: &mut [bool]) {
        let k = experts.len();
        experts.copy_from_slice(&self.experts[token * k..(token + 1) * k]);
        for (r, &x) in routed.iter_mut().zip(experts.iter()) {
            *r = logits[x as usize] > f64::NEG_INFINITY;
        }
    }
}

/// `[T]` per token, whether two recordings of the same shape differ: a token
/// routed in both whose expert sets (order ignored) differ, or a token routed
/// in only one of them. Tokens that are padding in both never differ.
pub fn differing_tokens(a: Replay, b: Replay) -> Result<Vec<bool>> {
    let (t, top_k) = (a.active.len(), a.top_k);
    let shape = |r: &Replay| (r.active.len(), r.top_k, r.num_experts, r.experts.len());
    if shape(&a) != shape(&b) || a.experts.len() != t * top_k {
        return Err(RouterError::shape(
            "replay",
            format!("[{t}, {top_k}] choices among {} experts, as the first recording", a.num_experts),
            format!("[{}, {}] choices among {} experts", b.active.len(), b.top_k, b.num_experts),
        ));
    }
    let k = top_k.max(1);
    let (mut x, mut y) = (vec![0i32; top_k], vec![0i32; top_k]);
    let rows = a.experts.chunks(k).zip(b.experts.chunks(k));
    Ok(rows
        .zip(a.active.iter().zip(b.active))
        .map(|((ra, rb), (&pa, &pb))| {
            if pa != pb {
                return true;
            }
            x.copy_from_slice(ra);
            y.copy_from_slice(rb);
            x.sort_unstable();
            y.sort_unstable();
            pa && x != y
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_ignore_order_and_padding() {
        let a = Replay { experts: &[0, 1, 2, 3, 0, 1], active: &[true, true, false], num_experts: 7, top_k: 2 };
        let b = Replay { experts: &[1, 0, 2, 4, 5, 6], active: &[true, true, false], num_experts: 7, top_k: 2 };
        assert_eq!(differing_tokens(a, b).unwrap(), vec![false, true, false]);
        let c = Replay { experts: &[0, 1, 2, 3, 0, 1], active: &[true, false, false], num_experts: 7, top_k: 2 };
        assert_eq!(differing_tokens(a, c).unwrap(), vec![false, true, false]);
    }

    #[test]
    fn own_recording_replays_bit_for_bit() {
        use crate::{route_logits, DropPolicy, RouteCall, RouterConfig};
        let logits = ndarray::Array2::from_shape_fn((700, 6), |(t, e)| ((t * 7 + e * 13) % 11) as f32 * 0.3 - 1.0);
        let mut options = RouterConfig::new(6, 2);
        options.drop_policy = DropPolicy::Probs;
        let bias = [0.5, -0.2, 0.0, 0.1, 0.0, 0.3];
        let call = RouteCall { expert_bias: Some(&bias), ..RouteCall::default() };
        let first = route_logits(logits.view(), &options, &call).unwrap();
        let active = vec![true; 700];
        let replay = Replay { experts: &first.expert_indices, active: &active, num_experts: 6, top_k: 2 };
        let again = route_logits(logits.view(), &options, &RouteCall { replay: Some(replay), ..call }).unwrap();
        assert_eq!(first, again);
    }

    #[test]
    fn check_names_replay() {
        let r = Replay { experts: &[0, 0], active: &[true], num_experts: 4, top_k: 2 };
        let err = r.check(1, 4, 2, None).unwrap_err();
        assert!(err.to_string().starts_with("replay[0, 1] is 0"), "{err}");
        let r = Replay { experts: &[0, 4], active: &[true], num_experts: 4, top_k: 2 };
        assert!(r.check(1, 4, 2, None).unwrap_err().to_string().contains("[0, 4)"));
        let r = Replay { experts: &[0, 1], active: &[false], num_experts: 4, top_k: 2 };
        assert!(r.check(1, 4, 2, Some(&[true])).unwrap_err().to_string().contains("token 0"));
        assert!(r.check(1, 4, 2, None).unwrap_err().to_string().contains("token 0"));
        assert!(r.check(1, 4, 2, Some(&[false])).is_ok());
        assert!(r.check(2, 4, 2, None).unwrap_err().to_string().starts_with("replay has shape"));
        assert!(r.check(1, 5, 2, None).unwrap_err().to_string().contains("among 4 experts"));
        let d = Replay { experts: &[0], active: &[true], num_experts: 4, top_k: 1 };
        assert!(differing_tokens(r, d).is_err());
    }
}
