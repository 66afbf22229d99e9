//! `route_logits` against the sequential reference router of `common`, on a grid
//! of shapes, capacity factors and drop policies, with the other options
//! (score function, bias, groups, mask, roundings, renormalization, reroute,
//! noise, dtype, kind of logits) drawn per case from a seeded PRNG.

mod common;

use common::{check_invariants, check_matches, factor, make_logits, make_mask, reference, to_f32, Logits, XorShift};
use moe_router_core::{
    route_logits, CapacityFactor, CapacityRounding, DropPolicy, GroupLimit, GroupScore, Overflow, RouteCall,
    RouterConfig, Routing, ScoreFunction,
};
use ndarray::ArrayView2;

const TOKENS: [usize; 6] = [0, 1, 511, 512, 513, 3000];
const EXPERTS_AND_K: [(usize, usize); 9] = [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2), (8, 8), (64, 1), (64, 2), (64, 8)];
const FACTORS: [Option<&str>; 5] = [None, Some("0.5"), Some("1.0"), Some("1.25"), Some("2")];
/// Independent draws of the other options per grid point.
const VARIANTS: u64 = 2;

/// One routing problem: logits, options and call arguments, with a description.
struct Case {
    name: String,
    t: usize,
    logits: Vec<f64>,
    f32_input: bool,
    mask: Option<Vec<bool>>,
    bias: Option<Vec<f64>>,
    options: RouterConfig,
    training: bool,
    step: u64,
    sequence_length: Option<usize>,
}

impl Case {
    fn call(&self) -> RouteCall<'_> {
        RouteCall {
            training: self.training,
            token_mask: self.mask.as_deref(),
            expert_bias: self.bias.as_deref(),
            step: self.step,
            sequence_length: self.sequence_length,
            return_probs: true,
            plain_topk_counts: true,
            ..RouteCall::default()
        }
    }

    /// Route, compare with the reference and check the invariants.
    fn check(&self) -> Result<Routing, String> {
        let e = self.options.num_experts;
        let call = self.call();
        let (got, want) = if self.f32_input {
            let data = to_f32(&self.logits);
            let view = ArrayView2::from_shape((self.t, e), &data).map_err(|err| err.to_string())?;
            (route_logits(view, &self.options, &call), reference(&data, self.t, &self.options, &call))
        } else {
            let view = ArrayView2::from_shape((self.t, e), &self.logits).map_err(|err| err.to_string())?;
            (route_logits(view, &self.options, &call), reference(&self.logits, self.t, &self.options, &call))
        };
        let got = got.map_err(|err| format!("{}: route_logits failed: {err}", self.name))?;
        check_matches(&self.name, &got, &want)?;
        check_invariants(&self.name, &got)?;
        Ok(got)
    }

    fn run_and_compare(&self) -> Routing {
        self.check().unwrap_or_else(|msg| panic!("{msg}"))
    }
}

/// Divisors of `t` worth trying as a sequence length (T = 0 accepts any).
fn sequence_lengths(t: usize) -> Vec<usize> {
    match t {
        0 => vec![4],
        _ => [1, 7, 19, 27, 64, 73, 128, 300, 512, 1000, 3000].into_iter().filter(|s| t.is_multiple_of(*s)).collect(),
    }
}

