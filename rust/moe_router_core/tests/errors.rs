//! Bad input and bad options give `Err` with a message naming the argument, the
//! value seen and what is allowed; never a panic.

mod common;

use common::{factor, make_logits, to_f32, Logits, XorShift};

use moe_router_core::{
    route, route_logits, CapacityFactor, ChunkBuf, ChunkRows, Decimal, GroupLimit, GroupScore, LogitSource, RouteCall,
    RouterConfig, RouterError, SliceLogits,
};
use ndarray::{Array2, ArrayView2};

fn logits(t: usize, e: usize) -> Array2<f32> {
    let mut rng = XorShift::new(1);
    Array2::from_shape_vec((t, e), to_f32(&make_logits(&mut rng, Logits::Gaussian, t, e))).expect("shape")
}

/// The error of routing, with its message checked for every `needles`.
fn error_of(view: ArrayView2<f32>, options: &RouterConfig, call: &RouteCall, needles: &[&str]) -> RouterError {
    let err = match route_logits(view, options, call) {
        Ok(_) => panic!("expected an error mentioning {needles:?}"),
        Err(err) => err,
    };
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "message {msg:?} does not mention {needle:?}");
    }
    err
}

fn bad_value_token(err: &RouterError) -> usize {
    match err {
        RouterError::BadValue { token, .. } => *token,
        other => panic!("expected BadValue, got {other:?}"),
    }
}

#[test]
fn nan_logit_names_the_token() {
    let mut x = logits(3000, 8);
    x[[1700, 2]] = f32::NAN;
    let err = error_of(x.view(), &RouterConfig::new(8, 2), &RouteCall::default(), &["logits", "NaN", "token 1700"]);
    assert_eq!(bad_value_token(&err), 1700);
}

#[test]
fn plus_inf_logit_names_the_first_token() {
    let mut x = logits(3000, 8);
    x[[2999, 0]] = f32::NAN;
    x[[900, 7]] = f32::INFINITY;
    let err = error_of(x.view(), &RouterConfig::new(8, 2), &RouteCall::default(), &["logits", "+inf", "token 900"]);
    assert_eq!(bad_value_token(&err), 900);
    // In the first chunk too, and as float64.
    let mut y = x.mapv(f64::from);
    y[[3, 1]] = f64::INFINITY;
    let err = route_logits(y.view(), &RouterConfig::new(8, 2), &RouteCall::default()).expect_err("+inf");
    assert_eq!(bad_value_token(&err), 3);
}

#[test]
fn all_neg_inf_row_names_the_token() {
    let mut x = logits(600, 4);
    x.row_mut(4).fill(f32::NEG_INFINITY);
    x.row_mut(520).fill(f32::NEG_INFINITY);
    let err = error_of(x.view(), &RouterConfig::new(4, 1), &RouteCall::default(), &["logits", "-inf", "token 4"]);
    assert_eq!(bad_value_token(&err), 4);
    // A single-token batch (no thread-pool path) behaves the same.
    let one = Array2::from_elem((1, 4), f32::NEG_INFINITY);
    let err = error_of(one.view(), &RouterConfig::new(4, 1), &RouteCall::default(), &["token 0"]);
    assert_eq!(bad_value_token(&err), 0);
    // Masking the row out makes it legal.
    let mut mask = vec![true; 600];
    mask[4] = false;
    mask[520] = false;
    let call = RouteCall { token_mask: Some(&mask), ..RouteCall::default() };
    assert!(route_logits(x.view(), &RouterConfig::new(4, 1), &call).is_ok());
}

