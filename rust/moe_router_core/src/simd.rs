//! Which vector instructions the row kernels use.
//!
//! The level is the best one the CPU has, unless the environment variable
//! `MOE_ROUTER_SIMD` asks for less: `avx512`, `avx2`, or `off` / `portable`
//! (the scalar kernels, which LLVM still vectorizes for the baseline target).
//! Asking for a level the CPU lacks gives the best available level below it, so
//! no unsupported instruction is ever executed; an unknown value is ignored (the
//! bindings warn about it at import).
//! The variable is read once per process. Every level gives the same bits.

use std::sync::OnceLock;

/// Name of the environment variable that caps the kernels' instruction set.
pub(crate) const SIMD_ENV: &str = "MOE_ROUTER_SIMD";

/// An instruction-set level of the row kernels, from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Scalar code, compiled for the baseline target.
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// x86-64 AVX-512F (with AVX2 + FMA).
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports.
    pub fn best_available() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    }

    /// The cap a value of `MOE_ROUTER_SIMD` spells (`None` for an unknown value).
    pub fn parse(value: &str) -> Option<SimdLevel> {
        match value.trim().to_ascii_lowercase().as_str() {
            "avx512" => Some(SimdLevel::Avx512),
            "avx2" => Some(SimdLevel::Avx2),
            "off" | "portable" => Some(SimdLevel::Portable),
            _ => None,
        }
    }

    /// The level for a value of `MOE_ROUTER_SIMD` (`None`: unset), given the
    /// best level the CPU supports.
    fn requested(value: Option<&str>, best: SimdLevel) -> SimdLevel {
        best.min(value.and_then(SimdLevel::parse).unwrap_or(SimdLevel::Avx512))
    }

    /// The spelling `MOE_ROUTER_SIMD` accepts for this level.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// The level the row kernels use in this process (read once).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let value = std::env::var(SIMD_ENV).ok();
        SimdLevel::requested(value.as_deref(), SimdLevel::best_available())
    })
}

/// A level the CPU is known to support: the proof the kernels' `unsafe`
/// dispatch relies on. Only made by `current` (and `all` in tests), which
/// never exceed `SimdLevel::best_available()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Simd(SimdLevel);

impl Simd {
    /// The process's level (`simd_level()`); choose it once per call.
    pub(crate) fn current() -> Simd {
        Simd(simd_level())
    }

    /// The level.
    #[inline(always)]
    pub(crate) fn level(self) -> SimdLevel {
        self.0
    }

    /// Every supported level (for tests that compare them).
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Simd> {
        let best = SimdLevel::best_available();
        [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= best).map(Simd).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SimdLevel::*;

    #[test]
    fn requests_are_capped_by_the_cpu() {
        assert_eq!(SimdLevel::requested(None, Avx512), Avx512);
        assert_eq!(SimdLevel::requested(Some("off"), Avx512), Portable);
        assert_eq!(SimdLevel::requested(Some(" Portable "), Avx2), Portable);
        assert_eq!(SimdLevel::requested(Some("avx2"), Avx512), Avx2);
        assert_eq!(SimdLevel::requested(Some("avx512"), Avx2), Avx2);
        assert_eq!(SimdLevel::requested(Some("avx2"), Portable), Portable);
        assert_eq!(SimdLevel::requested(Some("sse9"), Avx2), Avx2);
        assert!(simd_level() <= SimdLevel::best_available());
        assert_eq!(Simd::all().last().map(|s| s.level()), Some(SimdLevel::best_available()));
    }
}
