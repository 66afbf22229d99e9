//! Statistics of many routing calls: totals, running means of the losses,
//! per-expert utilization against the capacity each call offered, the
//! per-call load variances and a window of latencies.
//!
//! Definitions:
//! - utilization is cumulative kept assignments over cumulative capacity
//!   offered (`sum_calls tokens_per_expert[e] / sum_calls capacity`);
//! - the drop rates are 0.0, not a division by zero, before any token was routed;
//! - per-call averages are running means over the calls that routed at least
//!   one assignment, `mean * ((n - 1) / n) + x / n` (both terms are at most
//!   `max(|mean|, |x|)`, so large finite values cannot overflow); a value that
//!   is not finite is left out of its mean and counted in `non_finite_losses`;
//! - floats reduced over experts or over the latency window follow NumPy's
//!   formulas bit for bit (see `reductions`).

use std::collections::VecDeque;

use crate::error::{Result, RouterError};
use crate::reductions;

/// The per-call values kept as running means, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Averaged {
    /// The decision's `load_balance_loss`.
    LoadBalanceLoss = 0,
    /// The decision's `router_z_loss`.
    RouterZLoss = 1,
    /// The decision's `auxiliary_loss`.
    AuxiliaryLoss = 2,
    /// The decision's `routing_efficiency()` (kept / routed).
    RoutingEfficiency = 3,
}

/// One routing call as the statistics read it.
#[derive(Debug, Clone, Copy)]
pub struct CallRecord<'a> {
    /// Kept assignments per expert, `[E]`.
    pub kept_per_expert: &'a [i64],
    /// Routed (pre-capacity) assignments per expert, `[E]`.
    pub pre_drop_per_expert: &'a [i64],
    /// The capacity the call offered each expert (slots).
    pub capacity: u64,
    /// Rows of the call, padding included.
    pub total_tokens: u64,
    /// Rows not masked out.
    pub active_tokens: u64,
    /// Kept (token, expert) assignments.
    pub kept_assignments: u64,
    /// Dropped assignments.
    pub dropped_assignments: u64,
    /// Active tokens left with no kept expert.
    pub tokens_dropped: u64,
    /// The values averaged over calls, indexed by [`Averaged`].
    pub averaged: [f64; 4],
}

/// The plain counters (sums over every call since the last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls recorded.
    pub calls: u64,
    /// Calls that routed at least one assignment.
    pub routed_calls: u64,
    /// Calls recorded with a latency.
    pub timed_calls: u64,
    /// Sum of the calls' rows.
    pub total_tokens: u64,
    /// Sum of the calls' active rows.
    pub active_tokens: u64,
    /// Sum of kept + dropped assignments.
    pub total_assignments: u64,
    /// Sum of kept assignments.
    pub kept_assignments: u64,
    /// Sum of dropped assignments.
    pub dropped_assignments: u64,
    /// Sum of tokens left with no kept expert.
    pub tokens_dropped: u64,
    /// Averaged values that were inf or NaN and so left out of their means.
    pub non_finite_losses: u64,
    /// Sum of the capacity each call offered one expert.
    pub capacity_offered: u64,
}

/// Utilization figures over the experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilizationSummary {
    /// Mean of the per-expert utilization (0.0 before any call).
    pub mean: f64,
    /// Smallest utilization (0.0 before any call).
    pub min: f64,
    /// Largest utilization (0.0 before any call).
    pub max: f64,
    /// Coefficient of variation of the utilization.
    pub cv: f64,
    /// `(expert, utilization)` of the busiest expert, lowest index on ties.
    pub most: Option<(usize, f64)>,
    /// `(expert, utilization)` of the idlest expert, lowest index on ties.
    pub least: Option<(usize, f64)>,
}

/// The latency figures of the timed calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latencies {
    /// 50th, 95th and 99th percentiles of the window, seconds.
    pub p50_p95_p99: Option<[f64; 3]>,
    /// Mean over every timed call, seconds.
    pub mean: Option<f64>,
    /// Smallest latency of every timed call, seconds.
    pub min: Option<f64>,
    /// Largest latency of every timed call, seconds.
    pub max: Option<f64>,
}

