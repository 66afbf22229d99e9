//! Compatibility presets: a peer framework's router parameters translated into
//! a [`RouterConfig`] that routes as that framework does.
//!
//! Each preset has a table of the framework's parameters (their spellings, the
//! framework's default, the configuration fields each one determines) and a
//! translation from those settings to configuration fields. [`preset`] reads the
//! overrides (the framework's names or ours), checks every value, translates,
//! then applies our names; a framework name and one of ours that set a field to
//! different values are refused. What each preset reproduces, and the sources,
//! is documented per preset in `python/moe_router/presets.py`.

use crate::config::{boolean, integer, real, FieldValue, Peer, RouterConfig, TOP_K_ALIAS};
use crate::error::{Result, RouterError};

/// Every preset name, in the order the documentation lists them.
pub const PRESETS: &[&str] = &[
    "megatron",
    "deepspeed",
    "mixtral",
    "qwen_moe",
    "deepseek_v3",
    "switch",
    "tutel",
    "fairseq",
    "expert_choice",
    "base",
];

/// Largest E and k (expert ids are int32).
const I32_MAX: i128 = i32::MAX as i128;

/// A framework parameter's default, as the tables write it.
#[derive(Clone, Copy)]
enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Real(f64),
    Text(&'static str),
}

impl Value {
    fn value(self) -> FieldValue {
        match self {
            Value::Null => FieldValue::None,
            Value::Bool(b) => FieldValue::Bool(b),
            Value::Int(i) => FieldValue::Int(i),
            Value::Real(x) => float(x),
            Value::Text(s) => FieldValue::Text(s.to_string()),
        }
    }
}

/// One framework parameter.
struct Param {
    /// The name the translation reads it by.
    key: &'static str,
    /// Accepted spellings.
    names: &'static [&'static str],
    /// The framework's default.
    default: Value,
    /// The configuration fields it determines (for the conflict check with our names).
    fields: &'static [&'static str],
}

const fn param(
    key: &'static str,
    names: &'static [&'static str],
    default: Value,
    fields: &'static [&'static str],
) -> Param {
    Param { key, names, default, fields }
}

/// One preset: its parameters, the framework's names for E and k, its default k and its translation.
struct Spec {
    name: &'static str,
    params: &'static [Param],
    expert_names: &'static [&'static str],
    topk_names: &'static [&'static str],
    default_top_k: usize,
    translate: fn(&Settings) -> Result<Translation>,
}

/// The framework's settings of one call, with E and k.
struct Settings {
    preset: &'static str,
    num_experts: usize,
    top_k: usize,
    values: Vec<(&'static str, FieldValue)>,
}

/// Configuration fields in order (a field set twice keeps its first place) and the peer.
#[derive(Default)]
struct Translation {
    fields: Vec<(&'static str, FieldValue)>,
    peer: Option<Peer>,
}

impl Translation {
    fn set(&mut self, field: &'static str, value: FieldValue) -> &mut Self {
        match self.fields.iter_mut().find(|(f, _)| *f == field) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((field, value)),
        }
        self
    }

    fn get(&self, field: &str) -> Option<&FieldValue> {
        self.fields.iter().find(|(f, _)| *f == field).map(|(_, v)| v)
    }
}

static NONE: FieldValue = FieldValue::None;

impl Settings {
    fn get(&self, key: &str) -> &FieldValue {
        self.values.iter().find(|(k, _)| *k == key).map_or(&NONE, |(_, v)| v)
    }

    fn has(&self, key: &str) -> bool {
        self.values.iter().any(|(k, _)| *k == key)
    }

    fn is_none(&self, key: &str) -> bool {
        matches!(self.get(key), FieldValue::None)
    }

    fn refuse(&self, message: impl std::fmt::Display) -> RouterError {
        refuse(self.preset, message)
    }

    /// A flag read under `name` from the setting `key`.
    fn flag_named(&self, name: &'static str, key: &str) -> Result<bool> {
        boolean(name, self.get(key)).map_err(|e| self.prefixed(e))
    }

    fn flag(&self, key: &'static str) -> Result<bool> {
        self.flag_named(key, key)
    }

    fn number(&self, key: &'static str) -> Result<f64> {
        real(key, self.get(key)).map_err(|e| self.prefixed(e))
    }

    /// An integer in `[minimum, maximum]`.
    fn integer(&self, key: &'static str, minimum: i128, maximum: i128) -> Result<i128> {
        integer(key, self.get(key), minimum, maximum).map_err(|e| self.prefixed(e))
    }

    fn prefixed(&self, err: RouterError) -> RouterError {
        prefixed(self.preset, err)
    }

    /// Refuse `value` of setting `name` unless `allowed`, saying `why`.
    fn only(&self, name: &str, value: &FieldValue, allowed: bool, why: &str) -> Result<()> {
        if allowed {
            Ok(())
        } else {
            Err(self.refuse(format!("{name}={value} is not supported: {why}")))
        }
    }

    /// `only` for a setting spelt as a string: any other kind (None aside) is the
    /// wrong type (a `ConfigTypeError`), as for `RouterConfig`'s own choices.
    fn choice(&self, name: &str, value: &FieldValue, allowed: bool, why: &str) -> Result<()> {
        if matches!(value, FieldValue::Text(_) | FieldValue::None) {
            return self.only(name, value, allowed, why);
        }
        Err(RouterError::Preset {
            message: format!("preset '{}': invalid {name}: got {value}; must be a string ({why})", self.preset),
            wrong_type: true,
        })
    }

    /// Refuse a noise setting unless it is 0 (or None).
    fn no_noise(&self, name: &str, key: &str, why: &str) -> Result<()> {
        let value = self.get(key);
        self.only(name, value, matches!(value, FieldValue::None) || is_zero(value), why)
    }
}

/// A preset's refusal, `preset '<name>': <message>`.
fn refuse(preset: &str, message: impl std::fmt::Display) -> RouterError {
    RouterError::Preset { message: format!("preset '{preset}': {message}"), wrong_type: false }
}

/// A field reader's error with the preset named first.
fn prefixed(preset: &str, err: RouterError) -> RouterError {
    let wrong_type = matches!(err, RouterError::WrongType { .. });
    RouterError::Preset { message: format!("preset '{preset}': {err}"), wrong_type }
}

/// A float as Python's `repr` prints it (`1e-05`, `1e+16`, `nan`, `inf`).
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let text = format!("{x:?}");
    match text.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => text,
    }
}

