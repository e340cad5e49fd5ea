//! The statistics of the summary: medians, and ratios of rounds run back to
//! back.

use std::time::Duration;

/// The median of `v` (not empty).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The median of `v` (not empty).
pub fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of the per-round ratios `krate[i] / floor[i]`: rounds that
/// ran back to back share whatever the machine was doing then.
pub fn paired_ratio(krate: &[f64], floor: &[f64]) -> f64 {
    let ratios: Vec<f64> = krate.iter().zip(floor).map(|(k, f)| k / f).collect();
    median_f64(&ratios)
}
