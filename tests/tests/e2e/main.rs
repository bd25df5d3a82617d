//! End-to-end tests: the real `stella-server` and `stella-agent` binaries on
//! loopback with real TLS and a real redb file in a temp dir. One test binary
//! keeps the build quick; modules follow the design's parts.

mod api;
mod artifacts;
mod bundle;
mod cluster;
mod config;
mod console;
mod crash;
mod cross;
mod doctor;
mod enrollment;
mod faults;
mod haproxy;
mod hostile;
mod lifecycle;
mod ondemand;
mod operators;
mod phases;
mod postgres;
mod renewal;
mod rollout;
mod signing;
mod storm;
mod tasks;
mod tasks_server;
mod update;