#[test]
fn logits_whose_z_loss_term_overflows_name_the_token() {
    // sqrt(f64::MAX) = 1.34e154: below it the z-loss is finite, above it the square overflows.
    // Only the row's logsumexp counts (a lone very negative logit does not).
    for (row, ok) in [
        ([1.3e154f64, 0.0, 1.3e154], true),
        ([-1.3e154, -1.3e154, -1.3e154], true),
        ([0.0, -1e300, 0.0], true),
        ([0.0, 1.35e154, 0.0], false),
        ([-1e200, -1e200, f64::NEG_INFINITY], false),
        ([f64::MAX, 0.0, 0.0], false),
    ] {
        let mut data = vec![0.0f64; 4 * 3];
        data[6..9].copy_from_slice(&row);
        let view = ArrayView2::from_shape((4, 3), &data).expect("shape");
        match route_logits(view, &RouterConfig::new(3, 2), &RouteCall::default()) {
            Ok(r) => {
                assert!(ok, "{row:?}: expected an error");
                assert!(r.router_z_loss.is_finite() && r.expert_weights.iter().all(|w| w.is_finite()), "{row:?}");
            }
            Err(err) => {
                assert!(!ok, "{row:?}: {err}");
                assert_eq!(bad_value_token(&err), 2, "{row:?}");
                assert!(err.to_string().contains("z-loss") && err.to_string().contains("logits"), "{err}");
            }
        }
    }
}

#[test]
fn the_first_bad_token_is_named_whichever_check_finds_it() {
    // An overflowing z-loss term and a NaN logit, in either order, in the same
    // group of 8 tokens, across groups and across chunks of the thread split.
    let (e, t) = (16, 70_000);
    for (a, b) in [(3usize, 6usize), (5, 9), (20_000, 65_000)] {
        for (z_at, nan_at) in [(a, b), (b, a)] {
            let first = z_at.min(nan_at);
            let mut data = vec![0.5f64; t * e];
            data[z_at * e + 1] = 1.5e154;
            data[nan_at * e + 4] = f64::NAN;
            let view = ArrayView2::from_shape((t, e), &data).expect("shape");
            let err = route_logits(view, &RouterConfig::new(e, 2), &RouteCall::default()).expect_err("refused");
            assert_eq!(bad_value_token(&err), first, "z-loss overflow at {z_at}, NaN at {nan_at}: {err}");
            let z_loss = err.to_string().contains("z-loss");
            assert_eq!(z_loss, z_at == first, "{err}");
        }
    }
}

#[test]
fn some_neg_inf_is_fine() {
    let mut x = logits(10, 4);
    x[[0, 0]] = f32::NEG_INFINITY;
    x[[0, 1]] = f32::NEG_INFINITY;
    x[[0, 2]] = f32::NEG_INFINITY;
    let r = route_logits(x.view(), &RouterConfig::new(4, 2), &RouteCall::default()).expect("valid");
    assert_eq!(r.expert_indices[..2], [3, 0]);
    assert_eq!(r.kept[..2], [true, false]);
}

#[test]
fn mask_of_the_wrong_length() {
    let x = logits(10, 4);
    let mask = vec![true; 9];
    let call = RouteCall { token_mask: Some(&mask), ..RouteCall::default() };
    let err = error_of(x.view(), &RouterConfig::new(4, 2), &call, &["token_mask", "[10]", "[9]"]);
    assert!(matches!(err, RouterError::Shape { argument: "token_mask", .. }), "{err:?}");
}

#[test]
fn bias_of_the_wrong_length_or_not_finite() {
    let x = logits(10, 4);
    let o = RouterConfig::new(4, 2);
    let short = [0.0; 3];
    let call = RouteCall { expert_bias: Some(&short), ..RouteCall::default() };
    let err = error_of(x.view(), &o, &call, &["expert_bias", "[4]", "[3]"]);
    assert!(matches!(err, RouterError::Shape { argument: "expert_bias", .. }), "{err:?}");
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let bias = [0.0, 0.1, 0.0, bad];
        let call = RouteCall { expert_bias: Some(&bias), ..RouteCall::default() };
        let err = error_of(x.view(), &o, &call, &["expert_bias[3]", "finite"]);
        assert!(matches!(err, RouterError::NonFiniteParameter { index: 3, .. }), "{err:?}");
    }
}

