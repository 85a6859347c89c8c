//! The model artifact: a directory with `config.json`, `model.safetensors` and `items.tsv`.
//! `models/README.md` documents the format; this module is its one reader and writer.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::{ModelConfig, SeqModel};
use crate::data::vocab::Vocab;
use crate::durable;

pub const FORMAT_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const ITEMS_FILE: &str = "items.tsv";

/// A 64-bit FNV-1a of `bytes`: stable across machines and builds (model versions, cache names).
pub fn content_hash<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u64 {
    let mut hash = ContentHash::default();
    hash.update(bytes);
    hash.finish()
}

/// [`content_hash`] fed in pieces: the pieces' hash is their concatenation's.
#[derive(Debug, Clone, Copy)]
pub struct ContentHash(u64);

impl Default for ContentHash {
    fn default() -> Self {
        Self(0xcbf29ce484222325)
    }
}

impl ContentHash {
    pub fn update<'a>(&mut self, bytes: impl IntoIterator<Item = &'a u8>) {
        self.0 = bytes
            .into_iter()
            .fold(self.0, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: artifact format_version {found} is not supported (this build reads {FORMAT_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}:{line}: {message}")]
    Items {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: {source}")]
    Torch { path: PathBuf, source: tch::TchError },
}

/// Everything `config.json` holds besides the model hyper-parameters is free-form metadata
/// (data statistics, training settings, metrics) that the loader keeps but does not interpret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactConfig {
    pub format_version: u32,
    pub model: ModelConfig,
    /// Event-type names; the type at index `i + 1` is `event_types[i]` ("" = untyped).
    pub event_types: Vec<String>,
    #[serde(default)]
    pub info: serde_json::Value,
}

/// A loaded model with its vocabularies and item statistics.
pub struct Artifact {
    pub config: ArtifactConfig,
    pub items: Vocab,
    pub event_types: Vocab,
    /// Training-event count per item index (index 0 = padding = 0).
    pub item_counts: Vec<u64>,
    /// Categories per item index (empty when unknown).
    pub item_categories: Vec<Vec<String>>,
    pub model: SeqModel,
}

impl Artifact {
    /// An artifact of the current format for `model`: the config's model and event-type fields
    /// are taken from `model` and `event_types`, so they cannot disagree with them.
    pub fn new(
        model: SeqModel,
        items: Vocab,
        event_types: Vocab,
        item_counts: Vec<u64>,
        item_categories: Vec<Vec<String>>,
        info: serde_json::Value,
    ) -> Self {
        Self {
            config: ArtifactConfig {
                format_version: FORMAT_VERSION,
                model: model.config.clone(),
                event_types: event_types.ids().to_vec(),
                info,
            },
            items,
            event_types,
            item_counts,
            item_categories,
            model,
        }
    }

    /// Writes the artifact's files, each replaced whole (a kill or power cut never leaves half a
    /// file), the weights last: a directory with `model.safetensors` holds a complete artifact,
    /// which is what resumable scripts test before skipping a finished training.
    pub fn save(&self, dir: &Path) -> Result<(), ArtifactError> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        durable::replace(&dir.join(CONFIG_FILE), io, |partial| {
            let json = serde_json::to_string_pretty(&self.config).expect("config serialises");
            fs::write(partial, json + "\n").map_err(|e| io(partial, e))
        })?;
        durable::replace(&dir.join(ITEMS_FILE), io, |partial| {
            let mut out = std::io::BufWriter::new(fs::File::create(partial).map_err(|e| io(partial, e))?);
            writeln!(out, "index\titem_id\tcount\tcategories").map_err(|e| io(partial, e))?;
            for (i, id) in self.items.ids().iter().enumerate() {
                let idx = i + 1;
                let categories = self.item_categories.get(idx).map(|c| c.join("|")).unwrap_or_default();
                writeln!(out, "{idx}\t{id}\t{}\t{categories}", self.item_counts[idx]).map_err(|e| io(partial, e))?;
            }
            out.flush().map_err(|e| io(partial, e))
        })?;
        durable::replace(&dir.join(WEIGHTS_FILE), io, |partial| {
            let variables: Vec<(String, Tensor)> = self.model.vs.variables().into_iter().collect();
            Tensor::write_safetensors(&variables, partial).map_err(|source| ArtifactError::Torch {
                path: partial.to_path_buf(),
                source,
            })
        })?;
        durable::sync_dir(dir).map_err(|e| io(dir, e))
    }

    pub fn load(dir: &Path, device: Device) -> Result<Self, ArtifactError> {
        Self::load_with(dir, device, |_| {})
    }

    /// [`Artifact::load`], showing `seen` each file's bytes as read (config, items, weights, in
    /// that order): what a caller hashes there is exactly what the artifact was built from, even
    /// if the files are replaced meanwhile, and nothing is read twice.
    pub fn load_with(dir: &Path, device: Device, mut seen: impl FnMut(&[u8])) -> Result<Self, ArtifactError> {
        // A FIFO or a device in the artifact's place would block the read for good, and a reload
        // waits on it with no deadline.
        for file in [CONFIG_FILE, ITEMS_FILE, WEIGHTS_FILE] {
            let path = dir.join(file);
            let metadata = fs::metadata(&path).map_err(|source| io(&path, source))?;
            if !metadata.is_file() {
                let not_regular = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
                return Err(io(&path, not_regular));
            }
        }
        let mut read = |path: &Path| -> Result<Vec<u8>, ArtifactError> {
            let bytes = fs::read(path).map_err(|source| io(path, source))?;
            seen(&bytes);
            Ok(bytes)
        };
        let config_path = dir.join(CONFIG_FILE);
        let text = utf8(&config_path, read(&config_path)?)?;
        let config = parse_config(&config_path, &text)?;
        let items_path = dir.join(ITEMS_FILE);
        let (items, item_counts, item_categories) = parse_items(&items_path, &utf8(&items_path, read(&items_path)?)?)?;
        if items.len() != config.model.num_items {
            return Err(ArtifactError::Config {
                path: config_path,
                message: format!(
                    "model.num_items is {} but items.tsv lists {} items (+1 padding)",
                    config.model.num_items,
                    items.len() - 1
                ),
            });
        }
        let event_types = Vocab::from_ids(config.event_types.iter().cloned());
        let model = SeqModel::new(config.model.clone(), device);
        let weights_path = dir.join(WEIGHTS_FILE);
        load_weights(&model, &weights_path, &read(&weights_path)?)?;
        Ok(Self {
            config,
            items,
            event_types,
            item_counts,
            item_categories,
            model,
        })
    }
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, ArtifactError> {
    String::from_utf8(bytes).map_err(|e| io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

fn io(path: &Path, source: std::io::Error) -> ArtifactError {
    ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parse_config(path: &Path, text: &str) -> Result<ArtifactConfig, ArtifactError> {
    let invalid = |message: String| ArtifactError::Config {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    match value.get("format_version").and_then(serde_json::Value::as_u64) {
        None => return Err(invalid("missing or non-integer key `format_version`".into())),
        Some(v) if v != u64::from(FORMAT_VERSION) => {
            return Err(ArtifactError::Version {
                path: path.to_path_buf(),
                found: v as u32,
            })
        }
        Some(_) => {}
    }
    let config: ArtifactConfig = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    config.model.validate().map_err(invalid)?;
    if config.event_types.len() + 1 != config.model.num_event_types {
        return Err(invalid(format!(
            "model.num_event_types is {} but event_types lists {} (+1 padding)",
            config.model.num_event_types,
            config.event_types.len()
        )));
    }
    Ok(config)
}

pub type ItemTable = (Vocab, Vec<u64>, Vec<Vec<String>>);

pub fn read_items(path: &Path) -> Result<ItemTable, ArtifactError> {
    parse_items(path, &fs::read_to_string(path).map_err(|source| io(path, source))?)
}

fn parse_items(path: &Path, text: &str) -> Result<ItemTable, ArtifactError> {
    let bad = |line: usize, message: String| ArtifactError::Items {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, "index\titem_id\tcount\tcategories")) => {}
        _ => {
            return Err(bad(
                1,
                "expected header `index<TAB>item_id<TAB>count<TAB>categories`".into(),
            ))
        }
    }
    let (mut vocab, mut counts, mut categories) = (Vocab::new(), vec![0u64], vec![Vec::new()]);
    for (n, line) in lines {
        let line_no = n + 1;
        let fields: Vec<&str> = line.split('\t').collect();
        let [index, id, count, cats] = fields[..] else {
            return Err(bad(
                line_no,
                format!("expected 4 tab-separated fields, got {}", fields.len()),
            ));
        };
        if index.parse::<usize>() != Ok(vocab.len()) {
            return Err(bad(
                line_no,
                format!("index `{index}` out of order (expected {})", vocab.len()),
            ));
        }
        if id.is_empty() || vocab.get(id).is_some() {
            return Err(bad(line_no, format!("item id `{id}` is empty or repeated")));
        }
        vocab.insert(id);
        counts.push(
            count
                .parse()
                .map_err(|_| bad(line_no, format!("count `{count}` is not a non-negative integer")))?,
        );
        categories.push(cats.split('|').filter(|c| !c.is_empty()).map(str::to_owned).collect());
    }
    Ok((vocab, counts, categories))
}

/// Copies the file's tensors into the model, requiring exactly the names and shapes the config
/// implies, so a config/weights mismatch names the offending tensor instead of failing later.
fn load_weights(model: &SeqModel, path: &Path, bytes: &[u8]) -> Result<(), ArtifactError> {
    let torch = |source| ArtifactError::Torch {
        path: path.to_path_buf(),
        source,
    };
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        torch(tch::TchError::SafeTensorError {
            path: path.display().to_string(),
            err: e,
        })
    })?;
    let stored: HashMap<String, Tensor> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| Ok((name, Tensor::try_from(view).map_err(torch)?)))
        .collect::<Result<_, ArtifactError>>()?;
    copy_weights(&model.vs, stored).map_err(|(name, message)| ArtifactError::Tensor {
        path: path.to_path_buf(),
        name,
        message,
    })
}

/// Copies `stored` into the variables of `vs`, requiring exactly their names, shapes and dtypes;
/// a mismatch is `(tensor name, what is wrong)`, and what was copied before it stays copied.
pub fn copy_weights(vs: &tch::nn::VarStore, mut stored: HashMap<String, Tensor>) -> Result<(), (String, String)> {
    let mut variables = vs.variables();
    let mut names: Vec<String> = variables.keys().cloned().collect();
    names.sort();
    for name in names {
        let Some(value) = stored.remove(&name) else {
            return Err((name, "missing from the weights file".into()));
        };
        let var = variables.get_mut(&name).expect("listed above");
        if value.size() != var.size() {
            let message = format!("shape {:?} in file, config implies {:?}", value.size(), var.size());
            return Err((name, message));
        }
        if value.kind() != var.kind() {
            let message = format!("dtype {:?} in file, expected {:?}", value.kind(), var.kind());
            return Err((name, message));
        }
        tch::no_grad(|| var.copy_(&value));
    }
    if let Some(extra) = stored.keys().min() {
        return Err((
            extra.clone(),
            "in the weights file but not part of the configured model".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version hashed while loading is the hash of the three files' bytes, config first,
    /// weights last (what the versions of earlier builds were, so they do not change).
    #[test]
    fn loading_shows_each_files_bytes_once_in_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let mut pieces = Vec::new();
        Artifact::load_with(&dir, Device::Cpu, |bytes| pieces.push(bytes.to_vec())).unwrap();
        let files: Vec<Vec<u8>> = [CONFIG_FILE, ITEMS_FILE, WEIGHTS_FILE]
            .iter()
            .map(|f| fs::read(dir.join(f)).unwrap())
            .collect();
        assert_eq!(pieces, files);
        let mut hash = ContentHash::default();
        pieces.iter().for_each(|p| hash.update(p));
        assert_eq!(hash.finish(), content_hash(files.iter().flatten()));
    }

    /// An artifact whose config is a FIFO (nobody writing) is refused at once instead of
    /// blocking the loader (and a reload through the admin API) for good.
    #[test]
    fn a_fifo_in_the_artifacts_place_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        for file in [ITEMS_FILE, WEIGHTS_FILE] {
            fs::write(dir.path().join(file), b"").unwrap();
        }
        let fifo = std::ffi::CString::new(dir.path().join(CONFIG_FILE).to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let (sender, receiver) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let _ = sender.send(Artifact::load(&path, Device::Cpu).err().map(|e| e.to_string()));
        });
        let error = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the load blocked on the FIFO")
            .expect("the load failed");
        assert!(error.contains("config.json: not a regular file"), "{error}");
    }
}
