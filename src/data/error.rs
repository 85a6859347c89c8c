//! Errors of the data layer. Every variant names the file it is about, so a message printed at the
//! top of the program is enough to find and fix the offending input.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A line of an input file that cannot be read as the format says. `line` is 1-based and
    /// counts the header line, so it matches what an editor shows.
    #[error("{}:{line}: {message}", path.display())]
    BadRow {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "{}: unknown file format (supported: RecBole *.inter, MovieLens u.data *.data, \
         MovieLens ratings.dat *.dat, *.csv, *.tsv)",
        path.display()
    )]
    UnknownFormat { path: PathBuf },
    /// An event that cannot be written without changing its meaning when read back.
    /// `index` is 0-based in the slice given to the writer.
    #[error("{}: event {index}: {message}", path.display())]
    BadEvent {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("fetch failed: {0}")]
    Fetch(String),
}

/// For `map_err`: attaches the path an I/O error happened on.
pub(crate) fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_row_shows_path_and_line() {
        let e = DataError::BadRow {
            path: "data/x.csv".into(),
            line: 7,
            message: "empty user_id".into(),
        };
        assert_eq!(e.to_string(), "data/x.csv:7: empty user_id");
    }

    #[test]
    fn io_keeps_source_and_path() {
        let e = io_at(Path::new("a/b.inter"))(std::io::Error::new(std::io::ErrorKind::NotFound, "gone"));
        assert_eq!(e.to_string(), "a/b.inter: gone");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn unknown_format_lists_supported_formats() {
        let e = DataError::UnknownFormat { path: "x.json".into() };
        let text = e.to_string();
        assert!(text.starts_with("x.json: unknown file format"), "{text}");
        for ext in ["*.inter", "*.data", "*.dat", "*.csv", "*.tsv"] {
            assert!(text.contains(ext), "{text} lacks {ext}");
        }
    }
}