/// Draw everything but (T, E, k, cf, policy) from `rng`.
fn make_case(
    rng: &mut XorShift,
    t: usize,
    e: usize,
    k: usize,
    cf: Option<&str>,
    policy: DropPolicy,
    full_variety: bool,
) -> Case {
    let mut o = RouterConfig::new(e, k);
    o.drop_policy = policy;
    o.capacity_factor = cf.map_or(CapacityFactor::Dropless, factor);
    let kind = rng.pick(&common::ALL_LOGITS);
    let mut logits = make_logits(rng, kind, t, e);
    let f32_input = rng.chance(0.5);
    let mut name = format!("T={t} E={e} k={k} cf={cf:?} policy={policy:?} logits={kind:?} f32={f32_input}");
    let mut training = rng.chance(0.5);
    let mut mask = None;
    let mut bias = None;
    let mut sequence_length = None;
    if full_variety {
        o.score_function = if rng.chance(0.3) { ScoreFunction::Sigmoid } else { ScoreFunction::Softmax };
        o.normalize_weights = rng.chance(0.5);
        o.weight_scale = rng.pick(&[1.0, 1.0, 2.5, 0.75]);
        o.capacity_rounding = rng.pick(&[
            CapacityRounding::Exact,
            CapacityRounding::Megatron,
            CapacityRounding::DeepSpeed,
            CapacityRounding::Tutel,
            if k <= 2 { CapacityRounding::Fairseq } else { CapacityRounding::Exact },
        ]);
        o.capacity_alignment = rng.pick(&[1, 1, 1, 4, 24]);
        o.min_capacity = rng.pick(&[0, 0, 0, 4, 40]);
        o.renormalize_after_drop = rng.chance(0.3);
        if rng.chance(0.25) {
            o.eval_capacity_factor = Some(rng.pick(&[CapacityFactor::Dropless, factor("0.75"), factor("1.1")]));
        } else if rng.chance(0.25) {
            let CapacityFactor::Factor(fraction) = factor(rng.pick(&["0.25", "0.07", "1.5"])) else { unreachable!() };
            o.eval_capacity_token_fraction = Some(fraction);
        }
        if rng.chance(0.3) {
            o.overflow = Overflow::Reroute;
            o.reroute_weight_scale = rng.pick(&[0.5, 1.0, 0.25]);
            o.expert_dropout = rng.pick(&[1.0, 0.5]);
        }
        if e >= 8 && rng.chance(0.4) {
            let (num_groups, group_top_k) = if e == 8 { (4, 2) } else { rng.pick(&[(8, 3), (8, 2), (16, 4)]) };
            let mut group_score = if rng.chance(0.5) { GroupScore::Max } else { GroupScore::Top2Sum };
            // sigmoid(x) + sigmoid(-x) = 1: with tied logits, top-2 sums of different
            // groups are equal in exact arithmetic and rounding alone would rank them.
            if kind == Logits::Ties && o.score_function == ScoreFunction::Sigmoid {
                group_score = GroupScore::Max;
            }
            o.set_groups(Some(GroupLimit { num_groups, group_top_k, group_score }));
            // top_k must stay reachable.
            if k > group_top_k * (e / num_groups) {
                o.set_groups(None);
            }
        }
        if rng.chance(0.4) {
            bias = Some((0..e).map(|_| (rng.uniform() - 0.5) * 0.2).collect());
        }
        if rng.chance(0.4) {
            let p = rng.pick(&[0.1, 0.5, 1.0]);
            mask = Some(make_mask(rng, &mut logits, t, e, p));
        }
        if training && rng.chance(0.3) {
            o.jitter_eps = rng.pick(&[0.0, 0.01, 0.1]);
            o.noise_std = rng.pick(&[0.0, 0.5]);
            o.seed = rng.next_u64();
        }
        if rng.chance(0.3) {
            sequence_length = Some(rng.pick(&sequence_lengths(t)));
        }
    } else {
        training = false;
    }
    name += &format!(" training={training} mask={} bias={} seq={sequence_length:?}", mask.is_some(), bias.is_some());
    Case { name, t, logits, f32_input, mask, bias, options: o, training, step: rng.below(5) as u64, sequence_length }
}

