//! [`Learner`] over the burn model with autodiff, on any backend. A packed batch becomes padded
//! rows (padding at the ends, which causal attention never lets a real position see); the
//! backward pass differentiates `Σ stopgrad(dlogp) · logp`, whose gradient is the loss's.

use apr_core::decoder::BatchedDecoder;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::{LearnError, Learner, LearnerKind};
use crate::config::ModelConfig;
use crate::engine::engine_for;
use crate::model::{HostTensor, Model, Weights};
use crate::native::PackedBatch;
use crate::optim::{moment_name, AdamW, AdamWConfig};
use crate::params::{parameter_shapes, EMBED};

/// The burn model on an autodiff device, its optimizer, and the pending forward pass.
pub struct BurnLearner {
    model: Model,
    /// The plain device (the model lives on its autodiff wrapper; optimizer moments here).
    device: Device,
    optim: AdamW,
    /// The last forward's `[b, L]` log-probabilities (with their graph) and the flat index in
    /// them of every packed position.
    tape: Option<(Tensor<2>, Vec<usize>)>,
}

impl BurnLearner {
    /// A learner over `weights` on `device`, with a fresh optimizer.
    pub fn new(
        config: &ModelConfig,
        weights: &Weights,
        adamw: AdamWConfig,
        device: &Device,
    ) -> Result<Self, LearnError> {
        let model = Model::new(config.clone(), weights, &device.clone().autodiff())?;
        Ok(BurnLearner {
            model,
            device: device.clone(),
            optim: AdamW::new(adamw),
            tape: None,
        })
    }

    /// The same learner computing its products and attention in `precision` (weights, AdamW
    /// state, norms and the log-softmax stay f32); refused where the device cannot compute in it.
    pub fn with_precision(mut self, precision: crate::Precision) -> Result<Self, LearnError> {
        precision
            .check(&self.device)
            .map_err(LearnError::Precision)?;
        self.model.precision = precision;
        Ok(self)
    }

    /// The model being trained (on the autodiff device).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// `[b, L]` log-probabilities of `batch`'s targets under `model`, and where each packed
    /// position sits in them.
    fn padded_logprobs(
        &self,
        model: &Model,
        batch: &PackedBatch,
        device: &Device,
    ) -> Result<(Tensor<2>, Vec<usize>), LearnError> {
        let c = &self.model.config;
        batch.check(c.vocab_size, c.max_seq_len)?;
        let rows = batch.bounds.len().saturating_sub(1).max(1);
        let width = batch
            .bounds
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(1)
            .max(1);
        let mut inputs = vec![0i64; rows * width];
        let mut targets = vec![0i64; rows * width];
        let mut index = Vec::with_capacity(batch.len());
        for (row, w) in batch.bounds.windows(2).enumerate() {
            for (i, p) in (w[0]..w[1]).enumerate() {
                let at = row * width + i;
                inputs[at] = batch.inputs[p] as i64;
                targets[at] = batch.targets[p] as i64;
                index.push(at);
            }
        }
        let ids =
            |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [rows, width]), device);
        let logits = model.forward(ids(inputs));
        let logp = log_softmax(logits, 2)
            .gather(2, ids(targets).reshape([rows, width, 1]))
            .reshape([rows, width]);
        Ok((logp, index))
    }
}

/// The values of `logp` at `index`, on the host.
fn gather_host(logp: Tensor<2>, index: &[usize]) -> Vec<f32> {
    let flat: Vec<f32> = logp
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default();
    index
        .iter()
        .map(|&i| flat.get(i).copied().unwrap_or(f32::NAN))
        .collect()
}

/// `rows × cols` row-major → `cols × rows`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// burn stores linear weights `[in, out]`, HF `[out, in]`; embeddings and norms agree.
fn is_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name != EMBED
}

