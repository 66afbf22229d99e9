//! `overflow = Reroute` (semantics.md item 13): invariants against the same
//! routing with `overflow = Drop`, and exact agreement with the reference.

mod common;

use common::{assert_invariants, assert_matches, close, factor, make_logits, make_mask, reference, to_f32, XorShift};
use moe_router_core::{route_logits, CapacityFactor, DropPolicy, Overflow, RouteCall, RouterConfig, Routing};
use ndarray::ArrayView2;

const POLICIES: [DropPolicy; 4] = [DropPolicy::Position, DropPolicy::Rank, DropPolicy::Probs, DropPolicy::Bpr];

/// Logits with a strong per-expert skew so that the popular experts overflow.
fn skewed(rng: &mut XorShift, t: usize, e: usize) -> Vec<f64> {
    let skew: Vec<f64> = (0..e).map(|x| if x < e.div_ceil(4) { 2.0 } else { 0.0 }).collect();
    let mut v = make_logits(rng, common::Logits::Gaussian, t, e);
    for row in v.chunks_mut(e) {
        for (z, s) in row.iter_mut().zip(&skew) {
            *z += s;
        }
    }
    v
}

fn run(logits: &[f32], t: usize, o: &RouterConfig, call: &RouteCall) -> Routing {
    let view = ArrayView2::from_shape((t, o.num_experts), logits).expect("shape");
    route_logits(view, o, call).expect("routing")
}

/// Check one rerouting against its drop-only and dropless counterparts.
fn check_reroute(what: &str, logits: &[f32], t: usize, o: &RouterConfig, call: &RouteCall) -> usize {
    assert_eq!(o.overflow, Overflow::Reroute);
    assert!(!o.renormalize_after_drop);
    let k = o.top_k;
    let r = run(logits, t, o, call);
    let mut drop = o.clone();
    drop.overflow = Overflow::Drop;
    let d = run(logits, t, &drop, call);
    let mut unlimited = drop.clone();
    unlimited.capacity_factor = CapacityFactor::Dropless;
    unlimited.eval_capacity_factor = None;
    let u = run(logits, t, &unlimited, call);

    // Slots distinct and below capacity, counts consistent, k distinct experts per token.
    assert_invariants(what, &r);
    assert_eq!(r.capacity, d.capacity, "{what}");
    for (x, &n) in r.tokens_per_expert.iter().enumerate() {
        assert!(n as usize <= r.capacity, "{what}: expert {x} keeps {n} > capacity {}", r.capacity);
    }
    // Reroutes change neither the routing before capacity nor the losses.
    assert_eq!(r.pre_drop_tokens_per_expert, d.pre_drop_tokens_per_expert, "{what}");
    assert_eq!(r.load_balance_loss.to_bits(), d.load_balance_loss.to_bits(), "{what}");
    assert_eq!(r.router_z_loss.to_bits(), d.router_z_loss.to_bits(), "{what}");

    let mut moved = 0;
    for p in 0..t * k {
        let (tok, j) = (p / k, p % k);
        if r.rerouted[p] {
            moved += 1;
            // Only a routed assignment that the policy dropped moves ...
            assert!(!d.kept[p] && u.kept[p], "{what}: ({tok}, {j}) rerouted but not an overflow");
            assert!(r.kept[p], "{what}: ({tok}, {j}) rerouted but not kept");
            assert_ne!(r.expert_indices[p], d.expert_indices[p], "{what}: ({tok}, {j}) rerouted to itself");
            // ... with its original weight times reroute_weight_scale.
            let want = f64::from(u.expert_weights[p]) * o.reroute_weight_scale;
            assert!(
                close(f64::from(r.expert_weights[p]), want, 1e-6, 0.0),
                "{what}: ({tok}, {j}) weight {} expected {want}",
                r.expert_weights[p]
            );
        } else {
            // Everything else is exactly the drop-only result: no kept assignment is displaced.
            assert_eq!(r.expert_indices[p], d.expert_indices[p], "{what}: ({tok}, {j}) index");
            assert_eq!(r.kept[p], d.kept[p], "{what}: ({tok}, {j}) kept");
            assert_eq!(r.expert_slots[p], d.expert_slots[p], "{what}: ({tok}, {j}) slot");
            assert_eq!(r.expert_weights[p].to_bits(), d.expert_weights[p].to_bits(), "{what}: ({tok}, {j}) weight");
        }
    }
    assert_eq!(r.kept_assignments, d.kept_assignments + moved, "{what}");
    // Drop-only slots stay below the rerouted ones: a reroute takes the next free slot.
    for p in (0..t * k).filter(|&p| r.rerouted[p]) {
        let x = r.expert_indices[p];
        let placed = d.tokens_per_expert[x as usize];
        assert!(i64::from(r.expert_slots[p]) >= placed, "{what}: rerouted slot below a policy slot");
    }
    // In evaluation every overflow tries: one still dropped had nowhere to go.
    if !call.training || o.expert_dropout == 1.0 {
        for p in (0..t * k).filter(|&p| u.kept[p] && !r.kept[p]) {
            let tok = p / k;
            let mine = &r.expert_indices[tok * k..(tok + 1) * k];
            for x in 0..o.num_experts {
                if !mine.contains(&(x as i32)) {
                    assert_eq!(
                        r.tokens_per_expert[x] as usize,
                        r.capacity,
                        "{what}: ({tok}, {}) dropped although expert {x} had room",
                        p % k
                    );
                }
            }
        }
    }
    // And the reference agrees exactly.
    let want = reference(logits, t, o, call);
    assert_matches(what, &r, &want);
    moved
}

