//! diskferry's web UI and JSON API: axum routes, templates and static assets. The only crate
//! that will know HTTP.
//!
//! Empty on purpose for now: the workspace reserves the crate so the layout matches
//! ARCHITECTURE.md; the web UI issue fills it in on top of the `diskferry` library.
#![forbid(unsafe_code)]
