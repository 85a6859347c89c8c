//! The model the core serves, and how a new one takes its place while serving (hot reload).
//!
//! A request reads the served model once, at its start, together with the user's history, and
//! keeps that [`ServedModel`] to the end: its item indices, its engine slot (the worker keeps the
//! weights while any request holds the slot) and the version in its response all come from one
//! model. A reload loads and warms the new model beside the old one and hands it to the worker;
//! then, with requests held off for that moment, it re-resolves the items of every history in
//! memory by their external ids for the new vocabulary (new items become recommendable, retired
//! ones read as unknown) and makes the new model the one requests read.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::Device;

use super::error::quote;
use super::types::ModelInfo;
use super::Catalog;
use crate::data::formats::{item_categories, ItemMeta};
use crate::infer::ModelSlot;
use crate::model::artifact::ContentHash;
use crate::model::{Artifact, Precision};

pub struct ServedModel {
    /// Hash of the weights file: what responses and metrics call the model.
    pub version: String,
    /// `config.json` of the model.
    pub config: serde_json::Value,
    pub catalog: Arc<Catalog>,
    /// The directory it was loaded from (a reload without a path reads it again).
    pub dir: PathBuf,
    pub slot: Arc<ModelSlot>,
}

/// How a reload's item vocabulary relates to the served one's (for the log).
pub fn vocabulary_change(served: &Catalog, next: &Catalog) -> String {
    let kept = served.item_ids[1..]
        .iter()
        .filter(|id| next.items.get(id).is_some())
        .count();
    format!(
        "{kept} items kept, {} new, {} retired",
        next.item_ids.len() - 1 - kept,
        served.item_ids.len() - 1 - kept
    )
}

impl ServedModel {
    /// What `GET /v1/model` shows.
    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            version: self.version.clone(),
            config: self.config.clone(),
        }
    }
}

/// Why a model could not replace the served one; the served one goes on serving.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReloadError {
    #[error("loading the model from {dir}: {reason}")]
    Load { dir: String, reason: String },
    /// Memory holds event types as the served model's type indices, so a model must number
    /// them the same way (items are mapped by id).
    #[error("the model in {dir} cannot replace the served one: {reason}")]
    Incompatible { dir: String, reason: String },
}

/// Turns a model directory into an artifact the same way for the first model and every reload.
#[derive(Clone)]
pub struct ModelLoader {
    pub device: Device,
    pub precision: Precision,
    /// `--item-meta`, read once: categories for every model loaded.
    pub item_meta: Option<Arc<HashMap<String, ItemMeta>>>,
}

impl ModelLoader {
    /// The artifact in `dir` and its version: a hash of its three files, so the same bytes give
    /// the same version on every machine, and the same weights with another item list (the
    /// item ids the rows stand for) or configuration are another version.
    pub fn load(&self, dir: &Path) -> Result<(Artifact, String), ReloadError> {
        // Quoted, bounded: the directory may come from a client.
        let failed = |reason: String| ReloadError::Load {
            dir: quote(&dir.display().to_string()),
            reason: quote(&reason),
        };
        let dir = crate::model::builtin::resolve(dir).map_err(|e| failed(e.to_string()))?;
        let mut hash = ContentHash::default();
        let mut artifact =
            Artifact::load_with(&dir, self.device, |bytes| hash.update(bytes)).map_err(|e| failed(e.to_string()))?;
        let version = format!("{:016x}", hash.finish());
        artifact.model.set_precision(self.precision);
        if let Some(meta) = &self.item_meta {
            artifact.item_categories = item_categories(&artifact.items, Some(meta));
        }
        Ok((artifact, version))
    }
}

/// Whether `next` can serve the histories memory holds for `served`: the same event types, id
/// for id (items differ freely: they are mapped by id).
pub fn check_compatible(served: &Catalog, next: &Catalog, dir: &Path) -> Result<(), ReloadError> {
    let differ = |what: &str, served: &[Arc<str>], next: &[Arc<str>]| {
        let first = served.iter().zip(next).position(|(a, b)| a != b);
        let reason = match first {
            Some(i) => format!(
                "its {what} vocabulary differs from the served model's at index {i} (`{}` vs `{}`)",
                quote(&next[i]),
                quote(&served[i])
            ),
            None => format!(
                "its {what} vocabulary has {} entries, the served model's {}",
                next.len() - 1,
                served.len() - 1
            ),
        };
        ReloadError::Incompatible {
            dir: quote(&dir.display().to_string()),
            reason: format!("{reason}; retrain with the same event types, or restart the server with the new model (a --data-dir keeps the histories)"),
        }
    };
    if served.event_type_ids != next.event_type_ids {
        return Err(differ("event type", &served.event_type_ids, &next.event_type_ids));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::artifact::{CONFIG_FILE, ITEMS_FILE, WEIGHTS_FILE};

    /// The version names the model's answers: the same files give the same version, and the same
    /// weights with the item ids swapped (other items behind the same rows) give another one.
    #[test]
    fn the_version_covers_the_item_list_as_well_as_the_weights() {
        let loader = ModelLoader {
            device: Device::Cpu,
            precision: Precision::Fp32,
            item_meta: None,
        };
        let served = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let copy = tempfile::tempdir().unwrap();
        for file in [CONFIG_FILE, ITEMS_FILE, WEIGHTS_FILE] {
            std::fs::copy(served.join(file), copy.path().join(file)).unwrap();
        }
        let (_, original) = loader.load(&served).unwrap();
        assert_eq!(
            loader.load(copy.path()).unwrap().1,
            original,
            "same bytes, same version"
        );
        let items = std::fs::read_to_string(copy.path().join(ITEMS_FILE)).unwrap();
        let mut lines: Vec<String> = items.lines().map(str::to_owned).collect();
        let (first, second) = (lines[1].clone(), lines[2].clone());
        let id = |line: &str| line.split('\t').nth(1).unwrap().to_owned();
        lines[1] = first.replacen(&id(&first), &id(&second), 1);
        lines[2] = second.replacen(&id(&second), &id(&first), 1);
        std::fs::write(copy.path().join(ITEMS_FILE), lines.join("\n") + "\n").unwrap();
        assert_ne!(loader.load(copy.path()).unwrap().1, original, "two items swapped");
    }
}
