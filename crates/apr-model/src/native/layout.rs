//! Where every parameter sits in the native model's one flat vector: HF names and shapes in
//! [`parameter_shapes`] order, and each block's offsets.

use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::params::{parameter_shapes, BlockNames, EMBED, FINAL_NORM, HEAD};

/// Offsets of one block's tensors in the flat parameter vector.
#[derive(Clone, Copy, Debug)]
pub(super) struct BlockOffsets {
    pub(super) attn_norm: usize,
    pub(super) q: usize,
    pub(super) k: usize,
    pub(super) v: usize,
    pub(super) o: usize,
    pub(super) mlp_norm: usize,
    pub(super) gate: usize,
    pub(super) up: usize,
    pub(super) down: usize,
}

/// Where every tensor sits in the flat parameter vector.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    /// Every tensor: name, shape, offset.
    pub(super) names: Vec<(String, Vec<usize>, usize)>,
    pub(super) embed: usize,
    pub(super) blocks: Vec<BlockOffsets>,
    pub(super) norm: usize,
    pub(super) head: usize,
    /// Parameters in all.
    pub(super) total: usize,
}

impl Layout {
    /// The layout of a configuration's parameters, in [`parameter_shapes`] order.
    pub(super) fn of(config: &ModelConfig) -> Layout {
        let mut names = Vec::new();
        let mut offsets = BTreeMap::new();
        let mut total = 0;
        for (name, shape) in parameter_shapes(config) {
            offsets.insert(name.clone(), total);
            let len: usize = shape.iter().product();
            names.push((name, shape, total));
            total += len;
        }
        let at = |name: &str| offsets[name];
        let blocks = (0..config.n_layers)
            .map(|i| {
                let n = BlockNames::of(i);
                BlockOffsets {
                    attn_norm: at(&n.attn_norm),
                    q: at(&n.q),
                    k: at(&n.k),
                    v: at(&n.v),
                    o: at(&n.o),
                    mlp_norm: at(&n.mlp_norm),
                    gate: at(&n.gate),
                    up: at(&n.up),
                    down: at(&n.down),
                }
            })
            .collect();
        Layout {
            embed: at(EMBED),
            norm: at(FINAL_NORM),
            head: at(HEAD),
            names,
            blocks,
            total,
        }
    }
}
