//! Balanced assignment routing (BASE layers, Lewis et al. 2021): in training
//! every expert gets exactly `T_active * k / E` assignments, each token k
//! distinct experts (BASE: k = 1), chosen to maximize the total affinity; in
//! evaluation each token takes its top-k experts with no capacity limit
//! (BASE's greedy inference).
//!
//! The affinity of token t and expert e is the router logit, BASE's
//! `x . centroid_e` (for the hierarchical gate, its probability); `-inf` keeps
//! the token away from the expert. The weights are the scores of the assigned
//! experts under `score_function` (times `weight_scale`); BASE itself mixes
//! `sigmoid(x . c_e)` into the expert output, outside the router. A per-expert
//! selection bias cannot change a balanced optimum (every expert's tokens get
//! the same constant), so it only acts in evaluation.
//!
//! The solver is `balanced_solver`: the exact optimum (`crate::balanced_exact`)
//! or fairseq's approximate auction (`crate::balanced_auction`).

use rayon::prelude::*;

use crate::balanced_auction::fairseq_auction;
use crate::balanced_exact::solve_exact;
use crate::config::{BalancedSolver, CapacityFactor, RouterConfig};
use crate::error::{Result, RouterError};
use crate::peer_loss;
use crate::route::{chunk_tokens, route_into, RouteCall, Routing};
use crate::source::{ChunkBuf, Logit, LogitSource};

/// The token-choice configuration balanced routing scores with: the same top-k, no capacity.
fn greedy(options: &RouterConfig) -> RouterConfig {
    RouterConfig {
        capacity_factor: CapacityFactor::Dropless,
        eval_capacity_factor: None,
        expert_capacity: None,
        ..options.as_token_choice()
    }
}

/// Route with `routing = "balanced"` (see the module docs).
pub(crate) fn route_balanced<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
    probs_out: Option<&mut [f32]>,
) -> Result<Routing> {
    let plain = greedy(options);
    if !call.training {
        return route_into(source, &plain, call, probs_out);
    }
    // The token-choice pass validates the rows and gives the scores and the z-loss.
    let scored = RouteCall { return_probs: true, ..*call };
    let mut probs_out = if call.return_probs { probs_out } else { None };
    let mut r = route_into(source, &plain, &scored, probs_out.as_deref_mut())?;
    let (t, e, k) = (r.num_tokens, r.num_experts, r.top_k);
    let active = r.active_tokens;
    if !(active * k).is_multiple_of(e) {
        return Err(RouterError::Inconsistent {
            argument: source.argument(),
            detail: format!(
                "routing='balanced' gives every expert exactly T_active * top_k / num_experts tokens, \
                 so T_active * top_k must be divisible by num_experts = {e}; got {active} active tokens \
                 with top_k = {k}"
            ),
        });
    }
    let tokens: Vec<usize> = (0..t).filter(|&i| call.token_mask.is_none_or(|m| m[i])).collect();
    let rows = active_rows(source, call, &tokens);
    let experts = match options.balanced_solver {
        BalancedSolver::Exact => {
            let wide: Vec<f64> = rows.par_iter().map(|v| v.to_f64()).collect();
            solve_exact(&wide, e, k).map_err(|bad| RouterError::BadValue {
                argument: source.argument(),
                problem: "leaves no balanced assignment (too many experts are -inf for the tokens up to here)",
                token: tokens[bad.token],
                hint: "with routing='balanced' each expert must be reachable by T_active * top_k / E tokens",
            })?
        }
        BalancedSolver::FairseqAuction => auction(source.argument(), &rows, e)?,
    };

    let probs: &[f32] = match probs_out.as_deref() {
        Some(p) => p,
        None => &r.router_probs,
    };
    let share = active * k / e;
    let mut filled = vec![0i32; e];
    let mut first_choice = vec![0i64; e];
    let ws = options.weight_scale;
    let mut chosen: Vec<usize> = Vec::with_capacity(k);
    for (i, (&tok, mine)) in tokens.iter().zip(experts.chunks(k)).enumerate() {
        // Ranks by affinity, descending (the lower expert first on ties), as top-k orders them.
        let affinity = |x: usize| rows[i * e + x].to_f64();
        chosen.clear();
        chosen.extend(mine.iter().map(|&x| x as usize));
        chosen.sort_by(|&a, &b| affinity(b).total_cmp(&affinity(a)).then(a.cmp(&b)));
        first_choice[chosen[0]] += 1;
        let sum: f64 = chosen.iter().map(|&x| f64::from(probs[tok * e + x])).sum();
        for (j, &x) in chosen.iter().enumerate() {
            let at = tok * k + j;
            r.expert_indices[at] = x as i32;
            r.expert_slots[at] = filled[x];
            filled[x] += 1;
            r.kept[at] = true;
            r.routed[at] = true;
            let s = f64::from(probs[tok * e + x]);
            let w = if !options.normalize_weights {
                s
            } else if sum > 0.0 {
                s / sum
            } else {
                0.0
            };
            r.expert_weights[at] = (ws * w) as f32;
        }
    }
    if !call.return_probs {
        r.router_probs = Vec::new();
    }
    let counts = vec![share as i64; e];
    r.tokens_per_expert = counts.clone();
    r.pre_drop_tokens_per_expert = counts;
    r.first_choice_tokens_per_expert = first_choice;
    r.capacity = share;
    r.dropless = false;
    r.kept_assignments = active * k;
    r.dropped_assignments = 0;
    r.tokens_dropped = 0;
    // Every sequence's loss would measure the batch's balance, not the sequence's.
    r.seq_load_balance_loss = None;
    // E * sum_e f_e P_e with every f_e = 1 / E (f_e = n_e / (T_active k)).
    r.load_balance_loss = r.expert_prob_mean.iter().sum();
    r.auxiliary_loss =
        options.load_balance_loss_coeff * r.load_balance_loss + options.router_z_loss_coeff * r.router_z_loss;
    r.peer_load_balance_loss = options.peer.map(|peer| peer_loss::peer_load_balance_loss(peer, &r.loss_inputs()));
    Ok(r)
}