#[test]
fn experts_mismatch() {
    let x = logits(10, 7);
    let err = error_of(x.view(), &RouterConfig::new(8, 2), &RouteCall::default(), &["logits", "8", "7"]);
    assert!(matches!(err, RouterError::Shape { argument: "logits", .. }), "{err:?}");
    let empty = Array2::<f32>::zeros((10, 0));
    error_of(empty.view(), &RouterConfig::new(8, 2), &RouteCall::default(), &["logits"]);
}

#[test]
fn sequence_length_must_divide_the_tokens() {
    let x = logits(10, 4);
    let o = RouterConfig::new(4, 2);
    for s in [0, 3, 20] {
        let call = RouteCall { sequence_length: Some(s), ..RouteCall::default() };
        error_of(x.view(), &o, &call, &["logits", "T = 10"]);
    }
}

#[test]
fn slice_logits_of_the_wrong_length() {
    let data = [0.0f32; 10];
    let err = SliceLogits::new(&data, 3, 4).expect_err("length");
    assert!(err.to_string().contains("logits"), "{err}");
    assert!(err.to_string().contains("10"), "{err}");
}

/// Every invalid option: `Err(InvalidConfig)` naming the field, both from
/// `validate` and from routing.
#[test]
fn invalid_options_name_the_field() {
    let x = logits(16, 8);
    let mut cases: Vec<(RouterConfig, &str)> = Vec::new();
    let base = RouterConfig::new(8, 2);
    let with = |f: &dyn Fn(&mut RouterConfig)| {
        let mut o = base.clone();
        f(&mut o);
        o
    };
    cases.push((RouterConfig::new(0, 1), "num_experts"));
    cases.push((RouterConfig::new(8, 0), "top_k"));
    cases.push((RouterConfig::new(8, 9), "top_k"));
    cases.push((with(&|o| o.weight_scale = f64::NAN), "weight_scale"));
    cases.push((with(&|o| o.weight_scale = f64::INFINITY), "weight_scale"));
    cases.push((with(&|o| o.weight_scale = 3.5e38), "weight_scale"));
    cases.push((with(&|o| o.reroute_weight_scale = 1e39), "reroute_weight_scale"));
    cases.push((
        with(&|o| {
            o.weight_scale = 1e38;
            o.reroute_weight_scale = 4.0;
        }),
        "reroute_weight_scale",
    ));
    cases.push((with(&|o| o.capacity_factor = factor("0")), "capacity_factor"));
    cases.push((with(&|o| o.eval_capacity_factor = Some(factor("0.0"))), "eval_capacity_factor"));
    let group = |num_groups, group_top_k| Some(GroupLimit { num_groups, group_top_k, group_score: GroupScore::Max });
    cases.push((with(&|o| o.set_groups(group(3, 1))), "num_groups"));
    cases.push((with(&|o| o.set_groups(group(0, 1))), "num_groups"));
    cases.push((with(&|o| o.set_groups(group(16, 1))), "num_groups"));
    cases.push((with(&|o| o.set_groups(group(4, 0))), "group_top_k"));
    cases.push((with(&|o| o.set_groups(group(4, 5))), "group_top_k"));
    cases.push((
        with(&|o| {
            o.top_k = 3;
            o.set_groups(group(4, 1));
        }),
        "top_k",
    ));
    cases.push((with(&|o| o.reroute_weight_scale = -0.5), "reroute_weight_scale"));
    cases.push((with(&|o| o.reroute_weight_scale = f64::NAN), "reroute_weight_scale"));
    cases.push((with(&|o| o.expert_dropout = 1.5), "expert_dropout"));
    cases.push((with(&|o| o.expert_dropout = f64::NAN), "expert_dropout"));
    cases.push((with(&|o| o.jitter_eps = 1.0), "jitter_eps"));
    cases.push((with(&|o| o.jitter_eps = f64::NAN), "jitter_eps"));
    cases.push((with(&|o| o.noise_std = -1.0), "noise_std"));
    cases.push((with(&|o| o.noise_std = f64::INFINITY), "noise_std"));
    for (o, field) in cases {
        let err = o.validate().expect_err(field);
        match &err {
            RouterError::InvalidConfig { field: f, .. } => assert_eq!(*f, field, "{err}"),
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
        assert!(err.to_string().contains(field), "{err}");
        let view = if o.num_experts == 8 { x.view() } else { ArrayView2::from_shape((0, 0), &[]).expect("empty") };
        let routed = route_logits(view, &o, &RouteCall::default()).expect_err(field);
        assert_eq!(routed, err);
    }
}

#[test]
fn zero_capacity_factor_suggests_dropless() {
    let err = Decimal::parse_factor("capacity_factor", "0").expect_err("zero");
    assert!(err.to_string().contains("None"), "{err}");
    for text in ["-1", "-0.5", "nan", "inf", "", "abc"] {
        let err = Decimal::parse_factor("capacity_factor", text).expect_err(text);
        assert!(err.to_string().contains("capacity_factor"), "{err}");
    }
    assert!(Decimal::parse_factor("capacity_factor", "1.25").is_ok());
    // A tiny positive factor is valid and rounds up to capacity 1.
    let mut o = RouterConfig::new(8, 1);
    o.capacity_factor = factor("1e-30");
    let r = route_logits(logits(16, 8).view(), &o, &RouteCall::default()).expect("tiny factor");
    assert_eq!(r.capacity, 1);
    o.capacity_factor = CapacityFactor::Dropless;
    assert!(route_logits(logits(16, 8).view(), &o, &RouteCall::default()).is_ok());
}

/// A source claiming more tokens than an `i32` slot can index: refused before
/// any `[T, k]` array is allocated or any row is read.
struct Huge;

impl LogitSource for Huge {
    type Elem = f32;
    fn argument(&self) -> &'static str {
        "hidden"
    }
    fn num_tokens(&self) -> usize {
        1 << 31
    }
    fn num_experts(&self) -> usize {
        4
    }
    fn chunk<'s>(&'s self, _start: usize, _end: usize, _buf: &'s mut ChunkBuf<f32>) -> ChunkRows<'s, f32> {
        panic!("a refused source must not be read")
    }
}

