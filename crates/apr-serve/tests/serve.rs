//! `apr serve`'s HTTP API on the shipped APR model, through a plain HTTP/1.1 client: answers
//! equal the engine's own decoding, concurrent requests do not disturb one another (the CPU
//! engine is batch-invariant), stop strings, streaming, the prefix cache, disconnects, and a
//! 4xx with a clear message for every malformed request while the server stays up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use apr_core::{BatchedDecoder, StepInput, TextCodec};
use apr_model::checkpoint;
use apr_model::native::{NativeEngine, NativeModel};
use apr_model::AprTokenizer;
use apr_serve::server::{app, serve, ServerConfig};
use serde_json::{json, Value};

const PROMPT: &str = "Moving to Node #0\nCurrent State: 19:[18, 19, 20], Operations: []";

fn model() -> (NativeModel, AprTokenizer) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/apr-sft");
    let ck = checkpoint::load(&dir).unwrap();
    (
        NativeModel::from_weights(&ck.meta.model, &ck.weights).unwrap(),
        ck.tokenizer,
    )
}

/// Starts a server on a free port; returns its address.
fn start(slots: usize, queue: usize, auto_truncate: bool) -> SocketAddr {
    let (m, tok) = model();
    let config = ServerConfig {
        model_name: "apr-sft".into(),
        queue,
        auto_truncate,
        bos_text: apr_model::tokenizer::BOS.into(),
        max_body: 16 << 20,
        vocab_size: tok.vocab_size(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let router = app(config, Arc::new(tok), move || {
                Box::new(NativeEngine::new(m, slots, 1024)) as Box<dyn BatchedDecoder>
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            serve(listener, router).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// One HTTP/1.1 exchange: status and body (chunked bodies decoded).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, rest) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn complete(addr: SocketAddr, body: Value) -> Value {
    let (status, text) = http(addr, "POST", "/v1/completions", body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The engine's own greedy decoding of `prompt`, alone in one slot.
fn greedy_alone(prompt: &str, max_tokens: usize) -> String {
    let (m, tok) = model();
    let mut e = NativeEngine::new(m, 1, 1024);
    let mut pending = vec![tok.bos()];
    pending.extend(tok.encode(prompt).unwrap());
    let mut out = String::new();
    for _ in 0..max_tokens {
        let s = e.step(&[StepInput::greedy(0, &pending)]).unwrap()[0];
        if s.token == tok.eos() {
            break;
        }
        out.push_str(tok.piece(s.token));
        pending = vec![s.token];
    }
    out
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, text) = http(addr, "GET", "/metrics", b"");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn completions_equal_the_engine_alone_even_under_load() {
    let addr = start(8, 64, false);
    assert_eq!(http(addr, "GET", "/health", b"").0, 200);
    let (_, models) = http(addr, "GET", "/v1/models", b"");
    assert!(models.contains("\"apr-sft\""), "{models}");
    let expected = greedy_alone(PROMPT, 300);
    assert!(expected.len() > 100, "the model writes a search");
    let greedy = json!({"model": "apr-sft", "prompt": PROMPT, "max_tokens": 300, "temperature": 0});
    let r = complete(addr, greedy.clone());
    assert_eq!(r["choices"][0]["text"], expected.as_str());
    let usage = &r["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    // Sampled requests with seeds, sent alone and then 12 at once: the same answers.
    let sampled = |seed: u64| {
        json!({"model": "apr-sft", "prompt": PROMPT, "max_tokens": 120, "temperature": 1.0,
               "n": 2, "seed": seed, "logprobs": 0})
    };
    let alone: Vec<Value> = (0..12)
        .map(|s| complete(addr, sampled(s))["choices"].clone())
        .collect();
    assert_ne!(
        alone[0][0]["text"], alone[0][1]["text"],
        "n = 2 gives two draws"
    );
    let together: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|s| scope.spawn(move || complete(addr, sampled(s))["choices"].clone()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        alone, together,
        "concurrent requests changed each other's answers"
    );
    // Stop strings end the text before them and are reported.
    let r = complete(
        addr,
        json!({"model": "apr-sft", "prompt": PROMPT, "max_tokens": 300, "temperature": 0,
               "stop": ["Exploring", "\n\n"]}),
    );
    let c = &r["choices"][0];
    let cut = expected.find("Exploring").unwrap();
    assert_eq!(c["text"], &expected[..cut]);
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], "Exploring");
    // max_tokens ends with "length"; echo puts the prompt first.
    let r = complete(
        addr,
        json!({"model": "apr-sft", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "echo": true}),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert!(r["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with(PROMPT));
    // Streaming gives the same text, then the usage, then [DONE].
    let mut stream = greedy.clone();
    stream["stream"] = json!(true);
    let (status, body) = http(
        addr,
        "POST",
        "/v1/completions",
        stream.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["text"].as_str())
        .collect();
    assert_eq!(text, expected);
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn the_prefix_cache_prefills_only_new_tokens() {
    let addr = start(4, 16, false);
    let first = complete(
        addr,
        json!({"model": "apr-sft", "prompt": PROMPT, "max_tokens": 200, "temperature": 0}),
    );
    let continued = format!("{PROMPT}{}", first["choices"][0]["text"].as_str().unwrap());
    let before = (
        metric(addr, "apr_prefill_tokens_total"),
        metric(addr, "apr_prefix_cache_tokens_total"),
    );
    let r = complete(
        addr,
        json!({"model": "apr-sft", "prompt": continued, "max_tokens": 20, "temperature": 0}),
    );
    let prompt_tokens = r["usage"]["prompt_tokens"].as_u64().unwrap();
    let prefilled = metric(addr, "apr_prefill_tokens_total") - before.0;
    let reused = metric(addr, "apr_prefix_cache_tokens_total") - before.1;
    assert_eq!(prefilled + reused, prompt_tokens);
    assert!(
        prefilled <= 2,
        "prefilled {prefilled} of {prompt_tokens} tokens"
    );
    // And the answer is the one a fresh slot gives.
    assert_eq!(
        r["choices"][0]["text"],
        greedy_alone(&continued, 20).as_str()
    );
}

#[test]
fn bad_requests_are_4xx_and_the_server_stays_up() {
    let addr = start(2, 4, false);
    let huge = format!(
        "{{\"model\":\"apr-sft\",\"prompt\":\"{}\"}}",
        "1".repeat(10 << 20)
    );
    #[rustfmt::skip]
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{".to_vec(), "EOF"),
        (b"not json".to_vec(), "expected"),
        (br#"{"model":"apr-sft","prompt":1}"#.to_vec(), "did not match"),
        (br#"{"model":"apr-sft","prompt":"1","max_tokens":"9"}"#.to_vec(), "invalid type"),
        (br#"{"model":"apr-sft","prompt":"1","max_tokens":100000}"#.to_vec(), "exceed the context"),
        (br#"{"model":"apr-sft","prompt":"1","n":0}"#.to_vec(), "n must"),
        (br#"{"model":"apr-sft","prompt":"1","max_tokens":1.5}"#.to_vec(), "invalid type"),
        (br#"{"model":"other","prompt":"1"}"#.to_vec(), "does not exist"),
        (br#"{"model":"apr-sft","prompt":"hello"}"#.to_vec(), "cannot encode"),
        (br#"{"model":"apr-sft","prompt":"1","temperature":-2}"#.to_vec(), "temperature"),
        (br#"{"model":"apr-sft","prompt":"1","top_p":2}"#.to_vec(), "top_p"),
        (br#"{"model":"apr-sft","prompt":"1","n":100000}"#.to_vec(), "n must"),
        (br#"{"model":"apr-sft","prompt":"1","stop":""}"#.to_vec(), "stop"),
        (br#"{"model":"apr-sft","prompt":"1","logprobs":3}"#.to_vec(), "logprobs"),
        (br#"{"model":"apr-sft","prompt":"1","frequency_penalty":1}"#.to_vec(), "not supported"),
        (br#"{"model":"apr-sft","prompt":"1","extra":true}"#.to_vec(), "unknown field"),
        (br#"{"model":"apr-sft","prompt":"1","seed":18446744073709551616}"#.to_vec(), "did not match"),
        (br#"{"model":"apr-sft","prompt":["1",2]}"#.to_vec(), "did not match"),
        (br#"{"prompt":"1"}"#.to_vec(), "model"),
        (huge.into_bytes(), "context"),
    ];
    for (body, needle) in &cases {
        let (status, text) = http(addr, "POST", "/v1/completions", body);
        assert!((400..500).contains(&status), "{status}: {text}");
        if status != 413 {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        assert_eq!(http(addr, "GET", "/health", b"").0, 200);
    }
    assert_eq!(http(addr, "GET", "/nope", b"").0, 404);
    // An empty prompt is only BOS: a valid request.
    let (status, _) = http(
        addr,
        "POST",
        "/v1/completions",
        br#"{"model":"apr-sft","prompt":"","max_tokens":3}"#,
    );
    assert_eq!(status, 200);
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let addr = start(2, 8, false);
    // A generation can finish before the server sees the disconnect (the stream is short and
    // the engine fast), and then nothing is cancelled: disconnect until one is caught mid-stream
    // (at least three times, at most thirty).
    for attempt in 0..30 {
        if attempt >= 3 && metric(addr, "apr_sequences_cancelled_total") >= 1 {
            break;
        }
        let mut s = TcpStream::connect(addr).unwrap();
        let body = json!({"model": "apr-sft", "prompt": PROMPT, "max_tokens": 900,
                          "temperature": 1.0, "stream": true})
        .to_string();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).unwrap();
        drop(s);
    }
    // Every slot comes back, and the server still answers.
    let mut busy = u64::MAX;
    for _ in 0..200 {
        busy = metric(addr, "apr_busy_slots");
        if busy == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(busy, 0);
    assert!(metric(addr, "apr_sequences_cancelled_total") >= 1);
    let r = complete(
        addr,
        json!({"model": "apr-sft", "prompt": PROMPT, "max_tokens": 3}),
    );
    assert_eq!(r["choices"].as_array().unwrap().len(), 1);
}
