//! The behaviour suite: one binary, a real server per test.

mod helpers;

mod access;
mod auth;
mod bench;
mod cluster;
mod faults;
mod hostile;
mod lifecycle;
mod limits;
mod messaging;
mod observability;
mod rest;
mod resume;
mod servers;
mod web;