/// Totals, running means, per-expert counts and latencies of routing calls.
#[derive(Debug, Clone)]
pub struct RoutingStats {
    window: usize,
    history: usize,
    totals: Totals,
    num_experts: Option<usize>,
    means: [f64; 4],
    mean_counts: [u64; 4],
    kept_per_expert: Vec<i64>,
    pre_drop_per_expert: Vec<i64>,
    timed_active_tokens: u64,
    variances: VecDeque<f64>,
    latencies: VecDeque<f64>,
    total_time: f64,
    min_latency: Option<f64>,
    max_latency: Option<f64>,
}

/// Keep at most `bound` values, dropping the oldest.
fn push_bounded<T>(queue: &mut VecDeque<T>, value: T, bound: usize) {
    if queue.len() == bound {
        queue.pop_front();
    }
    queue.push_back(value);
}

impl RoutingStats {
    /// Empty statistics keeping the latencies of the last `window` timed calls
    /// and the load variances of the last `history` calls.
    ///
    /// Errors: `window` or `history` is 0.
    pub fn new(window: usize, history: usize) -> Result<Self> {
        for (field, value) in [("window", window), ("history", history)] {
            if value == 0 {
                return Err(RouterError::config(field, value, "must be an integer >= 1"));
            }
        }
        Ok(Self::with_sizes(window, history))
    }

    fn with_sizes(window: usize, history: usize) -> Self {
        RoutingStats {
            window,
            history,
            totals: Totals::default(),
            num_experts: None,
            means: [0.0; 4],
            mean_counts: [0; 4],
            kept_per_expert: Vec::new(),
            pre_drop_per_expert: Vec::new(),
            timed_active_tokens: 0,
            variances: VecDeque::new(),
            latencies: VecDeque::new(),
            total_time: 0.0,
            min_latency: None,
            max_latency: None,
        }
    }

    /// Forget every call (the window and history sizes are kept).
    pub fn reset(&mut self) {
        *self = Self::with_sizes(self.window, self.history);
    }

    /// Add one call, timed by `latency` seconds if given.
    ///
    /// Errors, before anything changes: `latency` negative or not finite
    /// (`latency_s`); per-expert counts of different lengths, or of another E
    /// than the calls recorded before (`decision`).
    pub fn record(&mut self, call: &CallRecord<'_>, latency: Option<f64>) -> Result<()> {
        if let Some(l) = latency.filter(|l| !(l.is_finite() && *l >= 0.0)) {
            return Err(RouterError::InvalidEntry {
                argument: "latency_s",
                index: String::new(),
                value: l.to_string(),
                allowed: "must be a finite number of seconds >= 0".into(),
            });
        }
        let e = call.kept_per_expert.len();
        let inconsistent = |detail: String| RouterError::Inconsistent { argument: "decision", detail };
        if call.pre_drop_per_expert.len() != e {
            return Err(inconsistent(format!(
                "tokens_per_expert has {e} entries but pre_drop_tokens_per_expert {}",
                call.pre_drop_per_expert.len()
            )));
        }
        match self.num_experts {
            Some(held) if held != e => {
                return Err(inconsistent(format!(
                    "it has {e} experts but these statistics hold {held}; \
                     use one RoutingStats per expert count, or reset()"
                )))
            }
            Some(_) => {}
            None => {
                self.num_experts = Some(e);
                self.kept_per_expert = vec![0; e];
                self.pre_drop_per_expert = vec![0; e];
            }
        }
        let t = &mut self.totals;
        let routed = call.kept_assignments.saturating_add(call.dropped_assignments);
        t.calls += 1;
        t.total_tokens = t.total_tokens.saturating_add(call.total_tokens);
        t.active_tokens = t.active_tokens.saturating_add(call.active_tokens);
        t.total_assignments = t.total_assignments.saturating_add(routed);
        t.kept_assignments = t.kept_assignments.saturating_add(call.kept_assignments);
        t.dropped_assignments = t.dropped_assignments.saturating_add(call.dropped_assignments);
        t.tokens_dropped = t.tokens_dropped.saturating_add(call.tokens_dropped);
        t.capacity_offered = t.capacity_offered.saturating_add(call.capacity);
        if routed > 0 {
            t.routed_calls += 1;
            for (i, &x) in call.averaged.iter().enumerate() {
                if !x.is_finite() {
                    t.non_finite_losses += 1;
                    continue;
                }
                self.mean_counts[i] += 1;
                let n = self.mean_counts[i] as f64;
                self.means[i] = self.means[i] * ((n - 1.0) / n) + x / n;
            }
        }
        for (sum, &x) in self.kept_per_expert.iter_mut().zip(call.kept_per_expert) {
            *sum = sum.saturating_add(x);
        }
        for (sum, &x) in self.pre_drop_per_expert.iter_mut().zip(call.pre_drop_per_expert) {
            *sum = sum.saturating_add(x);
        }
        let loads: Vec<f64> = call.kept_per_expert.iter().map(|&x| x as f64).collect();
        push_bounded(&mut self.variances, reductions::variance(&loads), self.history);
        if let Some(l) = latency {
            self.totals.timed_calls += 1;
            push_bounded(&mut self.latencies, l, self.window);
            self.total_time += l;
            self.timed_active_tokens = self.timed_active_tokens.saturating_add(call.active_tokens);
            self.min_latency = Some(self.min_latency.map_or(l, |m| m.min(l)));
            self.max_latency = Some(self.max_latency.map_or(l, |m| m.max(l)));
        }
        Ok(())
    }

