//! The Llama-2 decoder (spec §4.2) in one file: embedding; blocks of RMSNorm → causal multi-head
//! attention with RoPE → residual, RMSNorm → SwiGLU MLP → residual; final RMSNorm; untied head.
//!
//! Parameters are named and laid out as in Hugging Face's `LlamaForCausalLM`, and RoPE rotates
//! *halves* of each head (HF's `rotate_half`), so a checkpoint is an HF checkpoint up to the
//! transposition of linear weights (burn stores them `[in, out]`).

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::fast_ops::{self, Precision};
pub use crate::params::parameter_shapes;
use crate::params::{BlockNames, EMBED, FINAL_NORM, HEAD};

/// A tensor on the host: row-major `f32` values and a shape, in HF layout.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Named weights in HF layout (`[out, in]` for linear layers).
pub type Weights = BTreeMap<String, HostTensor>;

/// Multi-head self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// One decoder block.
#[derive(Module, Debug)]
pub struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The decoder's parameters.
#[derive(Module, Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
}

/// RoPE tables (`cos`, `sin`: `[max_seq_len, head_dim]`), HF's half-rotation convention.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
    head_dim: usize,
}

impl Rope {
    /// Tables for positions `0..max_seq_len`.
    pub fn new(config: &ModelConfig, device: &Device) -> Self {
        let hd = config.head_dim();
        let half = hd / 2;
        let n = config.max_seq_len;
        let mut cos = Vec::with_capacity(n * hd);
        let mut sin = Vec::with_capacity(n * hd);
        for pos in 0..n {
            for i in 0..hd {
                let inv_freq = 1.0 / config.rope_theta.powf((2 * (i % half)) as f64 / hd as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, [n, hd]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, hd]), device),
            head_dim: hd,
        }
    }

    /// The tables at `positions: [b, s]`, gathered once per cached forward and shared by every
    /// layer's queries and keys (on a GPU each gather is a kernel launch, and a decode step is
    /// launch-bound).
    fn at(&self, positions: &Tensor<2, Int>) -> RopeAt {
        let [b, s] = positions.dims();
        let flat = positions.clone().reshape([b * s]);
        let gather = |table: &Tensor<2>| {
            table
                .clone()
                .select(0, flat.clone())
                .reshape([b, 1, s, self.head_dim])
        };
        RopeAt {
            cos: gather(&self.cos),
            sin: gather(&self.sin),
            head_dim: self.head_dim,
        }
    }

    /// Rotates `x: [b, h, s, hd]` at positions `0..s` (training).
    fn apply_prefix(&self, x: Tensor<4>) -> Tensor<4> {
        let s = x.dims()[2];
        let cos = self
            .cos
            .clone()
            .narrow(0, 0, s)
            .reshape([1, 1, s, self.head_dim]);
        let sin = self
            .sin
            .clone()
            .narrow(0, 0, s)
            .reshape([1, 1, s, self.head_dim]);
        rotate(x, cos, sin)
    }
}

/// RoPE tables gathered at one batch's positions: `cos`, `sin` of shape `[b, 1, s, head_dim]`.
struct RopeAt {
    cos: Tensor<4>,
    sin: Tensor<4>,
    head_dim: usize,
}

impl RopeAt {
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        rotate(x, self.cos.clone(), self.sin.clone())
    }
}

/// `x · cos + rotate_half(x) · sin` (HF's half rotation).
fn rotate(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, h, s, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..hd]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// Per-layer key/value caches of a slot pool, one row per (slot, position):
/// `[slots × stride, d_model]` each, row `slot × stride + position`, with `stride = max_len + 1`.
/// New keys of a whole batch are written with one indexed assignment per layer, and a batch's
/// keys read with one gather (a dynamic step) or one view (a static step over slots `0..rows`).
/// Position `max_len` of every slot is scratch: a static step's idle rows write there, and no
/// query ever attends to it.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<(Tensor<2>, Tensor<2>)>,
    stride: usize,
}

