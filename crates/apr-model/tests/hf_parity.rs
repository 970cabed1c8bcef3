//! Interoperability with Hugging Face `transformers`: `export --format hf` loads as a
//! `LlamaForCausalLM` that computes our logits (≤ 1e-4, f32) on random tokens, and a
//! `LlamaForCausalLM` saved by `transformers` loads here and computes its own logits.
//!
//! Needs a Python with `torch` and `transformers`, named by `APR_PYTHON` (`.ci/run` installs one
//! into a virtual environment and sets it). Without it the test says so and does nothing else.

use std::path::Path;
use std::process::Command;

use apr_model::backend::Backend;
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::{init_weights, AprTokenizer, Model, ModelConfig, Preset};
use burn::tensor::{Int, Tensor, TensorData};

const SCRIPT: &str = r#"
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
mode, model_dir, tokens_path = sys.argv[1:4]
tokens = json.load(open(tokens_path))
if mode == "save":
    torch.manual_seed(0)
    cfg = LlamaConfig.from_pretrained(model_dir)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(sys.argv[4], safe_serialization=True)
else:
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model.eval()
with torch.no_grad():
    logits = model(torch.tensor([tokens])).logits[0]
print(json.dumps(logits.tolist()))
"#;

fn python(args: &[&str]) -> Vec<Vec<f32>> {
    let py = std::env::var("APR_PYTHON").expect("checked by the caller");
    let out = Command::new(py)
        .arg("-c")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python prints logits as JSON")
}

fn our_logits(dir: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let ck = checkpoint::load(dir).unwrap();
    let device = Backend::Cpu.device(0).unwrap();
    let model = Model::new(ck.meta.model.clone(), &ck.weights, &device).unwrap();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let logits = model.forward(Tensor::<2, Int>::from_data(
        TensorData::new(ids, [1, tokens.len()]),
        &device,
    ));
    let v = ck.meta.model.vocab_size;
    let data: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec().unwrap();
    data.chunks(v).map(<[f32]>::to_vec).collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn hf_export_and_import_match_transformers() {
    if std::env::var_os("APR_PYTHON").is_none() {
        eprintln!("hf_parity: not run: set APR_PYTHON to a python with torch and transformers (.ci/run does)");
        return;
    }
    let tok = AprTokenizer::domain();
    let config = ModelConfig {
        init_std: 0.2,
        max_seq_len: 64,
        ..ModelConfig::preset(Preset::Tiny, tok.vocab_size())
    };
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let meta = CheckpointMeta {
        model: config.clone(),
        info: serde_json::json!({}),
    };
    checkpoint::save(&ours, &meta, &init_weights(&config, 9), &tok, &[]).unwrap();
    let hf = dir.path().join("hf");
    checkpoint::export_hf(&checkpoint::load(&ours).unwrap(), &hf).unwrap();

    let mut state = 1u64;
    let tokens: Vec<u32> = (0..48)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((state >> 33) % config.vocab_size as u64) as u32
        })
        .collect();
    let tokens_path = dir.path().join("tokens.json");
    std::fs::write(&tokens_path, serde_json::to_vec(&tokens).unwrap()).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();

    // Export: transformers computes our logits.
    let theirs = python(&["load", &path(&hf), &path(&tokens_path)]);
    let diff = max_diff(&our_logits(&ours, &tokens), &theirs);
    assert!(diff <= 1e-4, "export: max |ours − transformers| = {diff}");

    // Import: a model transformers wrote loads here and computes what transformers computes.
    let imported = dir.path().join("imported");
    let theirs = python(&["save", &path(&hf), &path(&tokens_path), &path(&imported)]);
    std::fs::copy(hf.join("tokenizer.json"), imported.join("tokenizer.json")).unwrap();
    let diff = max_diff(&our_logits(&imported, &tokens), &theirs);
    assert!(diff <= 1e-4, "import: max |ours − transformers| = {diff}");
    let mean =
        theirs.iter().flatten().map(|x| x.abs()).sum::<f32>() / (48 * config.vocab_size) as f32;
    assert!(
        mean > 0.1,
        "logits too small to compare meaningfully ({mean})"
    );
}
