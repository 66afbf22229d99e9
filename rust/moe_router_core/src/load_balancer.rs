//! Expert load tracking and the aux-loss-free bias remedy (DeepSeek-V3, Wang
//! et al. 2024, arXiv:2408.15664): an EMA of each expert's share of the routed
//! assignments, a bounded history of the shares, imbalance detection, and a
//! per-expert selection bias moved by [`sign_bias_update`] after every step.

use std::collections::VecDeque;

use crate::error::{Result, RouterError};
use crate::global_balance::sign_bias_update;
use crate::reductions;

/// Default per-step bias change as a fraction of the mean softmax score 1/E.
pub const DEFAULT_RELATIVE_BIAS_RATE: f64 = 0.1;
/// Default EMA decay: the EMA averages over about 1 / (1 - decay) = 10 steps.
pub const DEFAULT_EMA_DECAY: f64 = 0.9;
/// Default number of per-step load shares kept.
pub const DEFAULT_LOAD_HISTORY: usize = 1024;
/// Default threshold on `(max - min) / mean` of the EMA load.
pub const DEFAULT_IMBALANCE_THRESHOLD: f64 = 0.5;
/// Default number of steps before an imbalance is reported.
pub const DEFAULT_WARMUP_STEPS: u64 = 10;
/// A snapshot is well balanced when the CV of its EMA load is below this.
pub const WELL_BALANCED_CV: f64 = 0.2;

/// The default bias step for E experts, `0.1 / E`: a tenth of the mean softmax score.
pub fn default_bias_update_rate(num_experts: usize) -> f64 {
    DEFAULT_RELATIVE_BIAS_RATE / num_experts as f64
}

/// How a [`LoadBalancer`] tracks and corrects the load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancerSettings {
    /// E, >= 1.
    pub num_experts: usize,
    /// Weight of the past in the EMA, in [0, 1).
    pub ema_decay: f64,
    /// Per-step shares kept, >= 1.
    pub history: usize,
    /// Imbalanced when `(max - min) / mean` of the EMA exceeds this (finite, >= 0).
    pub imbalance_threshold: f64,
    /// Steps before an imbalance is reported.
    pub warmup_steps: u64,
    /// Per-step change of each bias, in score units (finite, >= 0).
    pub bias_update_rate: f64,
    /// Whether updates move the bias.
    pub enabled: bool,
}

impl BalancerSettings {
    /// The defaults for E experts.
    pub fn new(num_experts: usize) -> Self {
        BalancerSettings {
            num_experts,
            ema_decay: DEFAULT_EMA_DECAY,
            history: DEFAULT_LOAD_HISTORY,
            imbalance_threshold: DEFAULT_IMBALANCE_THRESHOLD,
            warmup_steps: DEFAULT_WARMUP_STEPS,
            bias_update_rate: default_bias_update_rate(num_experts),
            enabled: true,
        }
    }

    fn validate(&self) -> Result<()> {
        let most = i32::MAX as usize;
        if !(1..=most).contains(&self.num_experts) {
            return Err(RouterError::config("num_experts", self.num_experts, "must be an integer in [1, 2**31 - 1]"));
        }
        if self.history == 0 {
            return Err(RouterError::config("history", self.history, "must be an integer >= 1"));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(RouterError::config("ema_decay", self.ema_decay, "must be in [0, 1)"));
        }
        finite_non_negative("imbalance_threshold", self.imbalance_threshold)?;
        finite_non_negative("bias_update_rate", self.bias_update_rate)
    }
}

fn finite_non_negative(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(RouterError::config(field, value, "must be a finite number >= 0"))
    }
}

/// A consistent snapshot of a [`LoadBalancer`].
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceSnapshot {
    /// EMA of each expert's share of the routed assignments, `[E]`.
    pub expert_loads: Vec<f64>,
    /// Updates that carried load.
    pub steps: u64,
    /// Whether the balancer reported an imbalance.
    pub imbalanced: bool,
    /// `(max - min) / mean` of `expert_loads`.
    pub imbalance_ratio: f64,
    /// The balancer's threshold.
    pub threshold: f64,
    /// The balancer's warm-up.
    pub warmup_steps: u64,
    /// The selection bias for the next call, `[E]`.
    pub expert_bias: Vec<f64>,
    /// The bias step.
    pub bias_update_rate: f64,
    /// Whether updates move the bias.
    pub enabled: bool,
    /// The last step's shares, `[E]`.
    pub last_load: Option<Vec<f64>>,
}

impl BalanceSnapshot {
    /// Population variance of `expert_loads` (squared shares).
    pub fn load_variance(&self) -> f64 {
        reductions::variance(&self.expert_loads)
    }

