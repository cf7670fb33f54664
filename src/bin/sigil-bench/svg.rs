//! `--plot FILE.svg`, hand-written SVG (no plotting crate): latency over
//! time (every request as a dot, with p50/p99 per 500 ms), throughput per
//! 500 ms, and the latency histogram on log-spaced bins with p50/p99/p99.9
//! marked.

use std::fmt::Write as _;

use crate::stats::{self, Rec};

const W: f64 = 1000.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const PANEL_H: f64 = 220.0;
/// Most dots drawn (requests are evenly thinned beyond this).
const MAX_DOTS: usize = 6000;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A log10 axis over `[lo, hi]` (both > 0) mapped to `[y0, y1]`.
struct LogAxis {
    lo: f64,
    hi: f64,
    a: f64,
    b: f64,
}

impl LogAxis {
    fn new(lo: f64, hi: f64, a: f64, b: f64) -> Self {
        let lo = lo.max(1e-3);
        let hi = hi.max(lo * 1.5);
        // Snap to 1-2-5 steps so the axis starts and ends on a tick.
        let snap_down = |v: f64| {
            let p = 10f64.powf(v.log10().floor());
            [5.0, 2.0, 1.0]
                .into_iter()
                .map(|m| m * p)
                .find(|t| *t <= v)
                .unwrap_or(p)
        };
        let snap_up = |v: f64| {
            let p = 10f64.powf(v.log10().floor());
            [1.0, 2.0, 5.0, 10.0]
                .into_iter()
                .map(|m| m * p)
                .find(|t| *t >= v)
                .unwrap_or(10.0 * p)
        };
        Self {
            lo: snap_down(lo),
            hi: snap_up(hi),
            a,
            b,
        }
    }

    fn map(&self, v: f64) -> f64 {
        let t = (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10());
        self.a + t.clamp(0.0, 1.0) * (self.b - self.a)
    }

    fn ticks(&self) -> Vec<f64> {
        let mut out = Vec::new();
        let mut p = 10f64.powf(self.lo.log10().floor());
        while p <= self.hi * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let t = m * p;
                if t >= self.lo * 0.9999 && t <= self.hi * 1.0001 {
                    out.push(t);
                }
            }
            p *= 10.0;
        }
        out
    }
}

fn fmt_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// A linear "nice" upper bound.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|t| *t >= v)
        .unwrap_or(10.0 * p)
}

fn frame(s: &mut String, top: f64, title: &str) {
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{PANEL_H}" fill="#fcfcfc" stroke="#999"/><text x="{LEFT}" y="{}" font-size="13" font-weight="bold">{}</text>"##,
        W - LEFT - RIGHT,
        top - 6.0,
        esc(title)
    );
}

