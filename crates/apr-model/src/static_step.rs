//! The engine's decode step at static shapes, optionally captured into a CUDA graph.
//!
//! A decode step (one token for each of several slots) is launch-bound on a GPU: about a
//! thousand kernels, each costing the host tens of microseconds. Captured once and replayed, the
//! whole step is one launch. A capture replays against the buffers it touched, so the step reads
//! everything from buffers that live across steps and are refreshed in place:
//!
//! * shapes depend only on a [`StepShape`]: rows = slots `0..rows` (a bucket of the highest slot
//!   decoding), keys over a power-of-two bucket of positions, greedy or sampled;
//! * the token, position and cache row of every row come from one `[3, rows]` int buffer, the
//!   sampling settings and uniforms from one `[4, rows]` f32 buffer, both written on the device
//!   before each step; a slot with nothing to decode writes its scratch cache row;
//! * keys and values are written in place into the engine's [`KvCache`], RoPE is gathered at the
//!   device-side positions, the mask compares them with a key-position table made once;
//! * sampling is [`crate::device_sample`]'s, so one token id and one log-probability per row
//!   come back, in one read.
//!
//! [`DecodePath::Static`] runs the same step op by op (what the capture records, and what the
//! tests compare with the dynamic path); [`DecodePath::Captured`] captures each shape on first
//! use and replays it: a CUDA graph on CUDA, recorded dispatches on wgpu (cubecl 0.11 has both). A capture that did not become a hardware graph (burn falls back
//! to re-running the closure) is counted in [`GraphReport`] and said once on stderr, never
//! silently slow.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use apr_core::decoder::{DecoderError, Sampled, Sampling, StepInput};
use apr_core::SlotTable;
use burn::tensor::{capture, Device, Graph, Int, Tensor, TensorData, Transaction};

use crate::device_sample::{draw_table, f32_tensor, sample_rows, SamplerTables, DRAW_FIELDS};
use crate::model::{KvCache, Model, StaticRows};

/// Row buckets of a static step (capped at the engine's slot count; past the last, multiples of
/// it).
pub const ROW_BUCKETS: [usize; 7] = [1, 8, 16, 32, 64, 128, 256];

/// The smallest key bucket: keys are attended over a power of two at least this.
pub const MIN_KEY_BUCKET: usize = 128;

/// How an [`crate::Engine`] runs a decode step (every input one token). Prefill always takes the
/// dynamic path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodePath {
    /// The prefill path: exactly the rows given, keys gathered by host-made indices.
    Dynamic,
    /// Static shapes per [`StepShape`], everything indexed on the device, run op by op.
    Static,
    /// Static, captured once per shape into a CUDA graph and replayed.
    Captured,
}

impl DecodePath {
    /// Every path, by name.
    pub const ALL: [(&'static str, DecodePath); 3] = [
        ("dynamic", DecodePath::Dynamic),
        ("static", DecodePath::Static),
        ("captured", DecodePath::Captured),
    ];

    /// The default for a device: captured on CUDA, dynamic elsewhere. wgpu replays captures too,
    /// but on lavapipe (compute-bound, not launch-bound) a whole evaluation ran slower captured
    /// (6 problems: 524 s against 438 s), the padded rows and keys costing more than the
    /// launches saved; burn-flex has no graphs. `APR_DECODE_PATH=dynamic|static|captured`
    /// overrides it, e.g. to time a CUDA run with capture off.
    pub fn default_for(device: &Device) -> DecodePath {
        if let Ok(name) = std::env::var("APR_DECODE_PATH") {
            match name.parse() {
                Ok(path) => return path,
                Err(e) => eprintln!("warning: APR_DECODE_PATH: {e}; using the default"),
            }
        }
        if crate::backend::is_cuda(device) {
            DecodePath::Captured
        } else {
            DecodePath::Dynamic
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
            .unwrap_or("dynamic")
    }
}

impl std::str::FromStr for DecodePath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                format!("unknown decode path {s:?} (expected dynamic, static or captured)")
            })
    }
}

/// What a static step's shapes depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StepShape {
    /// Slots `0..rows` take part.
    pub rows: usize,
    /// Keys attended over.
    pub kv_len: usize,
    /// Whether any row samples (else argmax only).
    pub sampled: bool,
}

/// How the captures of an engine went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphReport {
    /// Shapes captured into hardware graphs.
    pub hardware: usize,
    /// Shapes whose capture fell back to re-running the step.
    pub fallback: usize,
    /// Replays of hardware graphs.
    pub replays: u64,
}