#[test]
fn too_many_tokens_is_an_error_not_an_allocation() {
    let err = route(&Huge, &RouterConfig::new(4, 2), &RouteCall::default()).expect_err("too many tokens");
    assert!(err.to_string().contains("hidden"), "{err}");
}

#[test]
fn empty_input_is_fine() {
    let x = Array2::<f32>::zeros((0, 8));
    for cf in [factor("1.25"), CapacityFactor::Dropless] {
        let mut o = RouterConfig::new(8, 2);
        o.capacity_factor = cf;
        let r =
            route_logits(x.view(), &o, &RouteCall { sequence_length: Some(4), ..RouteCall::default() }).expect("empty");
        assert_eq!((r.num_tokens, r.capacity, r.kept_assignments, r.tokens_dropped), (0, 0, 0, 0));
        assert_eq!((r.load_balance_loss, r.router_z_loss, r.seq_load_balance_loss), (0.0, 0.0, Some(0.0)));
        assert!(r.expert_indices.is_empty());
    }
}

/// A set cancel flag stops the call (`Cancelled`, before any chunk is scored);
/// a flag that stays clear changes nothing.
#[test]
fn cancel_flag_stops_the_call() {
    use std::sync::atomic::AtomicBool;
    let x = logits(5000, 8);
    let o = RouterConfig::new(8, 2);
    let set = AtomicBool::new(true);
    let err = route_logits(x.view(), &o, &RouteCall { cancel: Some(&set), ..RouteCall::default() });
    assert_eq!(err, Err(RouterError::Cancelled));
    let clear = AtomicBool::new(false);
    let with_flag = route_logits(x.view(), &o, &RouteCall { cancel: Some(&clear), ..RouteCall::default() });
    assert_eq!(with_flag, route_logits(x.view(), &o, &RouteCall::default()));
    // The pool-free path of a one-chunk batch reads it too.
    let small = logits(10, 8);
    let err = route_logits(small.view(), &o, &RouteCall { cancel: Some(&set), ..RouteCall::default() });
    assert_eq!(err, Err(RouterError::Cancelled));
}
