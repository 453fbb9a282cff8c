//! Statistics of the samples: percentiles of one run's latencies, and the
//! spread (min / median / max) of a metric over repeated runs.

use serde::{Deserialize, Serialize};

/// The `p`-quantile (0..=1) of sorted samples, nearest rank: the smallest
/// sample with at least `p` of all samples at or below it. NaN when empty.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Percentiles of one series of latencies (µs or ms, as the caller says).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(samples: &[f64]) -> Percentiles {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: s.len(),
            min: s[0],
            p50: quantile(&s, 0.50),
            p90: quantile(&s, 0.90),
            p99: quantile(&s, 0.99),
            p999: quantile(&s, 0.999),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

/// A metric over repeated runs: min, median and max of the per-run values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub runs: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// None when no run produced a value.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            runs: n,
            min: v[0],
            median,
            max: v[n - 1],
        })
    }

    /// `1.23` or `1.23 (1.10–1.40)` with repeats; `digits` after the point.
    pub fn show(&self, digits: usize) -> String {
        if self.runs <= 1 || self.min == self.max {
            format!("{:.*}", digits, self.median)
        } else {
            format!(
                "{:.*} ({:.*}–{:.*})",
                digits, self.median, digits, self.min, digits, self.max
            )
        }
    }
}

/// A compact histogram of latencies in µs: buckets 1 µs wide up to 100 µs,
/// then 2 % wide. Kept in the JSON so every sample's distribution stays
/// there (10,000 raw samples per series and run would make it huge).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// (lower bound in µs, count), ascending, non-empty buckets only.
    pub buckets: Vec<(f64, u64)>,
}

fn bucket_floor(us: f64) -> f64 {
    if us < 100.0 {
        return us.max(0.0).floor();
    }
    // 100 · 1.02^k
    let k = ((us / 100.0).ln() / 1.02f64.ln()).floor();
    (100.0 * 1.02f64.powf(k) * 10.0).round() / 10.0
}

impl Histogram {
    pub fn of(samples_us: &[f64]) -> Histogram {
        let mut map: std::collections::BTreeMap<u64, u64> = Default::default();
        for &s in samples_us.iter().filter(|s| s.is_finite()) {
            // Keyed by the bound ×10 so the map orders them.
            *map.entry((bucket_floor(s) * 10.0) as u64).or_default() += 1;
        }
        Histogram {
            buckets: map.into_iter().map(|(k, c)| (k as f64 / 10.0, c)).collect(),
        }
    }

    #[cfg(test)]
    pub fn total(&self) -> u64 {
        self.buckets.iter().map(|(_, c)| c).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.5), 50.0);
        assert_eq!(quantile(&s, 0.99), 99.0);
        assert_eq!(quantile(&s, 0.999), 100.0);
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 1.0), 100.0);
        assert!(quantile(&[], 0.5).is_nan());
        // 10,000 samples: p99.9 is the 9,990th.
        let s: Vec<f64> = (1..=10_000).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.999), 9990.0);
    }

    #[test]
    fn percentiles_ignore_order_and_non_finite() {
        let p = Percentiles::of(&[3.0, 1.0, f64::NAN, 2.0, 4.0]);
        assert_eq!(p.count, 4);
        assert_eq!((p.min, p.p50, p.max), (1.0, 2.0, 4.0));
        assert_eq!(p.mean, 2.5);
        assert_eq!(Percentiles::of(&[]).count, 0);
    }

    #[test]
    fn spread_of_repeats() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.runs, s.min, s.median, s.max), (3, 1.0, 2.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0]).unwrap().median, 2.5);
        assert!(Spread::of([]).is_none());
        assert!(Spread::of([f64::NAN]).is_none());
        assert_eq!(Spread::of([1.5]).unwrap().show(2), "1.50");
        assert_eq!(s.show(1), "2.0 (1.0–3.0)");
    }

    #[test]
    fn histogram_keeps_every_sample() {
        let samples: Vec<f64> = (0..1000).map(|i| 20.0 + i as f64 * 3.7).collect();
        let h = Histogram::of(&samples);
        assert_eq!(h.total(), 1000);
        assert!(h.buckets.windows(2).all(|w| w[0].0 < w[1].0));
        // Fine below 100 µs, 2 % above.
        assert_eq!(bucket_floor(42.7), 42.0);
        let b = bucket_floor(1000.0);
        assert!(b <= 1000.0 && b > 1000.0 / 1.021, "{b}");
    }
}
