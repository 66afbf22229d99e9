//! The optional outputs of `route`: `router_probs`, `plain_tokens_per_expert`
//! and `first_choice_tokens_per_expert`, each against what a caller would
//! otherwise compute itself (a second routing call, NumPy-style scores).
//! The reference grid (`reference.rs`) and the thread-count test
//! (`determinism.rs`) check them too.

mod common;

use common::{factor, make_logits, make_mask, to_f32, Logits, XorShift};
use moe_router_core::{
    gate_probabilities, route, route_logits, CapacityFactor, DropPolicy, GateShape, GroupLimit, GroupScore,
    HierarchicalGate, Overflow, RouteCall, RouterConfig, Routing, ScoreFunction,
};
use ndarray::ArrayView2;

/// The options a caller would use to count the plain top-k with a second
/// call: no groups, no capacity, no bias (passed by the call), no reroute.
fn plain_options(o: &RouterConfig) -> RouterConfig {
    let mut p = o.clone();
    p.set_groups(None);
    p.capacity_factor = CapacityFactor::Dropless;
    p.eval_capacity_factor = None;
    p.min_capacity = 0;
    p.overflow = Overflow::Drop;
    p
}

fn run(data: &[f32], t: usize, o: &RouterConfig, call: &RouteCall) -> Routing {
    let e = o.num_experts;
    let view = ArrayView2::from_shape((t, e), data).expect("shape");
    route_logits(view, o, call).expect("valid input")
}

/// float32 of the float64 softmax (or sigmoid) of a row, as NumPy computes it.
fn numpy_scores(row: &[f32], function: ScoreFunction) -> Vec<f32> {
    let z: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
    if function == ScoreFunction::Sigmoid {
        return z.iter().map(|&v| (1.0 / (1.0 + (-v).exp())) as f32).collect();
    }
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = z.iter().map(|&v| (v - m).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&x| (x / sum) as f32).collect()
}

/// Configurations that change the main selection but not the plain one.
fn configurations(e: usize, k: usize) -> Vec<(&'static str, RouterConfig, bool)> {
    let mut out = Vec::new();
    let base = RouterConfig::new(e, k);
    out.push(("defaults", base.clone(), false));
    let mut grouped = base.clone();
    grouped.set_groups(Some(GroupLimit { num_groups: 8, group_top_k: 2, group_score: GroupScore::Top2Sum }));
    grouped.score_function = ScoreFunction::Sigmoid;
    grouped.normalize_weights = true;
    out.push(("sigmoid, groups", grouped, false));
    let mut capped = base.clone();
    capped.capacity_factor = factor("0.5");
    capped.drop_policy = DropPolicy::Probs;
    capped.overflow = Overflow::Reroute;
    out.push(("cf 0.5, probs, reroute", capped, false));
    let mut noisy = base.clone();
    noisy.jitter_eps = 0.05;
    noisy.noise_std = 0.2;
    noisy.seed = 9;
    noisy.set_groups(Some(GroupLimit { num_groups: 4, group_top_k: 1, group_score: GroupScore::Max }));
    out.push(("training noise, groups", noisy, true));
    out
}

#[test]
fn plain_counts_equal_a_second_plain_routing() {
    let (t, e) = (3000, 32);
    let mut rng = XorShift::new(77);
    for kind in [Logits::Gaussian, Logits::Ties, Logits::Sparse] {
        let clean = make_logits(&mut rng, kind, t, e);
        let mut masked = clean.clone();
        // Masked rows hold garbage (NaN, inf): never read.
        let mask = make_mask(&mut rng, &mut masked, t, e, 0.2);
        let (clean, masked) = (to_f32(&clean), to_f32(&masked));
        let bias: Vec<f64> = (0..e).map(|x| ((x * 7 % 5) as f64 - 2.0) * 0.05).collect();
        for k in [1, 2, 6] {
            for (name, o, training) in configurations(e, k) {
                for (with_mask, with_bias) in [(false, false), (true, false), (false, true), (true, true)] {
                    let call = RouteCall {
                        training,
                        token_mask: if with_mask { Some(&mask) } else { None },
                        expert_bias: if with_bias { Some(&bias) } else { None },
                        step: 4,
                        sequence_length: Some(100),
                        plain_topk_counts: true,
                        ..RouteCall::default()
                    };
                    let what = format!("{kind:?} k={k} {name} mask={with_mask} bias={with_bias}");
                    let data = if with_mask { &masked } else { &clean };
                    let r = run(data, t, &o, &call);
                    let plain_call = RouteCall { expert_bias: None, sequence_length: None, ..call };
                    let second = run(data, t, &plain_options(&o), &plain_call);
                    assert_eq!(r.plain_tokens_per_expert, second.pre_drop_tokens_per_expert, "{what}");
                    // Without bias and groups the plain top-k is the routing itself.
                    if !with_bias && o.groups().is_none() {
                        assert_eq!(r.plain_tokens_per_expert, r.pre_drop_tokens_per_expert, "{what}");
                    }
                    // Not asked: empty.
                    let quiet = run(data, t, &o, &RouteCall { plain_topk_counts: false, ..call });
                    assert!(quiet.plain_tokens_per_expert.is_empty(), "{what}");
                    assert_eq!(quiet.first_choice_tokens_per_expert, r.first_choice_tokens_per_expert, "{what}");
                }
            }
        }
    }
}

