//! kiln backends: quantized block math and the reference CPU interpreter.

pub mod quant;