#[test]
fn reroute_invariants_in_evaluation() {
    let mut total_moved = 0;
    for (e, k) in [(4, 3), (8, 1), (8, 2), (8, 4), (64, 2), (64, 8)] {
        for t in [1, 100, 513, 5000] {
            for cf in ["0.5", "1.0", "1.25"] {
                for (pi, policy) in POLICIES.into_iter().enumerate() {
                    let mut rng = XorShift::new((e * 1_000_000 + k * 10_000 + t) as u64 + pi as u64);
                    let mut logits = skewed(&mut rng, t, e);
                    let masked = rng.chance(0.3);
                    let mask = masked.then(|| make_mask(&mut rng, &mut logits, t, e, 0.25));
                    let logits = to_f32(&logits);
                    let mut o = RouterConfig::new(e, k);
                    o.capacity_factor = factor(cf);
                    o.drop_policy = policy;
                    o.overflow = Overflow::Reroute;
                    o.reroute_weight_scale = 0.5;
                    o.normalize_weights = rng.chance(0.5);
                    let call = RouteCall { token_mask: mask.as_deref(), ..RouteCall::default() };
                    let what = format!("E={e} k={k} T={t} cf={cf} {policy:?} masked={masked}");
                    total_moved += check_reroute(&what, &logits, t, &o, &call);
                }
            }
        }
    }
    assert!(total_moved > 1000, "the skewed inputs should overflow: only {total_moved} reroutes");
}

#[test]
fn reroute_in_training_is_a_seeded_coin() {
    let (t, e, k) = (3000, 8, 2);
    let mut rng = XorShift::new(99);
    let logits = to_f32(&skewed(&mut rng, t, e));
    for policy in POLICIES {
        let mut o = RouterConfig::new(e, k);
        o.capacity_factor = factor("1.0");
        o.drop_policy = policy;
        o.overflow = Overflow::Reroute;
        o.seed = 7;
        let moved = |o: &RouterConfig, step: u64| {
            let call = RouteCall { training: true, step, ..RouteCall::default() };
            let what = format!("{policy:?} training p={} step={step}", o.expert_dropout);
            check_reroute(&what, &logits, t, o, &call);
            run(&logits, t, o, &call).rerouted
        };
        o.expert_dropout = 0.0;
        assert!(!moved(&o, 0).contains(&true), "{policy:?}: p=0 must not reroute");
        o.expert_dropout = 1.0;
        let all = moved(&o, 0).iter().filter(|&&b| b).count();
        o.expert_dropout = 0.5;
        let a = moved(&o, 0);
        let half = a.iter().filter(|&&b| b).count();
        assert!(half > 0 && half < all, "{policy:?}: p=0.5 moved {half} of {all}");
        assert_eq!(a, moved(&o, 0), "{policy:?}: same seed and step, same draws");
        assert_ne!(a, moved(&o, 1), "{policy:?}: another step, other draws");
    }
}

#[test]
fn dropless_never_reroutes() {
    let (t, e, k) = (2000, 8, 2);
    let mut rng = XorShift::new(3);
    let logits = to_f32(&skewed(&mut rng, t, e));
    let mut o = RouterConfig::new(e, k);
    o.capacity_factor = CapacityFactor::Dropless;
    o.overflow = Overflow::Reroute;
    let r = run(&logits, t, &o, &RouteCall::default());
    assert!(!r.rerouted.contains(&true));
    assert_eq!(r.kept_assignments, t * k);
    let want = reference(&logits, t, &o, &RouteCall::default());
    assert_matches("dropless reroute", &r, &want);
}

/// A token never gets an expert twice, even when every other expert is full:
/// with E = k + 1 there is exactly one candidate.
#[test]
fn reroute_with_a_single_candidate_expert() {
    let (t, e, k) = (1000, 3, 2);
    let mut rng = XorShift::new(12);
    let logits = to_f32(&skewed(&mut rng, t, e));
    for policy in POLICIES {
        let mut o = RouterConfig::new(e, k);
        o.capacity_factor = factor("0.5");
        o.drop_policy = policy;
        o.overflow = Overflow::Reroute;
        check_reroute(&format!("E=3 k=2 {policy:?}"), &logits, t, &o, &RouteCall::default());
    }
}