    /// The latency window's size.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The load-variance history's size.
    pub fn history(&self) -> usize {
        self.history
    }

    /// The counters.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// E, fixed by the first call recorded.
    pub fn num_experts(&self) -> Option<usize> {
        self.num_experts
    }

    /// The running mean of `which` over the routed calls (None before a finite value).
    pub fn average(&self, which: Averaged) -> Option<f64> {
        let i = which as usize;
        (self.mean_counts[i] > 0).then_some(self.means[i])
    }

    /// `kept / total` assignments over every call; 1.0 when nothing was routed.
    pub fn routing_efficiency(&self) -> f64 {
        let t = &self.totals;
        ratio(t.kept_assignments, t.total_assignments, 1.0)
    }

    /// `tokens_dropped / active_tokens`; 0.0 when no token was active.
    pub fn tokens_dropped_rate(&self) -> f64 {
        ratio(self.totals.tokens_dropped, self.totals.active_tokens, 0.0)
    }

    /// `dropped / total` assignments; 0.0 when nothing was routed.
    pub fn assignment_drop_rate(&self) -> f64 {
        ratio(self.totals.dropped_assignments, self.totals.total_assignments, 0.0)
    }

    /// Cumulative kept assignments per expert (empty before any call).
    pub fn kept_per_expert(&self) -> &[i64] {
        &self.kept_per_expert
    }

    /// Cumulative routed (pre-capacity) assignments per expert.
    pub fn pre_drop_per_expert(&self) -> &[i64] {
        &self.pre_drop_per_expert
    }

    /// Per expert, cumulative kept over cumulative capacity offered, in [0, 1]
    /// (all 0.0 while no capacity was offered).
    pub fn expert_utilization(&self) -> Vec<f64> {
        let offered = self.totals.capacity_offered;
        self.kept_per_expert.iter().map(|&k| if offered == 0 { 0.0 } else { k as f64 / offered as f64 }).collect()
    }

    /// Coefficient of variation of [`expert_utilization`](Self::expert_utilization).
    pub fn utilization_cv(&self) -> f64 {
        reductions::coefficient_of_variation(&self.expert_utilization())
    }

