//! `apr serve` as a user starts it: it prints where it listens, answers `/health`, and the
//! `openai` Python package (named by `APR_PYTHON`, which `.ci/run` sets) passes
//! `scripts/openai_client_check.py` against it: completions, n > 1, stop, streaming, errors.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

const PROMPT: &str = "Moving to Node #0\nCurrent State: 19:[18, 19, 20], Operations: []";

#[test]
fn serve_answers_http_and_the_openai_client() {
    let (mut server, url) = common::serve("apr-sft", 8);
    let addr = url.trim_start_matches("http://").to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let result = match std::env::var("APR_PYTHON") {
        Ok(python) => {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py");
            let out = Command::new(python)
                .arg(script)
                .args([url.as_str(), "apr-sft", PROMPT])
                .output()
                .unwrap();
            Some(out)
        }
        Err(_) => {
            eprintln!("cli_serve: the openai client part did not run: set APR_PYTHON to a python with `openai` (.ci/run does)");
            None
        }
    };
    server.kill().unwrap();
    let _ = server.wait();
    if let Some(out) = result {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
