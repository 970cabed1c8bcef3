//! The HTTP side: `POST /v1/completions` (one body or server-sent events), `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus text). Requests become [`Job`]s on a bounded queue
//! to the engine thread; a full queue is a 429, a request beyond the context a 400 (or, with
//! `auto_truncate`, a generation that stops at the context with `finish_reason: "length"`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use apr_core::{BatchedDecoder, Sampling, TextCodec};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::api::{ApiError, Checked, CompletionRequest, Prompt, Usage};
use crate::scheduler::{self, Counters, Event, FinishReason, Job};

/// A tokenizer the server can share across request handlers.
pub trait Codec: TextCodec + Send + Sync {}
impl<T: TextCodec + Send + Sync> Codec for T {}

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The model's name in requests and `/v1/models`.
    pub model_name: String,
    /// Sequences that may wait for a slot; more is a 429.
    pub queue: usize,
    /// Cut generation at the context instead of refusing `prompt + max_tokens > context`.
    pub auto_truncate: bool,
    /// The text of the BOS token: a prompt that starts with it gets no second BOS.
    pub bos_text: String,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Tokens of the model's vocabulary: a token-id prompt must stay below it.
    pub vocab_size: usize,
}

struct Shared {
    config: ServerConfig,
    codec: Arc<dyn Codec>,
    jobs: SyncSender<Job>,
    context: usize,
    slots: usize,
    counters: Arc<Counters>,
    requests: AtomicU64,
    rejected: AtomicU64,
    next_id: AtomicU64,
}