fn float(x: f64) -> FieldValue {
    FieldValue::Real { value: x, text: py_float(x), exact: true }
}

fn text(s: &str) -> FieldValue {
    FieldValue::Text(s.to_string())
}

fn int(n: usize) -> FieldValue {
    FieldValue::Int(n as i128)
}

/// The number a value stands for, as Python compares numbers (a bool is 0 or 1).
fn numeric(v: &FieldValue) -> Option<f64> {
    match v {
        FieldValue::Bool(b) => Some(f64::from(u8::from(*b))),
        FieldValue::Int(i) => Some(*i as f64),
        FieldValue::Real { value, .. } => Some(*value),
        _ => None,
    }
}

/// Equal as Python's `==` on numbers (`0 == 0.0 == False`).
fn is_zero(v: &FieldValue) -> bool {
    numeric(v) == Some(0.0)
}

fn is_text(v: &FieldValue, s: &str) -> bool {
    matches!(v, FieldValue::Text(t) if t == s)
}

fn is_one_of(v: &FieldValue, allowed: &[&str]) -> bool {
    allowed.iter().any(|s| is_text(v, s))
}

/// Two settings say the same: both None, equal numbers (or sequences of them), or equal otherwise.
fn same(a: &FieldValue, b: &FieldValue) -> bool {
    match (a, b) {
        (FieldValue::None, FieldValue::None) => true,
        (FieldValue::None, _) | (_, FieldValue::None) => false,
        _ => match (numeric(a), numeric(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

// ---------------------------------------------------------------------------
// translations: framework settings -> configuration fields
// ---------------------------------------------------------------------------

fn megatron(s: &Settings) -> Result<Translation> {
    let k = s.top_k;
    let score = s.get("score_function");
    let scores = ["softmax", "sigmoid", "sqrtsoftplus"];
    s.choice(
        "score_function",
        score,
        is_one_of(score, &scores),
        "Megatron-Core's score functions are softmax, sigmoid and sqrtsoftplus",
    )?;
    let softmax = is_text(score, "softmax");
    let pre = s.flag("pre_softmax")?;
    // softmax after top-k (Megatron's default) is the renormalized top-k of the full
    // softmax; sigmoid and sqrtsoftplus scores are renormalized only for k > 1.
    let normalize = if softmax { !pre } else { k > 1 };
    let scale = if s.is_none("scaling_factor") { 1.0 } else { s.number("scaling_factor")? };
    if s.is_none("num_groups") != s.is_none("group_topk") {
        return Err(s.refuse("num_groups and group_topk go together (Megatron-Core requires both)"));
    }
    let mut group_score = "max".to_string();
    if !s.is_none("group_topk") {
        let per_group = k as i128 / s.integer("group_topk", 1, I32_MAX)?;
        if per_group < 1 {
            return Err(s.refuse(format!(
                "Megatron-Core scores a group by the sum of its top topk // group_topk = {per_group} scores; \
                 topk must be >= group_topk"
            )));
        }
        if per_group > 1 {
            group_score = format!("top{per_group}_sum");
        }
    }
    // Groups are ranked on the tensor selection runs on: raw logits in post-softmax mode.
    let group_input = if softmax && !pre { "logits" } else { "scores" };
    let mut capacity = s.get("capacity_factor").clone();
    if !s.is_none("capacity_factor") && s.number("capacity_factor")? < 0.0 {
        capacity = FieldValue::None; // Megatron-Core turns a negative factor into dropless routing
    }
    let drop = s.get("drop_policy");
    s.choice(
        "drop_policy",
        drop,
        is_one_of(drop, &["probs", "position"]),
        "Megatron-Core's moe_token_drop_policy is 'probs' or 'position'",
    )?;
    s.flag("pad_to_capacity")?;
    let biased = s.flag_named("moe_router_enable_expert_bias", "enable_expert_bias")? || !s.is_none("expert_bias");
    if biased && softmax {
        return Err(
            s.refuse("Megatron-Core allows an expert bias only with score_function='sigmoid' or 'sqrtsoftplus'")
        );
    }
    let balancing = s.get("load_balancing_type");
    s.choice(
        "moe_router_load_balancing_type",
        balancing,
        is_one_of(balancing, &["aux_loss", "seq_aux_loss", "sinkhorn", "none"]),
        "moe_router computes the micro-batch ('aux_loss') and sequence ('seq_aux_loss') losses and Sinkhorn \
         routing; global_aux_loss is not available",
    )?;
    let coeff = s.number("aux_loss_coeff")?;
    let sinkhorn = is_text(balancing, "sinkhorn");
    if sinkhorn {
        if coeff != 0.0 {
            return Err(
                s.refuse(format!("moe_aux_loss_coeff={} with sinkhorn: Megatron-Core requires 0", py_float(coeff)))
            );
        }
        if biased {
            return Err(s.refuse("Megatron-Core's Sinkhorn routing does not use an expert bias"));
        }
    }
    let z = if s.is_none("z_loss_coeff") { 0.0 } else { s.number("z_loss_coeff")? };
    s.no_noise(
        "moe_input_jitter_eps",
        "input_jitter_eps",
        "Megatron-Core jitters the router input (also in evaluation); moe_router's jitter_eps acts on the logits, \
         so it is not the same noise",
    )?;
    let loss = |kind: &str| float(if is_text(balancing, kind) { coeff } else { 0.0 });
    let mut t = Translation::default();
    t.set("score_function", score.clone())
        .set("normalize_weights", FieldValue::Bool(normalize))
        .set("weight_scale", float(scale))
        .set("num_groups", s.get("num_groups").clone())
        .set("group_top_k", s.get("group_topk").clone())
        .set("group_score", FieldValue::Text(group_score))
        .set("group_score_input", text(group_input))
        .set("capacity_factor", capacity)
        .set("eval_capacity_factor", FieldValue::None)
        .set("capacity_rounding", text("megatron"))
        .set("min_capacity", int(0))
        .set("expert_capacity", FieldValue::None)
        .set("drop_policy", drop.clone())
        .set("renormalize_after_drop", FieldValue::Bool(false))
        .set("load_balance_loss_coeff", loss("aux_loss"))
        .set("seq_load_balance_loss_coeff", loss("seq_aux_loss"))
        .set("router_z_loss_coeff", float(z))
        .set("expert_bias", s.get("expert_bias").clone())
        // float32 scores as Megatron computes them, ranked where Megatron ranks
        // (the logits in top-k-then-softmax)
        .set("score_precision", text(if softmax && !pre { "float32_logits" } else { "float32" }));
    if sinkhorn {
        // sinkhorn_load_balancing reads neither the score function nor the groups.
        t.set("routing", text("sinkhorn"))
            .set("score_function", text("softmax"))
            .set("normalize_weights", FieldValue::Bool(false))
            .set("num_groups", FieldValue::None)
            .set("group_top_k", FieldValue::None);
    }
    t.peer = Some(Peer::Megatron);
    Ok(t)
}

fn deepspeed(s: &Settings) -> Result<Translation> {
    let k = s.top_k;
    let gate = match s.get("gate") {
        FieldValue::None => text(match k {
            1 => "top1",
            2 => "top2",
            _ => "topk",
        }),
        given => given.clone(),
    };
    let gates = ["top1", "top2", "topk"];
    s.choice("gate", &gate, is_one_of(&gate, &gates), "DeepSpeed's gating functions are top1, top2, topk")?;
    let (routes, peer, default_policy) = match &gate {
        FieldValue::Text(g) if g == "top1" => ("1", Peer::DeepSpeedTop1, "position"),
        FieldValue::Text(g) if g == "top2" => ("2", Peer::DeepSpeedTop2, "rank"),
        _ => ("k", Peer::DeepSpeedTopK, "probs"),
    };
    if (routes == "1" && k != 1) || (routes == "2" && k != 2) {
        return Err(s.refuse(format!("gate={gate} routes {routes} expert(s) per token, but top_k = {k}")));
    }
    if s.flag("use_rts")? {
        return Err(s.refuse(
            "use_rts=True (random token selection) keeps the tokens of an overflowing expert by torch's RNG, \
             which cannot be reproduced; pass use_rts=False for DeepSpeed's deterministic order (tokens in order, \
             drop_policy='position')",
        ));
    }
    if s.flag("top2_2nd_expert_sampling")? && routes == "2" {
        return Err(s.refuse(
            "top2_2nd_expert_sampling=True draws the second expert with Gumbel noise from torch's RNG (also in \
             evaluation), which cannot be reproduced; pass False",
        ));
    }
    let noisy = s.get("noisy_gate_policy");
    s.choice(
        "noisy_gate_policy",
        noisy,
        matches!(noisy, FieldValue::None) || is_text(noisy, "None"),
        "DeepSpeed's 'Jitter' and 'RSample' draw from torch's RNG and cannot be reproduced",
    )?;
    let drop = s.flag("drop_tokens")?;
    let policy = match s.get("drop_policy") {
        FieldValue::None => text(default_policy),
        given => given.clone(),
    };
    let when_dropping = |key: &str| if drop { s.get(key).clone() } else { FieldValue::None };
    let mut t = Translation { peer: Some(peer), ..Translation::default() };
    t.set("score_function", text("softmax"))
        .set("normalize_weights", FieldValue::Bool(false))
        .set("weight_scale", float(1.0))
        .set("capacity_factor", when_dropping("capacity_factor"))
        .set("eval_capacity_factor", when_dropping("eval_capacity_factor"))
        .set("capacity_rounding", text("deepspeed"))
        .set("min_capacity", s.get("min_capacity").clone())
        .set("expert_capacity", FieldValue::None)
        .set("drop_policy", policy)
        .set("renormalize_after_drop", FieldValue::Bool(routes != "1"))
        .set("router_z_loss_coeff", float(0.0))
        // top-1/top-2 take argmax of the gates and (second choice) of the logits; top-k ranks float32 gates
        .set("score_precision", text(if routes == "k" { "float32" } else { "float32_logits" }));
    Ok(t)
}

/// What Mixtral and Qwen-MoE share: dropless float32 softmax, HF's loss coefficient.
fn hugging_face(s: &Settings, peer: Peer) -> Result<Translation> {
    if s.has("router_jitter_noise") {
        s.no_noise(
            "router_jitter_noise",
            "router_jitter_noise",
            "Hugging Face multiplies the router input (and, for Mixtral, the experts' input) by U(1-eps, 1+eps) in \
             training; moe_router's jitter_eps acts on the logits, so it is not the same noise; use \
             router_jitter_noise=0 (or our jitter_eps knowingly)",
        )?;
    }
    let coef = s.number("router_aux_loss_coef")?;
    let mut t = Translation { peer: Some(peer), ..Translation::default() };
    // HF's loss is k times ours: the same strength on ours needs k times the coefficient.
    t.set("score_function", text("softmax"))
        .set("capacity_factor", FieldValue::None)
        .set("eval_capacity_factor", FieldValue::None)
        .set("expert_capacity", FieldValue::None)
        .set("weight_scale", float(1.0))
        .set("load_balance_loss_coeff", float(coef * s.top_k as f64))
        .set("router_z_loss_coeff", float(0.0))
        .set("score_precision", text("float32"));
    Ok(t)
}

fn mixtral(s: &Settings) -> Result<Translation> {
    let mut t = hugging_face(s, Peer::Mixtral)?;
    t.set("normalize_weights", FieldValue::Bool(true));
    Ok(t)
}

fn qwen_moe(s: &Settings) -> Result<Translation> {
    let mut t = hugging_face(s, Peer::QwenMoe)?;
    t.set("normalize_weights", FieldValue::Bool(s.flag("norm_topk_prob")?));
    Ok(t)
}

fn deepseek_v3(s: &Settings) -> Result<Translation> {
    let scoring = s.get("scoring_func");
    s.choice("scoring_func", scoring, is_text(scoring, "sigmoid"), "DeepSeek-V3 routes on sigmoid scores")?;
    let method = s.get("topk_method");
    s.choice(
        "topk_method",
        method,
        is_text(method, "noaux_tc"),
        "DeepSeek-V3's router is 'noaux_tc' (bias-corrected, group-limited top-k)",
    )?;
    if s.is_none("n_group") != s.is_none("topk_group") {
        return Err(s.refuse("n_group and topk_group go together"));
    }
    let alpha = s.number("aux_loss_alpha")?;
    let seq = s.flag("seq_aux")?;
    let mut t = Translation { peer: Some(Peer::DeepSeekV3), ..Translation::default() };
    t.set("score_function", text("sigmoid"))
        .set("num_groups", s.get("n_group").clone())
        .set("group_top_k", s.get("topk_group").clone())
        .set("group_score", text("top2_sum"))
        .set("normalize_weights", FieldValue::Bool(s.flag("norm_topk_prob")?))
        .set("weight_scale", float(s.number("routed_scaling_factor")?))
        .set("expert_bias", s.get("e_score_correction_bias").clone())
        .set("capacity_factor", FieldValue::None)
        .set("eval_capacity_factor", FieldValue::None)
        .set("expert_capacity", FieldValue::None)
        .set("load_balance_loss_coeff", float(if seq { 0.0 } else { alpha }))
        .set("seq_load_balance_loss_coeff", float(if seq { alpha } else { 0.0 }))
        .set("router_z_loss_coeff", float(0.0))
        .set("score_precision", text("float32"));
    Ok(t)
}

fn switch(s: &Settings) -> Result<Translation> {
    if s.top_k != 1 {
        return Err(s.refuse(format!("the Switch Transformers router is top-1, got top_k = {}", s.top_k)));
    }
    s.no_noise(
        "router_jitter_noise",
        "router_jitter_noise",
        "Hugging Face multiplies the router input by U(1-eps, 1+eps) in training (default 0.01); moe_router's \
         jitter_eps acts on the logits, so it is not the same noise; use router_jitter_noise=0 (or our jitter_eps \
         knowingly)",
    )?;
    let mut t = Translation { peer: Some(Peer::Switch), ..Translation::default() };
    t.set("score_function", text("softmax"))
        .set("normalize_weights", FieldValue::Bool(false))
        .set("weight_scale", float(1.0))
        .set("capacity_factor", FieldValue::None)
        .set("eval_capacity_factor", FieldValue::None)
        .set("expert_capacity", s.get("expert_capacity").clone())
        .set("min_capacity", int(0))
        .set("drop_policy", text("position"))
        .set("renormalize_after_drop", FieldValue::Bool(false))
        .set("load_balance_loss_coeff", float(s.number("router_aux_loss_coef")?))
        .set("router_z_loss_coeff", float(s.number("router_z_loss_coef")?))
        .set("score_precision", text("float32"));
    Ok(t)
}

fn tutel(s: &Settings) -> Result<Translation> {
    if !s.flag("is_gshard_loss")? {
        return Err(s.refuse(
            "is_gshard_loss=False selects Tutel's load_importance_loss, which moe_router does not compute; pass \
             is_gshard_loss=True (the GShard loss)",
        ));
    }
    s.flag("fp32_gate")?;
    let mut capacity = s.get("capacity_factor").clone();
    if !s.is_none("capacity_factor") {
        // 0: dropless; -x: min(needed, bound), which keeps exactly what the bound x keeps.
        let cf = s.number("capacity_factor")?;
        capacity = if cf == 0.0 { FieldValue::None } else { float(cf.abs()) };
    }
    let noise = s.number("gate_noise")?;
    if !(noise.is_finite() && noise >= 0.0) {
        return Err(s.refuse(format!("gate_noise must be a finite number >= 0 (0: no noise), got {}", py_float(noise))));
    }
    // moe_layer.py: alignment = sharded_count * a2a_ffn_overlap_degree up to megablocks_size,
    // then up to a multiple of 128 above 256.
    let mega = s.integer("megablocks_size", 0, u64::MAX.into())?.unsigned_abs().max(1);
    let sharded = s.integer("sharded_count", 1, I32_MAX)?.unsigned_abs();
    let align = sharded * s.integer("a2a_ffn_overlap_degree", 1, I32_MAX)?.unsigned_abs();
    let align = align.div_ceil(mega) * mega;
    let align = if align > 256 { align.div_ceil(128) * 128 } else { align };
    let bpr = s.flag("batch_prioritized_routing")?;
    let normalize = s.flag("normalize_gate")? && s.top_k > 1;
    let mut t = Translation { peer: Some(Peer::Tutel), ..Translation::default() };
    t.set("score_function", text("softmax"))
        .set("normalize_weights", FieldValue::Bool(normalize))
        .set("weight_scale", float(1.0))
        .set("capacity_factor", capacity)
        .set("eval_capacity_factor", FieldValue::None)
        .set("capacity_rounding", text("tutel"))
        .set("capacity_alignment", FieldValue::Int(i128::try_from(align).unwrap_or(i128::MAX)))
        .set("min_capacity", int(0))
        .set("expert_capacity", FieldValue::None)
        .set("drop_policy", text(if bpr { "bpr_rank" } else { "rank" }))
        .set("renormalize_after_drop", FieldValue::Bool(false))
        .set("noise_std", float(if noise > 0.0 { noise / s.num_experts as f64 } else { 0.0 }))
        .set("jitter_eps", float(0.0))
        .set("router_z_loss_coeff", float(0.0));
    Ok(t)
}

fn fairseq(s: &Settings) -> Result<Translation> {
    let k = s.top_k;
    if k != 1 && k != 2 {
        return Err(s.refuse(format!("fairseq's gates are top1gating and top2gating; top_k = {k} is neither")));
    }
    s.flag("use_fp32")?;
    let policy = s.get("second_expert_policy");
    s.choice(
        "second_expert_policy",
        policy,
        is_one_of(policy, &["all", "sampling", "random"]),
        "fairseq's policies are 'sampling', 'random' and (any other value, here spelt 'all') the deterministic \
         second-best expert",
    )?;
    if k == 2 && is_one_of(policy, &["sampling", "random"]) {
        return Err(s.refuse(format!(
            "second_expert_policy={policy} draws from torch's RNG (Gumbel noise on the second choice's logits, in \
             evaluation too; or keeping it with probability min(1, 2*g2)), which moe_router's noise (on every \
             logit, training only) cannot express; pass second_expert_policy='all' for the deterministic \
             second-best expert"
        )));
    }
    let before = s.flag("normalize_gate_prob_before_dropping")?;
    let bpr = s.flag("batch_prioritized_routing")?;
    if bpr && k == 1 {
        return Err(s.refuse("batch_prioritized_routing exists in fairseq's top2gating only (top_k = 2)"));
    }
    let key = "moe_eval_capacity_token_fraction";
    let mut fraction = s.get(key).clone();
    if !s.is_none(key) && s.number(key)? <= 0.0 {
        fraction = FieldValue::None; // fairseq: a fraction <= 0 means the training formula in evaluation too
    }
    let policy = match (k, bpr) {
        (2, true) => "bpr_rank",
        (2, false) => "rank",
        _ => "position",
    };
    let mut t = Translation { peer: Some(Peer::Fairseq), ..Translation::default() };
    t.set("score_function", text("softmax"))
        .set("normalize_weights", FieldValue::Bool(k == 2 && before))
        .set("weight_scale", float(1.0))
        .set("capacity_factor", s.get("capacity_factor").clone())
        .set("eval_capacity_factor", FieldValue::None)
        .set("capacity_rounding", text("fairseq"))
        .set("eval_capacity_token_fraction", fraction)
        .set("capacity_alignment", int(1))
        .set("min_capacity", int(0))
        .set("expert_capacity", FieldValue::None)
        .set("drop_policy", text(policy))
        .set("renormalize_after_drop", FieldValue::Bool(k == 2 && !before))
        .set("router_z_loss_coeff", float(0.0));
    Ok(t)
}

fn expert_choice(s: &Settings) -> Result<Translation> {
    s.no_noise(
        "jitter_noise",
        "jitter_noise",
        "flaxformer multiplies the router input by U(1-eps, 1+eps); moe_router's jitter_eps acts on the logits, so \
         it is not the same noise",
    )?;
    let mut t = Translation::default();
    t.set("routing", text("expert_choice"))
        .set("score_function", text("softmax"))
        .set("normalize_weights", FieldValue::Bool(false))
        .set("weight_scale", float(1.0))
        .set("capacity_factor", s.get("train_capacity_factor").clone())
        .set("eval_capacity_factor", s.get("eval_capacity_factor").clone())
        .set("capacity_rounding", text("flaxformer"))
        .set("min_capacity", s.get("min_expert_capacity").clone())
        .set("load_balance_loss_coeff", float(0.0))
        .set("router_z_loss_coeff", float(s.number("router_z_loss_factor")?));
    Ok(t)
}

fn base(s: &Settings) -> Result<Translation> {
    if s.top_k != 1 {
        return Err(s.refuse(format!("a BASE layer sends each token to one expert, got top_k = {}", s.top_k)));
    }
    let shuffle = s.get("base_shuffle");
    s.only(
        "base_shuffle",
        shuffle,
        is_zero(shuffle),
        "fairseq sends every token to a random worker before routing (torch.randperm); shuffle the batch yourself \
         and pass base_shuffle=False",
    )?;
    let mut t = Translation::default();
    t.set("routing", text("balanced"))
        .set("balanced_solver", text("fairseq_auction"))
        .set("score_function", text("sigmoid"))
        .set("normalize_weights", FieldValue::Bool(false))
        .set("weight_scale", float(1.0))
        .set("capacity_factor", FieldValue::None)
        .set("eval_capacity_factor", FieldValue::None)
        .set("load_balance_loss_coeff", float(0.0))
        .set("router_z_loss_coeff", float(0.0));
    Ok(t)
}

// ---------------------------------------------------------------------------
// the tables: each framework's parameters, spellings and defaults
// ---------------------------------------------------------------------------

use Value::{Bool, Int, Null, Real, Text};

const LB: &[&str] = &["load_balance_loss_coeff", "seq_load_balance_loss_coeff"];
const HF_LOSS: Param =
    param("router_aux_loss_coef", &["router_aux_loss_coef"], Real(0.001), &["load_balance_loss_coeff"]);

const SPECS: &[Spec] = &[
    Spec {
        name: "megatron",
        params: &[
            param(
                "score_function",
                &["score_function", "moe_router_score_function"],
                Text("softmax"),
                &["score_function", "normalize_weights"],
            ),
            param(
                "pre_softmax",
                &["pre_softmax", "moe_router_pre_softmax", "use_pre_softmax"],
                Bool(false),
                &["normalize_weights"],
            ),
            param("scaling_factor", &["scaling_factor", "moe_router_topk_scaling_factor"], Null, &["weight_scale"]),
            param("num_groups", &["num_groups", "moe_router_num_groups"], Null, &["num_groups"]),
            param("group_topk", &["group_topk", "moe_router_group_topk"], Null, &["group_top_k", "group_score"]),
            param("capacity_factor", &["capacity_factor", "moe_expert_capacity_factor"], Null, &["capacity_factor"]),
            param("drop_policy", &["drop_policy", "moe_token_drop_policy"], Text("probs"), &["drop_policy"]),
            param("pad_to_capacity", &["pad_to_capacity", "moe_pad_expert_input_to_capacity"], Bool(false), &[]),
            param("expert_bias", &["expert_bias"], Null, &["expert_bias"]),
            param("enable_expert_bias", &["moe_router_enable_expert_bias", "enable_expert_bias"], Bool(false), &[]),
            param("aux_loss_coeff", &["aux_loss_coeff", "moe_aux_loss_coeff"], Real(0.0), LB),
            param("z_loss_coeff", &["z_loss_coeff", "moe_z_loss_coeff"], Null, &["router_z_loss_coeff"]),
            param(
                "load_balancing_type",
                &["moe_router_load_balancing_type", "load_balancing_type"],
                Text("aux_loss"),
                &["load_balance_loss_coeff", "seq_load_balance_loss_coeff", "routing"],
            ),
            param("input_jitter_eps", &["moe_input_jitter_eps", "input_jitter_eps"], Null, &[]),
        ],
        expert_names: &["num_moe_experts"],
        topk_names: &["topk", "moe_router_topk"],
        default_top_k: 2,
        translate: megatron,
    },
    Spec {
        name: "deepspeed",
        params: &[
            param("gate", &["gate"], Null, &["drop_policy", "renormalize_after_drop"]),
            param("capacity_factor", &["capacity_factor"], Real(1.0), &["capacity_factor"]),
            param("eval_capacity_factor", &["eval_capacity_factor"], Real(1.0), &["eval_capacity_factor"]),
            param("min_capacity", &["min_capacity"], Int(4), &["min_capacity"]),
            param("drop_tokens", &["drop_tokens"], Bool(true), &["capacity_factor", "eval_capacity_factor"]),
            param("drop_policy", &["drop_policy"], Null, &["drop_policy"]),
            param("use_rts", &["use_rts"], Bool(false), &[]),
            param("top2_2nd_expert_sampling", &["top2_2nd_expert_sampling"], Bool(false), &[]),
            param("noisy_gate_policy", &["noisy_gate_policy"], Null, &[]),
        ],
        expert_names: &[],
        topk_names: &["k"],
        default_top_k: 1,
        translate: deepspeed,
    },
    Spec {
        name: "mixtral",
        params: &[HF_LOSS, param("router_jitter_noise", &["router_jitter_noise"], Real(0.0), &[])],
        expert_names: &["num_local_experts"],
        topk_names: &["num_experts_per_tok"],
        default_top_k: 2,
        translate: mixtral,
    },
    Spec {
        name: "qwen_moe",
        params: &[HF_LOSS, param("norm_topk_prob", &["norm_topk_prob"], Bool(false), &["normalize_weights"])],
        expert_names: &[],
        topk_names: &["num_experts_per_tok"],
        default_top_k: 4,
        translate: qwen_moe,
    },
    Spec {
        name: "deepseek_v3",
        params: &[
            param("n_group", &["n_group"], Int(8), &["num_groups"]),
            param("topk_group", &["topk_group"], Int(4), &["group_top_k"]),
            param("routed_scaling_factor", &["routed_scaling_factor"], Real(2.5), &["weight_scale"]),
            param("norm_topk_prob", &["norm_topk_prob"], Bool(true), &["normalize_weights"]),
            param("e_score_correction_bias", &["e_score_correction_bias"], Null, &["expert_bias"]),
            param("scoring_func", &["scoring_func"], Text("sigmoid"), &["score_function"]),
            param("topk_method", &["topk_method"], Text("noaux_tc"), &[]),
            param("aux_loss_alpha", &["aux_loss_alpha"], Real(0.001), LB),
            param("seq_aux", &["seq_aux"], Bool(true), LB),
        ],
        expert_names: &["n_routed_experts"],
        topk_names: &["num_experts_per_tok"],
        default_top_k: 8,
        translate: deepseek_v3,
    },
    Spec {
        name: "switch",
        params: &[
            param("expert_capacity", &["expert_capacity"], Int(64), &["expert_capacity"]),
            HF_LOSS,
            param("router_z_loss_coef", &["router_z_loss_coef"], Real(0.001), &["router_z_loss_coeff"]),
            param("router_jitter_noise", &["router_jitter_noise"], Real(0.0), &[]),
        ],
        expert_names: &[],
        topk_names: &[],
        default_top_k: 1,
        translate: switch,
    },
    Spec {
        name: "tutel",
        params: &[
            param("capacity_factor", &["capacity_factor"], Real(1.0), &["capacity_factor"]),
            param("gate_noise", &["gate_noise"], Real(0.0), &["noise_std"]),
            param("normalize_gate", &["normalize_gate"], Bool(true), &["normalize_weights"]),
            param("batch_prioritized_routing", &["batch_prioritized_routing"], Bool(false), &["drop_policy"]),
            param("sharded_count", &["sharded_count"], Int(1), &["capacity_alignment"]),
            param("a2a_ffn_overlap_degree", &["a2a_ffn_overlap_degree"], Int(1), &["capacity_alignment"]),
            param("megablocks_size", &["megablocks_size"], Int(0), &["capacity_alignment"]),
            param("is_gshard_loss", &["is_gshard_loss"], Bool(true), &[]),
            param("fp32_gate", &["fp32_gate"], Bool(false), &[]),
        ],
        expert_names: &["num_global_experts"],
        topk_names: &["k"],
        default_top_k: 1,
        translate: tutel,
    },
    Spec {
        name: "fairseq",
        params: &[
            param("capacity_factor", &["capacity_factor"], Real(1.0), &["capacity_factor"]),
            param(
                "moe_eval_capacity_token_fraction",
                &["moe_eval_capacity_token_fraction"],
                Real(0.25),
                &["eval_capacity_token_fraction"],
            ),
            param("second_expert_policy", &["second_expert_policy", "moe_second_expert_policy"], Text("all"), &[]),
            param(
                "normalize_gate_prob_before_dropping",
                &["normalize_gate_prob_before_dropping", "moe_normalize_gate_prob_before_dropping"],
                Bool(false),
                &["normalize_weights", "renormalize_after_drop"],
            ),
            param(
                "batch_prioritized_routing",
                &["batch_prioritized_routing", "moe_batch_prioritized_routing"],
                Bool(false),
                &["drop_policy"],
            ),
            param("use_fp32", &["use_fp32", "moe_gating_use_fp32"], Bool(false), &[]),
        ],
        expert_names: &["moe_expert_count"],
        topk_names: &[],
        default_top_k: 2,
        translate: fairseq,
    },
    Spec {
        name: "expert_choice",
        params: &[
            param("train_capacity_factor", &["train_capacity_factor"], Real(1.0), &["capacity_factor"]),
            param("eval_capacity_factor", &["eval_capacity_factor"], Real(1.0), &["eval_capacity_factor"]),
            param("min_expert_capacity", &["min_expert_capacity"], Int(4), &["min_capacity"]),
            param("router_z_loss_factor", &["router_z_loss_factor"], Real(0.0), &["router_z_loss_coeff"]),
            param("jitter_noise", &["jitter_noise"], Real(0.0), &[]),
        ],
        expert_names: &[],
        topk_names: &[],
        default_top_k: 1,
        translate: expert_choice,
    },
    Spec {
        name: "base",
        params: &[param("base_shuffle", &["base_shuffle"], Bool(false), &[])],
        expert_names: &["num_workers"],
        topk_names: &[],
        default_top_k: 1,
        translate: base,
    },
];

// ---------------------------------------------------------------------------
// reading the overrides
// ---------------------------------------------------------------------------

fn spec(name: &FieldValue) -> Result<&'static Spec> {
    let listed = || PRESETS.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", ");
    let FieldValue::Text(name) = name else {
        return Err(RouterError::wrong_type("preset name", name, &format!("must be one of {}", listed())));
    };
    SPECS.iter().find(|s| s.name == name).ok_or_else(|| RouterError::Preset {
        message: format!("unknown preset '{name}'; expected one of {}", listed()),
        wrong_type: false,
    })
}

/// The framework's names (sorted) and our configuration names it does not shadow (sorted).
fn names(spec: &Spec) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut framework: Vec<&'static str> = spec.params.iter().flat_map(|p| p.names.iter().copied()).collect();
    framework.extend(spec.expert_names.iter().chain(spec.topk_names));
    framework.sort_unstable();
    framework.dedup();
    let mut ours: Vec<&'static str> = our_names().chain([TOP_K_ALIAS]).filter(|n| !framework.contains(n)).collect();
    ours.sort_unstable();
    (framework, ours)
}

/// The configuration fields an override may set by our name (E, k and the peer are the preset's).
fn our_names() -> impl Iterator<Item = &'static str> {
    RouterConfig::FIELDS.iter().copied().filter(|n| !matches!(*n, "num_experts" | "top_k" | "peer"))
}

