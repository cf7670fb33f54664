//! Latency records and their summaries: exact percentiles (every request is
//! kept, so no histogram approximation), per-second series for the plot.

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    /// When it was sent (or scheduled, in open-loop mode), µs after the timed phase began.
    pub start_us: u64,
    /// Latency, µs.
    pub lat_us: u32,
    /// Whether it succeeded.
    pub ok: bool,
}

/// Latency percentiles of the successful requests, milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Number of successful requests summarised.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// Sorted latencies (µs) of the successful requests.
pub fn sorted_ok_latencies(recs: &[Rec]) -> Vec<u32> {
    let mut v: Vec<u32> = recs.iter().filter(|r| r.ok).map(|r| r.lat_us).collect();
    v.sort_unstable();
    v
}

/// Nearest-rank percentile of sorted data (`p` in 0..=100); 0 for no data.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    // The epsilon keeps float noise (99.9 % of 1000 = 999.000…01) from
    // bumping the rank by one.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    /// Summarises sorted latencies (µs).
    pub fn of(sorted: &[u32]) -> Self {
        if sorted.is_empty() {
            return Self::default();
        }
        let ms = |us: u32| f64::from(us) / 1000.0;
        let sum: u64 = sorted.iter().map(|&v| u64::from(v)).sum();
        Self {
            count: sorted.len(),
            mean: sum as f64 / sorted.len() as f64 / 1000.0,
            p50: ms(percentile(sorted, 50.0)),
            p90: ms(percentile(sorted, 90.0)),
            p99: ms(percentile(sorted, 99.0)),
            p999: ms(percentile(sorted, 99.9)),
            max: ms(sorted[sorted.len() - 1]),
        }
    }

    /// As JSON (milliseconds).
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "mean": round3(self.mean),
            "p50": round3(self.p50),
            "p90": round3(self.p90),
            "p99": round3(self.p99),
            "p999": round3(self.p999),
            "max": round3(self.max),
        })
    }
}

/// Rounds to 3 decimals (for JSON readability).
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Per-bucket series over time: `(bucket start s, completed ok, p50 ms, p99 ms)`.
pub fn per_bucket(recs: &[Rec], bucket_us: u64) -> Vec<(f64, usize, f64, f64)> {
    let bucket_us = bucket_us.max(1);
    let Some(last) = recs.iter().map(|r| r.start_us).max() else {
        return Vec::new();
    };
    let n = (last / bucket_us + 1) as usize;
    let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); n];
    for r in recs.iter().filter(|r| r.ok) {
        buckets[(r.start_us / bucket_us) as usize].push(r.lat_us);
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(i, mut b)| {
            b.sort_unstable();
            (
                (i as u64 * bucket_us) as f64 / 1e6,
                b.len(),
                f64::from(percentile(&b, 50.0)) / 1000.0,
                f64::from(percentile(&b, 99.0)) / 1000.0,
            )
        })
        .collect()
}

/// Thousands separators for a count.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
        let s = Summary::of(&v);
        assert!((s.mean - 0.5005).abs() < 1e-9);
        assert_eq!(s.max, 1.0);
    }

    #[test]
    fn separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn buckets() {
        let recs = [
            Rec {
                start_us: 10,
                lat_us: 1000,
                ok: true,
            },
            Rec {
                start_us: 1_500_000,
                lat_us: 3000,
                ok: true,
            },
            Rec {
                start_us: 1_600_000,
                lat_us: 9000,
                ok: false,
            },
        ];
        let b = per_bucket(&recs, 1_000_000);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].1, 1);
        assert_eq!(b[1].1, 1);
        assert_eq!(b[1].3, 3.0);
    }
}