    /// Mean, extremes, CV and busiest and idlest experts of the utilization.
    pub fn utilization_summary(&self) -> UtilizationSummary {
        let u = self.expert_utilization();
        // The first extreme wins a tie, as numpy.argmax / argmin.
        let pick = |better: fn(f64, f64) -> bool| {
            u.iter().enumerate().fold(None, |best: Option<(usize, f64)>, (e, &x)| match best {
                Some((_, b)) if !better(x, b) => best,
                _ => Some((e, x)),
            })
        };
        let (most, least) = (pick(|x, b| x > b), pick(|x, b| x < b));
        UtilizationSummary {
            mean: reductions::mean(&u),
            min: least.map_or(0.0, |(_, x)| x),
            max: most.map_or(0.0, |(_, x)| x),
            cv: reductions::coefficient_of_variation(&u),
            most,
            least,
        }
    }

    /// Population variance of each of the last calls' kept loads (tokens^2), oldest first.
    pub fn load_variance_history(&self) -> Vec<f64> {
        self.variances.iter().copied().collect()
    }

    /// The `q`-th percentile (0..100) of the latency window, seconds; None before any timed call.
    ///
    /// Errors: `q` outside [0, 100] or NaN.
    pub fn latency_percentile(&self, q: f64) -> Result<Option<f64>> {
        if !(0.0..=100.0).contains(&q) {
            return Err(RouterError::InvalidEntry {
                argument: "q",
                index: String::new(),
                value: q.to_string(),
                allowed: "must be a percentile in [0, 100]".into(),
            });
        }
        Ok(self.window_percentiles([q]).map(|[p]| p))
    }

    /// The percentiles `qs` (each in [0, 100]) of the latency window.
    fn window_percentiles<const N: usize>(&self, qs: [f64; N]) -> Option<[f64; N]> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = self.latencies.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        Some(qs.map(|q| reductions::percentile(&sorted, q)))
    }

    /// Percentiles, mean and extremes of the latencies.
    pub fn latencies(&self) -> Latencies {
        Latencies {
            p50_p95_p99: self.window_percentiles([50.0, 95.0, 99.0]),
            mean: self.mean_latency(),
            min: self.min_latency,
            max: self.max_latency,
        }
    }

    /// Mean latency over every timed call, seconds.
    pub fn mean_latency(&self) -> Option<f64> {
        let n = self.totals.timed_calls;
        (n > 0).then(|| self.total_time / n as f64)
    }

    /// Sum of the latencies, seconds.
    pub fn total_time(&self) -> f64 {
        self.total_time
    }

    /// Active tokens per second over the timed calls: inf if they took no
    /// time but routed tokens, 0.0 if they routed none, None before any.
    pub fn throughput(&self) -> Option<f64> {
        if self.totals.timed_calls == 0 {
            return None;
        }
        let tokens = self.timed_active_tokens as f64;
        Some(if self.total_time > 0.0 {
            tokens / self.total_time
        } else if self.timed_active_tokens > 0 {
            f64::INFINITY
        } else {
            0.0
        })
    }
}

