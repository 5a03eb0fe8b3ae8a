//! Next-token sampling: greedy argmax and seeded temperature / top-k / top-p sampling with an
//! optional repetition penalty.
//!
//! The order is the usual one: repetition penalty on the raw logits, then temperature, then
//! top-k, then top-p (nucleus) on the tempered distribution, then one draw. Candidates are
//! ordered by (logit descending, id ascending), so results depend only on the logits, the
//! settings and the seed. The random numbers come from a xoshiro256** generator seeded
//! through splitmix64, implemented here so a seed gives the same tokens on every platform.

/// Errors from sampler settings or inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A setting is out of range.
    #[error("sampler setting {name} = {value} is invalid: {expected}")]
    BadSetting {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        expected: &'static str,
    },
    /// The logits are empty or contain no finite value to choose.
    #[error("cannot sample from {len} logits: no finite value to choose from")]
    NoCandidates {
        /// Number of logits given.
        len: usize,
    },
}

/// Sampling settings. `temperature == 0` means greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 selects the argmax.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// CTRL-style penalty for tokens already in the history; 1 disables.
    pub repetition_penalty: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplerConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks that every setting is in range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |name, value: f32, expected| SamplingError::BadSetting { name, value: value as f64, expected };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(bad("temperature", self.temperature, "a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", self.top_p, "in (0, 1]"));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(bad("repetition_penalty", self.repetition_penalty, "a finite number > 0"));
        }
        Ok(())
    }
}

/// xoshiro256** seeded with splitmix64: small, fast and identical everywhere.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniform number in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest finite logit, ties to the lowest id; `None` if there is none.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() || v == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.and_then(|(i, _)| u32::try_from(i).ok())
}

/// A stateful sampler (the state is the random generator).
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: Rng,
}

impl Sampler {
    /// A sampler with validated settings.
    pub fn new(config: SamplerConfig) -> Result<Self, SamplingError> {
        config.validate()?;
        Ok(Self { config, rng: Rng::new(config.seed) })
    }

    /// A greedy sampler.
    pub fn greedy() -> Self {
        Self { config: SamplerConfig::greedy(), rng: Rng::new(0) }
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Picks the next token from `logits`; `history` holds earlier tokens (prompt and output)
    /// for the repetition penalty. Ids in `history` outside the logits are ignored.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32, SamplingError> {
        let no_candidates = SamplingError::NoCandidates { len: logits.len() };
        let penalty = self.config.repetition_penalty;
        let penalized;
        let logits = if penalty != 1.0 && !history.is_empty() {
            let mut l = logits.to_vec();
            let mut seen = vec![false; l.len()];
            for &id in history {
                let i = id as usize;
                if let (Some(v), Some(s)) = (l.get_mut(i), seen.get_mut(i))
                    && !*s
                {
                    *s = true;
                    *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
                }
            }
            penalized = l;
            &penalized[..]
        } else {
            logits
        };

        if self.config.temperature == 0.0 {
            return argmax(logits).ok_or(no_candidates);
        }

        // Candidates (id, tempered logit), finite only.
        let inv_t = 1.0 / self.config.temperature as f64;
        let mut cands: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .filter_map(|(i, &v)| u32::try_from(i).ok().map(|i| (i, v as f64 * inv_t)))
            .collect();
        if cands.is_empty() {
            return Err(no_candidates);
        }
        let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.config.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, order);
            cands.truncate(k);
        }
        cands.sort_unstable_by(order);

        // Softmax over the survivors (the first candidate holds the maximum).
        let max = cands[0].1;
        let mut probs: Vec<f64> = cands.iter().map(|&(_, v)| (v - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= total;
        }

        // Nucleus: the shortest prefix whose mass reaches top_p (always at least one token).
        let mut keep = probs.len();
        if self.config.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.config.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..keep].iter().sum();
        let r = self.rng.next_f64() * mass;
        let mut cum = 0.0;
        for (i, p) in probs[..keep].iter().enumerate() {
            cum += p;
            if r < cum {
                return Ok(cands[i].0);
            }
        }
        Ok(cands[keep - 1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplerConfig {
        SamplerConfig { temperature, top_k, top_p, repetition_penalty: 1.0, seed }
    }

    #[test]
    fn greedy_ties_go_to_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, -5.0]), Some(2));
        assert_eq!(argmax(&[]), None);
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&[0.5, 2.0, 2.0], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN], &[]), Err(SamplingError::NoCandidates { len: 1 }));
    }

    #[test]
    fn rng_is_reproducible() {
        let a: Vec<u64> = (0..4).scan(Rng::new(42), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..4).scan(Rng::new(42), |r, _| Some(r.next_u64())).collect();
        let c: Vec<u64> = (0..4).scan(Rng::new(43), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(cfg(0.8, 20, 0.9, seed)).unwrap();
            (0..32).map(|_| s.sample(&logits, &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_limits_choices() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        let mut s = Sampler::new(cfg(1.5, 1, 1.0, 9)).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]).unwrap(), 1);
        }
        // Token 0 has ~99.99% of the mass: top_p 0.5 keeps only it.
        let mut s = Sampler::new(cfg(1.0, 0, 0.5, 3)).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[10.0, 0.0, 0.0], &[]).unwrap(), 0);
        }
        // top_k 2 never yields the two unlikely tokens.
        let mut s = Sampler::new(cfg(1.0, 2, 1.0, 5)).unwrap();
        for _ in 0..200 {
            let t = s.sample(&logits, &[]).unwrap();
            assert!(t == 1 || t == 2, "{t}");
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // logits ln(1), ln(3): expect about 25% / 75%.
        let logits = [0.0f32, 3.0f32.ln()];
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 11)).unwrap();
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits, &[]).unwrap() == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn repetition_penalty_discourages_history() {
        let logits = [2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplerConfig { repetition_penalty: 1.5, ..SamplerConfig::greedy() }).unwrap();
        assert_eq!(s.sample(&logits, &[]).unwrap(), 0);
        assert_eq!(s.sample(&logits, &[0, 0, 99]).unwrap(), 1);
        // Negative logits are pushed further down.
        assert_eq!(s.sample(&[-1.0, -1.2], &[0]).unwrap(), 1);
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(Sampler::new(cfg(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(cfg(f32::NAN, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(cfg(1.0, 0, 0.0, 0)).is_err());
        assert!(Sampler::new(cfg(1.0, 0, 1.5, 0)).is_err());
        let e = Sampler::new(SamplerConfig { repetition_penalty: 0.0, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("repetition_penalty"));
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0)).unwrap();
        assert_eq!(s.sample(&[], &[]), Err(SamplingError::NoCandidates { len: 0 }));
    }
}
