//! Criterion benchmarks of `route_logits` on float32 `[T, E]` logits.
//!
//! Groups:
//! - `score_topk`: dropless routing (no capacity limit), so a call is validation,
//!   float64 scoring (softmax), top-k selection and weights, plus the counts.
//! - `capacity_position`, `capacity_rank`, `capacity_probs`, `capacity_bpr`:
//!   the same with capacity factor 1.25 under each drop policy; the difference
//!   from `score_topk` is the cost of capacity assignment (slots and drops).
//! - Losses (load-balance and z-loss) are accumulated in every call, inside the
//!   scoring pass, so `score_topk` already includes them: there is no separate
//!   loss group.
//! - `optional_outputs`: dropless routing of (E, k) = (256, 8) with nothing
//!   extra (`none`), with `return_probs` (the `[T, E]` float32 scores, written
//!   in the scoring pass) and with `plain_topk_counts` under an expert bias
//!   (a second top-k per token); T in {65536, 262144}.
//! - `fused_gemm`: routing `[T, D]` hidden states through `hidden @ W + b`
//!   computed chunk by chunk inside the routing pass (`LinearLogits`), D in
//!   {1024, 4096}, E = 64, k = 2, cf 1.25, T in {4096, 16384}.
//!
//! T in {64, 4096, 65536, 262144}, (E, k) in {(8, 2), (64, 2), (64, 8), (256, 8)};
//! throughput is reported in tokens (`Throughput::Elements(T)`). Logits are
//! N(0, 1)-like float32 values from a fixed-seed generator, made once per E
//! (the largest T; smaller T use its first rows). Sample sizes and measurement
//! times are small, especially for large T, so a full run takes a few minutes;
//! `cargo bench -p moe_router_core -- --test` runs each benchmark once.

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use moe_router_core::{
    route, route_logits, CapacityFactor, Decimal, DropPolicy, LinearLogits, RouteCall, RouterConfig,
};
use ndarray::{s, Array2, ArrayView2};

const TOKENS: [usize; 4] = [64, 4096, 65_536, 262_144];
const SHAPES: [(usize, usize); 4] = [(8, 2), (64, 2), (64, 8), (256, 8)];
const MAX_TOKENS: usize = 262_144;

/// xorshift64* with a Box-Muller normal: deterministic N(0, 1)-like data.
struct Normal {
    state: u64,
    spare: Option<f64>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Normal { state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1, spare: None }
    }

    fn uniform(&mut self) -> f64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn sample(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let r = (-2.0 * (1.0 - self.uniform()).ln()).sqrt();
        let angle = std::f64::consts::TAU * self.uniform();
        self.spare = Some(r * angle.sin());
        r * angle.cos()
    }
}

/// `[MAX_TOKENS, e]` logits, made on first use (only for benchmarks that run).
fn logits(e: usize) -> &'static Array2<f32> {
    static CACHE: [OnceLock<Array2<f32>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = match e {
        8 => 0,
        64 => 1,
        256 => 2,
        _ => unreachable!("no logits for E = {e}"),
    };
    CACHE[slot].get_or_init(|| {
        let mut normal = Normal::new(e as u64);
        Array2::from_shape_simple_fn((MAX_TOKENS, e), || normal.sample() as f32)
    })
}

fn first_rows(e: usize, t: usize) -> ArrayView2<'static, f32> {
    logits(e).slice(s![..t, ..])
}

/// Small samples: criterion's minimum of 10 for large T, short windows throughout.
/// Large T use flat sampling (the same iteration count in every sample): linear
/// sampling would need at least 1 + 2 + ... + 10 = 55 iterations of a call that
/// takes a quarter of a second.
fn timing_for(group: &mut BenchmarkGroup<'_, WallTime>, t: usize) {
    if t >= 65_536 {
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
    } else {
        group
            .sampling_mode(SamplingMode::Auto)
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
    }
}

