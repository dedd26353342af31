//! The operator page's tests: one binary (see docs/ui.md).
//!
//! - `api`: what the page reads, over plain HTTP;
//! - `browser`: the page itself in headless Chromium.

mod api;
mod browser;
mod helpers;
