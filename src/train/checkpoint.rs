//! A checkpoint after every epoch, so a long training survives interruption and `--resume`
//! continues exactly as if it had never stopped: the weights, the best weights so far, the
//! optimizer's moments and step count, the batch-order RNG, the epoch log and the best score.
//!
//! Epoch `n` is two files: `epoch-000n.safetensors` (tensors), then `epoch-000n.json` (the rest),
//! each written under a temporary name, flushed to disk and renamed. The JSON is written last, so
//! a checkpoint whose JSON exists is whole; older epochs are deleted only after it.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::EpochLog;
use crate::durable;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Torch { path: PathBuf, source: tch::TchError },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path} was written by a different training run ({differences}); resume with the same \
         data and settings, or train into a fresh --out"
    )]
    OtherRun { path: PathBuf, differences: String },
}

/// Everything a checkpoint holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    pub optimizer_steps: i64,
    pub best_epoch: usize,
    pub best_score: f64,
    pub epochs: Vec<EpochLog>,
    /// Training seconds before this point (resumed runs report the whole time).
    pub seconds: f64,
    pub rng: RngState,
    /// The run's settings and data shape: a checkpoint only resumes the run that wrote it.
    pub fingerprint: serde_json::Value,
}

/// A ChaCha8 generator's position; u128 as text, which JSON numbers cannot carry exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RngState {
    seed: [u8; 32],
    stream: u64,
    word_pos: String,
}

impl RngState {
    pub fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn generator(&self) -> Result<ChaCha8Rng, String> {
        let word_pos = self
            .word_pos
            .parse()
            .map_err(|_| format!("rng word_pos {:?} is not a number", self.word_pos))?;
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

pub struct Checkpoint {
    pub progress: Progress,
    pub tensors: HashMap<String, Tensor>,
}

fn stem(epoch: usize) -> String {
    format!("epoch-{epoch:04}")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes epoch `progress.epoch`'s checkpoint into `dir` and removes earlier ones.
pub fn save(dir: &Path, progress: &Progress, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let stem = stem(progress.epoch);
    let io_error = |path: &Path, e| io(path)(e);
    durable::replace(&dir.join(format!("{stem}.safetensors")), io_error, |partial| {
        Tensor::write_safetensors(tensors, partial).map_err(|source| CheckpointError::Torch {
            path: partial.to_path_buf(),
            source,
        })
    })?;
    durable::replace(&dir.join(format!("{stem}.json")), io_error, |partial| {
        let text = serde_json::to_vec_pretty(progress).expect("progress serializes");
        std::fs::write(partial, text).map_err(io(partial))
    })?;
    // The new checkpoint's names must be on disk before the old files go.
    durable::sync_dir(dir).map_err(io(dir))?;
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("epoch-") && !name.starts_with(&stem) {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// The newest whole checkpoint in `dir`, if any.
pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut newest: Option<usize> = None;
    for entry in entries {
        let name = entry.map_err(io(dir))?.file_name();
        let epoch = name
            .to_str()
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse().ok());
        newest = newest.max(epoch);
    }
    let Some(epoch) = newest else { return Ok(None) };
    let meta = dir.join(format!("{}.json", stem(epoch)));
    let text = std::fs::read(&meta).map_err(io(&meta))?;
    let progress: Progress = serde_json::from_slice(&text).map_err(|e| CheckpointError::Corrupt {
        path: meta.clone(),
        message: e.to_string(),
    })?;
    let weights = dir.join(format!("{}.safetensors", stem(epoch)));
    let tensors = Tensor::read_safetensors(&weights)
        .map_err(|source| CheckpointError::Torch { path: weights, source })?
        .into_iter()
        .collect();
    Ok(Some(Checkpoint { progress, tensors }))
}

impl Checkpoint {
    /// Refuses a checkpoint of another run, naming the settings that differ.
    pub fn check_same_run(&self, dir: &Path, fingerprint: &serde_json::Value) -> Result<(), CheckpointError> {
        let saved = &self.progress.fingerprint;
        if saved == fingerprint {
            return Ok(());
        }
        let mut differences = Vec::new();
        differing_fields("", saved, fingerprint, &mut differences);
        Err(CheckpointError::OtherRun {
            path: dir.to_path_buf(),
            differences: differences.join(", "),
        })
    }

    /// The tensors saved under `prefix`, with the prefix taken off their names.
    pub fn take(&mut self, prefix: &str) -> HashMap<String, Tensor> {
        let names: Vec<String> = self.tensors.keys().filter(|n| n.starts_with(prefix)).cloned().collect();
        names
            .into_iter()
            .map(|name| {
                let tensor = self.tensors.remove(&name).expect("listed");
                (name[prefix.len()..].to_owned(), tensor)
            })
            .collect()
    }
}

/// `path: saved → now` for every leaf that differs.
fn differing_fields(path: &str, saved: &serde_json::Value, now: &serde_json::Value, out: &mut Vec<String>) {
    match (saved, now) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            let null = serde_json::Value::Null;
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                differing_fields(&child, a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} then, {b} now")),
        _ => {}
    }
}
