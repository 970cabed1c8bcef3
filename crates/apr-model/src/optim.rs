//! AdamW with global-norm gradient clipping and gradient accumulation: [`AdamW`] over any burn
//! module, [`FlatAdamW`] over the native model's flat parameter vector. Both are the same update
//! (PyTorch semantics); each [`crate::learner::Learner`] owns one.
//!
//! burn parameters are addressed by their visiting order, which is fixed by the module's
//! structure, so the optimizer state can be saved next to the weights and restored bit for bit
//! (burn's own optimizer records are keyed by run-time parameter ids).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::HostTensor;
use crate::native::NativeModel;

/// How a checkpoint names a moment (`m` or `v`) of a parameter: `m.<HF name>`, whichever
/// optimizer wrote it.
pub fn moment_name(moment: &str, parameter: &str) -> String {
    format!("{moment}.{parameter}")
}

/// AdamW hyper-parameters (PyTorch semantics: decoupled weight decay `p -= lr·wd·p`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: off).
    pub clip_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            clip_norm: 1.0,
        }
    }
}

/// Why an update was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OptimError {
    /// NaN or infinite gradients: the step is not applied.
    #[error("non-finite gradient norm ({0}); the update was not applied")]
    NonFinite(f64),
    /// Nothing was accumulated.
    #[error("no gradients accumulated")]
    Empty,
}

/// Optimizer state: step count and the two moments of every parameter (flattened).
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    m: Vec<Tensor<1>>,
    v: Vec<Tensor<1>>,
    /// Accumulated gradients (flattened, visiting order) and how many micro-batches.
    acc: Vec<Tensor<1>>,
    acc_count: usize,
}

struct CollectGrads<'a> {
    grads: &'a Gradients,
    out: Vec<Tensor<1>>,
}

impl ModuleVisitor for CollectGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let n = value.shape().num_elements();
        // A parameter the loss does not reach has a zero gradient.
        let grad = match value.grad(self.grads) {
            Some(g) => g.reshape([n]),
            None => value.inner().reshape([n]).zeros_like(),
        };
        self.out.push(grad);
    }
}

struct Apply<'a> {
    updates: &'a [Tensor<1>],
    index: usize,
}

impl ModuleMapper for Apply<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let i = self.index;
        self.index += 1;
        let dims = tensor.dims();
        let inner = tensor.inner();
        let updated = inner - self.updates[i].clone().reshape(dims);
        Param::from_mapped_value(id, Tensor::from_inner(updated).require_grad(), mapper)
    }
}

