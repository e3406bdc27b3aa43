//! What every loader shares: reading files with clear errors, bad-line accounting, label look-up.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{LoadOptions, Task};

/// Bad lines: an error at the first one, or (with `--skip-bad-lines`) a count and a warning at the end.
pub(crate) struct BadLines {
    skip: bool,
    count: usize,
    first: Option<String>,
}

impl BadLines {
    pub(crate) fn new(skip: bool) -> BadLines {
        BadLines {
            skip,
            count: 0,
            first: None,
        }
    }

    /// `at` is `FILE:LINE` or `FILE: entry N`.
    pub(crate) fn bad(&mut self, at: &str, what: &str) -> Result<()> {
        let message = format!("{at}: {what}");
        if !self.skip {
            bail!(
                "{message} (fix the line, or pass --skip-bad-lines to count and skip such lines)"
            );
        }
        self.count += 1;
        self.first.get_or_insert(message);
        Ok(())
    }

    pub(crate) fn finish(self, mut task: Task) -> Task {
        task.skipped_lines = self.count;
        if let Some(first) = self.first {
            eprintln!(
                "warning: {}: skipped {} bad line{} (the first: {first})",
                task.name,
                self.count,
                if self.count == 1 { "" } else { "s" }
            );
        }
        task
    }
}

/// The folder `--data` names for a task that needs one.
pub(crate) fn data_dir(task: &str, opts: &LoadOptions, expected: &str) -> Result<PathBuf> {
    let Some(dir) = &opts.data else {
        bail!("task {task} reads the user's data files: pass --data DIR, the folder with the {expected}");
    };
    if !dir.is_dir() {
        bail!(
            "--data {}: no such folder (task {task} expects a folder with the {expected})",
            dir.display()
        );
    }
    Ok(dir.clone())
}

/// A file opened for reading past a UTF-8 byte-order mark; `expected` says what should be there.
pub(crate) fn open(path: &Path, expected: &str) -> Result<BufReader<File>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: no such file ({expected})", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let start = reader
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if start.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    Ok(reader)
}

/// The non-blank lines of a file, read as they come (GLUE files run to hundreds of megabytes):
/// (1-based line number, the line without its ending, or `Err(())` where it is not UTF-8).
pub(crate) fn lines<'a>(
    path: &'a Path,
    mut reader: impl BufRead + 'a,
) -> impl Iterator<Item = Result<(usize, std::result::Result<String, ()>)>> + 'a {
    let mut n = 0;
    let mut buf = Vec::new();
    std::iter::from_fn(move || loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => {
                return Some(Err(e).with_context(|| format!("cannot read {}", at(path, n + 1))))
            }
        }
        n += 1;
        let raw = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match std::str::from_utf8(raw) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => return Some(Ok((n, Ok(line.to_string())))),
            Err(_) => return Some(Ok((n, Err(())))),
        }
    })
}

/// The JSON objects of a JSONL file, one a line, through `parse` (given the 1-based line number): a
/// line that is not UTF-8, not a JSON object, or that `parse` refuses is a bad line.
pub(crate) fn jsonl<T>(
    path: &Path,
    expected: &str,
    bad: &mut BadLines,
    mut parse: impl FnMut(usize, &Value) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let reader = open(path, expected)?;
    let mut out = Vec::new();
    for item in lines(path, reader) {
        let (n, line) = item?;
        let parsed = line
            .map_err(|()| NOT_UTF8.to_string())
            .and_then(|line| json_object(&line))
            .and_then(|obj| parse(n, &obj));
        match parsed {
            Ok(x) => out.push(x),
            Err(msg) => bad.bad(&at(path, n), &msg)?,
        }
    }
    Ok(out)
}

