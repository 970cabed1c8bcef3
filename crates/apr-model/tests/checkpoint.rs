//! Checkpoints round-trip and refuse weights of the wrong shape with a clear error.

use apr_model::checkpoint::{load, save, CheckpointMeta};
use apr_model::{init_weights, AprTokenizer, ModelConfig, Preset};

#[test]
fn save_load_round_trip_and_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let tok = AprTokenizer::domain();
    let config = ModelConfig::preset(Preset::Tiny, tok.vocab_size());
    let weights = init_weights(&config, 5);
    let meta = CheckpointMeta {
        model: config.clone(),
        info: serde_json::json!({"step": 3}),
    };
    let path = dir.path().join("ckpt");
    save(
        &path,
        &meta,
        &weights,
        &tok,
        &[("extra.bin", vec![1, 2, 3])],
    )
    .unwrap();
    // Saving again replaces it atomically.
    save(&path, &meta, &weights, &tok, &[("extra.bin", vec![4])]).unwrap();
    let ck = load(&path).unwrap();
    assert_eq!(ck.meta, meta);
    assert_eq!(ck.weights, weights);
    assert_eq!(std::fs::read(path.join("extra.bin")).unwrap(), [4]);
    assert!(!dir.path().join("ckpt.partial").exists());
    // A config that does not match the weights.
    let mut wrong = meta.clone();
    wrong.model.d_model = 128;
    wrong.model.n_heads = 4;
    save(&dir.path().join("bad"), &wrong, &weights, &tok, &[]).unwrap();
    let err = load(&dir.path().join("bad")).unwrap_err().to_string();
    assert!(
        err.contains(
            "model.embed_tokens.weight has shape [57, 64] but the configuration needs [57, 128]"
        ),
        "{err}"
    );
    let err = load(&dir.path().join("missing")).unwrap_err().to_string();
    assert!(err.contains("no such checkpoint directory"), "{err}");
    // A crash between save's two renames leaves only DIR.old: loading puts it back.
    std::fs::rename(&path, dir.path().join("ckpt.old")).unwrap();
    let ck = load(&path).unwrap();
    assert_eq!(ck.weights, weights);
    assert!(path.is_dir() && !dir.path().join("ckpt.old").exists());
}

#[test]
fn nan_weights_and_user_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = AprTokenizer::domain();
    let config = ModelConfig::preset(Preset::Tiny, tok.vocab_size());
    let mut weights = init_weights(&config, 5);
    let meta = CheckpointMeta {
        model: config.clone(),
        info: serde_json::Value::Null,
    };
    let name = weights.keys().next().unwrap().clone();
    weights.get_mut(&name).unwrap().data[3] = f32::NAN;
    let path = dir.path().join("ckpt");
    save(&path, &meta, &weights, &tok, &[]).unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains(&name), "{e}");
    // A directory of someone else's files, or a file, is never replaced by a checkpoint.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "keep").unwrap();
    assert!(save(&theirs, &meta, &weights, &tok, &[]).is_err());
    assert_eq!(
        std::fs::read_to_string(theirs.join("notes.txt")).unwrap(),
        "keep"
    );
    let file = dir.path().join("file");
    std::fs::write(&file, "keep").unwrap();
    assert!(save(&file, &meta, &weights, &tok, &[]).is_err());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
}

#[test]
fn checkpoints_carry_the_hf_tokenizer_and_generation_configs() {
    let dir = tempfile::tempdir().unwrap();
    let tok = AprTokenizer::domain();
    let config = ModelConfig::preset(Preset::Tiny, tok.vocab_size());
    let meta = CheckpointMeta {
        model: config.clone(),
        info: serde_json::Value::Null,
    };
    let path = dir.path().join("ckpt");
    save(&path, &meta, &init_weights(&config, 1), &tok, &[]).unwrap();
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path.join(name)).unwrap()).unwrap()
    };
    let t = read("tokenizer_config.json");
    assert_eq!(t["bos_token"], "<s>");
    assert_eq!(t["eos_token"], "</s>");
    assert_eq!(t["model_max_length"], config.max_seq_len);
    let g = read("generation_config.json");
    assert_eq!(g["bos_token_id"], tok.bos_id());
    assert_eq!(g["eos_token_id"], tok.eos_id());
    load(&path).unwrap();
}