/// Starts the engine thread on the decoder `make` builds there (engines need not be `Send`) and
/// returns the routes that feed it.
pub fn app<F>(config: ServerConfig, codec: Arc<dyn Codec>, make: F) -> Router
where
    F: FnOnce() -> Box<dyn BatchedDecoder> + Send + 'static,
{
    let (jobs, receiver) = sync_channel(config.queue.max(1));
    let counters = Arc::new(Counters::default());
    let (info_tx, info_rx) = std::sync::mpsc::channel();
    let engine_codec = codec.clone();
    let engine_counters = counters.clone();
    std::thread::spawn(move || {
        let mut decoder = make();
        let _ = info_tx.send((decoder.context_limit(), decoder.slots()));
        scheduler::run(
            decoder.as_mut(),
            engine_codec.as_ref(),
            receiver,
            engine_counters,
        );
    });
    let (context, slots) = info_rx.recv().unwrap_or((0, 0));
    let max_body = config.max_body;
    let shared = Arc::new(Shared {
        config,
        codec,
        jobs,
        context,
        slots,
        counters,
        requests: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        next_id: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(ApiError::status(404, "not_found_error", "no such route")) })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(e.body())).into_response()
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.config.model_name, "object": "model", "owned_by": "apr-rs",
        "max_model_len": s.context,
    }]}))
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let c = &s.counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    // Prometheus' text format: name, type, help, value; a table, one metric a line.
    #[rustfmt::skip]
    let lines = [
        ("apr_requests_total", "counter", "Completion requests received.", load(&s.requests)),
        ("apr_requests_rejected_total", "counter", "Requests refused (4xx, 429).", load(&s.rejected)),
        ("apr_sequences_total", "counter", "Sequences (choices) finished.", load(&c.sequences)),
        ("apr_sequences_cancelled_total", "counter", "Sequences whose client went away.", load(&c.cancelled)),
        ("apr_generated_tokens_total", "counter", "Tokens sampled.", load(&c.generated_tokens)),
        ("apr_prefill_tokens_total", "counter", "Prompt tokens prefilled into slots.", load(&c.prefilled_tokens)),
        ("apr_prefix_cache_tokens_total", "counter", "Prompt tokens served from the prefix cache.", load(&c.reused_tokens)),
        ("apr_engine_steps_total", "counter", "Batched engine steps.", load(&c.steps)),
        ("apr_busy_slots", "gauge", "Slots decoding now.", load(&c.busy_slots)),
        ("apr_slots", "gauge", "Slots of the engine.", s.slots as u64),
        ("apr_queue_length", "gauge", "Sequences waiting for a slot.", load(&c.waiting)),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in lines {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// One choice's result as it builds up.
#[derive(Default, Clone)]
struct Choice {
    text: String,
    tokens: Vec<(u32, f32)>,
    reason: Option<FinishReason>,
    stop: Option<String>,
    completion_tokens: usize,
}

/// The seed of a request's choice: choice 0 samples with the request's seed itself (its draw at
/// position `p` is `uniform_at(seed, p)`, as the runtime's threads draw), the others with mixes
/// of it.
fn seed_of(base: u64, choice: usize) -> u64 {
    if choice == 0 {
        return base;
    }
    let mut z = base
        ^ (choice as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Every choice's events of one request, tagged with the choice.
type Events = UnboundedReceiver<(usize, Event)>;

/// Tokenizes and queues a checked request; returns the event stream and the prompts' tokens.
fn submit(s: &Shared, req: &Checked) -> Result<(Events, Vec<Vec<u32>>), ApiError> {
    let codec = s.codec.as_ref();
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for p in &req.prompts {
        let tokens = match p {
            Prompt::Text(p) => {
                let text = p.strip_prefix(s.config.bos_text.as_str()).unwrap_or(p);
                let mut tokens = vec![codec.bos()];
                tokens.extend(
                    codec
                        .encode(text)
                        .map_err(|e| ApiError::invalid("prompt", format!("the prompt {e}")))?,
                );
                tokens
            }
            Prompt::Tokens(tokens) => {
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= s.config.vocab_size) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!(
                            "token id {bad} is outside the vocabulary of {}",
                            s.config.vocab_size
                        ),
                    ));
                }
                tokens.clone()
            }
        };
        prompts.push(tokens);
    }
    let mut max_tokens = Vec::with_capacity(prompts.len());
    for tokens in &prompts {
        let room = s.context.saturating_sub(tokens.len());
        if room == 0 {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "the prompt has {} tokens; the context is {}",
                    tokens.len(),
                    s.context
                ),
            ));
        }
        if req.max_tokens > room && !s.config.auto_truncate {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{} prompt tokens + max_tokens {} exceed the context of {} (start the \
                     server with --auto-truncate to stop at the context instead)",
                    tokens.len(),
                    req.max_tokens,
                    s.context
                ),
            ));
        }
        max_tokens.push(req.max_tokens.min(room));
    }
    let base = req.seed.unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ s.next_id.load(Ordering::Relaxed).rotate_left(32)
    });
    let sampling = Sampling {
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
    };
    let (events, receiver) = unbounded_channel();
    for (p, tokens) in prompts.iter().enumerate() {
        for i in 0..req.n {
            let choice = p * req.n + i;
            let job = Job {
                choice,
                prompt: tokens.clone(),
                max_tokens: max_tokens[p],
                sampling,
                seed: seed_of(base, choice),
                stops: req.stops.clone(),
                events: events.clone(),
            };
            match s.jobs.try_send(job) {
                Ok(()) => {}
                // Dropping the receiver on return cancels the jobs already queued.
                Err(TrySendError::Full(_)) => {
                    return Err(ApiError::status(
                        429,
                        "rate_limit_error",
                        "the queue is full; retry later",
                    ))
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(ApiError::status(
                        503,
                        "server_error",
                        "the engine has stopped",
                    ))
                }
            }
        }
    }
    Ok((receiver, prompts))
}

