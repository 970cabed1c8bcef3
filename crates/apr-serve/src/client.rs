//! The other direction: the APR runtime driving an OpenAI-compatible completions server
//! (`apr serve`, vLLM, SGLang) instead of an engine it owns.
//!
//! [`RemoteDecoder`] is one more [`BatchedDecoder`] beneath the same runtime. Its slots are token
//! lists kept here; each step sends one completion request per input, with the slot's tokens as
//! the prompt (token ids, so the server tokenizes nothing), the runtime's stop strings and as
//! many tokens as the runtime can take, and answers with the chunk of tokens the server wrote
//! ([`BatchedDecoder::step_many`]). Requests of one step run concurrently, at most `in_flight`
//! at a time; a request that fails is retried with backoff and then fails only its own thread's
//! problem. All calls of one problem go to one replica (its prefix cache serves the joins).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apr_core::{
    BatchedDecoder, DecoderError, Horizon, Sampled, SlotId, SlotTable, StepInput, TextCodec,
};
use serde_json::{json, Value};

/// Where the servers are and how to talk to them.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// Base URLs of the replicas (`http://host:port`, with or without `/v1`).
    pub urls: Vec<String>,
    /// The served model's name (default: the first model the first replica lists).
    pub model: Option<String>,
    /// Slots the runtime may fill (threads in flight).
    pub slots: usize,
    /// Requests in flight at once, over all replicas.
    pub in_flight: usize,
    /// Per request, connection to last byte.
    pub timeout: Duration,
    /// Retries of a request that failed on the way (connection, 429, 5xx).
    pub retries: usize,
    /// Wait before the first retry; doubled for each next one.
    pub backoff: Duration,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            urls: Vec::new(),
            model: None,
            slots: 64,
            in_flight: 64,
            timeout: Duration::from_secs(600),
            retries: 3,
            backoff: Duration::from_millis(500),
        }
    }
}

/// Counts of what a remote decoder did.
#[derive(Debug, Default)]
pub struct RemoteCounters {
    /// Completion requests answered.
    pub requests: AtomicU64,
    /// Attempts retried.
    pub retries: AtomicU64,
    /// Requests that failed for good.
    pub failures: AtomicU64,
    /// Tokens the servers wrote.
    pub completion_tokens: AtomicU64,
}

/// A [`BatchedDecoder`] over OpenAI-compatible completions servers.
pub struct RemoteDecoder {
    agent: ureq::Agent,
    urls: Vec<String>,
    model: String,
    codec: Arc<dyn TextCodec + Send + Sync>,
    /// Each slot's tokens (sent whole with every request); their lengths are `table`'s, its
    /// limit the served context.
    slots: Vec<Vec<u32>>,
    table: SlotTable,
    in_flight: usize,
    retries: usize,
    backoff: Duration,
    counters: Arc<RemoteCounters>,
}