fn bench_group(c: &mut Criterion, name: &str, capacity_factor: &CapacityFactor, policy: DropPolicy) {
    let mut group = c.benchmark_group(name);
    for (e, k) in SHAPES {
        let mut options = RouterConfig::new(e, k);
        options.capacity_factor = capacity_factor.clone();
        options.drop_policy = policy;
        for t in TOKENS {
            timing_for(&mut group, t);
            group.throughput(Throughput::Elements(t as u64));
            group.bench_function(BenchmarkId::new(format!("E{e}_k{k}"), t), |b| {
                let view = first_rows(e, t);
                let call = RouteCall::default();
                b.iter(|| route_logits(black_box(view), &options, &call).expect("valid input"))
            });
        }
    }
    group.finish();
}

/// (a) Scoring + top-k (+ losses), no capacity work.
fn score_topk(c: &mut Criterion) {
    bench_group(c, "score_topk", &CapacityFactor::Dropless, DropPolicy::Position);
}

/// (b) Capacity assignment at cf = 1.25, one group per drop policy.
fn capacity(c: &mut Criterion) {
    let cf = CapacityFactor::Factor(Decimal::from_parts(125, -2));
    for (name, policy) in [
        ("capacity_position", DropPolicy::Position),
        ("capacity_rank", DropPolicy::Rank),
        ("capacity_probs", DropPolicy::Probs),
        ("capacity_bpr", DropPolicy::Bpr),
    ] {
        bench_group(c, name, &cf, policy);
    }
}

/// (c) The optional outputs of pass 1, against the same call without them.
fn optional_outputs(c: &mut Criterion) {
    let mut group = c.benchmark_group("optional_outputs");
    let (e, k) = (256, 8);
    let mut options = RouterConfig::new(e, k);
    options.capacity_factor = CapacityFactor::Dropless;
    let bias: Vec<f64> = (0..e).map(|i| ((i * 37 % 11) as f64 - 5.0) * 1e-3).collect();
    for t in [65_536, MAX_TOKENS] {
        timing_for(&mut group, t);
        group.throughput(Throughput::Elements(t as u64));
        let view = first_rows(e, t);
        let calls = [
            ("none", RouteCall::default()),
            ("return_probs", RouteCall { return_probs: true, ..RouteCall::default() }),
            ("bias", RouteCall { expert_bias: Some(&bias), ..RouteCall::default() }),
            (
                "bias_plain_topk",
                RouteCall { expert_bias: Some(&bias), plain_topk_counts: true, ..RouteCall::default() },
            ),
        ];
        for (name, call) in calls {
            group.bench_function(BenchmarkId::new(format!("E{e}_k{k}_{name}"), t), |b| {
                b.iter(|| route_logits(black_box(view), &options, &call).expect("valid input"))
            });
        }
    }
    group.finish();
}

/// (d) The fused GEMM path: router logits computed per chunk, never as a whole.
fn fused_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("fused_gemm");
    let (e, k) = (64, 2);
    let options = RouterConfig::new(e, k);
    for d in [1024usize, 4096] {
        let mut normal = Normal::new(d as u64);
        let weight: Vec<f32> = (0..d * e).map(|_| (normal.sample() / (d as f64).sqrt()) as f32).collect();
        let bias: Vec<f32> = (0..e).map(|_| normal.sample() as f32 * 0.1).collect();
        for t in [4096usize, 16_384] {
            let hidden: Vec<f32> = (0..t * d).map(|_| normal.sample() as f32).collect();
            timing_for(&mut group, 65_536);
            group.throughput(Throughput::Elements(t as u64));
            group.bench_function(BenchmarkId::new(format!("D{d}_E{e}_k{k}"), t), |b| {
                let source = LinearLogits::new(&hidden, t, d, &weight, e, Some(&bias)).expect("valid shapes");
                let call = RouteCall::default();
                b.iter(|| route(black_box(&source), &options, &call).expect("valid input"))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // No plots: rendering them for 80 benchmarks costs more than measuring some.
    config = Criterion::default().without_plots();
    targets = score_topk, capacity, optional_outputs, fused_gemm
}
criterion_main!(benches);
