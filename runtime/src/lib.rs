//! kiln runtime.
