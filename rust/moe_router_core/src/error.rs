//! The one error type of the core. Every variant names the argument at fault,
//! the value seen and what is allowed, so the bindings can pass the message on
//! unchanged.

use thiserror::Error;

/// Why a routing call or a configuration was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RouterError {
    /// A configuration field has a value outside its domain.
    #[error("invalid {field}: got {value}; {allowed}")]
    InvalidConfig {
        /// Field name as the Python API spells it (`top_k`, `capacity_factor`, ...).
        field: &'static str,
        /// The offending value, printed.
        value: String,
        /// What would have been accepted.
        allowed: String,
    },

    /// A configuration field got a value of the wrong kind: a float or a bool
    /// for an integer, a string for a number, an integer for a flag, ...
    /// (the bindings raise it as a `TypeError`).
    #[error("invalid {field}: got {value} ({kind}); {expected}")]
    WrongType {
        /// Field name as the Python API spells it.
        field: &'static str,
        /// The offending value, printed.
        value: String,
        /// The kind of value given (`float`, `bool`, `str`, ...).
        kind: String,
        /// What would have been accepted.
        expected: String,
    },

    /// A configuration field name that does not exist.
    #[error("RouterConfig has no field '{name}'")]
    UnknownField {
        /// The name given.
        name: String,
    },

    /// An input array has the wrong shape.
    #[error("{argument} has shape {actual}, expected {expected}")]
    Shape {
        /// Argument name (`logits`, `token_mask`, `expert_bias`, `hidden`, `weight`).
        argument: &'static str,
        /// Expected shape, printed.
        expected: String,
        /// Actual shape, printed.
        actual: String,
    },

    /// A value inside an input array is not allowed (NaN, +inf, a row with no eligible expert).
    #[error("{argument} {problem} at token {token} (the first offending token; {hint})")]
    BadValue {
        /// Argument name.
        argument: &'static str,
        /// What is wrong, e.g. "contains NaN".
        problem: &'static str,
        /// Index of the first offending token (row), in flattened token order.
        token: usize,
        /// What the caller can do about it.
        hint: &'static str,
    },

    /// The caller stopped the call through `RouteCall::cancel`.
    #[error("routing was cancelled")]
    Cancelled,

    /// A per-expert input vector (expert bias) holds a non-finite value.
    #[error("{argument}[{index}] is {value}; every entry must be finite")]
    NonFiniteParameter {
        /// Argument name.
        argument: &'static str,
        /// Position of the first non-finite entry.
        index: usize,
        /// The value, printed.
        value: String,
    },

    /// An entry of a small per-expert input (a load vector) is outside its domain.
    #[error("{argument}{index} is {value}; {allowed}")]
    InvalidEntry {
        /// Argument name.
        argument: &'static str,
        /// Where, printed after the name (`[3]`, `[1, 7]`, or a phrase such as `'s total`).
        index: String,
        /// The value, printed.
        value: String,
        /// What would have been accepted.
        allowed: String,
    },

    /// An output the arguments ask for does not fit in memory.
    #[error("{argument} asks for {bytes} bytes of output, more than can be allocated")]
    TooLarge {
        /// The argument that sizes the output.
        argument: &'static str,
        /// The bytes asked for (saturated at u128::MAX).
        bytes: u128,
    },

    /// A compatibility preset refused its arguments: an unknown preset or setting,
    /// a value the framework rejects or whose behaviour cannot be reproduced, or a
    /// value of the wrong kind (`wrong_type`, raised as a `TypeError`). The message
    /// names the preset and the parameter.
    #[error("{message}")]
    Preset {
        /// The whole message.
        message: String,
        /// The value has the wrong kind (a float for a flag, an unknown name, ...).
        wrong_type: bool,
    },

    /// Values that should agree contradict each other (a decision's slot used
    /// twice, counts that do not add up, an accumulator of another E).
    #[error("{argument} is inconsistent: {detail}")]
    Inconsistent {
        /// Argument (decision field) name.
        argument: &'static str,
        /// What disagrees.
        detail: String,
    },
}

/// Result type of the core.
pub type Result<T> = std::result::Result<T, RouterError>;

/// `vec![value; len]`, or `TooLarge` naming `argument` when the memory cannot be
/// had (instead of the allocator's abort).
pub(crate) fn filled<T: Clone>(len: usize, value: T, argument: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    let bytes = (len as u128).saturating_mul(std::mem::size_of::<T>().max(1) as u128);
    v.try_reserve_exact(len).map_err(|_| RouterError::TooLarge { argument, bytes })?;
    v.resize(len, value);
    Ok(v)
}

impl RouterError {
    pub(crate) fn config(field: &'static str, value: impl ToString, allowed: impl Into<String>) -> Self {
        RouterError::InvalidConfig { field, value: value.to_string(), allowed: allowed.into() }
    }

    pub(crate) fn wrong_type(field: &'static str, value: &crate::config::FieldValue, expected: &str) -> Self {
        RouterError::WrongType {
            field,
            value: value.to_string(),
            kind: value.kind().to_string(),
            expected: expected.to_string(),
        }
    }

    /// A `Shape` error.
    pub fn shape(argument: &'static str, expected: impl Into<String>, actual: impl Into<String>) -> Self {
        RouterError::Shape { argument, expected: expected.into(), actual: actual.into() }
    }
}
