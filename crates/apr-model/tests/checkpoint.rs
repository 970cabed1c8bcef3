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