async fn completions(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let checked = CompletionRequest::parse(&body).and_then(|r| r.check(&s.config.model_name));
    let submitted = checked.and_then(|req| submit(&s, &req).map(|(rx, p)| (req, rx, p)));
    let (req, mut rx, prompts) = match submitted {
        Ok(x) => x,
        Err(e) => {
            s.rejected.fetch_add(1, Ordering::Relaxed);
            return error(e);
        }
    };
    let id = format!("cmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let total = prompts.len() * req.n;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum::<usize>() * req.n;
    let model = s.config.model_name.clone();
    let codec = s.codec.clone();
    let echoed: Vec<String> = req
        .prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(t) => t.clone(),
            Prompt::Tokens(tokens) => tokens
                .iter()
                .map(|&t| {
                    if t == codec.bos() {
                        s.config.bos_text.as_str()
                    } else {
                        codec.piece(t)
                    }
                })
                .collect(),
        })
        .collect();
    let token_ids = req.token_ids;
    let logprobs_of = move |tokens: &[(u32, f32)]| {
        let names: Vec<String> = tokens
            .iter()
            .map(|&(t, _)| {
                if token_ids {
                    format!("token_id:{t}")
                } else {
                    codec.piece(t).to_owned()
                }
            })
            .collect();
        json!({
            "tokens": names,
            "token_logprobs": tokens.iter().map(|&(_, l)| l).collect::<Vec<_>>(),
            "top_logprobs": null,
        })
    };
    if !req.stream {
        let mut choices = vec![Choice::default(); total];
        let mut done = 0;
        while done < total {
            let Some((c, event)) = rx.recv().await else {
                return error(ApiError::status(500, "server_error", "the engine stopped"));
            };
            match event {
                Event::Text { text, tokens } => {
                    choices[c].text.push_str(&text);
                    choices[c].tokens.extend(tokens);
                }
                Event::Done {
                    reason,
                    stop,
                    completion_tokens,
                } => {
                    choices[c].reason = Some(reason);
                    choices[c].stop = stop;
                    choices[c].completion_tokens = completion_tokens;
                    done += 1;
                }
                Event::Error(e) => return error(ApiError::status(500, "server_error", e)),
            }
        }
        let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
        let body = json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let prefix = if req.echo { echoed[i / req.n].as_str() } else { "" };
                json!({
                    "index": i, "text": format!("{prefix}{}", c.text),
                    "logprobs": if req.logprobs { logprobs_of(&c.tokens) } else { Value::Null },
                    "finish_reason": c.reason.map(FinishReason::as_str),
                    "stop_reason": c.stop,
                })
            }).collect::<Vec<_>>(),
            "usage": Usage { prompt_tokens, completion_tokens,
                             total_tokens: prompt_tokens + completion_tokens },
        });
        return Json(body).into_response();
    }
    // Streaming: one chunk per event; the echo first; the usage and [DONE] last.
    struct Stream {
        rx: UnboundedReceiver<(usize, Event)>,
        pending: std::collections::VecDeque<String>,
        done: usize,
        total: usize,
        completion_tokens: usize,
        finished: bool,
    }
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Value| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": choices})
        }
    };
    let mut pending = std::collections::VecDeque::new();
    if req.echo {
        for i in 0..total {
            pending.push_back(
                chunk(json!([{"index": i, "text": echoed[i / req.n],
                "logprobs": null, "finish_reason": null}]))
                .to_string(),
            );
        }
    }
    let state = Stream {
        rx,
        pending,
        done: 0,
        total,
        completion_tokens: 0,
        finished: false,
    };
    let logprobs = req.logprobs;
    let stream = futures_util::stream::unfold(state, move |mut st| {
        let chunk = chunk.clone();
        let logprobs_of = logprobs_of.clone();
        async move {
            loop {
                if let Some(data) = st.pending.pop_front() {
                    let e = SseEvent::default().data(data);
                    return Some((Ok::<_, std::convert::Infallible>(e), st));
                }
                if st.finished {
                    return None;
                }
                if st.done == st.total {
                    st.finished = true;
                    let usage = Usage {
                        prompt_tokens,
                        completion_tokens: st.completion_tokens,
                        total_tokens: prompt_tokens + st.completion_tokens,
                    };
                    let mut last = chunk(json!([]));
                    last["usage"] = json!(usage);
                    st.pending.push_back(last.to_string());
                    st.pending.push_back("[DONE]".into());
                    continue;
                }
                match st.rx.recv().await {
                    None => return None,
                    Some((c, Event::Text { text, tokens })) => {
                        let lp = if logprobs {
                            logprobs_of(&tokens)
                        } else {
                            Value::Null
                        };
                        st.pending.push_back(
                            chunk(json!([{"index": c, "text": text,
                            "logprobs": lp, "finish_reason": null}]))
                            .to_string(),
                        );
                    }
                    Some((
                        c,
                        Event::Done {
                            reason,
                            stop,
                            completion_tokens,
                        },
                    )) => {
                        st.done += 1;
                        st.completion_tokens += completion_tokens;
                        st.pending.push_back(
                            chunk(json!([{"index": c, "text": "",
                            "logprobs": null, "finish_reason": reason.as_str(),
                            "stop_reason": stop}]))
                            .to_string(),
                        );
                    }
                    Some((_, Event::Error(e))) => {
                        st.finished = true;
                        st.pending
                            .push_back(ApiError::status(500, "server_error", e).body().to_string());
                    }
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}
