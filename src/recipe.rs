//! Recipes: one YAML file names a source model and, per device (`watch`, `phone`, `laptop`,
//! `gpu`), the backend and the passes with their options.
//!
//! ```yaml
//! name: smollm2-135m
//! model: smollm2-135m-instruct      # a models.yaml id, or a path relative to the recipe
//! devices:
//!   laptop:
//!     backend: cpu
//!     passes: [dce, { quantize: { default: q4_k, rules: { attn_v: q6_k } } }]
//! calibration: { text: ../tests/fixtures/text/calib-excerpt.txt, ctx: 512, chunks: 8 }   # optional
//! quality: { text: ../tests/fixtures/text/ppl-excerpt.txt, ctx: 512, chunks: 4 }         # optional
//! ```
//!
//! `calibration` runs the source model over a text to collect the importance
//! matrix the quantization passes weight their errors by (`kiln calibrate`,
//! cached); `quality` scores every build that changed the weights against the
//! source model on held-out text (perplexity, KL divergence, top-1 agreement)
//! and stores the report in the manifest. Text paths are relative to the recipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{KilnError, KilnResult};

pub const DEVICES: &[&str] = &["watch", "phone", "laptop", "gpu"];
/// Recipes larger than this are refused before parsing.
const MAX_RECIPE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub model: String,
    pub devices: BTreeMap<String, DeviceSpec>,
    #[serde(default)]
    pub calibration: Option<TextSpec>,
    #[serde(default)]
    pub quality: Option<TextSpec>,
}

/// A text the compiler runs the model over, in chunks of `ctx` tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// Path relative to the recipe.
    pub text: String,
    #[serde(default = "default_ctx")]
    pub ctx: usize,
    /// Most chunks to use (0 = all).
    #[serde(default)]
    pub chunks: usize,
}

fn default_ctx() -> usize {
    512
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// `backend: cpu`, or a preference list `backend: [metal, cpu]`: the build carries every
    /// listed backend's files and runs on the first one available where it is run.
    pub backend: Backends,
    #[serde(default)]
    pub passes: Vec<PassEntry>,
}

/// One backend name or a preference list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Backends {
    One(String),
    Many(Vec<String>),
}

impl Backends {
    /// The names in preference order.
    pub fn names(&self) -> Vec<String> {
        match self {
            Backends::One(n) => vec![n.clone()],
            Backends::Many(v) => v.clone(),
        }
    }
}

/// `- name` or `- name: { options }` (kept as a value so a malformed entry gets a precise message).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct PassEntry(pub Value);

/// A recipe read from a file, with its text (hashed into the manifest).
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub path: PathBuf,
    pub text: String,
    pub recipe: Recipe,
}

impl LoadedRecipe {
    /// Reads, parses and checks a recipe: devices, backends and pass names must be known.
    pub fn load(path: &Path) -> KilnResult<LoadedRecipe> {
        let meta = std::fs::metadata(path).map_err(|e| KilnError::io(path, e))?;
        if meta.len() > MAX_RECIPE_BYTES {
            return Err(KilnError::bad(path, format!("{} bytes is too large for a recipe", meta.len())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| KilnError::io(path, e))?;
        let recipe: Recipe =
            serde_saphyr::from_str(&text).map_err(|e| KilnError::bad(path, format!("invalid recipe: {e}")))?;
        let loaded = LoadedRecipe { path: path.to_path_buf(), text, recipe };
        loaded.check()?;
        Ok(loaded)
    }

    fn check(&self) -> KilnResult<()> {
        let r = &self.recipe;
        let bad = |msg: String| Err(KilnError::bad(&self.path, msg));
        if r.name.is_empty()
            || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || r.name.starts_with('.')
        {
            return bad(format!(
                "recipe name `{}` must be non-empty and use only letters, digits, `-`, `_`, `.`",
                r.name
            ));
        }
        for (what, spec) in [("calibration", &r.calibration), ("quality", &r.quality)] {
            if let Some(t) = spec
                && t.ctx < 8
            {
                return bad(format!("{what}: ctx {} is too small (at least 8)", t.ctx));
            }
        }
        if r.devices.is_empty() {
            return bad("the recipe lists no devices".into());
        }
        for (dev, spec) in &r.devices {
            if !DEVICES.contains(&dev.as_str()) {
                return bad(format!("unknown device `{dev}` (known: {})", DEVICES.join(", ")));
            }
            let names = spec.backend.names();
            if names.is_empty() {
                return bad(format!("device `{dev}`: the backend list is empty"));
            }
            for (i, name) in names.iter().enumerate() {
                if !kiln_backends::BACKEND_NAMES.iter().any(|(n, _)| n == name) {
                    let known: Vec<_> = kiln_backends::BACKEND_NAMES.iter().map(|(n, _)| *n).collect();
                    return bad(format!("device `{dev}`: unknown backend `{name}` (known: {})", known.join(", ")));
                }
                if names[..i].contains(name) {
                    return bad(format!("device `{dev}`: backend `{name}` is listed twice"));
                }
            }
            for p in &spec.passes {
                let (name, options) =
                    p.resolve().map_err(|m| KilnError::bad(&self.path, format!("device `{dev}`: {m}")))?;
                if let Err(e) = kiln_passes::by_name(&name).and_then(|pass| pass.check_options(&options)) {
                    return bad(format!("device `{dev}`: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Reads a [`TextSpec`]'s text (relative to the recipe), naming the recipe on error.
    pub fn read_text(&self, spec: &TextSpec) -> KilnResult<(PathBuf, String)> {
        let p = self.path.parent().unwrap_or(Path::new(".")).join(&spec.text);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            KilnError::bad(&self.path, format!("cannot read text `{}` ({}): {e}", spec.text, p.display()))
        })?;
        Ok((p, text))
    }

    /// The device spec, or an error naming the recipe and the devices it has.
    pub fn device(&self, device: &str) -> KilnResult<&DeviceSpec> {
        self.recipe.devices.get(device).ok_or_else(|| {
            let has: Vec<_> = self.recipe.devices.keys().map(String::as_str).collect();
            if DEVICES.contains(&device) {
                KilnError::bad(&self.path, format!("the recipe has no `{device}` device (it has: {})", has.join(", ")))
            } else {
                KilnError::bad(&self.path, format!("unknown device `{device}` (known: {})", DEVICES.join(", ")))
            }
        })
    }
}

impl PassEntry {
    /// The pass name and its options (`{}` when none).
    pub fn resolve(&self) -> Result<(String, Value), String> {
        match &self.0 {
            Value::String(n) => Ok((n.clone(), Value::Object(Default::default()))),
            Value::Object(m) if m.len() == 1 => {
                let (k, v) = m.iter().next().ok_or("empty pass entry")?;
                let v = if v.is_null() { Value::Object(Default::default()) } else { v.clone() };
                Ok((k.clone(), v))
            }
            other => Err(format!("a pass entry must be `name` or `name: {{options}}`, found {other}")),
        }
    }
}
