//! The default model, built into the binary: `xsrec serve` (and every command that takes
//! `--model models/default`) works from any directory, and a container needs no model files.
//! The committed `models/default` is under 1 MB, so carrying it costs the binary about that.
use std::path::{Path, PathBuf};

use super::artifact::{content_hash, ArtifactError, CONFIG_FILE, ITEMS_FILE, WEIGHTS_FILE};

/// The path that names the built-in model when nothing is there on disk.
pub const DEFAULT_MODEL_DIR: &str = "models/default";

const FILES: [(&str, &[u8]); 3] = [
    (CONFIG_FILE, include_bytes!("../../models/default/config.json")),
    (ITEMS_FILE, include_bytes!("../../models/default/items.tsv")),
    (WEIGHTS_FILE, include_bytes!("../../models/default/model.safetensors")),
];

/// Where to load `dir` from: `dir` itself when it exists, or — for the default path, missing
/// from this working directory — the built-in copy, unpacked once into the temporary directory
/// (named by a hash of its bytes, so that two builds never share a copy).
pub fn resolve(dir: &Path) -> Result<PathBuf, ArtifactError> {
    match dir.exists() || dir != Path::new(DEFAULT_MODEL_DIR) {
        true => Ok(dir.to_path_buf()),
        false => unpacked(),
    }
}

/// The built-in model's files in the temporary directory, written there if missing.
fn unpacked() -> Result<PathBuf, ArtifactError> {
    let hash = content_hash(FILES.iter().flat_map(|(_, bytes)| bytes.iter()));
    let unpacked = std::env::temp_dir().join(format!("xsrec-default-model-{hash:016x}"));
    let io = |path: &Path, source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !unpacked.join(WEIGHTS_FILE).exists() {
        // Written beside and renamed into place, so that a concurrent start never reads half.
        let staging = unpacked.with_extension(format!("partial-{}", std::process::id()));
        std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
        for (name, bytes) in FILES {
            std::fs::write(staging.join(name), bytes).map_err(|e| io(&staging.join(name), e))?;
        }
        if let Err(error) = std::fs::rename(&staging, &unpacked) {
            // Another process won the race: its copy is the same bytes.
            let _ = std::fs::remove_dir_all(&staging);
            if !unpacked.join(WEIGHTS_FILE).exists() {
                return Err(io(&unpacked, error));
            }
        }
    }
    Ok(unpacked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_model_unpacks_to_the_committed_one_and_other_paths_are_left_alone() {
        let missing = Path::new("no/such/model");
        assert_eq!(resolve(missing).unwrap(), missing);
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL_DIR);
        assert_eq!(resolve(&here).unwrap(), here);
        let copy = unpacked().unwrap();
        assert_eq!(unpacked().unwrap(), copy, "unpacked once");
        for (name, _) in FILES {
            assert_eq!(
                std::fs::read(copy.join(name)).unwrap(),
                std::fs::read(here.join(name)).unwrap(),
                "{name}"
            );
        }
        let artifact = super::super::Artifact::load(&copy, tch::Device::Cpu).unwrap();
        assert_eq!(
            artifact.items.len(),
            super::super::Artifact::load(&here, tch::Device::Cpu)
                .unwrap()
                .items
                .len()
        );
    }
}
