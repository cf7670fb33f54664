//! Integration tests: one binary, real server on loopback.

mod agent;
mod attest;
mod cli;
mod crash;
mod deploy;
mod enroll;
mod fuzz_regressions;
mod hardening;
mod harness;
mod lifecycle;
mod plans;
mod replicas;