impl KvCache {
    /// Zeroed caches for `slots` slots of `max_len` positions.
    pub fn new(config: &ModelConfig, slots: usize, max_len: usize, device: &Device) -> Self {
        let stride = max_len + 1;
        let shape = [slots * stride, config.d_model];
        KvCache {
            layers: (0..config.n_layers)
                .map(|_| (Tensor::zeros(shape, device), Tensor::zeros(shape, device)))
                .collect(),
            stride,
        }
    }

    /// Rows per slot: its positions and the scratch row.
    pub fn stride(&self) -> usize {
        self.stride
    }
}

/// One static decode step's inputs, every tensor on the device: row `r` is slot `r`'s one new
/// token. The shapes depend only on `(rows, kv_len)`, and nothing in the step is indexed from
/// the host, so the step can be captured once and replayed with fresh values in these buffers.
pub struct StaticRows<'a> {
    /// `[rows, 1]` token of each row.
    pub tokens: Tensor<2, Int>,
    /// `[rows, 1]` its position (the slot's length before it).
    pub positions: Tensor<2, Int>,
    /// `[rows]` cache row it writes: `r × stride + position`, or `r × stride + max_len` (the
    /// scratch row) for a slot with nothing to decode.
    pub dest: Tensor<1, Int>,
    /// `0..kv_len` (at least), made once: the key positions attended over.
    pub key_positions: &'a Tensor<1, Int>,
    /// Keys attended over, a bucket at least every row's position + 1.
    pub kv_len: usize,
}

/// Row indices of one cached forward, shared by every layer.
struct CacheRows {
    /// Rows of the flattened `[b × l]` new tokens that are real (not padding).
    valid: Tensor<1, Int>,
    /// Where they go in the cache.
    dest: Tensor<1, Int>,
    /// Cache rows to read: `slot × stride + j` for `j < kv_len`, per batch row.
    read: Tensor<1, Int>,
}

impl CacheRows {
    fn new(batch: &CachedBatch, l: usize, stride: usize, device: &Device) -> Self {
        let (mut valid, mut dest, mut read) = (Vec::new(), Vec::new(), Vec::new());
        for (row, ((&slot, &start), &len)) in batch
            .slots
            .iter()
            .zip(&batch.starts)
            .zip(&batch.lens)
            .enumerate()
        {
            for i in 0..len {
                valid.push((row * l + i) as i64);
                dest.push((slot * stride + start + i) as i64);
            }
            read.extend((0..batch.kv_len).map(|j| (slot * stride + j) as i64));
        }
        let t = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        CacheRows {
            valid: t(valid),
            dest: t(dest),
            read: t(read),
        }
    }
}

/// Where a batch row of a cached forward writes and reads.
#[derive(Clone, Debug)]
pub struct CachedBatch {
    /// Slot of each row.
    pub slots: Vec<usize>,
    /// Position of each row's first new token (= the slot's cached length).
    pub starts: Vec<usize>,
    /// New tokens per row (rows are right-padded to the longest).
    pub lens: Vec<usize>,
    /// Keys attended over: at least `max(start + len)`; a bucketed value keeps shapes few.
    pub kv_len: usize,
}

fn linear_from(weight: &HostTensor, device: &Device) -> Linear {
    // HF stores [out, in]; burn's row layout is [in, out].
    let (out_dim, in_dim) = (weight.shape[0], weight.shape[1]);
    let t: Tensor<2> = Tensor::from_data(
        TensorData::new(weight.data.clone(), [out_dim, in_dim]),
        device,
    );
    Linear {
        weight: Param::from_tensor(t.transpose()),
        bias: None,
    }
}

fn norm_from(weight: &HostTensor, eps: f64, device: &Device) -> RmsNorm {
    RmsNorm {
        gamma: Param::from_tensor(Tensor::from_data(
            TensorData::new(weight.data.clone(), [weight.shape[0]]),
            device,
        )),
        epsilon: eps,
    }
}