    /// Coefficient of variation of `expert_loads`; 0.0 if the mean is 0.
    pub fn load_cv(&self) -> f64 {
        reductions::coefficient_of_variation(&self.expert_loads)
    }

    /// At least one step seen and `load_cv() < max_cv`.
    pub fn is_well_balanced(&self, max_cv: f64) -> bool {
        self.steps > 0 && self.load_cv() < max_cv
    }
}

/// Per-expert load EMA, history, imbalance detection and selection bias.
#[derive(Debug, Clone)]
pub struct LoadBalancer {
    settings: BalancerSettings,
    ema: Vec<f64>,
    bias: Vec<f64>,
    shares: VecDeque<Vec<f64>>,
    steps: u64,
}

impl LoadBalancer {
    /// A balancer that has seen no step.
    ///
    /// Errors: a setting outside its domain (named).
    pub fn new(settings: BalancerSettings) -> Result<Self> {
        settings.validate()?;
        let e = settings.num_experts;
        Ok(LoadBalancer { settings, ema: vec![0.0; e], bias: vec![0.0; e], shares: VecDeque::new(), steps: 0 })
    }

    /// The settings in force.
    pub fn settings(&self) -> &BalancerSettings {
        &self.settings
    }

    /// Set the bias step. Errors: negative or not finite.
    pub fn set_bias_update_rate(&mut self, rate: f64) -> Result<()> {
        finite_non_negative("bias_update_rate", rate)?;
        self.settings.bias_update_rate = rate;
        Ok(())
    }

