//! Float64 reductions that give NumPy's bits: the sum, mean, population
//! variance and percentile the statistics report, so a figure read from the
//! core equals the one `numpy` computes from the same values.
//!
//! - [`sum`] is NumPy's pairwise summation (`pairwise_sum` in NumPy's
//!   `loops_utils.h`): blocks of at most 128 values summed with eight
//!   accumulators, larger runs split in two halves at a multiple of 8;
//! - [`mean`] is `sum / n`, [`variance`] `sum((x - mean)**2) / n` (ddof 0),
//!   as `numpy.mean` and `numpy.var` compute them;
//! - [`percentile`] is `numpy.percentile`'s default, linear interpolation
//!   between order statistics (Hyndman and Fan 1996, type 7), with NumPy's
//!   two-sided lerp.

/// The largest run summed with the eight accumulators (NumPy's `PW_BLOCKSIZE`).
const BLOCK: usize = 128;

/// Sum of `values` in NumPy's pairwise order (0.0 when empty).
pub fn sum(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 8 {
        return values.iter().fold(-0.0, |acc, &x| acc + x);
    }
    if n <= BLOCK {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&values[..8]);
        let whole = n - n % 8;
        for block in values[8..whole].chunks_exact(8) {
            for (acc, &x) in r.iter_mut().zip(block) {
                *acc += x;
            }
        }
        let head = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        return values[whole..].iter().fold(head, |acc, &x| acc + x);
    }
    let half = n / 2;
    let half = half - half % 8;
    sum(&values[..half]) + sum(&values[half..])
}

/// Arithmetic mean (`numpy.mean`); 0.0 when empty.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    sum(values) / values.len() as f64
}

/// Population variance (`numpy.var`, ddof 0); 0.0 when empty.
pub fn variance(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let m = mean(values);
    let squares: Vec<f64> = values.iter().map(|&x| (x - m) * (x - m)).collect();
    sum(&squares) / values.len() as f64
}

/// `spread / mean(values)`: 0.0 when `values` is empty or its mean is <= 0.
fn per_mean(values: &[f64], spread: impl FnOnce(f64) -> f64) -> f64 {
    let m = mean(values);
    if m <= 0.0 {
        0.0
    } else {
        spread(m) / m
    }
}

/// Coefficient of variation, population std / mean (`np.std(x) / np.mean(x)`);
/// 0.0 when empty or the mean is <= 0.
pub fn coefficient_of_variation(values: &[f64]) -> f64 {
    per_mean(values, |_| variance(values).sqrt())
}

/// `(max - min) / mean`; 0.0 when empty or the mean is <= 0.
pub fn range_over_mean(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    per_mean(values, |_| max - min)
}

/// The `q`-th percentile (`q` in [0, 100]) of `sorted` (ascending, finite, not
/// empty), as `numpy.percentile(values, q)` with its default linear method.
///
/// The virtual index is `h = (n - 1) * (q / 100)`, `lo = floor(h)`, `g = h - lo`;
/// the value is `a[lo] + (a[lo+1] - a[lo]) * g` for `g < 0.5` and
/// `a[lo+1] - (a[lo+1] - a[lo]) * (1 - g)` otherwise (NumPy's `_lerp`, exact at
/// both ends); `h >= n - 1` gives the largest value.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let h = (n - 1) as f64 * (q / 100.0);
    if h >= (n - 1) as f64 {
        return sorted[n - 1];
    }
    let lo = h.floor();
    let g = h - lo;
    let lo = lo as usize;
    let (a, b) = (sorted[lo], sorted[lo + 1]);
    let diff = b - a;
    if g >= 0.5 {
        b - diff * (1.0 - g)
    } else {
        a + diff * g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_accumulators_keep_what_a_plain_loop_absorbs() {
        // 1e16 absorbs the ones in a left-to-right loop; the eight accumulators keep seven of them.
        let mut v = vec![1e16];
        v.extend([1.0; 15]);
        // Accumulators: r0 = 1e16 + 1 (absorbed), r1..r7 = 2 each; head = 1e16 + 14.
        assert_eq!(sum(&v), 1e16 + 14.0);
        assert_eq!(sum(&[]), 0.0);
        assert_eq!(sum(&[1.5, 2.5]), 4.0);
    }

    #[test]
    fn long_runs_split_at_a_multiple_of_eight() {
        let v: Vec<f64> = (0..1000).map(|i| 1.0 / (1.0 + i as f64)).collect();
        // n / 2 = 500, rounded down to 496.
        assert_eq!(sum(&v), sum(&v[..496]) + sum(&v[496..]));
    }

    #[test]
    fn moments_and_spreads() {
        let v = [1.0, 0.1, 0.2];
        assert_eq!(mean(&v), (1.0 + 0.1 + 0.2) / 3.0);
        let m = mean(&v);
        let var = ((1.0 - m) * (1.0 - m) + (0.1 - m) * (0.1 - m) + (0.2 - m) * (0.2 - m)) / 3.0;
        assert_eq!(variance(&v), var);
        assert_eq!(coefficient_of_variation(&v), var.sqrt() / m);
        assert_eq!(range_over_mean(&[0.75, 0.25]), 1.0);
        assert_eq!(coefficient_of_variation(&[]), 0.0);
        assert_eq!(range_over_mean(&[0.0, 0.0]), 0.0);
        assert_eq!(variance(&[]), 0.0);
    }

    #[test]
    fn percentiles_interpolate_linearly() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64).collect();
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 50.0), 50.5);
        assert!((percentile(&v, 95.0) - 95.05).abs() < 1e-12);
        assert_eq!(percentile(&[3.0], 37.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0], 25.0), 1.25);
        assert_eq!(percentile(&[1.0, 2.0], 75.0), 1.75);
    }
}
