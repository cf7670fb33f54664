//! Integration tests: one binary, real server on loopback.

mod cli;
mod enroll;
mod harness;
mod plans;