/// Why a server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No URL was given.
    #[error("no server URL given")]
    NoUrl,
    /// A URL is not `http://…`.
    #[error("{0}: only http:// URLs are supported")]
    Scheme(String),
    /// `GET /v1/models` failed or said something unexpected.
    #[error("{url}: {message}")]
    Models {
        /// The replica.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// `http://host:port` or `http://host:port/v1` → `http://host:port/v1`.
fn api_base(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.ends_with("/v1") {
        url.to_owned()
    } else {
        format!("{url}/v1")
    }
}

impl RemoteDecoder {
    /// Checks every replica (`GET /v1/models`): each must serve the model; the context is the
    /// smallest `max_model_len` they report.
    pub fn connect(
        config: &RemoteConfig,
        codec: Arc<dyn TextCodec + Send + Sync>,
    ) -> Result<Self, ConnectError> {
        if config.urls.is_empty() {
            return Err(ConnectError::NoUrl);
        }
        let agent = ureq::AgentBuilder::new()
            .timeout(config.timeout)
            .max_idle_connections_per_host(config.in_flight.max(1))
            .build();
        let mut urls = Vec::new();
        let mut model = config.model.clone();
        let mut context = usize::MAX;
        for url in &config.urls {
            if !url.starts_with("http://") {
                return Err(ConnectError::Scheme(url.clone()));
            }
            let base = api_base(url);
            let err = |message: String| ConnectError::Models {
                url: url.clone(),
                message,
            };
            let listing: Value = agent
                .get(&format!("{base}/models"))
                .call()
                .map_err(|e| err(format!("GET /v1/models: {e}")))?
                .into_json()
                .map_err(|e| err(format!("GET /v1/models: not JSON: {e}")))?;
            let models = listing["data"]
                .as_array()
                .ok_or_else(|| err("GET /v1/models: no `data` list".into()))?;
            let name = model
                .get_or_insert_with(|| {
                    models
                        .first()
                        .and_then(|m| m["id"].as_str())
                        .unwrap_or("")
                        .to_owned()
                })
                .clone();
            let entry = models
                .iter()
                .find(|m| m["id"].as_str() == Some(&name))
                .ok_or_else(|| err(format!("does not serve the model {name:?}")))?;
            let len = entry["max_model_len"]
                .as_u64()
                .ok_or_else(|| err(format!("the model {name:?} has no max_model_len")))?;
            context = context.min(len as usize);
            urls.push(base);
        }
        Ok(RemoteDecoder {
            agent,
            urls,
            model: model.unwrap_or_default(),
            codec,
            slots: vec![Vec::new(); config.slots.max(1)],
            table: SlotTable::new(config.slots.max(1), context),
            in_flight: config.in_flight.max(1),
            retries: config.retries,
            backoff: config.backoff,
            counters: Arc::new(RemoteCounters::default()),
        })
    }

    /// The served model's name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// What this decoder has done so far.
    pub fn counters(&self) -> Arc<RemoteCounters> {
        self.counters.clone()
    }

    /// One completion request with retries: the tokens the server wrote after `prompt`.
    fn complete(
        &self,
        prompt: &[u32],
        input: &StepInput<'_>,
        horizon: &Horizon,
    ) -> Result<Vec<Sampled>, DecoderError> {
        let replica = mix(horizon.affinity) as usize % self.urls.len();
        let url = format!("{}/completions", self.urls[replica]);
        let mut body = json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": horizon.max_tokens,
            "temperature": input.sampling.temperature,
            "top_p": input.sampling.top_p,
            "logprobs": 0,
            "return_tokens_as_token_ids": true,
        });
        if input.sampling.temperature > 0.0 {
            // As a signed integer, the range vLLM accepts; `apr serve` reads the same bits back.
            body["seed"] = json!(input.seed as i64);
        }
        if input.sampling.top_k > 0 {
            body["top_k"] = json!(input.sampling.top_k);
        }
        if !horizon.stop.is_empty() {
            body["stop"] = json!(horizon.stop);
        }
        let mut attempt = 0;
        loop {
            match self.agent.post(&url).send_json(&body) {
                Ok(response) => {
                    let answer: Value = response
                        .into_json()
                        .map_err(|e| backend(format!("{url}: the answer is not JSON: {e}")))?;
                    self.counters.requests.fetch_add(1, Ordering::Relaxed);
                    return self
                        .chunk(&answer, horizon)
                        .map_err(|m| backend(format!("{url}: {m}")));
                }
                Err(e) => {
                    let retryable = match &e {
                        ureq::Error::Status(code, _) => matches!(code, 429 | 500 | 502 | 503 | 504),
                        ureq::Error::Transport(_) => true,
                    };
                    if !retryable || attempt >= self.retries {
                        return Err(backend(format!("{url}: {}", describe(e))));
                    }
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(self.backoff * 2u32.saturating_pow(attempt as u32));
                    attempt += 1;
                }
            }
        }
    }

    /// The tokens of a completion answer, EOS appended when the server stopped on it.
    fn chunk(&self, answer: &Value, horizon: &Horizon) -> Result<Vec<Sampled>, String> {
        let choice = &answer["choices"][0];
        let logprobs = &choice["logprobs"];
        let names = logprobs["tokens"]
            .as_array()
            .ok_or("no logprobs.tokens in the answer (the server must honour logprobs = 0)")?;
        let values = logprobs["token_logprobs"].as_array();
        let mut chunk = Vec::with_capacity(names.len() + 1);
        for (i, name) in names.iter().enumerate() {
            let token = name
                .as_str()
                .and_then(|n| n.strip_prefix("token_id:"))
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| {
                    format!(
                        "token {name} is not `token_id:N` (the server must honour \
                         return_tokens_as_token_ids)"
                    )
                })?;
            let logprob = values
                .and_then(|v| v.get(i))
                .and_then(Value::as_f64)
                .unwrap_or(0.0) as f32;
            chunk.push(Sampled { token, logprob });
        }
        let eos = self.codec.eos();
        let stopped = choice["finish_reason"].as_str() == Some("stop");
        match &choice["stop_reason"] {
            // A stop string: the tokens must contain it, or the next call would write it again.
            Value::String(stop) if stopped => {
                let text: String = chunk.iter().map(|s| self.codec.piece(s.token)).collect();
                if !text.contains(stop.as_str()) {
                    return Err(format!(
                        "the server stopped on {stop:?} but its tokens do not contain it"
                    ));
                }
            }
            // EOS (or a stop token): the runtime needs to see it.
            _ if stopped && chunk.last().is_none_or(|s| s.token != eos) => chunk.push(Sampled {
                token: eos,
                logprob: 0.0,
            }),
            _ => {}
        }
        if chunk.is_empty() {
            return Err("the server wrote no token".into());
        }
        if chunk.len() > horizon.max_tokens + 1 {
            return Err(format!(
                "the server wrote {} tokens; {} were asked for",
                chunk.len(),
                horizon.max_tokens
            ));
        }
        self.counters
            .completion_tokens
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok(chunk)
    }
}