/// Counts float parameters (to size the state).
struct Count(usize);
impl ModuleVisitor for Count {
    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
        self.0 += 1;
    }
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            m: Vec::new(),
            v: Vec::new(),
            acc: Vec::new(),
            acc_count: 0,
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Adds the gradients of one micro-batch (`grads` from `loss.backward()` on `module`).
    pub fn accumulate<M: Module>(&mut self, module: &M, grads: &Gradients) {
        let mut collect = CollectGrads {
            grads,
            out: Vec::new(),
        };
        module.visit(&mut collect);
        if self.acc.is_empty() {
            self.acc = collect.out;
        } else {
            for (acc, g) in self.acc.iter_mut().zip(collect.out) {
                *acc = acc.clone() + g;
            }
        }
        self.acc_count += 1;
    }

    /// Applies one update from the accumulated gradients divided by `average_over` (the
    /// micro-batches of a mean; 1 when the loss is a sum over them) and returns the pre-clipping
    /// global gradient norm.
    pub fn step<M: Module>(
        &mut self,
        module: M,
        lr: f64,
        average_over: usize,
    ) -> Result<(M, f64), (M, OptimError)> {
        if self.acc_count == 0 {
            return Err((module, OptimError::Empty));
        }
        let scale = 1.0 / average_over.max(1) as f64;
        let grads: Vec<Tensor<1>> = std::mem::take(&mut self.acc)
            .into_iter()
            .map(|g| g * scale)
            .collect();
        self.acc_count = 0;
        // One host read for the global norm.
        let sq: Vec<Tensor<1>> = grads
            .iter()
            .map(|g| g.clone().powi_scalar(2).sum())
            .collect();
        let norm = Tensor::cat(sq, 0)
            .sum()
            .into_data()
            .iter::<f64>()
            .next()
            .unwrap_or(f64::NAN)
            .sqrt();
        if !norm.is_finite() {
            return Err((module, OptimError::NonFinite(norm)));
        }
        let clip = if self.config.clip_norm > 0.0 && norm > self.config.clip_norm {
            self.config.clip_norm / norm
        } else {
            1.0
        };
        self.step += 1;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        if self.m.is_empty() {
            self.m = grads.iter().map(|g| g.zeros_like()).collect();
            self.v = grads.iter().map(|g| g.zeros_like()).collect();
        }
        let params = current_params(&module);
        let mut updates = Vec::with_capacity(grads.len());
        for (i, g) in grads.into_iter().enumerate() {
            let g = g * clip;
            let m = self.m[i].clone() * c.beta1 + g.clone() * (1.0 - c.beta1);
            let v = self.v[i].clone() * c.beta2 + g.powi_scalar(2) * (1.0 - c.beta2);
            let m_hat = m.clone() / bias1;
            let v_hat = v.clone() / bias2;
            let adam = m_hat / (v_hat.sqrt() + c.eps);
            let decay = params[i].clone() * (c.weight_decay);
            updates.push((adam + decay) * lr);
            self.m[i] = m;
            self.v[i] = v;
        }
        let module = module.map(&mut Apply {
            updates: &updates,
            index: 0,
        });
        Ok((module, norm))
    }

    /// The two moments of every parameter on the host, flat in the module's layout and visiting
    /// order (empty before the first step), and the step count.
    pub fn moments(&self) -> (u64, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let host = |list: &[Tensor<1>]| -> Vec<Vec<f32>> {
            list.iter()
                .map(|t| {
                    let data = t.clone().into_data().convert::<f32>();
                    data.try_to_vec().unwrap_or_default()
                })
                .collect()
        };
        (self.step, host(&self.m), host(&self.v))
    }

    /// Restores moments given as by [`AdamW::moments`] for `module`'s parameters on `device`;
    /// at step 0 they are ignored (a fresh optimizer).
    pub fn restore_moments<M: Module>(
        &mut self,
        module: &M,
        device: &Device,
        step: u64,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    ) -> Result<(), String> {
        let mut count = Count(0);
        module.visit(&mut count);
        if step > 0 {
            if m.len() != count.0 || v.len() != count.0 {
                return Err(format!(
                    "optimizer state holds {} and {} moments, the model {} parameters",
                    m.len(),
                    v.len(),
                    count.0
                ));
            }
            let load = |list: Vec<Vec<f32>>| -> Vec<Tensor<1>> {
                list.into_iter()
                    .map(|data| {
                        let n = data.len();
                        Tensor::from_data(TensorData::new(data, [n]), device)
                    })
                    .collect()
            };
            self.m = load(m);
            self.v = load(v);
        }
        self.step = step;
        Ok(())
    }
}

struct Values(Vec<Tensor<1>>);
impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let v = param.val();
        let n = v.shape().num_elements();
        self.0.push(v.inner().reshape([n]));
    }
}

fn current_params<M: Module>(module: &M) -> Vec<Tensor<1>> {
    let mut values = Values(Vec::new());
    module.visit(&mut values);
    values.0
}