/// The device buffers a step reads, refreshed in place before it runs.
struct StepBuffers {
    /// `[3, rows]`: tokens, positions, cache rows.
    ints: Tensor<2, Int>,
    /// `[4, rows]` f32: the draw table.
    draws: Tensor<2>,
}

type StepOutput = (Tensor<2, Int>, Tensor<2>);
type StepGraph = Graph<StepOutput, Box<dyn FnMut() -> StepOutput>>;

/// One shape's buffers and, once captured, its graph.
struct Step {
    buffers: Rc<RefCell<StepBuffers>>,
    graph: Option<StepGraph>,
}

/// The static decode steps of one engine.
pub struct StaticSteps {
    path: DecodePath,
    device: Device,
    tables: SamplerTables,
    /// `0..stride` of the cache: the key positions.
    key_positions: Tensor<1, Int>,
    steps: BTreeMap<StepShape, Step>,
    report: GraphReport,
    warned: bool,
}

impl std::fmt::Debug for StaticSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticSteps")
            .field("path", &self.path)
            .field("shapes", &self.steps.keys().collect::<Vec<_>>())
            .field("report", &self.report)
            .finish()
    }
}

impl StaticSteps {
    /// Steps over a cache of `stride` rows per slot, sampling with the engine's `tables`.
    pub fn new(path: DecodePath, tables: SamplerTables, stride: usize, device: &Device) -> Self {
        StaticSteps {
            path,
            device: device.clone(),
            tables,
            key_positions: Tensor::arange(0..stride as i64, device),
            steps: BTreeMap::new(),
            report: GraphReport::default(),
            warned: false,
        }
    }

    /// The path.
    pub fn path(&self) -> DecodePath {
        self.path
    }

    /// How the captures went.
    pub fn report(&self) -> GraphReport {
        self.report
    }

