//! The behaviour suite: one binary, a real server per test.

mod helpers;

mod access;
mod auth;
mod lifecycle;
mod limits;
mod messaging;
mod rest;
mod resume;
