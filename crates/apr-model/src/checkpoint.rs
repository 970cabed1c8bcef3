//! Checkpoints: a directory that is at once an HF `LlamaForCausalLM` export and our training
//! state.
//!
//! ```text
//! apr.json            our model configuration and metadata (step, what trained it)
//! config.json         HF config (LlamaForCausalLM)
//! model.safetensors   weights with HF names and layout, f32
//! tokenizer.json      HF tokenizer
//! …                   extra files of the trainer (optimizer state, data cursor)
//! ```
//!
//! Writes are atomic: everything goes to `DIR.partial`, which then replaces `DIR`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::model::{parameter_shapes, HostTensor, Weights};
use crate::tokenizer::AprTokenizer;

/// A checkpoint that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file's content is not what it should be.
    #[error("{path}: {message}")]
    Format {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

fn format_err(path: &Path, message: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// `apr.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Model shape.
    pub model: ModelConfig,
    /// Free-form metadata (step, trainer, data…).
    #[serde(default)]
    pub info: serde_json::Value,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// `apr.json`.
    pub meta: CheckpointMeta,
    /// Weights (HF names and layout).
    pub weights: Weights,
    /// Tokenizer.
    pub tokenizer: AprTokenizer,
    /// Where it was read from.
    pub dir: PathBuf,
}

/// Encodes named f32 tensors as safetensors bytes.
pub fn safetensors_bytes(tensors: &BTreeMap<String, HostTensor>) -> Result<Vec<u8>, String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let raw: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name.clone(), t.shape.clone(), raw)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(name, shape, raw)| {
            TensorView::new(Dtype::F32, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// Decodes safetensors bytes (f32, bf16 or f16) into named f32 tensors.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(path, e))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .as_chunks::<4>()
                .0
                .iter()
                .map(|&c| f32::from_le_bytes(c))
                .collect(),
            Dtype::BF16 => raw
                .as_chunks::<2>()
                .0
                .iter()
                .map(|&c| half::bf16::from_le_bytes(c).to_f32())
                .collect(),
            Dtype::F16 => raw
                .as_chunks::<2>()
                .0
                .iter()
                .map(|&c| half::f16::from_le_bytes(c).to_f32())
                .collect(),
            other => {
                return Err(format_err(
                    path,
                    format!("tensor {name}: unsupported dtype {other:?}"),
                ))
            }
        };
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// The HF `config.json` of a model.
pub fn hf_config(config: &ModelConfig, tokenizer: &AprTokenizer) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": config.init_std,
        "bos_token_id": tokenizer.bos_id(),
        "eos_token_id": tokenizer.eos_id(),
        "pad_token_id": tokenizer.pad_id(),
        "torch_dtype": "float32",
    })
}

/// HF `tokenizer_config.json` and `generation_config.json` for a checkpoint, so that
/// `transformers` and vLLM load the directory as it is, without warnings.
pub fn hf_side_configs(
    config: &ModelConfig,
    tokenizer: &AprTokenizer,
) -> [(&'static str, serde_json::Value); 2] {
    let piece = |id: u32| tokenizer.token(id).unwrap_or_default();
    [
        (
            "tokenizer_config.json",
            serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": piece(tokenizer.bos_id()),
                "eos_token": piece(tokenizer.eos_id()),
                "pad_token": piece(tokenizer.pad_id()),
                "add_bos_token": true,
                "add_eos_token": false,
                "model_max_length": config.max_seq_len,
                "clean_up_tokenization_spaces": false,
            }),
        ),
        (
            "generation_config.json",
            serde_json::json!({
                "bos_token_id": tokenizer.bos_id(),
                "eos_token_id": tokenizer.eos_id(),
                "pad_token_id": tokenizer.pad_id(),
            }),
        ),
    ]
}