/// The whole SVG document.
pub fn plot(title: &str, recs: &[Rec]) -> String {
    let ok: Vec<&Rec> = recs.iter().filter(|r| r.ok).collect();
    let sorted = stats::sorted_ok_latencies(recs);
    let h = 60.0 + 3.0 * (PANEL_H + 70.0);
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"##,
        esc(title)
    );
    if sorted.is_empty() {
        s += r#"<text x="70" y="80">no successful request</text></svg>"#;
        return s;
    }
    let x0 = LEFT;
    let x1 = W - RIGHT;
    let t_end = recs.iter().map(|r| r.start_us).max().unwrap_or(0) as f64 / 1e6;
    let t_end = t_end.max(1e-3);
    let xt = |t: f64| x0 + (t / t_end) * (x1 - x0);
    let lat_ms = |us: u32| f64::from(us) / 1000.0;
    let lo = lat_ms(sorted[0]);
    let hi = lat_ms(sorted[sorted.len() - 1]);

    // Panel 1: latency over time.
    let top1 = 60.0;
    frame(&mut s, top1, "latency over time (ms, log scale): dots = requests, lines = p50 (blue) and p99 (red) per 500 ms");
    let ya = LogAxis::new(lo, hi, top1 + PANEL_H, top1);
    axis_y_log(&mut s, &ya);
    axis_x_time(&mut s, top1 + PANEL_H, t_end, &xt);
    let step = ok.len().div_ceil(MAX_DOTS).max(1);
    s += r##"<g fill="#555" fill-opacity="0.35">"##;
    for r in ok.iter().step_by(step) {
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.3"/>"#,
            xt(r.start_us as f64 / 1e6),
            ya.map(lat_ms(r.lat_us))
        );
    }
    s += "</g>";
    let buckets = stats::per_bucket(recs, 500_000);
    for (idx, color) in [(2usize, "#1f5fbf"), (3, "#c62828")] {
        let pts: Vec<String> = buckets
            .iter()
            .filter(|b| b.1 > 0)
            .map(|b| {
                let v = if idx == 2 { b.2 } else { b.3 };
                format!("{:.1},{:.1}", xt(b.0 + 0.25), ya.map(v))
            })
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" ")
        );
    }

    // Panel 2: throughput per 500 ms.
    let top2 = top1 + PANEL_H + 70.0;
    frame(
        &mut s,
        top2,
        "successful enrollments per second (per 500 ms bucket)",
    );
    let rates: Vec<f64> = buckets.iter().map(|b| b.1 as f64 * 2.0).collect();
    let rmax = nice_max(rates.iter().copied().fold(0.0, f64::max));
    axis_y_lin(&mut s, top2, rmax);
    axis_x_time(&mut s, top2 + PANEL_H, t_end, &xt);
    s += r##"<g fill="#2e7d32" fill-opacity="0.8">"##;
    for (b, r) in buckets.iter().zip(&rates) {
        let xa = xt(b.0);
        let xb = xt((b.0 + 0.5).min(t_end));
        let y = top2 + PANEL_H - r / rmax * PANEL_H;
        let _ = write!(
            s,
            r#"<rect x="{xa:.1}" y="{y:.1}" width="{:.1}" height="{:.1}"/>"#,
            (xb - xa - 1.0).max(0.5),
            top2 + PANEL_H - y
        );
    }
    s += "</g>";

    // Panel 3: histogram on log-spaced bins.
    let top3 = top2 + PANEL_H + 70.0;
    frame(
        &mut s,
        top3,
        "latency histogram (ms, log-spaced bins): requests per bin",
    );
    let xa = LogAxis::new(lo, hi, x0, x1);
    const BINS: usize = 80;
    let (llo, lhi) = (xa.lo.log10(), xa.hi.log10());
    let mut counts = [0u64; BINS];
    for &us in &sorted {
        let t = (lat_ms(us).max(xa.lo).log10() - llo) / (lhi - llo);
        counts[((t * BINS as f64) as usize).min(BINS - 1)] += 1;
    }
    let cmax = nice_max(counts.iter().copied().max().unwrap_or(1) as f64);
    axis_y_lin(&mut s, top3, cmax);
    for t in xa.ticks() {
        let x = xa.map(t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            top3,
            top3 + PANEL_H,
            top3 + PANEL_H + 14.0,
            fmt_ms(t)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">latency (ms)</text>"#,
        (x0 + x1) / 2.0,
        top3 + PANEL_H + 30.0
    );
    s += r##"<g fill="#6a1b9a" fill-opacity="0.8">"##;
    let bw = (x1 - x0) / BINS as f64;
    for (i, c) in counts.iter().enumerate() {
        if *c == 0 {
            continue;
        }
        let hgt = *c as f64 / cmax * PANEL_H;
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{hgt:.1}"/>"#,
            x0 + i as f64 * bw,
            top3 + PANEL_H - hgt,
            (bw - 0.5).max(0.5)
        );
    }
    s += "</g>";
    for (p, color) in [(50.0, "#1f5fbf"), (99.0, "#c62828"), (99.9, "#ef6c00")] {
        let v = lat_ms(stats::percentile(&sorted, p));
        let x = xa.map(v);
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="{color}" stroke-width="1.5" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="{color}">p{p} {v:.2} ms</text>"#,
            top3,
            top3 + PANEL_H,
            x + 3.0,
            top3 + 14.0
                + if p > 99.0 {
                    28.0
                } else if p > 50.0 {
                    14.0
                } else {
                    0.0
                }
        );
    }
    s += "</svg>\n";
    s
}

fn axis_y_log(s: &mut String, ya: &LogAxis) {
    for t in ya.ticks() {
        let y = ya.map(t);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{} ms</text>"##,
            W - RIGHT,
            LEFT - 5.0,
            y + 4.0,
            fmt_ms(t)
        );
    }
}

fn axis_y_lin(s: &mut String, top: f64, max: f64) {
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + PANEL_H - PANEL_H * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 5.0,
            y + 4.0,
            if v >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        );
    }
}

fn axis_x_time(s: &mut String, bottom: f64, t_end: f64, xt: &dyn Fn(f64) -> f64) {
    let step = nice_max(t_end / 10.0);
    let mut t = 0.0;
    while t <= t_end + 1e-9 {
        let x = xt(t);
        let _ = write!(
            s,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            bottom + 14.0,
            if step < 1.0 {
                format!("{t:.1}")
            } else {
                format!("{t:.0}")
            }
        );
        t += step;
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since the timed phase began</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        bottom + 30.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_is_well_formed_enough() {
        let recs: Vec<Rec> = (0..2000u32)
            .map(|i| Rec {
                start_us: u64::from(i) * 1000,
                lat_us: 500 + (i * 37) % 20_000,
                ok: i % 100 != 0,
            })
            .collect();
        let svg = plot("t <1>", &recs);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.contains("p99.9"));
        assert!(plot("empty", &[]).contains("no successful request"));
    }

    #[test]
    fn log_axis_snaps() {
        let a = LogAxis::new(0.7, 13.0, 0.0, 100.0);
        assert_eq!((a.lo, a.hi), (0.5, 20.0));
        assert_eq!(a.ticks(), vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        assert!((a.map(0.5) - 0.0).abs() < 1e-9 && (a.map(20.0) - 100.0).abs() < 1e-9);
    }
}