/// A CSV file (comma-separated, fields optionally in `"` quotes with quotes doubled inside them, which
/// may hold line breaks) read record by record, each with the 1-based line it starts on.
///
/// A stray quote at the start of a field opens a quoted field that the CSV parser, without an error,
/// runs on to the next quote in the file, or to the end of the file, taking the lines in between
/// with it. Such a record is a bad line: `FILE:LINE: unclosed quote starting here`, at the line of
/// the opening quote, where it reaches the end of the file, and where the quote that closes it is
/// followed by text (which well-formed CSV never has: a closing quote ends its field). An I/O error
/// is a hard error, never a bad line: the rest of the file could not be read.
pub(crate) struct CsvFile<'p, R = BufReader<File>> {
    path: &'p Path,
    reader: csv::Reader<CsvWatch<R>>,
}

/// The message for a record that a stray quote runs on past its line.
const UNCLOSED_QUOTE: &str = "unclosed quote starting here";

/// A record as [`CsvFile`] reads it: its line, or a bad line's place and message.
enum Record {
    Line(usize),
    Bad(usize, String),
}

impl<'p> CsvFile<'p> {
    pub(crate) fn open(path: &'p Path, expected: &str) -> Result<CsvFile<'p>> {
        Ok(CsvFile::from_reader(path, open(path, expected)?))
    }
}

impl<'p, R: Read> CsvFile<'p, R> {
    /// `reader` reads `path`, past any byte-order mark.
    fn from_reader(path: &'p Path, reader: R) -> CsvFile<'p, R> {
        let reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(CsvWatch::new(reader));
        CsvFile { path, reader }
    }

    fn next(&mut self, record: &mut csv::ByteRecord) -> Result<Option<Record>> {
        match self.reader.read_byte_record(record) {
            Ok(false) => Ok(None),
            Ok(true) => {
                let Some(start) = self.reader.get_mut().starts.pop_front() else {
                    let line = record.position().map_or(1, |p| p.line() as usize);
                    return Ok(Some(Record::Line(line)));
                };
                Ok(Some(match start.quote {
                    None => Record::Line(start.line),
                    Some(QuoteTrouble::AtEnd { open }) => Record::Bad(
                        open,
                        format!("{UNCLOSED_QUOTE} (it runs to the end of the file)"),
                    ),
                    Some(QuoteTrouble::TextAfter { open, close }) if open == close => Record::Bad(
                        open,
                        "text after the closing quote of a field (quote a whole field, doubling \
                         the quotes inside it: \"say \"\"hi\"\"\")"
                            .into(),
                    ),
                    Some(QuoteTrouble::TextAfter { open, close }) => Record::Bad(
                        open,
                        format!(
                            "{UNCLOSED_QUOTE} (it runs on to the quote on line {close}, which is \
                             followed by text)"
                        ),
                    ),
                }))
            }
            // With flexible records read as bytes, the reader's only error is an I/O error.
            Err(e) => {
                let line = self.reader.get_ref().line;
                Err(e).with_context(|| format!("cannot read {}", at(self.path, line)))
            }
        }
    }

    /// The first record, as a header: its line and its trimmed, lower-case column names. A file
    /// without one, or whose header is a bad line, is an error.
    pub(crate) fn header(&mut self) -> Result<(usize, Vec<String>)> {
        let mut record = csv::ByteRecord::new();
        match self.next(&mut record)? {
            None => bail!(
                "{}: empty file (expected a header line)",
                self.path.display()
            ),
            Some(Record::Bad(line, what)) => bail!("{}: {what}", at(self.path, line)),
            Some(Record::Line(line)) => Ok((
                line,
                record
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).trim().to_lowercase())
                    .collect(),
            )),
        }
    }

    /// The remaining records through `row` (given the record's line): records of blank fields only
    /// are passed over, and a record `row` refuses is a bad line.
    pub(crate) fn records<T>(
        mut self,
        bad: &mut BadLines,
        mut row: impl FnMut(usize, &csv::ByteRecord) -> std::result::Result<T, String>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut record = csv::ByteRecord::new();
        while let Some(next) = self.next(&mut record)? {
            let line = match next {
                Record::Line(line) => line,
                Record::Bad(line, what) => {
                    bad.bad(&at(self.path, line), &what)?;
                    continue;
                }
            };
            if record.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
                continue;
            }
            match row(line, &record) {
                Ok(x) => out.push(x),
                Err(msg) => bad.bad(&at(self.path, line), &msg)?,
            }
        }
        Ok(out)
    }
}

