//! Skeleton; built out by its own issue.

fn main() {}