/// A model configuration from an HF `config.json` (Llama with as many KV heads as heads).
pub fn config_from_hf(path: &Path) -> Result<ModelConfig, CheckpointError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format_err(path, e))?;
    let get = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| format_err(path, format!("missing integer field {k}")))
    };
    let heads = get("num_attention_heads")?;
    if v.get("num_key_value_heads")
        .and_then(serde_json::Value::as_u64)
        .is_some_and(|kv| kv as usize != heads)
    {
        return Err(format_err(path, "grouped-query attention is not supported"));
    }
    Ok(ModelConfig {
        vocab_size: get("vocab_size")?,
        d_model: get("hidden_size")?,
        n_layers: get("num_hidden_layers")?,
        n_heads: heads,
        d_ff: get("intermediate_size")?,
        max_seq_len: get("max_position_embeddings")?,
        rope_theta: v
            .get("rope_theta")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(10_000.0),
        norm_eps: v
            .get("rms_norm_eps")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(1e-6),
        init_std: v
            .get("initializer_range")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.02),
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Saves a checkpoint directory atomically. `extra` files (name, bytes) go in too.
pub fn save(
    dir: &Path,
    meta: &CheckpointMeta,
    weights: &Weights,
    tokenizer: &AprTokenizer,
    extra: &[(&str, Vec<u8>)],
) -> Result<(), CheckpointError> {
    let mut partial = dir.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut old = dir.as_os_str().to_owned();
    old.push(".old");
    let old = PathBuf::from(old);
    // Everything this replaces must be a checkpoint (or nothing): never a user's file.
    for p in [dir, &partial, &old] {
        replaceable(p)?;
    }
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    fs::write(
        partial.join("apr.json"),
        json(&serde_json::to_value(meta).unwrap_or_default()),
    )
    .map_err(io(&partial))?;
    fs::write(
        partial.join("config.json"),
        json(&hf_config(&meta.model, tokenizer)),
    )
    .map_err(io(&partial))?;
    for (name, value) in hf_side_configs(&meta.model, tokenizer) {
        fs::write(partial.join(name), json(&value)).map_err(io(&partial))?;
    }
    let bytes = safetensors_bytes(weights).map_err(|e| format_err(dir, e))?;
    fs::write(partial.join("model.safetensors"), bytes).map_err(io(&partial))?;
    tokenizer
        .save(&partial.join("tokenizer.json"))
        .map_err(|e| format_err(dir, e))?;
    for (name, bytes) in extra {
        fs::write(partial.join(name), bytes).map_err(io(&partial))?;
    }
    // Swap the finished directory into place; the old one is removed only afterwards, so a
    // crash leaves either the old or the new checkpoint complete.
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        fs::rename(dir, &old).map_err(io(dir))?;
    }
    fs::rename(&partial, dir).map_err(io(dir))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Whether `path` may be replaced by a checkpoint: it does not exist, or it is an empty
/// directory, or a directory this module wrote (an `apr.json` and no subdirectories).
fn replaceable(path: &Path) -> Result<(), CheckpointError> {
    if !path.exists() {
        return Ok(());
    }
    let refuse = |why: &str| {
        format_err(
            path,
            format!("{why}; refusing to replace it (pick another path, or move it away)"),
        )
    };
    if !path.is_dir() {
        return Err(refuse("exists and is not a checkpoint directory"));
    }
    let mut entries = fs::read_dir(path).map_err(io(path))?.peekable();
    if entries.peek().is_none() {
        return Ok(());
    }
    let mut ours = false;
    for entry in entries {
        let entry = entry.map_err(io(path))?;
        if entry.path().is_dir() {
            return Err(refuse(
                "is a directory with subdirectories, not a checkpoint",
            ));
        }
        ours |= entry.file_name() == "apr.json";
    }
    if ours {
        Ok(())
    } else {
        Err(refuse("is a non-empty directory that is not a checkpoint"))
    }
}

/// Puts back the previous checkpoint when a crash between the two renames of [`save`] left it
/// only as `DIR.old`; a no-op otherwise. Whoever asks whether a checkpoint exists calls it first.
pub fn recover(dir: &Path) -> Result<(), CheckpointError> {
    let mut old = dir.as_os_str().to_owned();
    old.push(".old");
    let old = PathBuf::from(old);
    if !dir.exists() && old.is_dir() {
        fs::rename(&old, dir).map_err(io(dir))?;
    }
    Ok(())
}

/// Loads a checkpoint: ours (`apr.json`) or a plain HF Llama directory (`config.json`). The
/// weights must match the configuration's shapes.
pub fn load(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    recover(dir)?;
    if !dir.is_dir() {
        return Err(format_err(dir, "no such checkpoint directory"));
    }
    if !dir.join("apr.json").exists() && !dir.join("config.json").exists() {
        let inner = dir.join("checkpoint");
        let hint = if inner.join("apr.json").exists() {
            format!("a run directory; its checkpoint is {}", inner.display())
        } else {
            "not a checkpoint (expected apr.json or an HF config.json in it)".to_owned()
        };
        return Err(format_err(dir, hint));
    }
    let meta = match fs::read_to_string(dir.join("apr.json")) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| format_err(&dir.join("apr.json"), e))?
        }
        Err(_) => CheckpointMeta {
            model: config_from_hf(&dir.join("config.json"))?,
            info: serde_json::json!({"imported": "hf"}),
        },
    };
    let config_file = if dir.join("apr.json").exists() {
        "apr.json"
    } else {
        "config.json"
    };
    meta.model
        .validate()
        .map_err(|e| format_err(&dir.join(config_file), e))?;
    let weights = read_safetensors(&dir.join("model.safetensors"))?;
    for (name, shape) in parameter_shapes(&meta.model) {
        match weights.get(&name) {
            None => {
                return Err(format_err(
                    &dir.join("model.safetensors"),
                    format!("missing tensor {name}"),
                ))
            }
            Some(t) if t.shape != shape => {
                return Err(format_err(
                    &dir.join("model.safetensors"),
                    format!(
                        "tensor {name} has shape {:?} but the configuration needs {shape:?}",
                        t.shape
                    ),
                ))
            }
            Some(t) if t.data.iter().any(|x| !x.is_finite()) => {
                // A diverged run's weights: loading them would only produce NaN logits.
                return Err(format_err(
                    &dir.join("model.safetensors"),
                    format!("tensor {name} holds NaN or infinite values"),
                ));
            }
            Some(_) => {}
        }
    }
    let tokenizer = AprTokenizer::from_file(&dir.join("tokenizer.json"))
        .map_err(|e| format_err(&dir.join("tokenizer.json"), e))?;
    if tokenizer.vocab_size() > meta.model.vocab_size {
        return Err(format_err(
            dir,
            format!(
                "tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                meta.model.vocab_size
            ),
        ));
    }
    Ok(Checkpoint {
        meta,
        weights,
        tokenizer,
        dir: dir.to_owned(),
    })
}

