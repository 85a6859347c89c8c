//! Files that a kill or a power cut leaves whole or absent, never half written: the checkpoints
//! and artifacts of a training, the datasets a fetch unpacks. The history journal keeps its own
//! engine (fjall) and only shares [`sync_dir`].
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Writes `path` through `write` under a temporary name (`path` + `.part`), flushes it to disk and
/// renames it into place; if `write` fails the temporary file is removed and `path` is untouched.
/// `write` gets the temporary path; `io_error` names the failing path in
/// the caller's error type. The rename is durable once the caller syncs the directory
/// ([`sync_dir`]), which it does after the last file of a set.
pub fn replace<E>(
    path: &Path,
    io_error: impl Fn(&Path, io::Error) -> E,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let partial = partial_path(path);
    if let Err(error) = write(&partial) {
        // Best effort: a leftover is harmless (the next write replaces it) but untidy.
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| io_error(path, e))
}

/// Flushes `dir`'s entries (new names, renames, removals) to disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

fn partial_path(path: &Path) -> PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".part");
    PathBuf::from(partial)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_error(path: &Path, e: io::Error) -> String {
        format!("{}: {e}", path.display())
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_partial_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        std::fs::write(&path, "old").unwrap();
        let failed = replace(&path, io_error, |partial| {
            std::fs::write(partial, "half").unwrap();
            Err("disk full".to_owned())
        });
        assert_eq!(failed, Err("disk full".to_owned()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert!(!partial_path(&path).exists());

        replace(&path, io_error, |partial| {
            std::fs::write(partial, "new").map_err(|e| io_error(partial, e))
        })
        .unwrap();
        sync_dir(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["model.json"]);
    }

    #[test]
    fn a_write_that_makes_no_file_is_an_error_naming_the_temporary_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        let error = replace(&path, io_error, |_| Ok::<(), String>(())).unwrap_err();
        assert!(error.contains("weights.safetensors.part"), "{error}");
        assert!(!path.exists());
    }
}
