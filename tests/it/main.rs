//! Integration tests: one binary, real server on loopback.

mod attest;
mod cli;
mod crash;
mod enroll;
mod fuzz_regressions;
mod harness;
mod lifecycle;
mod plans;
