//! Token-bucket rate limits per peer (IP address, or SPIFFE ID for mTLS
//! callers). Pure and clock-injected: the broker core asks
//! [`RateLimiter::take`] before doing work and reports failed credential
//! checks with [`RateLimiter::penalize`]. Memory is bounded: buckets that
//! have refilled are forgotten by [`RateLimiter::prune`], and the table is
//! capped.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
};

/// Most peers tracked per limit; beyond it, full buckets are pruned first
/// and, if still full, the new peer is limited (fail closed).
const MAX_PEERS: usize = 100_000;

/// One limit: `burst` requests at once, refilled at `per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_sec: f64,
    /// Bucket size.
    pub burst: f64,
}

impl Rate {
    /// `per_sec` sustained, `burst` at once.
    pub const fn new(per_sec: f64, burst: f64) -> Self {
        Self { per_sec, burst }
    }
}

/// What is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Enrollment and renewal calls.
    Issue,
    /// Server challenges.
    Challenge,
    /// The bootstrap RPC.
    Bootstrap,
    /// Failed credential checks (bad HMAC, bad attestation): brute force.
    Failures,
}

/// Limits and exemptions.
#[derive(Debug, Clone, PartialEq)]
pub struct RateConfig {
    /// Off entirely (benchmarks).
    pub disabled: bool,
    /// Enroll/renew per peer.
    pub issue: Rate,
    /// GetChallenge per peer.
    pub challenge: Rate,
    /// BootstrapPlan per peer.
    pub bootstrap: Rate,
    /// Failed credential checks per peer.
    pub failures: Rate,
    /// Peers never limited (e.g. a load generator on loopback).
    pub exempt: Vec<Cidr>,
}

impl Default for RateConfig {
    /// Generous for real clients, tight for guessing: 100 issuances/s (burst
    /// 200), 100 challenges/s, 1 bootstrap/s (burst 5), and 20 failed
    /// credential checks (refilled 1/s) per peer.
    fn default() -> Self {
        Self {
            disabled: false,
            issue: Rate::new(100.0, 200.0),
            challenge: Rate::new(100.0, 200.0),
            bootstrap: Rate::new(1.0, 5.0),
            failures: Rate::new(1.0, 20.0),
            exempt: Vec::new(),
        }
    }
}

/// An IP network, e.g. `127.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` (or a bare address).
    ///
    /// # Errors
    /// A message quoting the input.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let net: IpAddr = a.trim().parse().map_err(|_| format!("bad CIDR {s:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix in {s:?}"))?
        };
        Ok(Self { net, prefix })
    }

    /// True when `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// The limiter: one bucket table per [`Limit`].
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateConfig,
    tables: Mutex<HashMap<(Limit, String), Bucket>>,
}

impl RateLimiter {
    /// A limiter with `cfg`.
    pub fn new(cfg: RateConfig) -> Self {
        Self {
            cfg,
            tables: Mutex::new(HashMap::new()),
        }
    }

    fn rate(&self, l: Limit) -> Rate {
        match l {
            Limit::Issue => self.cfg.issue,
            Limit::Challenge => self.cfg.challenge,
            Limit::Bootstrap => self.cfg.bootstrap,
            Limit::Failures => self.cfg.failures,
        }
    }

    fn exempt(&self, peer: &str) -> bool {
        self.cfg.disabled
            || peer
                .parse::<IpAddr>()
                .is_ok_and(|ip| self.cfg.exempt.iter().any(|c| c.contains(ip)))
    }

    /// Spends `cost` tokens of `limit` for `peer`; `Err(retry_after_ms)` when
    /// there are not enough (nothing is spent then).
    pub fn take(&self, limit: Limit, peer: &str, cost: f64, now_ms: i64) -> Result<(), u64> {
        if self.exempt(peer) {
            return Ok(());
        }
        let rate = self.rate(limit);
        let mut t = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        if t.len() >= MAX_PEERS && !t.contains_key(&(limit, peer.to_owned())) {
            prune_locked(&mut t, &self.cfg, now_ms);
            if t.len() >= MAX_PEERS {
                return Err(1000);
            }
        }
        let b = t.entry((limit, peer.to_owned())).or_insert(Bucket {
            tokens: rate.burst,
            at_ms: now_ms,
        });
        refill(b, rate, now_ms);
        if b.tokens >= cost {
            b.tokens -= cost;
            Ok(())
        } else {
            let missing = cost - b.tokens;
            Err(((missing / rate.per_sec.max(1e-9)) * 1000.0).ceil() as u64)
        }
    }