/// A reader that follows the CSV bytes passing through it as the `csv` parser (default settings)
/// splits them: a record starts at the first byte that is not a line break, a field that starts with
/// `"` is quoted up to a `"` that is not doubled, a `"` anywhere else is text. It knows the line each
/// record starts on (the parser's own position is where the previous record ended, before any blank
/// lines) and the quoting trouble in it, which the parser passes over in silence.
struct CsvWatch<R> {
    inner: R,
    state: Quoting,
    /// 1-based line of the next byte.
    line: usize,
    /// The records seen here but not yet returned by the parser, which reads ahead.
    starts: VecDeque<RecordSeen>,
    /// The line of the last opening quote.
    quote_line: usize,
    eof: bool,
}

struct RecordSeen {
    line: usize,
    quote: Option<QuoteTrouble>,
}

/// Lines of the opening quote and of the quote that closes it.
enum QuoteTrouble {
    /// Still open at the end of the file.
    AtEnd { open: usize },
    /// The closing quote is followed by text, not by a comma or the end of the line.
    TextAfter { open: usize, close: usize },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    RecordStart,
    FieldStart,
    Unquoted,
    Quoted,
    /// A `"` inside a quoted field: the end of the quotes, or the first of a doubled `""`.
    QuoteInQuoted,
}

impl<R> CsvWatch<R> {
    fn new(inner: R) -> CsvWatch<R> {
        CsvWatch {
            inner,
            state: Quoting::RecordStart,
            line: 1,
            starts: VecDeque::new(),
            quote_line: 0,
            eof: false,
        }
    }

    fn trouble(&mut self, trouble: QuoteTrouble) {
        if let Some(start) = self.starts.back_mut() {
            start.quote.get_or_insert(trouble);
        }
    }

    fn watch(&mut self, bytes: &[u8]) {
        use Quoting::*;
        for &b in bytes {
            let line_break = b == b'\n' || b == b'\r';
            if self.state == RecordStart && !line_break {
                self.starts.push_back(RecordSeen {
                    line: self.line,
                    quote: None,
                });
                self.state = FieldStart;
            }
            self.state = match (self.state, b) {
                (RecordStart, _) => RecordStart,
                (FieldStart, b'"') => {
                    self.quote_line = self.line;
                    Quoted
                }
                (Quoted, b'"') => QuoteInQuoted,
                (Quoted, _) => Quoted,
                (QuoteInQuoted, b'"') => Quoted,
                (_, b',') => FieldStart,
                _ if line_break => RecordStart,
                (QuoteInQuoted, _) => {
                    self.trouble(QuoteTrouble::TextAfter {
                        open: self.quote_line,
                        close: self.line,
                    });
                    Unquoted
                }
                _ => Unquoted,
            };
            if b == b'\n' {
                self.line += 1;
            }
        }
    }
}

impl<R: Read> Read for CsvWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.eof {
            self.eof = true;
            if self.state == Quoting::Quoted {
                let open = self.quote_line;
                if let Some(start) = self.starts.back_mut() {
                    // The more telling of the two: the quote never closes.
                    start.quote = Some(QuoteTrouble::AtEnd { open });
                }
            }
        }
        self.watch(&buf[..n]);
        Ok(n)
    }
}

/// The message for a line that is not UTF-8.
pub(crate) const NOT_UTF8: &str = "not valid UTF-8 text";

/// `FILE:LINE`.
pub(crate) fn at(path: &Path, line: usize) -> String {
    format!("{}:{line}", path.display())
}

