//! The model's shape as a plain, serialisable struct with presets.

use serde::{Deserialize, Serialize};

/// The longest context a configuration may ask for (the paper's models use 4,096).
pub const MAX_SEQ_LEN: usize = 131_072;

/// The most parameters a configuration may have (about 4 GB of f32 weights).
pub const MAX_PARAMS: usize = 1 << 30;

/// A Llama-2 decoder's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (embedding rows and head outputs).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Decoder blocks.
    pub n_layers: usize,
    /// Attention heads (multi-head: as many key/value heads).
    pub n_heads: usize,
    /// SwiGLU hidden width.
    pub d_ff: usize,
    /// Longest sequence (per thread) the model is used at; sizes the RoPE tables and KV caches.
    pub max_seq_len: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Standard deviation of the normal initialisation.
    pub init_std: f64,
}

/// Named presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Tests: well under a million parameters.
    Tiny,
    /// The CPU pipeline.
    Small,
    /// The paper's model: 18 layers, d 1024, 16 heads, MLP 2752, context 4,096.
    Paper,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "paper" => Ok(Preset::Paper),
            other => Err(format!(
                "unknown preset {other:?} (expected tiny, small or paper)"
            )),
        }
    }
}

impl ModelConfig {
    /// A preset for a vocabulary of `vocab_size` tokens.
    pub fn preset(preset: Preset, vocab_size: usize) -> Self {
        let base = ModelConfig {
            vocab_size,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            d_ff: 176,
            max_seq_len: 512,
            rope_theta: 10_000.0,
            norm_eps: 1e-6,
            init_std: 0.02,
        };
        match preset {
            Preset::Tiny => base,
            // Chosen by measurement: ~2.4k training tokens/s with burn-flex on 2 cores, so the
            // quick pipeline's SFT fits in about ten minutes.
            Preset::Small => ModelConfig {
                d_model: 128,
                n_layers: 4,
                n_heads: 4,
                d_ff: 384,
                max_seq_len: 1024,
                ..base
            },
            Preset::Paper => ModelConfig {
                d_model: 1024,
                n_layers: 18,
                n_heads: 16,
                d_ff: 2752,
                max_seq_len: 4096,
                ..base
            },
        }
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Checks the shape is usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "d_model {} must be a positive multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.vocab_size == 0 || self.n_layers == 0 || self.d_ff == 0 || self.max_seq_len == 0 {
            return Err("vocab_size, n_layers, d_ff and max_seq_len must be positive".into());
        }
        // Far above anything trainable here, far below what would overflow a size: a config
        // outside these is a typo, and would otherwise abort allocating RoPE tables or weights.
        let limits = [
            ("max_seq_len", self.max_seq_len, MAX_SEQ_LEN),
            ("d_model", self.d_model, 65_536),
            ("d_ff", self.d_ff, 262_144),
            ("n_layers", self.n_layers, 1_024),
            ("vocab_size", self.vocab_size, 1 << 20),
        ];
        for (name, value, limit) in limits {
            if value > limit {
                return Err(format!("{name} {value} is above the limit of {limit}"));
            }
        }
        if self.total_params() > MAX_PARAMS {
            return Err(format!(
                "{} parameters are above the limit of {MAX_PARAMS}",
                self.total_params()
            ));
        }
        if !self.norm_eps.is_finite() || self.norm_eps <= 0.0 {
            return Err(format!(
                "norm_eps {} must be a positive number",
                self.norm_eps
            ));
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 0.0 {
            return Err(format!(
                "rope_theta {} must be a positive number",
                self.rope_theta
            ));
        }
        if !self.init_std.is_finite() || self.init_std < 0.0 {
            return Err(format!(
                "init_std {} must be a non-negative number",
                self.init_std
            ));
        }
        Ok(())
    }

    /// Bytes of f32 KV cache that `slots` threads of `context` tokens hold at most.
    pub fn kv_cache_bytes(&self, slots: usize, context: usize) -> u128 {
        slots as u128 * context as u128 * self.n_layers as u128 * 2 * self.d_model as u128 * 4
    }

    /// Parameters outside the embedding and the head.
    pub fn non_embedding_params(&self) -> usize {
        let d = self.d_model;
        let per_layer = 4 * d * d + 3 * d * self.d_ff + 2 * d;
        self.n_layers * per_layer + d
    }

    /// All parameters.
    pub fn total_params(&self) -> usize {
        self.non_embedding_params() + 2 * self.vocab_size * self.d_model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_preset_has_the_papers_size() {
        let c = ModelConfig::preset(Preset::Paper, 32_000);
        // Spec §4.2: 227.7M non-embedding, 293.2M total.
        assert_eq!(c.non_embedding_params() / 100_000, 2277);
        assert_eq!(c.total_params() / 100_000, 2932);
        assert!(ModelConfig::preset(Preset::Tiny, 64).total_params() < 1_000_000);
        for p in [Preset::Tiny, Preset::Small, Preset::Paper] {
            ModelConfig::preset(p, 100).validate().unwrap();
        }
    }
}
