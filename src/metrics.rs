//! Prometheus text exposition, hand-rolled to keep the dependency tree
//! lean: counters with label sets and fixed-bucket histograms, registered
//! once and updated lock-free per sample except for the first sample of a
//! label set. Names follow Prometheus conventions (`sigil_…_total`,
//! `_seconds`). Only the api layer and the store record into it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock, PoisonError,
    },
};

/// Latency buckets, seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Batch-size buckets (store group commit).
pub const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug, Default)]
struct Histogram {
    bounds: Vec<f64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }
}

/// The process-wide registry.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(String, String), u64>>,
    histograms: Mutex<BTreeMap<(String, String), std::sync::Arc<Histogram>>>,
}

/// A gauge computed at scrape time: name, labels, value.
pub type Gauge<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// The global registry.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s
}

impl Metrics {
    /// Adds `n` to counter `name{labels}`.
    pub fn inc(&self, name: &str, l: &[(&str, &str)], n: u64) {
        let mut c = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        *c.entry((name.to_owned(), labels(l))).or_insert(0) += n;
    }

    /// Records `secs` into histogram `name{labels}` with `buckets`.
    pub fn observe(&self, name: &str, l: &[(&str, &str)], buckets: &[f64], secs: f64) {
        let h = {
            let mut hs = self
                .histograms
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            hs.entry((name.to_owned(), labels(l)))
                .or_insert_with(|| std::sync::Arc::new(Histogram::new(buckets)))
                .clone()
        };
        for (i, b) in h.bounds.iter().enumerate() {
            if secs <= *b {
                if let Some(c) = h.buckets.get(i) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add((secs * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    /// The text exposition of every counter and histogram, plus `gauges`
    /// (name, labels, value) computed by the caller at scrape time.
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let mut out = String::new();
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut last = "";
        for ((name, l), v) in counters.iter() {
            if name != last {
                let _ = writeln!(out, "# TYPE {name} counter");
                last = name;
            }
            if l.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{l}}} {v}");
            }
        }
        drop(counters);
        let hs = self
            .histograms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut last = String::new();
        for ((name, l), h) in hs.iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name} histogram");
                last.clone_from(name);
            }
            let sep = if l.is_empty() { "" } else { "," };
            for (b, n) in h.bounds.iter().zip(&h.buckets) {
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"{b}\"}} {n}");
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"+Inf\"}} {count}");
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let braces = if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            };
            let _ = writeln!(out, "{name}_sum{braces} {sum}");
            let _ = writeln!(out, "{name}_count{braces} {count}");
        }
        drop(hs);
        let mut last = "";
        for (name, l, v) in gauges {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name} gauge");
                last = name;
            }
            let pairs: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let l = labels(&pairs);
            if l.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{l}}} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.inc(
            "sigil_requests_total",
            &[("rpc", "Enroll"), ("reason", "ok")],
            2,
        );
        m.inc(
            "sigil_requests_total",
            &[("rpc", "Enroll"), ("reason", "NONCE_REPLAYED")],
            1,
        );
        m.observe(
            "sigil_rpc_seconds",
            &[("rpc", "Enroll")],
            LATENCY_BUCKETS,
            0.003,
        );
        let text = m.render(&[("sigil_plan_version", vec![], 3.0)]);
        assert!(text.contains("sigil_requests_total{rpc=\"Enroll\",reason=\"ok\"} 2"));
        assert!(text.contains("sigil_rpc_seconds_bucket{rpc=\"Enroll\",le=\"0.005\"} 1"));
        assert!(text.contains("sigil_rpc_seconds_bucket{rpc=\"Enroll\",le=\"0.002\"} 0"));
        assert!(text.contains("sigil_rpc_seconds_count{rpc=\"Enroll\"} 1"));
        assert!(text.contains("# TYPE sigil_plan_version gauge\nsigil_plan_version 3"));
    }
}