#[test]
fn router_probs_are_the_scores_numpy_would_compute() {
    let (t, e) = (1500, 64);
    let mut rng = XorShift::new(5);
    for kind in [Logits::Gaussian, Logits::Sparse, Logits::Wide] {
        let mut logits = make_logits(&mut rng, kind, t, e);
        let mask = make_mask(&mut rng, &mut logits, t, e, 0.3);
        let data = to_f32(&logits);
        for function in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
            let mut o = RouterConfig::new(e, 4);
            o.score_function = function;
            let call = RouteCall { token_mask: Some(&mask), return_probs: true, ..RouteCall::default() };
            let r = run(&data, t, &o, &call);
            assert_eq!(r.router_probs.len(), t * e);
            let mut differing = 0usize;
            for i in 0..t {
                let got = &r.router_probs[i * e..(i + 1) * e];
                if !mask[i] {
                    assert!(got.iter().all(|&p| p == 0.0), "{kind:?} {function:?}: masked token {i}");
                    continue;
                }
                let want = numpy_scores(&data[i * e..(i + 1) * e], function);
                for (x, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    // Both round one float64 value to float32; the float64 values
                    // may differ in their last bits, so the results by one float32 ulp.
                    let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
                    assert!(ulps <= 1, "{kind:?} {function:?} token {i} expert {x}: {g} vs {w}");
                    differing += usize::from(ulps != 0);
                }
            }
            assert!(differing * 100 <= t * e, "{kind:?} {function:?}: {differing} values differ by one ulp");
            // Not asked: empty, and the rest of the result unchanged.
            let quiet = run(&data, t, &o, &RouteCall { return_probs: false, ..call });
            assert!(quiet.router_probs.is_empty());
            assert_eq!(Routing { router_probs: Vec::new(), ..r }, quiet);
        }
    }
}

#[test]
fn first_choice_counts_rank_zero_before_drops() {
    let (t, e, k) = (2048, 16, 2);
    let mut rng = XorShift::new(31);
    let mut logits = make_logits(&mut rng, Logits::Sparse, t, e);
    let mask = make_mask(&mut rng, &mut logits, t, e, 0.25);
    let data = to_f32(&logits);
    let bias: Vec<f64> = (0..e).map(|x| if x % 3 == 0 { 0.3 } else { 0.0 }).collect();
    let mut o = RouterConfig::new(e, k);
    o.capacity_factor = factor("0.25");
    o.drop_policy = DropPolicy::Rank;
    let call = RouteCall { token_mask: Some(&mask), expert_bias: Some(&bias), ..RouteCall::default() };
    let r = run(&data, t, &o, &call);
    // Rank 0 of every active token, drops or not (no reroute: indices stay).
    let mut want = vec![0i64; e];
    for i in (0..t).filter(|&i| mask[i]) {
        want[r.expert_indices[i * k] as usize] += 1;
    }
    assert_eq!(r.first_choice_tokens_per_expert, want);
    assert!(r.dropped_assignments > 0, "the capacity must bite for this test to mean something");
    assert_eq!(want.iter().sum::<i64>(), r.active_tokens as i64);
}

#[test]
fn gate_router_probs_are_the_gate_probabilities() {
    let (t, d, e) = (700, 10, 50);
    let shape = GateShape::for_experts(e);
    let values = |n: usize, salt: u64| -> Vec<f32> {
        (0..n).map(|i| ((((i as u64 * 2_654_435_761 + salt) % 1000) as f32) / 500.0 - 1.0) * 0.4).collect()
    };
    let hidden = values(t * d, 1);
    let group_weight = values(d * shape.groups, 2);
    let expert_weight = values(shape.groups * d * shape.per_group, 3);
    let mask: Vec<bool> = (0..t).map(|i| i % 7 != 3).collect();
    for group_top_k in [None, Some(2)] {
        let gate = HierarchicalGate::new(&hidden, t, d, &group_weight, &expert_weight, e, group_top_k).expect("gate");
        let (probs, _) = gate_probabilities(&gate);
        let mut o = RouterConfig::new(e, 3);
        o.score_function = ScoreFunction::Probabilities;
        let call = RouteCall { token_mask: Some(&mask), return_probs: true, ..RouteCall::default() };
        let r = route(&gate, &o, &call).expect("routing");
        for i in 0..t {
            let (got, want) = (&r.router_probs[i * e..(i + 1) * e], &probs[i * e..(i + 1) * e]);
            if mask[i] {
                assert_eq!(got, want, "token {i} group_top_k {group_top_k:?}");
            } else {
                assert!(got.iter().all(|&p| p == 0.0));
            }
        }
    }
}