/// The label id of `raw` among `accepted` (the values as they appear in the file), or the message of
/// an unknown-label error.
pub(crate) fn label_id(raw: &str, accepted: &[&str]) -> std::result::Result<u32, String> {
    accepted
        .iter()
        .position(|a| *a == raw)
        .map(|i| i as u32)
        .ok_or_else(|| format!("unknown label '{raw}' (expected {})", accepted.join(", ")))
}

/// A JSON scalar as the text a label is matched on: strings as they are, numbers and booleans as JSON
/// writes them.
pub(crate) fn json_label(v: &Value) -> std::result::Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Err("the label is null".into()),
        other => Err(format!("the label is not a string or a number: {other}")),
    }
}

/// A string field of a JSON object, trimmed; missing, non-string and empty fields are errors.
pub(crate) fn json_text<'v>(obj: &'v Value, key: &str) -> std::result::Result<&'v str, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("missing field '{key}'")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("empty field '{key}'")),
        Some(Value::String(s)) => Ok(s.trim()),
        Some(other) => Err(format!("field '{key}' is not a string: {other}")),
    }
}

/// A line of a JSONL file as an object.
pub(crate) fn json_object(line: &str) -> std::result::Result<Value, String> {
    match serde_json::from_str::<Value>(line) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not valid JSON ({e})")),
    }
}

/// One line of task text from `field: value` pairs (the RetriKT paper's Appendix B form), e.g.
/// `sentence1: … sentence2: …`. Values are trimmed, and line breaks inside a value become spaces.
pub(crate) fn render(parts: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (field, value) in parts {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(field);
        out.push_str(": ");
        push_one_line(&mut out, value.trim());
    }
    out
}