    /// The shape a decode of `inputs` runs at in the pool `table` describes.
    pub fn shape(inputs: &[StepInput<'_>], table: &SlotTable) -> StepShape {
        let top = inputs.iter().map(|i| i.slot + 1).max().unwrap_or(1);
        let slots = table.slots();
        let largest = ROW_BUCKETS[ROW_BUCKETS.len() - 1];
        let rows = ROW_BUCKETS
            .into_iter()
            .find(|&b| b >= top)
            .unwrap_or(top.div_ceil(largest) * largest)
            .min(slots);
        let keys = inputs
            .iter()
            .map(|i| table.slot_len(i.slot) + 1)
            .max()
            .unwrap_or(1);
        let kv_len = keys
            .next_power_of_two()
            .max(MIN_KEY_BUCKET)
            .min(table.max_len());
        StepShape {
            rows,
            kv_len,
            sampled: inputs.iter().any(|i| i.sampling.temperature > 0.0),
        }
    }

    /// Decodes one token for each input (all one token long, checked by the caller); `draws`
    /// are their uniforms. Writes the cache; the caller appends to the table afterwards.
    pub fn decode(
        &mut self,
        model: &Model,
        cache: &Rc<RefCell<KvCache>>,
        table: &SlotTable,
        inputs: &[StepInput<'_>],
        draws: &[f64],
        pad: u32,
    ) -> Result<Vec<Sampled>, DecoderError> {
        let shape = Self::shape(inputs, table);
        let rows = shape.rows;
        let stride = cache.borrow().stride();
        let vocab = model.config.vocab_size;
        // Idle rows: the pad token at position 0, written to their own scratch row.
        let mut ints = vec![0i64; 3 * rows];
        let mut params = vec![(Sampling::GREEDY, 0.0); rows];
        for r in 0..rows {
            ints[r] = pad as i64;
            ints[2 * rows + r] = (r * stride + stride - 1) as i64;
        }
        for (input, &u) in inputs.iter().zip(draws) {
            let (r, pos) = (input.slot, table.slot_len(input.slot));
            ints[r] = input.tokens[0] as i64;
            ints[rows + r] = pos as i64;
            ints[2 * rows + r] = (r * stride + pos) as i64;
            params[r] = (input.sampling, u);
        }
        let fresh_ints =
            Tensor::<2, Int>::from_data(TensorData::new(ints, [3, rows]), &self.device);
        let fresh_draws = shape.sampled.then(|| {
            let table = draw_table(&params, vocab);
            f32_tensor(table, [DRAW_FIELDS, rows], &self.device)
        });
        {
            let mut buffers = self.step(shape).buffers.borrow_mut();
            buffers
                .ints
                .inplace(|t| t.slice_assign([0..3, 0..rows], fresh_ints));
            if let Some(fresh) = fresh_draws {
                buffers
                    .draws
                    .inplace(|t| t.slice_assign([0..DRAW_FIELDS, 0..rows], fresh));
            }
        }
        if self.path == DecodePath::Captured && self.step(shape).graph.is_none() {
            self.capture(model, cache, shape);
        }
        let (tables, keys) = (&self.tables, &self.key_positions);
        let step = self.steps.get_mut(&shape).expect("made above");
        let (tokens, logprobs) = match step.graph.as_mut() {
            Some(graph) => {
                if graph.is_hardware() {
                    self.report.replays += 1;
                }
                // SAFETY: every buffer the graph touched is alive for its lifetime: the cache
                // and the step buffers are held by the closure (through `Rc`), the weights by
                // its model, the output by the graph; this engine is the only user of them, on
                // the one thread that captured it, and the read below orders after the replay.
                unsafe { graph.replay() }.clone()
            }
            None => {
                let buffers = step.buffers.borrow();
                run_step(
                    model,
                    &mut cache.borrow_mut(),
                    &buffers,
                    tables,
                    keys,
                    shape,
                )
            }
        };
        let data = Transaction::default()
            .register(tokens)
            .register(logprobs)
            .try_execute()
            .map_err(|e| DecoderError::Backend(format!("reading a decode step: {e:?}")))?;
        let tokens: Vec<i64> = data[0].iter::<i64>().collect();
        let logprobs: Vec<f32> = data[1].iter::<f32>().collect();
        Ok(inputs
            .iter()
            .map(|i| Sampled {
                token: tokens[i.slot] as u32,
                logprob: logprobs[i.slot],
            })
            .collect())
    }

    /// The buffers of a shape, made on first use.
    fn step(&mut self, shape: StepShape) -> &mut Step {
        let device = &self.device;
        self.steps.entry(shape).or_insert_with(|| {
            let rows = shape.rows;
            let fields = vec![0.0; DRAW_FIELDS * rows];
            Step {
                buffers: Rc::new(RefCell::new(StepBuffers {
                    ints: Tensor::zeros([3, rows], device),
                    draws: f32_tensor(fields, [DRAW_FIELDS, rows], device),
                })),
                graph: None,
            }
        })
    }

    /// Captures a shape's step, its buffers already holding this step's inputs: the warm-up runs
    /// and the capture write the same keys and values the replay then writes again.
    fn capture(&mut self, model: &Model, cache: &Rc<RefCell<KvCache>>, shape: StepShape) {
        let (model, cache) = (model.clone(), Rc::clone(cache));
        let (tables, keys) = (self.tables.clone(), self.key_positions.clone());
        let device = self.device.clone();
        let step = self.step(shape);
        let inputs = Rc::clone(&step.buffers);
        let closure: Box<dyn FnMut() -> StepOutput> = Box::new(move || {
            run_step(
                &model,
                &mut cache.borrow_mut(),
                &inputs.borrow(),
                &tables,
                &keys,
                shape,
            )
        });
        let graph = capture(&device, closure);
        let hardware = graph.is_hardware();
        step.graph = Some(graph);
        if hardware {
            self.report.hardware += 1;
        } else {
            self.report.fallback += 1;
            if !self.warned {
                self.warned = true;
                eprintln!(
                    "warning: the decode step at {shape:?} did not capture into a hardware \
                     graph; it runs op by op"
                );
            }
        }
    }
}

/// The step itself: what a capture records.
fn run_step(
    model: &Model,
    cache: &mut KvCache,
    buffers: &StepBuffers,
    tables: &SamplerTables,
    key_positions: &Tensor<1, Int>,
    shape: StepShape,
) -> StepOutput {
    let rows = shape.rows;
    let field = |f: usize| buffers.ints.clone().narrow(0, f, 1);
    let step = StaticRows {
        tokens: field(0).reshape([rows, 1]),
        positions: field(1).reshape([rows, 1]),
        dest: field(2).reshape([rows]),
        key_positions,
        kv_len: shape.kv_len,
    };
    let logits = model.llama.decode_rows(&step, cache, &model.rope);
    sample_rows(logits, shape.sampled.then_some(&buffers.draws), tables)
}