/// The active tokens' rows, row-major `[tokens.len(), E]`, gathered in parallel
/// over the shape-fixed chunks.
fn active_rows<S: LogitSource>(source: &S, call: &RouteCall, tokens: &[usize]) -> Vec<S::Elem> {
    let (t, e) = (source.num_tokens(), source.num_experts());
    let chunk = chunk_tokens(t, e);
    let parts: Vec<Vec<S::Elem>> = (0..t.div_ceil(chunk))
        .into_par_iter()
        .map_init(ChunkBuf::default, |buf, c| {
            let (start, end) = (c * chunk, ((c + 1) * chunk).min(t));
            let rows = source.chunk(start, end, buf).rows;
            let mut out = Vec::with_capacity((end - start) * e);
            for i in (start..end).filter(|&i| call.token_mask.is_none_or(|m| m[i])) {
                out.extend_from_slice(&rows[(i - start) * e..(i - start + 1) * e]);
            }
            out
        })
        .collect();
    debug_assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), tokens.len() * e);
    parts.concat()
}

/// Each active token's expert under fairseq's auction, run in the rows'
/// precision after `base_layer.py`'s replacement of non-finite scores by the
/// smallest finite one.
fn auction<F: Logit>(argument: &'static str, rows: &[F], e: usize) -> Result<Vec<u32>> {
    let mut rows = rows.to_vec();
    let finite_min = rows.iter().map(|v| v.to_f64()).filter(|v| v.is_finite()).fold(f64::INFINITY, f64::min);
    for v in rows.iter_mut().filter(|v| !v.to_f64().is_finite()) {
        *v = F::from_f64(finite_min);
    }
    let n = rows.len() / e;
    let lists = if let Some(x) = F::as_f32(&rows) {
        fairseq_auction(x, e)
    } else {
        fairseq_auction(F::as_f64(&rows).unwrap_or(&[]), e)
    }
    .map_err(|stuck| RouterError::Inconsistent {
        argument,
        detail: format!("fairseq's auction did not end within {} rounds", stuck.rounds),
    })?;
    let mut experts = vec![u32::MAX; n];
    let share = n / e;
    for (i, &tok) in lists.iter().enumerate() {
        let tok = tok as usize;
        if experts[tok] != u32::MAX {
            return Err(RouterError::Inconsistent {
                argument,
                detail: format!(
                    "fairseq's auction gave active token {tok} to experts {} and {} (tied scores moved a won \
                     token out of its winner's top T_active / E); use balanced_solver='exact'",
                    experts[tok],
                    i / share
                ),
            });
        }
        experts[tok] = (i / share) as u32;
    }
    if let Some(tok) = experts.iter().position(|&x| x == u32::MAX) {
        return Err(RouterError::Inconsistent {
            argument,
            detail: format!("fairseq's auction left active token {tok} out"),
        });
    }
    Ok(experts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutingAlgorithm;
    use crate::route::route_logits;
    use ndarray::array;

    fn config(solver: BalancedSolver) -> RouterConfig {
        RouterConfig { routing: RoutingAlgorithm::Balanced, balanced_solver: solver, ..RouterConfig::new(2, 1) }
    }

    #[test]
    fn training_balances_and_evaluation_is_greedy() {
        // Every token prefers expert 0; token 2 loses least by moving.
        let logits = array![[3.0f64, 0.0], [2.0, 0.0], [1.0, 0.5], [4.0, 0.0]];
        let call = RouteCall { training: true, ..RouteCall::default() };
        for solver in [BalancedSolver::Exact, BalancedSolver::FairseqAuction] {
            let r = route_logits(logits.view(), &config(solver), &call).unwrap();
            assert_eq!(r.expert_indices, vec![0, 1, 1, 0], "{solver}");
            assert_eq!(r.expert_slots, vec![0, 0, 1, 1]);
            assert_eq!(r.tokens_per_expert, vec![2, 2]);
            let p = 1.0 / (1.0 + (-2.0f64).exp());
            assert!((f64::from(r.expert_weights[1]) - (1.0 - p)).abs() < 1e-7);
            assert_eq!((r.capacity, r.dropless, r.dropped_assignments), (2, false, 0));
        }
        let eval = route_logits(logits.view(), &config(BalancedSolver::Exact), &RouteCall::default()).unwrap();
        assert_eq!(eval.expert_indices, vec![0, 0, 0, 0]);
        assert!(eval.dropless);
    }

    #[test]
    fn refuses_an_active_count_not_divisible_by_e() {
        let logits = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 0.0]];
        let call = RouteCall { training: true, ..RouteCall::default() };
        let err = route_logits(logits.view(), &config(BalancedSolver::Exact), &call).unwrap_err();
        assert!(err.to_string().contains("3 active tokens"), "{err}");
        let mask = [true, true, false];
        let masked = RouteCall { token_mask: Some(&mask), ..call };
        let r = route_logits(logits.view(), &config(BalancedSolver::Exact), &masked).unwrap();
        assert_eq!((r.expert_indices[0], r.expert_indices[1], r.kept[2]), (0, 1, false));
    }
}