/// One input's answer: the tokens the server wrote, or why there are none.
type Chunk = Result<Vec<Sampled>, DecoderError>;

fn backend(message: String) -> DecoderError {
    DecoderError::Backend(message)
}

/// A ureq error in one line, with the server's own message for an HTTP error status.
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, response) => {
            let text = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            // One line however the server formats it (pydantic's errors span several).
            let message: Vec<&str> = message.split_whitespace().collect();
            let mut line = message.join(" ");
            if line.len() > 400 {
                let cut = (0..=400)
                    .rev()
                    .find(|&i| line.is_char_boundary(i))
                    .unwrap_or(0);
                line.truncate(cut);
                line.push('…');
            }
            format!("HTTP {code}: {line}")
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

/// SplitMix64's finalizer: spreads problem ids over replicas.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl BatchedDecoder for RemoteDecoder {
    fn table(&self) -> &SlotTable {
        &self.table
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        let horizons: Vec<Horizon> = inputs
            .iter()
            .map(|_| Horizon {
                max_tokens: 1,
                stop: &[],
                affinity: 0,
            })
            .collect();
        self.step_many(inputs, &horizons)
            .into_iter()
            .map(|chunk| chunk.map(|c| c[0]))
            .collect()
    }

    fn step_many(
        &mut self,
        inputs: &[StepInput<'_>],
        horizons: &[Horizon],
    ) -> Vec<Result<Vec<Sampled>, DecoderError>> {
        // The prompts: each slot's tokens with the input appended.
        let mut prompts: Vec<Result<Vec<u32>, DecoderError>> = Vec::with_capacity(inputs.len());
        for input in inputs {
            // Room for the input and the token the server samples after it.
            let len = self.table.slot_len(input.slot) + input.tokens.len() + 1;
            let prompt = if input.slot >= self.slots.len() {
                Err(DecoderError::BadSlot(input.slot))
            } else if len > self.table.max_len() {
                Err(DecoderError::ContextFull {
                    slot: input.slot,
                    len,
                    limit: self.table.max_len(),
                })
            } else {
                // Fits the table: checked just above.
                self.table.extend(input.slot, input.tokens.len());
                let held = &mut self.slots[input.slot];
                held.extend_from_slice(input.tokens);
                Ok(held.clone())
            };
            prompts.push(prompt);
        }
        let results: Vec<Mutex<Option<Chunk>>> = inputs.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let this = &*self;
        std::thread::scope(|scope| {
            for _ in 0..this.in_flight.min(inputs.len()) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(input) = inputs.get(i) else { break };
                    let result = match &prompts[i] {
                        Ok(prompt) => this.complete(prompt, input, &horizons[i]),
                        Err(e) => Err(e.clone()),
                    };
                    if result.is_err() {
                        this.counters.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                });
            }
        });
        let mut results: Vec<Chunk> = results
            .into_iter()
            .map(|r| {
                r.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or_else(|| Err(backend("the request was not made".into())))
            })
            .collect();
        // Every chunk token but the last is now part of its slot; a chunk that would overflow
        // the slot (a server that wrote past the context) fails its input instead, so the
        // tokens held and the table's lengths never disagree.
        for (input, result) in inputs.iter().zip(&mut results) {
            let Ok(chunk) = result else { continue };
            let kept = &chunk[..chunk.len() - 1];
            if self.table.extend(input.slot, kept.len()) {
                self.slots[input.slot].extend(kept.iter().map(|s| s.token));
            } else {
                let len = self.table.slot_len(input.slot) + kept.len();
                *result = Err(DecoderError::ContextFull {
                    slot: input.slot,
                    len,
                    limit: self.table.max_len(),
                });
            }
        }
        results
    }

    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        let len = self.table.truncate(slot, len)?;
        self.slots[slot].truncate(len);
        Ok(())
    }

    fn release(&mut self, slot: SlotId) {
        if self.table.release(slot) {
            self.slots[slot].clear();
        }
    }
}
