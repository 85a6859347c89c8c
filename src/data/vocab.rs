//! Dense indices for external string ids. Index 0 is reserved for padding.
use std::collections::HashMap;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vocab {
    ids: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    pub fn new() -> Self {
        Self {
            ids: vec![String::new()],
            index: HashMap::new(),
        }
    }

    /// Builds a vocabulary whose index `i + 1` is `ids[i]`.
    pub fn from_ids<I: IntoIterator<Item = String>>(ids: I) -> Self {
        let mut vocab = Self::new();
        for id in ids {
            vocab.insert(&id);
        }
        vocab
    }

    /// Returns the index of `id`, assigning the next free one when it is new.
    pub fn insert(&mut self, id: &str) -> u32 {
        if let Some(&idx) = self.index.get(id) {
            return idx;
        }
        let idx = self.ids.len() as u32;
        self.ids.push(id.to_owned());
        self.index.insert(id.to_owned(), idx);
        idx
    }

    pub fn get(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// External id of a dense index; the padding index has the empty id.
    pub fn id(&self, idx: u32) -> &str {
        &self.ids[idx as usize]
    }

    /// Table size including the padding row.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.len() == 1
    }

    /// External ids in index order, padding excluded.
    pub fn ids(&self) -> &[String] {
        &self.ids[1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_start_at_one_and_are_stable() {
        let mut v = Vocab::new();
        assert!(v.is_empty());
        assert_eq!(v.insert("a"), 1);
        assert_eq!(v.insert("b"), 2);
        assert_eq!(v.insert("a"), 1);
        assert_eq!(v.len(), 3);
        assert_eq!(v.id(2), "b");
        assert_eq!(v.get("c"), None);
        assert_eq!(Vocab::from_ids(v.ids().to_vec()), v);
    }
}