fn host<const D: usize>(t: Tensor<D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t.into_data().convert::<f32>().try_to_vec::<f32>();
    HostTensor {
        shape,
        data: data.unwrap_or_default(),
    }
}

/// Why weights do not fit a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    /// A tensor the model needs is absent.
    #[error("missing tensor {0}")]
    Missing(String),
    /// A tensor has another shape than the configuration implies.
    #[error("tensor {name} has shape {found:?}, the configuration needs {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
}

/// Fresh weights: normal(0, `init_std`) everywhere, norms at one. Every tensor draws from its own
/// stream of `seed` (by name), so initialisation is the same on every backend and thread count.
pub fn init_weights(config: &ModelConfig, seed: u64) -> Weights {
    parameter_shapes(config)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                let mut rng = NormalRng::new(seed ^ fnv1a(name.as_bytes()));
                (0..n)
                    .map(|_| (rng.next() * config.init_std) as f32)
                    .collect()
            };
            (name, HostTensor { shape, data })
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64 uniforms turned normal by Box–Muller.
struct NormalRng {
    state: u64,
    spare: Option<f64>,
}

impl NormalRng {
    fn new(seed: u64) -> Self {
        NormalRng {
            state: seed,
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

impl Llama {
    /// Builds the module from named HF-layout weights, checking every shape.
    pub fn from_weights(
        config: &ModelConfig,
        weights: &Weights,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        for (name, expected) in parameter_shapes(config) {
            let t = weights
                .get(&name)
                .ok_or_else(|| WeightsError::Missing(name.clone()))?;
            if t.shape != expected || t.data.len() != t.numel() {
                return Err(WeightsError::Shape {
                    name,
                    expected,
                    found: t.shape.clone(),
                });
            }
        }
        let w = |name: &str| &weights[name];
        let eps = config.norm_eps;
        let embed = w(EMBED);
        let layers = (0..config.n_layers)
            .map(|i| {
                let n = BlockNames::of(i);
                Block {
                    input_layernorm: norm_from(w(&n.attn_norm), eps, device),
                    self_attn: Attention {
                        q_proj: linear_from(w(&n.q), device),
                        k_proj: linear_from(w(&n.k), device),
                        v_proj: linear_from(w(&n.v), device),
                        o_proj: linear_from(w(&n.o), device),
                    },
                    post_attention_layernorm: norm_from(w(&n.mlp_norm), eps, device),
                    mlp: Mlp {
                        gate_proj: linear_from(w(&n.gate), device),
                        up_proj: linear_from(w(&n.up), device),
                        down_proj: linear_from(w(&n.down), device),
                    },
                }
            })
            .collect();
        Ok(Llama {
            embed_tokens: Embedding {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(embed.data.clone(), [embed.shape[0], embed.shape[1]]),
                    device,
                )),
            },
            layers,
            norm: norm_from(w(FINAL_NORM), eps, device),
            lm_head: linear_from(w(HEAD), device),
        })
    }

    /// The weights, named and laid out as HF's `LlamaForCausalLM`.
    pub fn to_weights(&self) -> Weights {
        let lin = |l: &Linear| host(l.weight.val().transpose());
        let norm = |n: &RmsNorm| host(n.gamma.val());
        let mut out = Weights::new();
        out.insert(EMBED.into(), host(self.embed_tokens.weight.val()));
        for (i, b) in self.layers.iter().enumerate() {
            let n = BlockNames::of(i);
            let (attn, mlp) = (&b.self_attn, &b.mlp);
            out.insert(n.attn_norm, norm(&b.input_layernorm));
            out.insert(n.q, lin(&attn.q_proj));
            out.insert(n.k, lin(&attn.k_proj));
            out.insert(n.v, lin(&attn.v_proj));
            out.insert(n.o, lin(&attn.o_proj));
            out.insert(n.mlp_norm, norm(&b.post_attention_layernorm));
            out.insert(n.gate, lin(&mlp.gate_proj));
            out.insert(n.up, lin(&mlp.up_proj));
            out.insert(n.down, lin(&mlp.down_proj));
        }
        out.insert(FINAL_NORM.into(), norm(&self.norm));
        out.insert(HEAD.into(), lin(&self.lm_head));
        out
    }

    /// Full causal forward: `tokens: [b, s]` → logits `[b, s, vocab]`, f32. Its products and
    /// attention are [`fast_ops`](crate::fast_ops) computed in `precision`, so training keeps no
    /// attention scores for its backward.
    pub fn forward(&self, tokens: Tensor<2, Int>, rope: &Rope, precision: Precision) -> Tensor<3> {
        let mut x = self.embed_tokens.forward(tokens);
        for block in &self.layers {
            x = block.forward_full(x, rope, precision);
        }
        fast_ops::linear(self.norm.forward(x), self.lm_head.weight.val(), precision)
    }

    /// Per-token log-probabilities of `targets` (`[b, s]`) under the logits of `tokens`
    /// (`[b, s]`, the inputs shifted by one): `[b, s]`.
    pub fn token_logprobs(
        &self,
        tokens: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        rope: &Rope,
    ) -> Tensor<2> {
        let logits = self.forward(tokens, rope, Precision::F32);
        let [b, s, _] = logits.dims();
        let logp = log_softmax(logits, 2);
        logp.gather(2, targets.reshape([b, s, 1])).reshape([b, s])
    }

    /// Cached forward of new tokens (`tokens`, `positions`: `[b, l]`, right-padded) for the rows
    /// of `batch`; writes their keys/values into `cache` and returns the logits at each row's
    /// last new token: `[b, vocab]`.
    pub fn forward_cached(
        &self,
        tokens: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        batch: &CachedBatch,
        cache: &mut KvCache,
        rope: &Rope,
    ) -> Tensor<2> {
        let device = tokens.device();
        let [b, l] = tokens.dims();
        let rows = CacheRows::new(batch, l, cache.stride, &device);
        // mask[r, i, j] = key j is after query i's position (so hidden).
        let key_pos =
            Tensor::<1, Int>::arange(0..batch.kv_len as i64, &device).reshape([1, 1, batch.kv_len]);
        let mask: Tensor<4, Bool> = key_pos
            .greater(positions.clone().reshape([b, l, 1]))
            .reshape([b, 1, l, batch.kv_len]);
        let rope = rope.at(&positions);
        let mut x = self.embed_tokens.forward(tokens);
        for (layer, block) in self.layers.iter().enumerate() {
            x = block.forward_cached(x, &mask, &rows, &mut cache.layers[layer], &rope);
        }
        // The hidden state at each row's last new token.
        let d = x.dims()[2];
        let last = Tensor::<1, Int>::from_data(
            TensorData::new(
                batch
                    .lens
                    .iter()
                    .map(|&n| n.max(1) as i64 - 1)
                    .collect::<Vec<_>>(),
                [b],
            ),
            &device,
        )
        .reshape([b, 1, 1])
        .expand([b, 1, d]);
        let h = x.gather(1, last).reshape([b, d]);
        self.lm_head.forward(self.norm.forward(h))
    }

    /// A static decode step: one token for each of slots `0..rows` (see [`StaticRows`]); writes
    /// their keys and values in place and returns the logits `[rows, vocab]`.
    pub fn decode_rows(
        &self,
        step: &StaticRows<'_>,
        cache: &mut KvCache,
        rope: &Rope,
    ) -> Tensor<2> {
        let [rows, _] = step.tokens.dims();
        let kv = step.kv_len;
        let key_pos = step
            .key_positions
            .clone()
            .narrow(0, 0, kv)
            .reshape([1, 1, kv]);
        let mask: Tensor<4, Bool> = key_pos
            .greater(step.positions.clone().reshape([rows, 1, 1]))
            .reshape([rows, 1, 1, kv]);
        let rope = rope.at(&step.positions);
        let mut x = self.embed_tokens.forward(step.tokens.clone());
        for (layer, block) in self.layers.iter().enumerate() {
            let attn = &block.self_attn;
            let (q, k, v) = attn.qkv(block.input_layernorm.forward(x.clone()), rope.head_dim);
            let (q, k) = (rope.apply(q), rope.apply(k));
            let (keys, values) = cache.write_rows(layer, &step.dest, k, v, rows, kv);
            x = x + attn.merge(scaled_attention(q, keys, values, mask.clone()));
            let h = block
                .mlp
                .forward(block.post_attention_layernorm.forward(x.clone()));
            x = x + h;
        }
        let d = x.dims()[2];
        self.lm_head
            .forward(self.norm.forward(x.reshape([rows, d])))
    }
}

impl KvCache {
    /// Writes one new key and value per row (`[rows, h, 1, hd]`) at cache rows `dest`, in place,
    /// and returns the keys and values of slots `0..rows` at positions `0..kv`: `[rows, h, kv, hd]`.
    fn write_rows(
        &mut self,
        layer: usize,
        dest: &Tensor<1, Int>,
        k: Tensor<4>,
        v: Tensor<4>,
        rows: usize,
        kv: usize,
    ) -> (Tensor<4>, Tensor<4>) {
        let [_, h, _, hd] = k.dims();
        let stride = self.stride;
        let flat = |t: Tensor<4>| t.reshape([rows, h * hd]);
        let (k_cache, v_cache) = &mut self.layers[layer];
        // `inplace` hands the assignment the only handle, so CubeCL writes the same buffer (a
        // captured graph replays against it).
        k_cache.inplace(|c| c.select_assign(0, dest.clone(), flat(k), IndexingUpdateOp::Assign));
        v_cache.inplace(|c| c.select_assign(0, dest.clone(), flat(v), IndexingUpdateOp::Assign));
        let view = |c: &Tensor<2>| {
            c.clone()
                .narrow(0, 0, rows * stride)
                .reshape([rows, stride, h, hd])
                .narrow(1, 0, kv)
                .swap_dims(1, 2)
        };
        (view(k_cache), view(v_cache))
    }
}

impl Block {
    fn forward_full(&self, x: Tensor<3>, rope: &Rope, precision: Precision) -> Tensor<3> {
        let h =
            self.self_attn
                .forward_full(self.input_layernorm.forward(x.clone()), rope, precision);
        let x = x + h;
        let h = self
            .mlp
            .forward_full(self.post_attention_layernorm.forward(x.clone()), precision);
        x + h
    }

