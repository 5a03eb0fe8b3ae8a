//! kiln importers: read GGUF files and Hugging Face directories and lower them to kiln IR.

pub mod gguf;
