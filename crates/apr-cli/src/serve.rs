//! `apr serve`: the OpenAI completions API over a checkpoint (`apr_serve`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use apr_serve::server::{app, serve, ServerConfig};
use clap::Args;

use crate::model::load_model;
use crate::DeviceArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory, or the name of a shipped model.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free one; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Engine slots (sequences decoded together; free ones are the prefix cache).
    #[arg(long, value_parser = crate::args::slots, default_value_t = 64)]
    slots: usize,
    /// Sequences that may wait for a slot; beyond it requests get 429.
    #[arg(long, value_parser = crate::args::samples, default_value_t = 1024)]
    queue: usize,
    /// Stop at the context (`finish_reason: "length"`) instead of refusing a request whose
    /// prompt plus `max_tokens` exceeds it (SGLang's `--allow-auto-truncate`).
    #[arg(long)]
    auto_truncate: bool,
    /// The model name clients use (default: the checkpoint directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Refuse settings whose KV caches could exceed this many GB (default: 90% of RAM).
    #[arg(long, value_parser = crate::args::gigabytes)]
    max_memory: Option<f64>,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let dir = crate::model::resolve_model(&args.model)?;
    let (model, tok, _) = load_model(&dir, &args.device)?;
    let context = model.config.max_seq_len;
    crate::args::check_kv_memory(&model.config, args.slots, context, args.max_memory)?;
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let config = ServerConfig {
        model_name: name.clone(),
        queue: args.queue,
        auto_truncate: args.auto_truncate,
        bos_text: apr_model::tokenizer::BOS.to_owned(),
        max_body: 16 << 20,
        vocab_size: tok.vocab_size(),
    };
    let pad = tok.pad_id();
    let slots = args.slots;
    let codec = Arc::new(tok);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let router = app(config, codec, move || {
            apr_model::engine::engine_for(&model, slots, context, pad)
        });
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        // One line on stdout, so that scripts can read the address.
        println!(
            "{}",
            serde_json::json!({"listening": format!("http://{local}"), "model": name,
                               "slots": slots, "context": context})
        );
        serve(listener, router).await.context("serving HTTP")?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
