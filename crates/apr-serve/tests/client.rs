//! The remote decoder against a fake completions server: a request that fails on the way is
//! retried with backoff, one that keeps failing (or gets an answer it cannot use) fails only its
//! own input, and the slots hold exactly what the contract of `step_many` says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apr_core::scripted::ByteCodec;
use apr_core::{BatchedDecoder, Horizon, StepInput};
use apr_serve::client::{RemoteConfig, RemoteDecoder};
use serde_json::{json, Value};

/// Serves `/v1/models` and answers completions by the prompt's second token: 10 always 503,
/// 11 503 once then fine, 12 tokens by text instead of id, 13 an HTTP 400; otherwise two tokens.
fn fake_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let flaky = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let flaky = flaky.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let (status, answer) = if line.starts_with("GET /v1/models") {
                    (200, json!({"data": [{"id": "fake", "max_model_len": 64}]}))
                } else {
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(request["return_tokens_as_token_ids"], true);
                    let ok = json!({"choices": [{"text": "", "finish_reason": "length",
                        "logprobs": {"tokens": ["token_id:5", "token_id:6"],
                                     "token_logprobs": [-0.5, -0.25]}}]});
                    match request["prompt"][1].as_u64() {
                        Some(10) => (503, json!({"error": {"message": "busy"}})),
                        Some(11) if flaky.fetch_add(1, Ordering::SeqCst) == 0 => {
                            (503, json!({"error": {"message": "busy"}}))
                        }
                        Some(12) => (
                            200,
                            json!({"choices": [{"finish_reason": "length",
                                "logprobs": {"tokens": ["hello"], "token_logprobs": [0.0]}}]}),
                        ),
                        Some(13) => (
                            400,
                            json!({"error": {"message": "bad prompt\nsecond line"}}),
                        ),
                        _ => (200, ok),
                    }
                };
                let text = answer.to_string();
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                )
                .unwrap();
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn failures_are_retried_then_fail_only_their_own_input() {
    let url = fake_server();
    let config = RemoteConfig {
        urls: vec![url],
        slots: 5,
        in_flight: 3,
        timeout: Duration::from_secs(10),
        retries: 2,
        backoff: Duration::from_millis(5),
        ..RemoteConfig::default()
    };
    let mut decoder = RemoteDecoder::connect(&config, Arc::new(ByteCodec)).unwrap();
    assert_eq!((decoder.model(), decoder.context_limit()), ("fake", 64));
    let prompts: Vec<Vec<u32>> = [10, 11, 12, 13, 20]
        .iter()
        .map(|&t| vec![1, t, 30])
        .collect();
    let inputs: Vec<StepInput> = prompts
        .iter()
        .enumerate()
        .map(|(slot, p)| StepInput::greedy(slot, p))
        .collect();
    let horizons = vec![
        Horizon {
            max_tokens: 8,
            stop: &[],
            affinity: 0,
        };
        inputs.len()
    ];
    let results = decoder.step_many(&inputs, &horizons);
    let err = |i: usize| format!("{}", results[i].as_ref().unwrap_err());
    assert!(err(0).contains("HTTP 503: busy"), "{}", err(0));
    assert!(err(2).contains("token_id:N"), "{}", err(2));
    assert!(
        err(3).contains("HTTP 400: bad prompt second line") && !err(3).contains('\n'),
        "{}",
        err(3)
    );
    for i in [1, 4] {
        let chunk = results[i].as_ref().unwrap();
        assert_eq!(
            chunk
                .iter()
                .map(|s| (s.token, s.logprob))
                .collect::<Vec<_>>(),
            [(5, -0.5), (6, -0.25)]
        );
        // The slot holds the prompt and every chunk token but the last.
        assert_eq!(decoder.slot_len(i), 4);
    }
    let c = decoder.counters();
    // Input 0: two retries, then a failure; input 1: one retry, then an answer.
    assert_eq!(c.retries.load(Ordering::Relaxed), 3);
    assert_eq!(c.failures.load(Ordering::Relaxed), 3);
    // The next step continues a slot from the chunk's last token.
    let last = [6];
    let next = StepInput::greedy(4, &last);
    assert!(decoder.step_many(&[next], &horizons[..1])[0].is_ok());
    assert_eq!(decoder.slot_len(4), 6);
    // A prompt the context cannot hold fails before any request.
    let long = vec![1; 64];
    let too_long = StepInput::greedy(0, &long);
    assert!(decoder.step_many(&[too_long], &horizons[..1])[0].is_err());
}

#[test]
fn a_server_without_the_model_is_refused_at_connect() {
    let url = fake_server();
    let config = RemoteConfig {
        urls: vec![url],
        model: Some("other".into()),
        ..RemoteConfig::default()
    };
    let err = RemoteDecoder::connect(&config, Arc::new(ByteCodec))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("does not serve the model \"other\""),
        "{err}"
    );
}
