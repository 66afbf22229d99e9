//! Same input, same output, bit for bit, whatever the rayon pool size
//! (semantics.md item 15), and whatever the input's dtype or memory layout.

mod common;

use common::{factor, make_logits, make_mask, to_f32, Logits, XorShift};
use moe_router_core::{
    route_logits, CapacityFactor, DropPolicy, GroupLimit, GroupScore, Overflow, RouteCall, RouterConfig, RouterError,
    Routing, ScoreFunction,
};
use ndarray::{s, Array2, ArrayView2, ShapeBuilder};

const T: usize = 5000;
const THREADS: [usize; 3] = [1, 2, 7];
const POLICIES: [DropPolicy; 4] = [DropPolicy::Position, DropPolicy::Rank, DropPolicy::Probs, DropPolicy::Bpr];

fn pools() -> Vec<(usize, rayon::ThreadPool)> {
    THREADS.iter().map(|&n| (n, rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("thread pool"))).collect()
}

/// Route in every pool (twice in the first) and require identical results.
fn same_in_every_pool(what: &str, logits: ArrayView2<f32>, options: &RouterConfig, call: &RouteCall) -> Routing {
    let pools = pools();
    let first = pools[0].1.install(|| route_logits(logits, options, call));
    let first = first.unwrap_or_else(|err| panic!("{what}: {err}"));
    let again = pools[0].1.install(|| route_logits(logits, options, call)).expect("second run");
    assert!(first == again, "{what}: two runs on one thread differ");
    for (n, pool) in &pools[1..] {
        let other = pool.install(|| route_logits(logits, options, call)).expect("routing");
        if other != first {
            let p = (0..first.expert_indices.len()).find(|&p| {
                first.expert_indices[p] != other.expert_indices[p]
                    || first.expert_slots[p] != other.expert_slots[p]
                    || first.kept[p] != other.kept[p]
                    || first.expert_weights[p].to_bits() != other.expert_weights[p].to_bits()
            });
            panic!(
                "{what}: {n} threads differ from 1 thread (first [T, k] difference at {p:?}; losses {} / {} vs {} / {})",
                other.load_balance_loss, other.router_z_loss, first.load_balance_loss, first.router_z_loss
            );
        }
    }
    first
}

/// The configurations run for every policy.
fn configurations(e: usize, k: usize) -> Vec<(&'static str, RouterConfig, bool, bool, Option<usize>)> {
    // (name, options, training, masked, sequence_length)
    let mut out = Vec::new();
    let mut o = RouterConfig::new(e, k);
    o.capacity_factor = factor("1.0");
    out.push(("plain cf=1.0", o.clone(), false, false, None));
    out.push(("masked", o.clone(), false, true, None));
    out.push(("[B, S, E] S=100", o.clone(), false, false, Some(100)));
    out.push(("[B, S, E] S=1000 masked", o.clone(), false, true, Some(1000)));
    let mut noisy = o.clone();
    noisy.jitter_eps = 0.05;
    noisy.noise_std = 0.3;
    noisy.seed = 42;
    noisy.overflow = Overflow::Reroute;
    noisy.expert_dropout = 0.5;
    noisy.renormalize_after_drop = true;
    out.push(("training noise, reroute p=0.5, renormalize", noisy, true, true, Some(250)));
    let mut grouped = o.clone();
    grouped.score_function = ScoreFunction::Sigmoid;
    grouped.normalize_weights = true;
    grouped.set_groups(Some(GroupLimit { num_groups: 8, group_top_k: 4, group_score: GroupScore::Top2Sum }));
    grouped.capacity_factor = factor("0.75");
    out.push(("sigmoid, groups, cf=0.75", grouped, false, false, None));
    let mut dropless = o;
    dropless.capacity_factor = CapacityFactor::Dropless;
    out.push(("dropless", dropless, false, true, Some(50)));
    out
}