/// AdamW over one flat parameter vector (the [`apr_model::native::NativeModel`] layout): the
/// same update as [`AdamW`], elementwise in parallel, with the norm summed in a fixed order.
pub struct FlatAdamW {
    config: AdamWConfig,
    step: u64,
    /// Parameters it updates.
    len: usize,
    /// The moments, allocated at the first step or restore (a model that is only scored, such
    /// as GRPO's frozen reference, never holds them).
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FlatAdamW {
    /// A fresh optimizer for `len` parameters.
    pub fn new(config: AdamWConfig, len: usize) -> Self {
        FlatAdamW {
            config,
            step: 0,
            len,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// The moments, allocated (zero) on first use.
    fn moments_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        if self.m.len() != self.len {
            self.m = vec![0.0; self.len];
            self.v = vec![0.0; self.len];
        }
        (&mut self.m, &mut self.v)
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update from `grads` (already averaged) and returns the pre-clipping global
    /// gradient norm; non-finite gradients leave the parameters untouched.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) -> Result<f64, OptimError> {
        use rayon::prelude::*;
        assert_eq!(params.len(), self.len, "parameter count");
        assert_eq!(grads.len(), self.len, "gradient count");
        const BLOCK: usize = 1 << 14;
        let partial: Vec<f64> = grads
            .par_chunks(BLOCK)
            .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum())
            .collect();
        let norm = partial.iter().sum::<f64>().sqrt();
        if !norm.is_finite() {
            return Err(OptimError::NonFinite(norm));
        }
        let c = self.config;
        let clip = if c.clip_norm > 0.0 && norm > c.clip_norm {
            c.clip_norm / norm
        } else {
            1.0
        };
        self.step += 1;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        let (b1, b2, eps, wd) = (
            c.beta1 as f32,
            c.beta2 as f32,
            c.eps as f32,
            c.weight_decay as f32,
        );
        let (clip, bias1, bias2, lr) = (clip as f32, bias1 as f32, bias2 as f32, lr as f32);
        let (m, v) = self.moments_mut();
        params
            .par_chunks_mut(BLOCK)
            .zip(m.par_chunks_mut(BLOCK))
            .zip(v.par_chunks_mut(BLOCK))
            .zip(grads.par_chunks(BLOCK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let g = g[i] * clip;
                    m[i] = b1 * m[i] + (1.0 - b1) * g;
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    let adam = (m[i] / bias1) / ((v[i] / bias2).sqrt() + eps);
                    p[i] -= lr * (adam + wd * p[i]);
                }
            });
        Ok(norm)
    }

    /// The moments as named host tensors (`m.<parameter>`, `v.<parameter>`) in `model`'s
    /// layout, zero before the first step: what a checkpoint's `optimizer.safetensors` holds.
    pub fn named_state(&self, model: &NativeModel) -> BTreeMap<String, HostTensor> {
        let zeros;
        let (m, v): (&[f32], &[f32]) = if self.m.len() == self.len {
            (&self.m, &self.v)
        } else {
            zeros = vec![0.0; self.len];
            (&zeros, &zeros)
        };
        let mut out = BTreeMap::new();
        for (moment, flat) in [("m", m), ("v", v)] {
            for (name, t) in model.split(flat) {
                out.insert(moment_name(moment, &name), t);
            }
        }
        out
    }

    /// Restores moments saved by [`FlatAdamW::named_state`] at optimizer step `step`.
    pub fn restore_named(
        &mut self,
        model: &NativeModel,
        step: u64,
        saved: &BTreeMap<String, HostTensor>,
    ) -> Result<(), String> {
        let prefix = |moment| moment_name(moment, "");
        let moments = model
            .join(saved, &prefix("m"))
            .zip(model.join(saved, &prefix("v")));
        let (m, v) = moments.ok_or("moments missing or of the wrong size for this model")?;
        self.restore(step, m, v)
    }

    /// Restores a state saved from [`FlatAdamW::state`].
    pub fn restore(&mut self, step: u64, m: Vec<f32>, v: Vec<f32>) -> Result<(), String> {
        if m.len() != self.len || v.len() != self.len {
            return Err(format!(
                "optimizer state has {} values, the model {}",
                m.len(),
                self.len
            ));
        }
        (self.step, self.m, self.v) = (step, m, v);
        Ok(())
    }
}