    fn forward_cached(
        &self,
        x: Tensor<3>,
        mask: &Tensor<4, Bool>,
        rows: &CacheRows,
        cache: &mut (Tensor<2>, Tensor<2>),
        rope: &RopeAt,
    ) -> Tensor<3> {
        let h = self.self_attn.forward_cached(
            self.input_layernorm.forward(x.clone()),
            mask,
            rows,
            cache,
            rope,
        );
        let x = x + h;
        let h = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x + h
    }
}

impl Mlp {
    fn forward_full(&self, x: Tensor<3>, precision: Precision) -> Tensor<3> {
        let lin = |l: &Linear, x: Tensor<3>| fast_ops::linear(x, l.weight.val(), precision);
        let gate = silu(lin(&self.gate_proj, x.clone()));
        lin(&self.down_proj, gate * lin(&self.up_proj, x))
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

impl Attention {
    /// `[b, s, d]` → q, k, v as `[b, h, s, hd]`.
    fn qkv(&self, x: Tensor<3>, hd: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, s, d] = x.dims();
        let n_heads = d / hd;
        let split = |t: Tensor<3>| t.reshape([b, s, n_heads, hd]).swap_dims(1, 2);
        (
            split(self.q_proj.forward(x.clone())),
            split(self.k_proj.forward(x.clone())),
            split(self.v_proj.forward(x)),
        )
    }

    fn merge(&self, out: Tensor<4>) -> Tensor<3> {
        let [b, h, s, hd] = out.dims();
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h * hd]))
    }

    fn forward_full(&self, x: Tensor<3>, rope: &Rope, precision: Precision) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let hd = rope.head_dim;
        let lin = |l: &Linear, x: Tensor<3>| fast_ops::linear(x, l.weight.val(), precision);
        let split = |t: Tensor<3>| t.reshape([b, s, d / hd, hd]).swap_dims(1, 2);
        let q = rope.apply_prefix(split(lin(&self.q_proj, x.clone())));
        let k = rope.apply_prefix(split(lin(&self.k_proj, x.clone())));
        let v = split(lin(&self.v_proj, x));
        let out = fast_ops::causal_attention(q, k, v, precision);
        lin(&self.o_proj, out.swap_dims(1, 2).reshape([b, s, d]))
    }

    fn forward_cached(
        &self,
        x: Tensor<3>,
        mask: &Tensor<4, Bool>,
        rows: &CacheRows,
        cache: &mut (Tensor<2>, Tensor<2>),
        rope: &RopeAt,
    ) -> Tensor<3> {
        let (q, k, v) = self.qkv(x, rope.head_dim);
        let (q, k) = (rope.apply(q), rope.apply(k));
        let [b, h, l, hd] = k.dims();
        let kv_len = rows.read.dims()[0] / b;
        // New keys/values as rows `[b × l, d]`; the real ones go to their cache rows in one
        // indexed assignment per buffer. The buffers are taken out so the write owns them.
        let flat = |t: Tensor<4>| {
            t.swap_dims(1, 2)
                .reshape([b * l, h * hd])
                .select(0, rows.valid.clone())
        };
        let device = k.device();
        let (k_cache, v_cache) = std::mem::replace(
            cache,
            (
                Tensor::empty([0, 0], &device),
                Tensor::empty([0, 0], &device),
            ),
        );
        let k_cache =
            k_cache.select_assign(0, rows.dest.clone(), flat(k), IndexingUpdateOp::Assign);
        let v_cache =
            v_cache.select_assign(0, rows.dest.clone(), flat(v), IndexingUpdateOp::Assign);
        let read = |c: &Tensor<2>| {
            c.clone()
                .select(0, rows.read.clone())
                .reshape([b, kv_len, h, hd])
                .swap_dims(1, 2)
        };
        let (keys, values) = (read(&k_cache), read(&v_cache));
        *cache = (k_cache, v_cache);
        self.merge(scaled_attention(q, keys, values, mask.clone()))
    }
}

