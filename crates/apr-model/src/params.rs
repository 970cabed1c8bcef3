//! The parameters of a configuration, named once: Hugging Face `LlamaForCausalLM` names and
//! shapes (linear weights `[out, in]`). The burn module, the native model's flat layout and
//! checkpoints all read their names from here.

use crate::config::ModelConfig;

/// Token embedding, `[vocab, d_model]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final RMSNorm weight, `[d_model]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// Output head, `[vocab, d_model]` (untied).
pub const HEAD: &str = "lm_head.weight";

/// The names of one decoder block's tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockNames {
    /// RMSNorm before attention, `[d]`.
    pub attn_norm: String,
    /// Query projection, `[d, d]`.
    pub q: String,
    /// Key projection, `[d, d]`.
    pub k: String,
    /// Value projection, `[d, d]`.
    pub v: String,
    /// Output projection, `[d, d]`.
    pub o: String,
    /// RMSNorm before the MLP, `[d]`.
    pub mlp_norm: String,
    /// SwiGLU gate, `[d_ff, d]`.
    pub gate: String,
    /// SwiGLU up projection, `[d_ff, d]`.
    pub up: String,
    /// SwiGLU down projection, `[d, d_ff]`.
    pub down: String,
}

impl BlockNames {
    /// The names of block `layer`.
    pub fn of(layer: usize) -> Self {
        let p = format!("model.layers.{layer}");
        BlockNames {
            attn_norm: format!("{p}.input_layernorm.weight"),
            q: format!("{p}.self_attn.q_proj.weight"),
            k: format!("{p}.self_attn.k_proj.weight"),
            v: format!("{p}.self_attn.v_proj.weight"),
            o: format!("{p}.self_attn.o_proj.weight"),
            mlp_norm: format!("{p}.post_attention_layernorm.weight"),
            gate: format!("{p}.mlp.gate_proj.weight"),
            up: format!("{p}.mlp.up_proj.weight"),
            down: format!("{p}.mlp.down_proj.weight"),
        }
    }

    /// Every tensor of the block with its shape, in checkpoint order.
    fn shapes(self, d: usize, f: usize) -> [(String, Vec<usize>); 9] {
        [
            (self.attn_norm, vec![d]),
            (self.q, vec![d, d]),
            (self.k, vec![d, d]),
            (self.v, vec![d, d]),
            (self.o, vec![d, d]),
            (self.mlp_norm, vec![d]),
            (self.gate, vec![f, d]),
            (self.up, vec![f, d]),
            (self.down, vec![d, f]),
        ]
    }
}

/// The HF names and shapes of every parameter of a configuration, in checkpoint order.
pub fn parameter_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (config.d_model, config.d_ff, config.vocab_size);
    let mut out = vec![(EMBED.to_owned(), vec![v, d])];
    for i in 0..config.n_layers {
        out.extend(BlockNames::of(i).shapes(d, f));
    }
    out.push((FINAL_NORM.to_owned(), vec![d]));
    out.push((HEAD.to_owned(), vec![v, d]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn names_are_unique_and_shapes_count_the_parameters() {
        let config = ModelConfig::preset(Preset::Small, 16);
        let shapes = parameter_shapes(&config);
        let mut names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), shapes.len(), "a name used twice");
        assert_eq!(shapes.len(), 3 + 9 * config.n_layers);
        let (d, f, v) = (config.d_model, config.d_ff, config.vocab_size);
        let total: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(
            total,
            2 * v * d + d + config.n_layers * (4 * d * d + 3 * d * f + 2 * d)
        );
        assert_eq!(shapes[1].0, "model.layers.0.input_layernorm.weight");
        assert_eq!(shapes.last().map(|(n, _)| n.as_str()), Some(HEAD));
    }
}