fn push_one_line(out: &mut String, value: &str) {
    if !value.contains(['\n', '\r']) {
        out.push_str(value);
        return;
    }
    let pieces = value
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|p| !p.is_empty());
    for (i, piece) in pieces.enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (line, fields) of each record, through a reader that hands out `chunk` bytes at a time.
    /// A record as the tests see it: its line and its fields.
    type Row = (usize, Vec<String>);

    fn records(text: &str, chunk: usize, skip: bool) -> (Result<Vec<Row>>, usize) {
        let reader = Chunked {
            bytes: text.as_bytes().to_vec(),
            at: 0,
            chunk,
            fail_at: None,
        };
        let mut bad = BadLines::new(skip);
        let got = CsvFile::from_reader(Path::new("f.csv"), reader).records(&mut bad, |line, r| {
            Ok((
                line,
                r.iter()
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect(),
            ))
        });
        (got, bad.count)
    }

    /// Reads `chunk` bytes at a time; fails once `fail_at` bytes have been read.
    struct Chunked {
        bytes: Vec<u8>,
        at: usize,
        chunk: usize,
        fail_at: Option<usize>,
    }

    impl Read for Chunked {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.fail_at.is_some_and(|f| self.at >= f) {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = self.chunk.min(buf.len()).min(self.bytes.len() - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn row(line: usize, fields: &[&str]) -> Row {
        (line, fields.iter().map(|f| f.to_string()).collect())
    }

    #[test]
    fn csv_records_carry_the_line_they_start_on() {
        let text = "a,b\n\n\nc,\"two\nlines\"\nd,\"say \"\"hi\"\"\"\r\n\r\ne,x\"y\r\nf,g";
        let want = vec![
            row(1, &["a", "b"]),
            row(4, &["c", "two\nlines"]),
            row(6, &["d", "say \"hi\""]),
            row(8, &["e", "x\"y"]),
            row(9, &["f", "g"]),
        ];
        for chunk in [1, 2, 3, 7, 1 << 16] {
            let (got, skipped) = records(text, chunk, false);
            assert_eq!(got.unwrap(), want, "chunk {chunk}");
            assert_eq!(skipped, 0);
        }
    }

    #[test]
    fn an_unclosed_quote_is_a_bad_line_not_the_rest_of_the_file() {
        // The quote on line 3 is never closed: the parser would make lines 3 to 6 one field.
        let text = "a,1\nb,2\nc,\"oops,3\nd,4\ne,5\nf,6\n";
        for chunk in [1, 5, 1 << 16] {
            let (got, _) = records(text, chunk, false);
            let err = got.unwrap_err().to_string();
            assert!(
                err.starts_with(
                    "f.csv:3: unclosed quote starting here (it runs to the end of the file)"
                ),
                "{err}"
            );
            let (got, skipped) = records(text, chunk, true);
            assert_eq!(got.unwrap(), [row(1, &["a", "1"]), row(2, &["b", "2"])]);
            assert_eq!(skipped, 1);
        }
        // Closed by the opening quote of a later field: lines 3 to 5 would be one field.
        let text = "a,1\nb,2\nc,\"oops,3\nd,4\n\"e\",5\nf,6\n";
        for chunk in [1, 5, 1 << 16] {
            let (got, _) = records(text, chunk, false);
            let err = got.unwrap_err().to_string();
            assert!(
                err.starts_with(
                    "f.csv:3: unclosed quote starting here (it runs on to the quote on line 5"
                ),
                "{err}"
            );
            let (got, skipped) = records(text, chunk, true);
            let want = [
                row(1, &["a", "1"]),
                row(2, &["b", "2"]),
                row(6, &["f", "6"]),
            ];
            assert_eq!(got.unwrap(), want);
            assert_eq!(skipped, 1);
        }
        let (got, _) = records("a,1\n\"b\"x,2\n", 1 << 16, false);
        let err = got.unwrap_err().to_string();
        assert!(
            err.starts_with("f.csv:2: text after the closing quote of a field"),
            "{err}"
        );
        // Closed at the very end, or a quote inside an unquoted field: no error.
        let (got, _) = records("a,\"1\nx\"", 1 << 16, false);
        assert_eq!(got.unwrap(), [row(1, &["a", "1\nx"])]);
        let (got, _) = records("a,5\" screen\n", 1 << 16, false);
        assert_eq!(got.unwrap(), [row(1, &["a", "5\" screen"])]);
        // The opening quote's line, not the record's.
        let (got, _) = records("\"x\ny\",\"z\n", 1 << 16, false);
        let err = got.unwrap_err().to_string();
        assert!(err.starts_with("f.csv:2: unclosed quote"), "{err}");
    }

    #[test]
    fn a_read_error_is_never_a_skipped_line() {
        // The line is where reading stopped: within line 2 in 3-byte reads, at the end otherwise.
        for (chunk, line) in [(3, 2), (1 << 16, 4)] {
            let reader = Chunked {
                bytes: b"a,1\nb,2\nc,3\n".to_vec(),
                at: 0,
                chunk,
                fail_at: Some(5),
            };
            let mut bad = BadLines::new(true);
            let err = CsvFile::from_reader(Path::new("f.csv"), reader)
                .records(&mut bad, |_, _| Ok(()))
                .unwrap_err();
            let err = format!("{err:#}");
            assert_eq!(err, format!("cannot read f.csv:{line}: disk on fire"));
            assert_eq!(bad.count, 0);
        }
    }

    #[test]
    fn a_header_in_an_unclosed_quote_is_an_error() {
        let mut file = CsvFile::from_reader(Path::new("f.csv"), &b"\"text,label\nhi,1\n"[..]);
        let err = file.header().unwrap_err().to_string();
        assert_eq!(
            err,
            "f.csv:1: unclosed quote starting here (it runs to the end of the file)"
        );
        let mut file = CsvFile::from_reader(Path::new("f.csv"), &b"\n\n"[..]);
        assert!(file
            .header()
            .unwrap_err()
            .to_string()
            .contains("empty file"));
        // After blank lines, the header's own line.
        let mut file = CsvFile::from_reader(Path::new("f.csv"), &b"\r\n\nText , label\nhi,1\n"[..]);
        let (line, names) = file.header().unwrap();
        assert_eq!((line, names), (3, vec!["text".to_string(), "label".into()]));
    }
}