/// Every case of the grid for one policy; panics listing the failures (all of
/// them are run, so one fault cannot hide another).
fn grid(policy: DropPolicy) {
    let mut cases = 0;
    let mut failures = Vec::new();
    for (ti, &t) in TOKENS.iter().enumerate() {
        for (ei, &(e, k)) in EXPERTS_AND_K.iter().enumerate() {
            for (ci, &cf) in FACTORS.iter().enumerate() {
                for v in 0..=VARIANTS {
                    let seed = (((ti * 100 + ei) * 100 + ci) * 100) as u64 + v + 1000 * policy as u64;
                    let mut rng = XorShift::new(seed);
                    // Variant 0: default options (only the logits vary); others: everything drawn.
                    let case = make_case(&mut rng, t, e, k, cf, policy, v > 0);
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.check()));
                    let failure = match outcome {
                        Ok(Ok(_)) => None,
                        Ok(Err(msg)) => Some(msg),
                        Err(_) => Some(format!("{}: route_logits panicked", case.name)),
                    };
                    if let Some(msg) = failure {
                        failures.push((case.options.clone(), msg));
                    }
                    cases += 1;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{policy:?}: {} of {cases} cases differ from the reference:\n{}\n\nThe first ones in full:\n\n{}",
        failures.len(),
        failures.iter().map(|(_, m)| m.lines().next().unwrap_or(m)).collect::<Vec<_>>().join("\n"),
        failures.iter().take(4).map(|(o, m)| format!("{m}\n  options: {o:?}")).collect::<Vec<_>>().join("\n\n")
    );
}

#[test]
fn grid_position() {
    grid(DropPolicy::Position);
}

#[test]
fn grid_rank() {
    grid(DropPolicy::Rank);
}

#[test]
fn grid_probs() {
    grid(DropPolicy::Probs);
}

#[test]
fn grid_bpr() {
    grid(DropPolicy::Bpr);
}

#[test]
fn grid_bpr_rank() {
    grid(DropPolicy::BprRank);
}

fn plain_case(t: usize, e: usize, k: usize, seed: u64) -> Case {
    let mut rng = XorShift::new(seed);
    let logits = make_logits(&mut rng, Logits::Gaussian, t, e);
    Case {
        name: format!("T={t} E={e} k={k}"),
        t,
        logits,
        f32_input: true,
        mask: None,
        bias: None,
        options: RouterConfig::new(e, k),
        training: false,
        step: 0,
        sequence_length: None,
    }
}

/// The sequence-level loss chunks the tokens by whole sequences; the drop
/// policies must still see every token once, in order, whatever the length.
#[test]
fn sequence_length_not_dividing_the_chunk_size_keeps_capacity_exact() {
    for policy in [DropPolicy::Position, DropPolicy::Rank, DropPolicy::Probs, DropPolicy::Bpr] {
        for (t, s) in [(513, 27), (3000, 300), (3000, 1000), (1200, 600)] {
            let mut case = plain_case(t, 8, 2, 7);
            case.options.drop_policy = policy;
            case.options.capacity_factor = factor("1.0");
            case.sequence_length = Some(s);
            case.name = format!("T={t} E=8 k=2 cf=1.0 policy={policy:?} sequence_length={s}");
            case.run_and_compare();
        }
    }
}

#[test]
fn capacity_roundings_follow_the_table() {
    // T=200, E=4, k=1, cf=1.1: exact 55, Megatron's float64 56, DeepSpeed 55.
    for (rounding, want) in
        [(CapacityRounding::Exact, 55), (CapacityRounding::Megatron, 56), (CapacityRounding::DeepSpeed, 55)]
    {
        let mut case = plain_case(200, 4, 1, 3);
        case.options.capacity_factor = factor("1.1");
        case.options.capacity_rounding = rounding;
        case.name = format!("T=200 E=4 k=1 cf=1.1 {rounding:?}");
        assert_eq!(case.run_and_compare().capacity, want, "{}", case.name);
    }
    // T*k < E: capacity never floors to 0.
    let mut case = plain_case(4, 8, 1, 5);
    case.options.capacity_factor = factor("0.5");
    let r = case.run_and_compare();
    assert_eq!(r.capacity, 1);
    assert!(r.kept_assignments >= 1);
    // min_capacity wins over the formula; a capacity above T is fine.
    let mut case = plain_case(10, 2, 1, 6);
    case.options.min_capacity = 1000;
    let r = case.run_and_compare();
    assert_eq!((r.capacity, r.kept_assignments, r.dropped_assignments), (1000, 10, 0));
}

#[test]
fn eval_capacity_factor_applies_only_in_evaluation() {
    let mut case = plain_case(1000, 8, 2, 11);
    case.options.capacity_factor = factor("1.0");
    case.options.eval_capacity_factor = Some(factor("2.0"));
    assert_eq!(case.run_and_compare().capacity, 500);
    case.training = true;
    assert_eq!(case.run_and_compare().capacity, 250);
    case.options.eval_capacity_factor = Some(CapacityFactor::Dropless);
    case.training = false;
    let r = case.run_and_compare();
    assert!(r.dropless);
    assert_eq!(r.dropped_assignments, 0);
}

#[test]
fn masked_tokens_count_nowhere() {
    let mut rng = XorShift::new(21);
    let (t, e, k) = (600, 8, 2);
    let mut logits = make_logits(&mut rng, Logits::Gaussian, t, e);
    let mask = make_mask(&mut rng, &mut logits, t, e, 0.5);
    let active = mask.iter().filter(|&&m| m).count();
    let mut case = plain_case(t, e, k, 0);
    case.logits = logits;
    case.mask = Some(mask.clone());
    case.options.capacity_factor = factor("1.0");
    case.name = "masked_tokens_count_nowhere".into();
    let r = case.run_and_compare();
    assert_eq!(r.active_tokens, active);
    assert_eq!(r.capacity, (active * k).div_ceil(e));
    for (i, &m) in mask.iter().enumerate() {
        if !m {
            assert_eq!(&r.expert_indices[i * k..(i + 1) * k], &[0, 1]);
            assert_eq!(&r.expert_slots[i * k..(i + 1) * k], &[-1, -1]);
        }
    }
    // All masked: nothing routed, zero losses, capacity 0.
    case.mask = Some(vec![false; t]);
    let r = case.run_and_compare();
    assert_eq!((r.active_tokens, r.capacity, r.kept_assignments, r.tokens_dropped), (0, 0, 0, 0));
    assert_eq!((r.load_balance_loss, r.router_z_loss), (0.0, 0.0));
}

#[test]
fn fewer_eligible_experts_than_k_gives_unrouted_fillers() {
    let ninf = f64::NEG_INFINITY;
    let logits = vec![ninf, 1.0, ninf, ninf, /* token 1 */ 0.5, ninf, ninf, 2.0];
    let mut case = plain_case(2, 4, 3, 0);
    case.logits = logits;
    case.options.normalize_weights = true;
    case.name = "fillers".into();
    let r = case.run_and_compare();
    assert_eq!(r.expert_indices, vec![1, 0, 2, 3, 0, 1]);
    assert_eq!(r.kept, vec![true, false, false, true, true, false]);
    assert_eq!(r.pre_drop_tokens_per_expert, vec![1, 1, 0, 1]);
    assert_eq!(r.expert_weights[0], 1.0);
    assert_eq!(r.expert_weights[1], 0.0);
}

#[test]
fn ties_go_to_the_lower_expert_and_the_lower_token() {
    // Four identical tokens, every logit equal: experts 0 and 1 win every token,
    // and under every policy the first tokens get the capacity.
    for policy in [DropPolicy::Position, DropPolicy::Rank, DropPolicy::Probs, DropPolicy::Bpr] {
        let mut case = plain_case(4, 4, 2, 0);
        case.logits = vec![0.25; 16];
        case.options.drop_policy = policy;
        case.options.capacity_factor = factor("1.0"); // C = 2
        case.name = format!("ties {policy:?}");
        let r = case.run_and_compare();
        assert_eq!(r.expert_indices, vec![0, 1, 0, 1, 0, 1, 0, 1]);
        assert_eq!(r.kept, vec![true, true, true, true, false, false, false, false]);
    }
}

/// Megatron "probs" keeps the highest weights, ties to the lower token. Zero
/// weights (a second choice 1005 below the first, whose normalized weight
/// underflows to 0) tie, and capacity must still hold. A negative
/// `weight_scale`, which could make a weight `-0.0`, is refused by `validate`.
#[test]
fn probs_policy_keeps_capacity_with_zero_weights() {
    let mut case = plain_case(2, 4, 2, 0);
    case.logits = vec![-1000.0, 5.0, -1000.0, -1000.0, -1000.0, -1000.0, 5.0, -1000.0];
    case.options.score_function = ScoreFunction::Sigmoid;
    case.options.normalize_weights = true;
    case.options.drop_policy = DropPolicy::Probs;
    case.options.capacity_factor = factor("1.0"); // C = ceil(2 * 2 / 4) = 1
    let view = ArrayView2::from_shape((2, 4), &case.logits).expect("shape");
    let r = route_logits(view, &case.options, &case.call()).expect("valid");
    check_invariants("probs with zero weights", &r).unwrap_or_else(|m| panic!("{m}"));
    assert_eq!(r.tokens_per_expert[0], 1, "{r:?}");
    // Token 0 keeps expert 1 (weight 1) and wins the zero-weight tie on expert 0;
    // token 1 keeps expert 2 (weight 1) and loses the tie.
    assert_eq!(r.expert_indices, vec![1, 0, 2, 0], "{r:?}");
    assert_eq!(r.kept, vec![true, true, true, false], "{r:?}");
    assert_eq!(r.expert_weights, vec![1.0, 0.0, 1.0, 0.0], "{r:?}");
    let mut negative = case.options.clone();
    negative.weight_scale = -1.0;
    assert!(negative.validate().unwrap_err().to_string().contains("weight_scale"));
}

/// Minimal reproduction: softmax scores plus `expert_bias` select the experts
/// (semantics.md item 3). Logits [1, 0] give softmax [0.731, 0.269]; with bias
/// [0, 0.5] the keys are [0.731, 0.769] and expert 1 wins. Adding the bias to
/// the unnormalized exp(z - max) = [1, 0.368] instead picks expert 0.
#[test]
fn softmax_plus_bias_selects_minimal_reproduction() {
    let logits = [1.0f32, 0.0];
    let bias = [0.0, 0.5];
    let call = RouteCall { expert_bias: Some(&bias), ..RouteCall::default() };
    let view = ArrayView2::from_shape((1, 2), &logits).expect("shape");
    let r = route_logits(view, &RouterConfig::new(2, 1), &call).expect("valid");
    assert_eq!(r.expert_indices, vec![1], "softmax [0.731, 0.269] + bias [0, 0.5]");
    // The weight is the unbiased softmax score.
    assert!((f64::from(r.expert_weights[0]) - 0.268_941_421_369_995_1).abs() < 1e-7, "{:?}", r.expert_weights);
}

/// Sigmoid scores in float64 (item 2): for very negative logits they are
/// e^z, which underflows to 0 below about -745, and their ratios are kept in
/// [-745, -700]. Logits [-710, -705] with normalize_weights give weights
/// [e^-5 / (1 + e^-5), 1 / (1 + e^-5)] = [0.0067, 0.9933], not [0.5, 0.5].
#[test]
fn sigmoid_of_very_negative_logits_keeps_its_ratios() {
    let logits = [-710.0f64, -705.0];
    let mut o = RouterConfig::new(2, 2);
    o.score_function = ScoreFunction::Sigmoid;
    o.normalize_weights = true;
    let view = ArrayView2::from_shape((1, 2), &logits).expect("shape");
    let r = route_logits(view, &o, &RouteCall::default()).expect("valid");
    let want = [1.0 / (1.0 + 5f64.exp()), 1.0 / (1.0 + (-5f64).exp())];
    assert_eq!(r.expert_indices, vec![1, 0]);
    assert!(
        common::close(f64::from(r.expert_weights[0]), want[1], 1e-6, 0.0)
            && common::close(f64::from(r.expert_weights[1]), want[0], 1e-6, 0.0),
        "weights {:?}, expected {:?}",
        r.expert_weights,
        [want[1], want[0]]
    );
}

/// Minimal reproduction of the sequence-chunking fault: with
/// `sequence_length = 600` pass 1 tallies chunks of 600 tokens while the
/// capacity pass walks chunks of 512, so token 512 starts counting at 600.
/// Tokens 0..1024 prefer expert 1, the rest expert 0; E = 2, k = 1, cf = 1.0
/// (capacity 600). "position" must keep tokens 0..600 on expert 1 (slots
/// 0..599); "probs" must not panic.
#[test]
fn sequence_length_600_minimal_reproduction() {
    let t = 1200;
    let logits: Vec<f64> = (0..t).flat_map(|i| if i < 1024 { [0.0, 1.0] } else { [1.0, 0.0] }).collect();
    for policy in [DropPolicy::Position, DropPolicy::Probs] {
        let mut case = plain_case(t, 2, 1, 0);
        case.logits = logits.clone();
        case.options.drop_policy = policy;
        case.options.capacity_factor = factor("1.0");
        case.sequence_length = Some(600);
        case.name = format!("T=1200 E=2 k=1 cf=1.0 sequence_length=600 {policy:?}");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.check()));
        match outcome {
            Err(_) => panic!("{}: route_logits panicked", case.name),
            Ok(Err(msg)) => panic!("{msg}"),
            Ok(Ok(r)) => {
                assert_eq!(r.capacity, 600);
                assert_eq!(r.expert_slots[512], 512, "{}", case.name);
            }
        }
    }
}
