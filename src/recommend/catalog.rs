//! What the core knows about items without asking the model: ids, types, categories, and the
//! popularity ranking that answers for users the model cannot read.
use std::collections::HashSet;
use std::sync::Arc;

use crate::data::formats::category_names;
use crate::data::vocab::Vocab;
use crate::history::{LoggedEvent, StoredEvent};
use crate::model::Artifact;

pub struct Catalog {
    pub items: Vocab,
    /// External id per item index, shared with stored events.
    pub item_ids: Vec<Arc<str>>,
    pub event_types: Vocab,
    /// External id per event-type index, shared with stored events.
    pub event_type_ids: Vec<Arc<str>>,
    /// Item indices by descending training popularity (the fallback ranking).
    pub popular: Vec<u32>,
    pub item_counts: Vec<u64>,
    /// Category names; the inference worker's category index `c` is `categories[c]`.
    pub categories: Vec<String>,
    /// Category mass of the popularity distribution, largest first (the interests fallback).
    pub popular_interests: Vec<(usize, f32)>,
}

impl Catalog {
    pub fn new(artifact: &Artifact) -> Self {
        let shared = |vocab: &Vocab| -> Vec<Arc<str>> {
            std::iter::once("")
                .chain(vocab.ids().iter().map(String::as_str))
                .map(Arc::from)
                .collect()
        };
        let mut popular: Vec<u32> = (1..artifact.items.len() as u32).collect();
        popular.sort_by(|&a, &b| popularity_order(&artifact.item_counts, a, b));
        let categories = category_names(&artifact.item_categories);
        let total: u64 = artifact.item_counts.iter().sum();
        let mut mass = vec![0f32; categories.len()];
        for (item, item_categories) in artifact.item_categories.iter().enumerate() {
            for category in item_categories {
                let c = categories.binary_search(category).expect("listed");
                mass[c] += artifact.item_counts[item] as f32 / total.max(1) as f32 / item_categories.len() as f32;
            }
        }
        let mut popular_interests: Vec<(usize, f32)> = mass.into_iter().enumerate().collect();
        popular_interests.sort_by(|a, b| b.1.total_cmp(&a.1));
        Self {
            item_ids: shared(&artifact.items),
            items: artifact.items.clone(),
            event_type_ids: shared(&artifact.event_types),
            event_types: artifact.event_types.clone(),
            popular,
            item_counts: artifact.item_counts.clone(),
            categories,
            popular_interests,
        }
    }

    /// A known item's index and the catalog's shared copy of its id; `None` for an item the model
    /// does not know.
    pub fn known_item(&self, item_id: &str) -> Option<(u32, Arc<str>)> {
        let index = self.items.get(item_id)?;
        Some((index, self.item_ids[index as usize].clone()))
    }

    /// The memory form of an event given by external ids. Items the model does not know get
    /// index 0 (kept, not model input); types it never saw read as "untyped" (1), as offline.
    pub fn resolve(&self, item_id: &str, event_type: Option<&str>) -> StoredEvent {
        self.resolve_typed(item_id, event_type.and_then(|t| self.event_types.get(t)))
    }

    /// [`Catalog::resolve`] with the type already looked up: `known_type` is its index in
    /// [`Catalog::event_types`], `None` for no type or one the model never saw.
    pub fn resolve_typed(&self, item_id: &str, known_type: Option<u32>) -> StoredEvent {
        let (item, item_id) = self.known_item(item_id).unwrap_or_else(|| (0, Arc::from(item_id)));
        StoredEvent {
            item,
            item_id,
            timestamp: 0,
            event_type: known_type.unwrap_or(1),
        }
    }

    pub fn resolve_logged(&self, logged: &LoggedEvent) -> StoredEvent {
        StoredEvent {
            timestamp: logged.timestamp,
            ..self.resolve(&logged.item_id, logged.event_type.as_deref())
        }
    }

    /// The popularity ranking (score = training count) of `candidates`, or of the whole catalogue
    /// without `seen`.
    pub fn popular_items(&self, k: usize, candidates: Option<&[i64]>, seen: &HashSet<u32>) -> Vec<(u32, f32)> {
        let count = |item: u32| self.item_counts[item as usize] as f32;
        match candidates {
            Some(candidates) => {
                let mut ranked: Vec<u32> = candidates.iter().map(|&i| i as u32).collect();
                ranked.sort_by(|&a, &b| popularity_order(&self.item_counts, a, b));
                ranked.into_iter().take(k).map(|i| (i, count(i))).collect()
            }
            None => self
                .popular
                .iter()
                .filter(|i| !seen.contains(i))
                .take(k)
                .map(|&i| (i, count(i)))
                .collect(),
        }
    }
}

/// The popularity ranking's order: more training events first, ties by index.
fn popularity_order(counts: &[u64], a: u32, b: u32) -> std::cmp::Ordering {
    counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b))
}