    /// Checks without spending: `Err(retry_after_ms)` when `peer` has no
    /// token of `limit` left.
    pub fn check(&self, limit: Limit, peer: &str, now_ms: i64) -> Result<(), u64> {
        if self.exempt(peer) {
            return Ok(());
        }
        let rate = self.rate(limit);
        let mut t = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        match t.get_mut(&(limit, peer.to_owned())) {
            None => Ok(()),
            Some(b) => {
                refill(b, rate, now_ms);
                if b.tokens >= 1.0 {
                    Ok(())
                } else {
                    Err((((1.0 - b.tokens) / rate.per_sec.max(1e-9)) * 1000.0).ceil() as u64)
                }
            }
        }
    }

    /// Records one failed credential check for `peer`.
    pub fn penalize(&self, peer: &str, now_ms: i64) {
        let _ = self.take(Limit::Failures, peer, 1.0, now_ms);
    }

    /// Forgets buckets that have refilled completely.
    pub fn prune(&self, now_ms: i64) {
        let mut t = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        prune_locked(&mut t, &self.cfg, now_ms);
    }

    /// Peers tracked (for metrics).
    pub fn tracked(&self) -> usize {
        self.tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn refill(b: &mut Bucket, rate: Rate, now_ms: i64) {
    let elapsed = (now_ms - b.at_ms).max(0) as f64 / 1000.0;
    b.tokens = (b.tokens + elapsed * rate.per_sec).min(rate.burst);
    b.at_ms = now_ms.max(b.at_ms);
}

fn prune_locked(t: &mut HashMap<(Limit, String), Bucket>, cfg: &RateConfig, now_ms: i64) {
    t.retain(|(l, _), b| {
        let rate = match l {
            Limit::Issue => cfg.issue,
            Limit::Challenge => cfg.challenge,
            Limit::Bootstrap => cfg.bootstrap,
            Limit::Failures => cfg.failures,
        };
        let elapsed = (now_ms - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens + elapsed * rate.per_sec < rate.burst
    });
}

/// The rate-limit key of an address string (`ip:port` → `ip`).
pub fn peer_key(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => addr.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_reports_retry_after() {
        let l = RateLimiter::new(RateConfig {
            failures: Rate::new(2.0, 3.0),
            ..RateConfig::default()
        });
        for _ in 0..3 {
            assert!(l.take(Limit::Failures, "1.2.3.4", 1.0, 0).is_ok());
        }
        assert_eq!(l.take(Limit::Failures, "1.2.3.4", 1.0, 0), Err(500));
        assert!(
            l.take(Limit::Failures, "5.6.7.8", 1.0, 0).is_ok(),
            "other peers unaffected"
        );
        assert!(
            l.take(Limit::Failures, "1.2.3.4", 1.0, 500).is_ok(),
            "refilled"
        );
        assert!(l.check(Limit::Failures, "1.2.3.4", 500).is_err());
        l.prune(10_000);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn exemptions_and_cidrs() {
        let l = RateLimiter::new(RateConfig {
            bootstrap: Rate::new(1.0, 1.0),
            exempt: vec![Cidr::parse("127.0.0.0/8").unwrap()],
            ..RateConfig::default()
        });
        for _ in 0..10 {
            assert!(l.take(Limit::Bootstrap, "127.0.0.1", 1.0, 0).is_ok());
        }
        assert!(l.take(Limit::Bootstrap, "10.0.0.1", 1.0, 0).is_ok());
        assert!(l.take(Limit::Bootstrap, "10.0.0.1", 1.0, 0).is_err());
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains("2001:db8::1".parse().unwrap()));
        assert!(!c.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert_eq!(peer_key("10.1.2.3:4567"), "10.1.2.3");
        assert_eq!(peer_key("[::1]:80"), "::1");
    }
}
