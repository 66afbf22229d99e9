//! Criterion benchmarks of the dispatch plan (issue 10): building it, and the
//! two moves it makes, on routing decisions from `route_logits`.
//!
//! Groups:
//! - `plan_new`: `DispatchPlan::new` (alignment 1, no padding) on a decision
//!   routed at capacity factor 1.25, next to `route_logits` itself on the same
//!   logits (`route/…`), so the ratio plan / routing is read off one run.
//!   T in {4096, 65536, 262144}; throughput in tokens.
//! - `permute`: `DispatchPlan::permute` of `[T, D]` hidden states into a
//!   preallocated `[N, D]` buffer (N = kept assignments, about T*k).
//! - `combine`: `DispatchPlan::combine` (weighted) of `[N, D]` expert outputs
//!   into a preallocated `[T, D]` buffer.
//! - `copy_floor`: `copy_from_slice` of the bytes `permute` moves (an `[N, D]`
//!   buffer into another; one thread) — a memory-copy reference for the two
//!   moves, which use the global rayon pool.
//!
//! The moves run at T in {4096, 65536}, D = 1024 (and D = 4096 at T = 4096),
//! (E, k) in {(64, 2), (256, 8)}, on `f32` and `half::f16`; throughput in
//! bytes read + written (criterion prints GB/s). T = 262144 is left to
//! `benches/bench_dispatch.py` (its buffers reach several GB).
//!
//! Sample sizes are criterion's minimum (10) with short windows and flat
//! sampling, so a full run takes a few minutes:
//! `cargo bench -p moe_router_core --bench dispatch` (`-- --test` runs each once).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use half::f16;
use moe_router_core::{
    route_logits, Assignments, CapacityFactor, Decimal, DispatchPlan, Payload, PlanLayout, RouteCall, RouterConfig,
    Routing,
};
use ndarray::Array2;

const SHAPES: [(usize, usize); 2] = [(64, 2), (256, 8)];
const PLAN_TOKENS: [usize; 3] = [4096, 65_536, 262_144];
/// (T, D) of the moves.
const MOVES: [(usize, usize); 3] = [(4096, 1024), (4096, 4096), (65_536, 1024)];

/// xorshift64*: deterministic pseudo-random bits.
struct Bits(u64);

impl Bits {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Roughly N(0, 1): the sum of four uniforms, centred and scaled (enough for
    /// routing with few ties; the exact distribution does not matter for timing).
    fn normalish(&mut self) -> f32 {
        let u = |v: u64| (v >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        let s = u(self.next()) + u(self.next()) + u(self.next()) + u(self.next());
        (s - 2.0) * 1.732
    }
}

fn logits(t: usize, e: usize) -> Array2<f32> {
    let mut bits = Bits((e as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    Array2::from_shape_simple_fn((t, e), || bits.normalish())
}

fn options(e: usize, k: usize) -> RouterConfig {
    let mut options = RouterConfig::new(e, k);
    options.capacity_factor = CapacityFactor::Factor(Decimal::from_parts(125, -2));
    options
}

fn assignments(r: &Routing) -> Assignments<'_> {
    Assignments {
        num_tokens: r.num_tokens,
        num_experts: r.num_experts,
        top_k: r.top_k,
        expert_indices: &r.expert_indices,
        expert_slots: &r.expert_slots,
        expert_weights: &r.expert_weights,
        kept: &r.kept,
        tokens_per_expert: &r.tokens_per_expert,
        capacity: r.capacity,
        dropless: r.dropless,
    }
}

fn short(group: &mut BenchmarkGroup<'_, WallTime>, big: bool) {
    group
        .sampling_mode(if big { SamplingMode::Flat } else { SamplingMode::Auto })
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(if big { 1500 } else { 800 }));
}

/// `DispatchPlan::new` against routing itself, on the same logits.
fn plan_new(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_new");
    for (e, k) in SHAPES {
        let options = options(e, k);
        for t in PLAN_TOKENS {
            let x = logits(t, e);
            short(&mut group, t >= 65_536);
            group.throughput(Throughput::Elements(t as u64));
            let call = RouteCall::default();
            group.bench_function(BenchmarkId::new(format!("route/E{e}_k{k}"), t), |b| {
                b.iter(|| route_logits(black_box(x.view()), &options, &call).expect("valid input"))
            });
            let routing = route_logits(x.view(), &options, &call).expect("valid input");
            let a = assignments(&routing);
            group.bench_function(BenchmarkId::new(format!("plan/E{e}_k{k}"), t), |b| {
                b.iter(|| DispatchPlan::new(black_box(&a), PlanLayout::default()).expect("consistent decision"))
            });
        }
    }
    group.finish();
}

/// A plan for `[t, e]` logits at top-k `k`.
fn plan_for(t: usize, e: usize, k: usize) -> DispatchPlan {
    let routing = route_logits(logits(t, e).view(), &options(e, k), &RouteCall::default()).expect("valid input");
    DispatchPlan::new(&assignments(&routing), PlanLayout::default()).expect("consistent decision")
}

fn filled<P: Payload>(n: usize, from_f32: impl Fn(f32) -> P) -> Vec<P> {
    let mut bits = Bits(n as u64 | 1);
    (0..n).map(|_| from_f32(bits.normalish())).collect()
}

fn type_name<P>() -> &'static str {
    if std::mem::size_of::<P>() == 2 {
        "f16"
    } else {
        "f32"
    }
}

fn moves_for<P: Payload>(c: &mut Criterion, from_f32: impl Fn(f32) -> P + Copy) {
    let size = std::mem::size_of::<P>();
    let dtype = type_name::<P>();
    for (e, k) in SHAPES {
        for (t, d) in MOVES {
            let plan = plan_for(t, e, k);
            let n = plan.num_rows;
            let big = n * d * size >= 256 << 20;
            let hidden = filled(t * d, from_f32);
            let mut rows = vec![P::ZERO; n * d];
            let mut tokens = vec![P::ZERO; t * d];
            let id = |op: &str| BenchmarkId::new(format!("{dtype}_E{e}_k{k}_D{d}"), format!("{op}T{t}"));

            let mut group = c.benchmark_group("permute");
            short(&mut group, big);
            group.throughput(Throughput::Bytes((2 * n * d * size) as u64));
            group.bench_function(id(""), |b| {
                b.iter(|| plan.permute(black_box(&hidden), d, &mut rows).expect("shapes agree"))
            });
            group.finish();

            let mut group = c.benchmark_group("combine");
            short(&mut group, big);
            group.throughput(Throughput::Bytes(((n + t) * d * size) as u64));
            group.bench_function(id(""), |b| {
                b.iter(|| plan.combine(black_box(&rows), d, true, &mut tokens).expect("shapes agree"))
            });
            group.finish();

            let mut group = c.benchmark_group("copy_floor");
            short(&mut group, big);
            group.throughput(Throughput::Bytes((2 * n * d * size) as u64));
            let mut copy = vec![P::ZERO; n * d];
            group.bench_function(id(""), |b| b.iter(|| copy.copy_from_slice(black_box(&rows))));
            group.finish();
        }
    }
}

fn moves(c: &mut Criterion) {
    moves_for::<f32>(c, |v| v);
    moves_for::<f16>(c, f16::from_f32);
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = plan_new, moves
}
criterion_main!(benches);