/// Writes an HF export (`config.json`, `model.safetensors`, `tokenizer.json`) of a checkpoint.
pub fn export_hf(checkpoint: &Checkpoint, out: &Path) -> Result<(), CheckpointError> {
    fs::create_dir_all(out).map_err(io(out))?;
    let json = serde_json::to_vec_pretty(&hf_config(&checkpoint.meta.model, &checkpoint.tokenizer))
        .unwrap_or_default();
    write_atomic(&out.join("config.json"), &json)?;
    for (name, value) in hf_side_configs(&checkpoint.meta.model, &checkpoint.tokenizer) {
        write_atomic(
            &out.join(name),
            &serde_json::to_vec_pretty(&value).unwrap_or_default(),
        )?;
    }
    let bytes = safetensors_bytes(&checkpoint.weights).map_err(|e| format_err(out, e))?;
    write_atomic(&out.join("model.safetensors"), &bytes)?;
    checkpoint
        .tokenizer
        .save(&out.join("tokenizer.json"))
        .map_err(|e| format_err(out, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with one tensor per dtype, as a Hugging Face export in half precision would hold.
    fn write_mixed(path: &Path, values: &[f32]) {
        let f32s: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let bf16s: Vec<u8> = values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let f16s: Vec<u8> = values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let shape = vec![2, values.len() / 2];
        let views = [
            ("a.f32", Dtype::F32, &f32s),
            ("b.bf16", Dtype::BF16, &bf16s),
            ("c.f16", Dtype::F16, &f16s),
        ]
        .map(|(name, dtype, raw)| (name, TensorView::new(dtype, shape.clone(), raw).unwrap()));
        fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    #[test]
    fn half_precision_tensors_are_read_as_their_f32_values() {
        // Each value is exact in bf16 and f16, so all three tensors must read back equal.
        let values = [1.0f32, -2.5, 0.0, 0.15625, 384.0, -0.0078125];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_mixed(&path, &values);
        let tensors = read_safetensors(&path).unwrap();
        for name in ["a.f32", "b.bf16", "c.f16"] {
            assert_eq!(tensors[name].shape, vec![2, 3], "{name}");
            assert_eq!(tensors[name].data, values, "{name}");
        }
    }

    #[test]
    fn an_unsupported_dtype_is_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let raw: Vec<u8> = [1i32, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::I32, vec![2], &raw).unwrap();
        fs::write(
            &path,
            safetensors::serialize([("ids", view)], None).unwrap(),
        )
        .unwrap();
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("tensor ids: unsupported dtype I32"), "{err}");
    }
}