#[test]
fn identical_for_1_2_and_7_threads() {
    let (e, k) = (64, 2);
    let mut rng = XorShift::new(2024);
    let clean = make_logits(&mut rng, Logits::Gaussian, T, e);
    let mut masked = clean.clone();
    let mask = make_mask(&mut rng, &mut masked, T, e, 0.2);
    let bias: Vec<f64> = (0..e).map(|_| (rng.uniform() - 0.5) * 0.05).collect();
    let clean32 = to_f32(&clean);
    let masked32 = to_f32(&masked);
    for policy in POLICIES {
        for (name, mut options, training, with_mask, sequence_length) in configurations(e, k) {
            options.drop_policy = policy;
            let data = if with_mask { &masked32 } else { &clean32 };
            let view = ArrayView2::from_shape((T, e), data).expect("shape");
            for expert_bias in [None, Some(bias.as_slice())] {
                let call = RouteCall {
                    training,
                    token_mask: if with_mask { Some(&mask) } else { None },
                    expert_bias,
                    step: 3,
                    sequence_length,
                    // The optional outputs too must not depend on the pool.
                    return_probs: true,
                    plain_topk_counts: true,
                    ..RouteCall::default()
                };
                let what = format!("{policy:?} / {name} / bias={}", expert_bias.is_some());
                let r = same_in_every_pool(&what, view, &options, &call);
                assert_eq!(r.num_tokens, T, "{what}");
            }
        }
    }
}

#[test]
fn identical_for_every_thread_count_with_k_8() {
    let (e, k) = (64, 8);
    let mut rng = XorShift::new(77);
    let mut logits = make_logits(&mut rng, Logits::Ties, T, e);
    let mask = make_mask(&mut rng, &mut logits, T, e, 0.1);
    let data = to_f32(&logits);
    let view = ArrayView2::from_shape((T, e), &data).expect("shape");
    for policy in POLICIES {
        let mut o = RouterConfig::new(e, k);
        o.drop_policy = policy;
        o.capacity_factor = factor("0.5");
        let call = RouteCall { token_mask: Some(&mask), sequence_length: Some(500), ..RouteCall::default() };
        same_in_every_pool(&format!("{policy:?} k=8 ties"), view, &o, &call);
    }
}

#[test]
fn the_first_offending_token_is_reported_whatever_the_thread_count() {
    let (e, k) = (8, 2);
    let mut rng = XorShift::new(5);
    let mut logits = to_f32(&make_logits(&mut rng, Logits::Gaussian, T, e));
    // Bad rows in several chunks; the first is token 1234 (+inf).
    logits[4100 * e + 3] = f32::NAN;
    logits[1234 * e + 5] = f32::INFINITY;
    logits[2600 * e..2601 * e].fill(f32::NEG_INFINITY);
    let view = ArrayView2::from_shape((T, e), &logits).expect("shape");
    let o = RouterConfig::new(e, k);
    for (n, pool) in pools() {
        let err = pool.install(|| route_logits(view, &o, &RouteCall::default())).expect_err("bad logits");
        match &err {
            RouterError::BadValue { argument, token, .. } => {
                assert_eq!((*argument, *token), ("logits", 1234), "{n} threads: {err}");
            }
            other => panic!("{n} threads: unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("+inf"), "{err}");
    }
}

#[test]
fn float32_and_float64_inputs_with_the_same_values_route_identically() {
    let (e, k) = (64, 8);
    let mut rng = XorShift::new(8);
    let logits32 = to_f32(&make_logits(&mut rng, Logits::Gaussian, 3000, e));
    let logits64: Vec<f64> = logits32.iter().map(|&v| f64::from(v)).collect();
    for policy in POLICIES {
        let mut o = RouterConfig::new(e, k);
        o.drop_policy = policy;
        o.normalize_weights = true;
        let call = RouteCall::default();
        let a = route_logits(ArrayView2::from_shape((3000, e), &logits32).expect("shape"), &o, &call).expect("f32");
        let b = route_logits(ArrayView2::from_shape((3000, e), &logits64).expect("shape"), &o, &call).expect("f64");
        assert!(a == b, "{policy:?}: float32 and float64 inputs differ");
    }
}

#[test]
fn strided_and_column_major_views_route_like_a_contiguous_copy() {
    let (t, e, k) = (1500, 8, 2);
    let mut rng = XorShift::new(9);
    let logits = to_f32(&make_logits(&mut rng, Logits::Gaussian, 2 * t, e));
    let mut o = RouterConfig::new(e, k);
    o.capacity_factor = factor("1.0");
    let call = RouteCall::default();
    let full = Array2::from_shape_vec((2 * t, e), logits).expect("shape");
    // Every other row: a strided view.
    let strided = full.slice(s![..;2, ..]);
    let contiguous = strided.to_owned();
    let want = route_logits(contiguous.view(), &o, &call).expect("contiguous");
    assert_eq!(route_logits(strided, &o, &call).expect("strided"), want);
    // Column-major (Fortran) layout holding the same matrix.
    let mut fortran = Array2::<f32>::zeros((t, e).f());
    fortran.assign(&contiguous);
    assert_eq!(route_logits(fortran.view(), &o, &call).expect("column-major"), want);
}