/// softmax(q kᵀ / √d + mask) v, with `mask` true where a key is hidden.
fn scaled_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4, Bool>) -> Tensor<4> {
    let hd = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
    let [b, h, s, t] = scores.dims();
    let scores = scores.mask_fill(mask.expand([b, h, s, t]), f32::NEG_INFINITY);
    softmax(scores, 3).matmul(v)
}

/// The model ready to run: configuration, parameters, RoPE tables.
#[derive(Clone, Debug)]
pub struct Model {
    /// Shape.
    pub config: ModelConfig,
    /// Parameters.
    pub llama: Llama,
    /// RoPE tables.
    pub rope: Rope,
    /// What the full forward computes its products and attention in.
    pub precision: Precision,
}

impl Model {
    /// Builds a model from weights on a device.
    pub fn new(
        config: ModelConfig,
        weights: &Weights,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        let llama = Llama::from_weights(&config, weights, device)?;
        let rope = Rope::new(&config, device);
        Ok(Model {
            config,
            llama,
            rope,
            precision: Precision::F32,
        })
    }

    /// A copy for inference: parameters without autodiff tracking, on the plain device.
    pub fn valid(&self) -> Model {
        let device = self.rope_device().inner();
        Model {
            config: self.config.clone(),
            llama: self.llama.valid(),
            rope: Rope::new(&self.config, &device),
            precision: self.precision,
        }
    }

    /// The device the model lives on.
    pub fn rope_device(&self) -> Device {
        self.rope.cos.device()
    }

    /// Logits of a full batch `[b, s]` → `[b, s, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.llama.forward(tokens, &self.rope, self.precision)
    }

    /// The same model computing its full forward in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }
}