    /// Turn the bias remedy on or off.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.settings.enabled = enabled;
    }

    /// Add one step's per-expert load: its shares `load / sum(load)` enter the
    /// EMA (`decay * ema + (1 - decay) * share`; the first step initializes it)
    /// and the history, and if enabled every bias moves by the rate toward
    /// balance. A step with no load (sum 0) is ignored.
    ///
    /// Errors, before anything changes: `load` not of E entries, or an entry
    /// negative or not finite.
    pub fn update(&mut self, load: &[f64]) -> Result<()> {
        self.check_load_shape(&[load.len()])?;
        if let Some(i) = load.iter().position(|l| !(l.is_finite() && *l >= 0.0)) {
            return Err(RouterError::InvalidEntry {
                argument: "load",
                index: format!("[{i}]"),
                value: load[i].to_string(),
                allowed: "every load must be finite and >= 0".into(),
            });
        }
        let total = reductions::sum(load);
        if total <= 0.0 {
            return Ok(());
        }
        if self.settings.enabled && self.settings.bias_update_rate > 0.0 {
            self.bias = sign_bias_update(load, &self.bias, self.settings.bias_update_rate)?;
        }
        let share: Vec<f64> = load.iter().map(|&l| l / total).collect();
        let decay = self.settings.ema_decay;
        if self.steps == 0 {
            self.ema.clone_from(&share);
        } else {
            for (m, &s) in self.ema.iter_mut().zip(&share) {
                *m = decay * *m + (1.0 - decay) * s;
            }
        }
        if self.shares.len() == self.settings.history {
            self.shares.pop_front();
        }
        self.shares.push_back(share);
        self.steps += 1;
        Ok(())
    }

    /// Errors unless `shape` is `[E]`, the shape of a per-expert load.
    pub fn check_load_shape(&self, shape: &[usize]) -> Result<()> {
        let e = self.settings.num_experts;
        if shape == [e] {
            return Ok(());
        }
        Err(RouterError::Inconsistent {
            argument: "load",
            detail: format!("expected a per-expert load of shape [{e}] (num_experts), got shape {shape:?}"),
        })
    }

    /// Forget every step and zero the bias (the settings are kept).
    pub fn reset(&mut self) {
        let e = self.settings.num_experts;
        (self.ema, self.bias, self.shares, self.steps) = (vec![0.0; e], vec![0.0; e], VecDeque::new(), 0);
    }

    /// The EMA of each expert's share, `[E]` (zeros before any step).
    pub fn expert_loads(&self) -> &[f64] {
        &self.ema
    }

    /// The selection bias for the next call, `[E]`.
    pub fn expert_bias(&self) -> &[f64] {
        &self.bias
    }

    /// Updates that carried load.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The last (at most `history`) steps' shares, oldest first, row-major `[n, E]`.
    pub fn load_history(&self) -> Vec<f64> {
        self.shares.iter().flatten().copied().collect()
    }

    /// Rows of [`load_history`](Self::load_history).
    pub fn history_len(&self) -> usize {
        self.shares.len()
    }

    /// `(max - min) / mean` of the EMA load (0.0 before any step).
    pub fn imbalance_ratio(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            reductions::range_over_mean(&self.ema)
        }
    }

    /// After the warm-up, the imbalance ratio exceeds the threshold.
    pub fn is_imbalanced(&self) -> bool {
        self.steps > 0
            && self.steps >= self.settings.warmup_steps
            && self.imbalance_ratio() > self.settings.imbalance_threshold
    }

    /// Everything a report needs, read at once.
    pub fn snapshot(&self) -> BalanceSnapshot {
        BalanceSnapshot {
            expert_loads: self.ema.clone(),
            steps: self.steps,
            imbalanced: self.is_imbalanced(),
            imbalance_ratio: self.imbalance_ratio(),
            threshold: self.settings.imbalance_threshold,
            warmup_steps: self.settings.warmup_steps,
            expert_bias: self.bias.clone(),
            bias_update_rate: self.settings.bias_update_rate,
            enabled: self.settings.enabled,
            last_load: self.shares.back().cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(e: usize, decay: f64, rate: f64, warmup: u64) -> LoadBalancer {
        let settings = BalancerSettings {
            ema_decay: decay,
            bias_update_rate: rate,
            warmup_steps: warmup,
            ..BalancerSettings::new(e)
        };
        LoadBalancer::new(settings).unwrap()
    }

    #[test]
    fn ema_history_and_bias_by_hand() {
        let mut lb = balancer(4, 0.5, 0.1, 0);
        lb.update(&[6.0, 2.0, 0.0, 0.0]).unwrap();
        assert_eq!(lb.expert_loads(), [0.75, 0.25, 0.0, 0.0]);
        assert_eq!(lb.expert_bias(), [-0.1, 0.0, 0.1, 0.1]);
        lb.update(&[0.0, 0.0, 4.0, 4.0]).unwrap();
        assert_eq!(lb.expert_loads(), [0.375, 0.125, 0.25, 0.25]);
        assert_eq!(lb.load_history(), [0.75, 0.25, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
        assert_eq!(lb.imbalance_ratio(), 1.0);
        assert!(lb.is_imbalanced());
        let snap = lb.snapshot();
        assert_eq!(snap.last_load.as_deref(), Some(&[0.0, 0.0, 0.5, 0.5][..]));
        assert!(!snap.is_well_balanced(WELL_BALANCED_CV));
    }

    #[test]
    fn empty_steps_warmup_history_and_reset() {
        let mut lb = balancer(2, 0.9, 0.1, 3);
        lb.update(&[0.0, 0.0]).unwrap();
        assert_eq!(lb.steps(), 0);
        for _ in 0..2 {
            lb.update(&[3.0, 1.0]).unwrap();
        }
        assert!(!lb.is_imbalanced()); // 2 steps < warm-up
        lb.update(&[3.0, 1.0]).unwrap();
        assert!(lb.is_imbalanced());
        let mut short = LoadBalancer::new(BalancerSettings { history: 2, ..BalancerSettings::new(2) }).unwrap();
        for i in 1..=5 {
            short.update(&[i as f64, 1.0]).unwrap();
        }
        assert_eq!(short.history_len(), 2);
        short.reset();
        assert_eq!((short.steps(), short.history_len(), short.expert_bias()), (0, 0, &[0.0, 0.0][..]));
    }

    #[test]
    fn refusals_name_the_setting_or_the_load() {
        let bad = |s: BalancerSettings| LoadBalancer::new(s).unwrap_err().to_string();
        let d = BalancerSettings::new(4);
        assert!(bad(BalancerSettings { ema_decay: 1.0, ..d }).contains("ema_decay"));
        assert!(bad(BalancerSettings { history: 0, ..d }).contains("history"));
        assert!(bad(BalancerSettings { imbalance_threshold: -1.0, ..d }).contains("imbalance_threshold"));
        assert!(bad(BalancerSettings { bias_update_rate: f64::NAN, ..d }).contains("bias_update_rate"));
        assert!(bad(BalancerSettings::new(0)).contains("num_experts"));
        let mut lb = LoadBalancer::new(d).unwrap();
        assert!(lb.update(&[1.0, 2.0, 3.0]).unwrap_err().to_string().contains("shape [4]"));
        assert!(lb.update(&[1.0, -2.0, 3.0, 0.0]).unwrap_err().to_string().contains(">= 0"));
        assert!(lb.set_bias_update_rate(-1e-3).is_err());
        assert_eq!(lb.steps(), 0);
        assert_eq!(default_bias_update_rate(64), 0.0015625);
    }
}