/// `part / whole`, or `empty` when `whole` is 0.
fn ratio(part: u64, whole: u64, empty: f64) -> f64 {
    if whole == 0 {
        empty
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(kept: &'a [i64], pre: &'a [i64], capacity: u64, losses: [f64; 3]) -> CallRecord<'a> {
        let kept_total = kept.iter().sum::<i64>() as u64;
        let routed = pre.iter().sum::<i64>() as u64;
        let efficiency = if routed == 0 { 1.0 } else { kept_total as f64 / routed as f64 };
        CallRecord {
            kept_per_expert: kept,
            pre_drop_per_expert: pre,
            capacity,
            total_tokens: routed,
            active_tokens: routed,
            kept_assignments: kept_total,
            dropped_assignments: routed - kept_total,
            tokens_dropped: routed - kept_total,
            averaged: [losses[0], losses[1], losses[2], efficiency],
        }
    }

    #[test]
    fn totals_utilization_and_means_by_hand() {
        let mut s = RoutingStats::new(8, 8).unwrap();
        s.record(&call(&[10, 4, 2], &[14, 4, 2], 10, [1.5, 3.0, 0.2]), Some(0.010)).unwrap();
        s.record(&call(&[30, 0, 6], &[30, 0, 6], 30, [1.1, 1.0, 0.4]), Some(0.030)).unwrap();
        let t = s.totals();
        assert_eq!((t.calls, t.routed_calls, t.kept_assignments, t.dropped_assignments), (2, 2, 52, 4));
        assert_eq!(t.capacity_offered, 40);
        assert_eq!(s.expert_utilization(), vec![1.0, 0.1, 0.2]);
        let summary = s.utilization_summary();
        assert_eq!(summary.most, Some((0, 1.0)));
        assert_eq!(summary.least, Some((1, 0.1)));
        assert_eq!(s.average(Averaged::RouterZLoss), Some(2.0));
        assert_eq!(s.average(Averaged::RoutingEfficiency), Some((16.0 / 20.0) * 0.5 + 1.0 / 2.0));
        assert_eq!(s.throughput(), Some(56.0 / (0.010 + 0.030)));
        assert_eq!(s.routing_efficiency(), 52.0 / 56.0);
    }

    #[test]
    fn empty_statistics_divide_by_nothing() {
        let mut s = RoutingStats::new(1, 1).unwrap();
        assert_eq!((s.routing_efficiency(), s.tokens_dropped_rate(), s.utilization_cv()), (1.0, 0.0, 0.0));
        assert_eq!(s.utilization_summary().most, None);
        assert_eq!(s.throughput(), None);
        assert_eq!(s.latency_percentile(50.0).unwrap(), None);
        s.record(&call(&[0, 0], &[0, 0], 0, [f64::NAN; 3]), Some(0.0)).unwrap();
        assert_eq!(s.totals().routed_calls, 0);
        assert_eq!(s.totals().non_finite_losses, 0); // an empty call has no loss to average
        assert_eq!(s.throughput(), Some(0.0));
        assert_eq!(s.expert_utilization(), vec![0.0, 0.0]);
    }

    #[test]
    fn windows_are_bounded_and_non_finite_values_skipped() {
        let mut s = RoutingStats::new(10, 3).unwrap();
        for ms in 1..=100 {
            let loss = if ms % 2 == 0 { f64::INFINITY } else { 1.0 };
            s.record(&call(&[ms, 0], &[ms, 0], 100, [loss, 1.0, 1.0]), Some(ms as f64 / 1e3)).unwrap();
        }
        assert_eq!(s.latency_percentile(0.0).unwrap(), Some(0.091));
        assert_eq!(s.load_variance_history().len(), 3);
        assert_eq!(s.average(Averaged::LoadBalanceLoss), Some(1.0));
        assert_eq!(s.totals().non_finite_losses, 50);
        assert_eq!(s.latencies().max, Some(0.1));
    }

    #[test]
    fn refusals_change_nothing() {
        let mut s = RoutingStats::new(4, 4).unwrap();
        s.record(&call(&[1, 1], &[1, 1], 1, [1.0; 3]), None).unwrap();
        let err = s.record(&call(&[1, 1, 1], &[1, 1, 1], 1, [1.0; 3]), None).unwrap_err();
        assert!(err.to_string().contains("3 experts but these statistics hold 2"), "{err}");
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            let err = s.record(&call(&[1, 1], &[1, 1], 1, [1.0; 3]), Some(bad)).unwrap_err();
            assert!(err.to_string().starts_with("latency_s"), "{err}");
        }
        assert!(s.latency_percentile(101.0).is_err() && s.latency_percentile(f64::NAN).is_err());
        assert_eq!(s.totals().calls, 1);
        assert!(RoutingStats::new(0, 1).is_err() && RoutingStats::new(1, 0).is_err());
        s.reset();
        assert_eq!((s.totals().calls, s.num_experts(), s.window()), (0, None, 4));
    }
}
