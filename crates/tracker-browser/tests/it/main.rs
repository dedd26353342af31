//! The operator page's tests: one binary (see docs/ui.md).
//!
//! - `api`: what the page reads, over plain HTTP;
//! - `browser`: the page itself in headless Chromium;
//! - `socket`: `clients/js` in headless Chromium against the API.

mod api;
mod browser;
mod helpers;
mod socket;
