//! kiln passes.