/// Every override name `preset` accepts for preset `name`: the framework's, then ours.
pub fn accepted_names(name: &FieldValue) -> Result<Vec<&'static str>> {
    let (mut framework, ours) = names(spec(name)?);
    framework.extend(ours);
    Ok(framework)
}

/// Take every spelling of one setting out of `overrides`; they must agree.
/// Returns the name used last and its value.
fn pop_aliases(
    preset: &str,
    what: &str,
    names: &[&str],
    overrides: &mut Vec<(String, FieldValue)>,
) -> Result<Option<(String, FieldValue)>> {
    let mut found: Option<(String, FieldValue)> = None;
    for name in names {
        let Some(i) = overrides.iter().position(|(n, _)| n == name) else { continue };
        let (n, v) = overrides.remove(i);
        if let Some((used, value)) = &found {
            if !same(&v, value) {
                return Err(refuse(preset, format!("{used}={value} and {n}={v} both set {what} and disagree")));
            }
        }
        found = Some((n, v));
    }
    Ok(found)
}

/// A [`RouterConfig`] that routes like preset `name` with E experts and k per token.
///
/// `top_k` None is the framework's default k. `overrides` take the framework's
/// parameter names (see [`accepted_names`]) or configuration field names; ours
/// are applied last, and a framework name and ours that set one field to
/// different values are refused. Errors: [`RouterError::Preset`] naming the
/// preset and the parameter (an unknown preset or setting, a value of the wrong
/// type, a setting that cannot be reproduced), or the configuration's own error
/// for a field out of range, after the preset's name and the setting it came from.
pub fn preset(
    name: &FieldValue,
    num_experts: &FieldValue,
    top_k: &FieldValue,
    overrides: Vec<(String, FieldValue)>,
) -> Result<RouterConfig> {
    let spec = spec(name)?;
    let p = spec.name;
    let mut overrides = overrides;
    let e = integer::<usize>("num_experts", num_experts, 1, I32_MAX).map_err(|err| prefixed(p, err))?;
    // E and k under the framework's names
    if let Some((used, value)) = pop_aliases(p, "num_experts", spec.expert_names, &mut overrides)? {
        if !same(&value, &int(e)) {
            return Err(refuse(p, format!("{used}={value} disagrees with num_experts={e}")));
        }
    }
    let mut top_k = top_k.clone();
    let mut top_k_name = None;
    let topk_names: Vec<&str> = spec.topk_names.iter().copied().chain([TOP_K_ALIAS]).collect();
    if let Some((used, value)) = pop_aliases(p, "top_k", &topk_names, &mut overrides)? {
        if !matches!(top_k, FieldValue::None) && !same(&value, &top_k) {
            return Err(refuse(p, format!("{used}={value} disagrees with top_k={top_k}")));
        }
        top_k = value;
        top_k_name = Some(used);
    }
    let k = match top_k {
        FieldValue::None => spec.default_top_k,
        k => integer::<usize>("top_k", &k, 1, I32_MAX).map_err(|err| prefixed(p, err))?,
    };
    // the framework's settings
    let mut settings = Settings { preset: p, num_experts: e, top_k: k, values: Vec::new() };
    let mut given: Vec<(&Param, String)> = Vec::new();
    for param in spec.params {
        let value = match pop_aliases(p, param.key, param.names, &mut overrides)? {
            Some((used, value)) => {
                given.push((param, used));
                value
            }
            None => param.default.value(),
        };
        settings.values.push((param.key, value));
    }
    let mut ours: Vec<(&'static str, FieldValue)> = Vec::new();
    overrides.retain(|(n, v)| match our_names().find(|f| f == n) {
        Some(field) => {
            ours.push((field, v.clone()));
            false
        }
        None => true,
    });
    if !overrides.is_empty() {
        let mut unknown: Vec<String> = overrides.iter().map(|(n, _)| format!("'{n}'")).collect();
        unknown.sort();
        let (framework, our) = names(spec);
        return Err(RouterError::Preset {
            message: format!(
                "preset '{p}' got unknown setting(s) [{}]; accepted: the framework's names {}; and RouterConfig's \
                 names {}",
                unknown.join(", "),
                framework.join(", "),
                our.join(", ")
            ),
            wrong_type: true,
        });
    }
    let mut t = (spec.translate)(&settings)?;
    for (field, value) in ours {
        for (param, used) in &given {
            if let Some(set) = t.get(field).filter(|set| param.fields.contains(&field) && !same(set, &value)) {
                return Err(refuse(
                    p,
                    format!(
                        "{used}={} sets {field}={set}, but {field}={value} was also given",
                        settings.get(param.key)
                    ),
                ));
            }
        }
        t.set(field, value);
    }
    let peer = t.peer.map_or(FieldValue::None, |peer| text(&peer.to_string()));
    let fixed = [("num_experts", int(e)), ("top_k", int(k)), ("peer", peer)];
    RouterConfig::from_fields(fixed.into_iter().chain(t.fields)).map_err(|err| {
        // Name the framework's setting the refused field came from, as the user spelt it
        // (or as the preset's default), before the field's own message.
        let field = match &err {
            RouterError::InvalidConfig { field, .. } | RouterError::WrongType { field, .. } => *field,
            _ => return err,
        };
        let from_given = given
            .iter()
            .find(|(param, _)| param.fields.contains(&field))
            .map(|(param, used)| format!("{used}={} sets {field}", settings.get(param.key)))
            .or_else(|| top_k_name.as_ref().filter(|_| field == "top_k").map(|used| format!("{used}={k} sets top_k")));
        let from_default = || {
            spec.params.iter().find(|param| param.fields.contains(&field)).map(|param| {
                format!(
                    "the default {}={} sets {field}",
                    param.names.first().unwrap_or(&param.key),
                    settings.get(param.key)
                )
            })
        };
        match from_given.or_else(from_default) {
            Some(origin) => RouterError::Preset {
                message: format!("preset '{p}': {origin}: {err}"),
                wrong_type: matches!(err, RouterError::WrongType { .. }),
            },
            // A field given under our name, or E and k themselves: still the preset's refusal.
            None => prefixed(p, err),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> FieldValue {
        text(s)
    }

    fn make(preset_name: &str, e: i128, k: Option<i128>, overrides: &[(&str, FieldValue)]) -> Result<RouterConfig> {
        let k = k.map_or(FieldValue::None, FieldValue::Int);
        let overrides = overrides.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
        preset(&name(preset_name), &FieldValue::Int(e), &k, overrides)
    }

    fn message(r: Result<RouterConfig>) -> String {
        r.expect_err("refused").to_string()
    }

    #[test]
    fn every_preset_builds_with_its_defaults() {
        for p in PRESETS {
            let c = make(p, 64, None, &[]).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(c.num_experts, 64);
        }
        let m = make("megatron", 64, None, &[]).expect("megatron");
        assert_eq!((m.top_k, m.peer, m.normalize_weights), (2, Some(Peer::Megatron), true));
        assert_eq!(m.field("score_precision"), Some(text("float32_logits")));
    }

    #[test]
    fn framework_names_translate() {
        let m = make("megatron", 64, Some(8), &[("moe_router_pre_softmax", FieldValue::Bool(true))]).expect("pre");
        assert!(!m.normalize_weights);
        let d = make("deepspeed", 16, Some(2), &[]).expect("deepspeed");
        assert_eq!((d.peer, d.renormalize_after_drop), (Some(Peer::DeepSpeedTop2), true));
        assert_eq!(d.field("drop_policy"), Some(text("rank")));
        // Hugging Face's coefficient is k times ours
        let x = make("mixtral", 8, Some(2), &[("router_aux_loss_coef", float(0.02))]).expect("mixtral");
        assert_eq!(x.load_balance_loss_coeff, 0.04);
        // Tutel: a negative factor is its bound; the alignment rounds up to 128 above 256
        let t =
            make("tutel", 16, Some(2), &[("capacity_factor", float(-1.5)), ("sharded_count", FieldValue::Int(300))])
                .expect("tutel");
        assert_eq!(t.capacity_alignment, 384);
        assert!(matches!(t.field("capacity_factor"), Some(FieldValue::Real { value, .. }) if value == 1.5));
    }

    #[test]
    fn refusals_name_the_preset_and_the_parameter() {
        let m = message(make("deepspeed", 16, Some(3), &[("gate", text("top2"))]));
        assert_eq!(m, "preset 'deepspeed': gate='top2' routes 2 expert(s) per token, but top_k = 3");
        let m = message(make("megatron", 8, Some(2), &[("pre_softmax", FieldValue::Int(1))]));
        assert_eq!(m, "preset 'megatron': invalid pre_softmax: got 1 (int); must be True or False (a bool)");
        let m = message(make(
            "megatron",
            8,
            Some(2),
            &[("pre_softmax", FieldValue::Bool(true)), ("normalize_weights", FieldValue::Bool(true))],
        ));
        assert_eq!(m, "preset 'megatron': pre_softmax=True sets normalize_weights=False, but normalize_weights=True was also given");
        let m = message(make("mixtral", 8, Some(2), &[("num_experts_per_tok", FieldValue::Int(4))]));
        assert_eq!(m, "preset 'mixtral': num_experts_per_tok=4 disagrees with top_k=2");
        let m = message(make(
            "megatron",
            8,
            Some(2),
            &[("moe_router_load_balancing_type", text("sinkhorn")), ("moe_aux_loss_coeff", FieldValue::Int(1))],
        ));
        assert_eq!(m, "preset 'megatron': moe_aux_loss_coeff=1.0 with sinkhorn: Megatron-Core requires 0");
        let err = make("qwen_moe", 8, Some(2), &[("n_group", FieldValue::Int(2))]).expect_err("unknown");
        assert!(matches!(err, RouterError::Preset { wrong_type: true, .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("preset 'qwen_moe' got unknown setting(s) ['n_group']; accepted: the framework's names"));
        let err = make("gshard", 8, None, &[]).expect_err("unknown preset");
        assert!(err.to_string().starts_with("unknown preset 'gshard'; expected one of 'megatron', 'deepspeed'"));
        assert!(matches!(
            preset(&FieldValue::Int(3), &FieldValue::Int(8), &FieldValue::None, vec![]),
            Err(RouterError::WrongType { .. })
        ));
        // the configuration's own checks, with the preset named as for the preset's own
        let m = message(make("mixtral", 8, Some(9), &[]));
        assert!(m.starts_with("preset 'mixtral': invalid top_k: got 9; must satisfy 1 <= top_k <= num_experts"), "{m}");
        let m = message(make("mixtral", 8, None, &[("num_experts_per_tok", FieldValue::Int(9))]));
        assert!(m.starts_with("preset 'mixtral': num_experts_per_tok=9 sets top_k: invalid top_k: got 9"), "{m}");
        let m = message(make("mixtral", 8, Some(2), &[("capacity_factor", float(-1.0))]));
        assert!(m.starts_with("preset 'mixtral': invalid capacity_factor: got -1.0"), "{m}");
    }

    #[test]
    fn accepted_names_list_the_framework_first() {
        let names = accepted_names(&name("mixtral")).expect("mixtral");
        assert_eq!(
            &names[..4],
            ["num_experts_per_tok", "num_local_experts", "router_aux_loss_coef", "router_jitter_noise"]
        );
        assert!(names.contains(&"capacity_factor") && names.contains(&TOP_K_ALIAS) && !names.contains(&"peer"));
    }

    #[test]
    fn floats_print_as_python_does() {
        assert_eq!(
            [py_float(1e-5), py_float(1e16), py_float(0.5), py_float(f64::NAN)],
            ["1e-05", "1e+16", "0.5", "nan"]
        );
    }
}