impl Learner for BurnLearner {
    fn kind(&self) -> LearnerKind {
        LearnerKind::Burn
    }

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn forward(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, LearnError> {
        self.tape = None;
        let device = self.model.rope_device();
        let (logp, index) = self.padded_logprobs(&self.model, batch, &device)?;
        let values = gather_host(logp.clone(), &index);
        self.tape = Some((logp, index));
        Ok(values)
    }

    fn score(&self, batch: &PackedBatch) -> Result<Vec<f32>, LearnError> {
        let frozen = self.model.valid();
        let (logp, index) = self.padded_logprobs(&frozen, batch, &self.device)?;
        Ok(gather_host(logp, &index))
    }

    fn backward(&mut self, dlogp: &[f32]) -> Result<(), LearnError> {
        let (logp, index) = self
            .tape
            .take()
            .ok_or_else(|| LearnError::NoForward("none".into()))?;
        if index.len() != dlogp.len() {
            return Err(LearnError::NoForward(format!(
                "{} positions, {} derivatives",
                index.len(),
                dlogp.len()
            )));
        }
        let [rows, width] = logp.dims();
        let mut weights = vec![0.0f32; rows * width];
        for (&at, &g) in index.iter().zip(dlogp) {
            weights[at] = g;
        }
        let weights =
            Tensor::<2>::from_data(TensorData::new(weights, [rows, width]), &logp.device());
        let grads = (logp * weights).sum().backward();
        self.optim.accumulate(&self.model.llama, &grads);
        Ok(())
    }

    fn step(&mut self, lr: f64, average_over: usize) -> Result<f64, LearnError> {
        // Parameters are reference-counted tensors: the clone is cheap and is replaced.
        match self.optim.step(self.model.llama.clone(), lr, average_over) {
            Ok((llama, norm)) => {
                self.model.llama = llama;
                Ok(norm)
            }
            Err((llama, e)) => {
                self.model.llama = llama;
                Err(e.into())
            }
        }
    }

    fn weights(&self) -> Weights {
        self.model.llama.to_weights()
    }

    fn optimizer_state(&self) -> (u64, Weights) {
        let (steps, m, v) = self.optim.moments();
        let mut out = Weights::new();
        for (moment, list) in [("m", m), ("v", v)] {
            for (i, (name, shape)) in parameter_shapes(self.config()).into_iter().enumerate() {
                let n: usize = shape.iter().product();
                let data = match list.get(i) {
                    Some(flat) if is_linear(&name, &shape) => transpose(flat, shape[1], shape[0]),
                    Some(flat) => flat.clone(),
                    None => vec![0.0; n], // before the first step
                };
                out.insert(moment_name(moment, &name), HostTensor { shape, data });
            }
        }
        (steps, out)
    }

    fn restore_optimizer(&mut self, steps: u64, state: &Weights) -> Result<(), LearnError> {
        let shapes = parameter_shapes(self.config());
        // HF names, as both learners write them.
        let named = |moment: &str| -> Option<Vec<Vec<f32>>> {
            shapes
                .iter()
                .map(|(name, shape)| {
                    let t = state.get(&moment_name(moment, name))?;
                    (t.data.len() == shape.iter().product::<usize>()).then(|| {
                        if is_linear(name, shape) {
                            transpose(&t.data, shape[0], shape[1])
                        } else {
                            t.data.clone()
                        }
                    })
                })
                .collect()
        };
        // Visiting order in burn's layout (`m.0000`), as this learner wrote them before.
        let ordered = |moment: &str| -> Option<Vec<Vec<f32>>> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, (_, shape))| {
                    let t = state.get(&format!("{moment}.{i:04}"))?;
                    (t.data.len() == shape.iter().product::<usize>()).then(|| t.data.clone())
                })
                .collect()
        };
        let (m, v) = if steps == 0 {
            (Vec::new(), Vec::new())
        } else {
            named("m")
                .zip(named("v"))
                .or_else(|| ordered("m").zip(ordered("v")))
                .ok_or_else(|| {
                    LearnError::State("moments missing or of the wrong size for this model".into())
                })?
        };
        self.optim
            .restore_moments(&self.model.llama, &self.device, steps, m, v)
            .map_err(LearnError::State)
    }

    fn decoder(&self, slots: usize, context: usize, pad: u32) -> Box<dyn BatchedDecoder> {
        engine_for(&self.model.valid(), slots, context, pad)
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transpose_round_trips() {
        let x: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let t = transpose(&x, 2, 3);
        assert_eq!(t, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose(&t, 3, 2), x);
    }
}
