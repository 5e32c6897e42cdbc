//! Transaction files: CSV with a header or JSON Lines, optionally gzipped.

use super::transaction::{FieldError, Transaction};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc;
use std::thread;

/// A row that could not be read, with where it was.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("line {line}: {source}")]
    Row { line: u64, source: FieldError },
    #[error("line {line}: {reason}")]
    Format { line: u64, reason: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    pub fn line(&self) -> Option<u64> {
        match self {
            ReadError::Row { line, .. } | ReadError::Format { line, .. } => Some(*line),
            ReadError::Io(_) => None,
        }
    }
}

/// Opens a file, transparently gunzipping it. Decompression runs on its own
/// thread so that it overlaps parsing and scoring on the other core.
pub fn open_decoded(path: &Path) -> io::Result<Box<dyn Read + Send>> {
    let mut file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    let head = io::Cursor::new(magic[..n].to_vec()).chain(file);
    if n == 2 && magic == [0x1f, 0x8b] {
        let gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, head));
        Ok(Box::new(Prefetch::spawn(gz)))
    } else {
        Ok(Box::new(head))
    }
}

/// Reads ahead on a background thread in 1 MiB chunks through a bounded
/// channel. Read chunks go back to the thread to be filled again: fresh
/// ones would cost the kernel a page fault and a zeroed page every 4 kB.
pub struct Prefetch {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    spent: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

const PREFETCH_CHUNK: usize = 1 << 20;

impl Prefetch {
    pub fn spawn<R: Read + Send + 'static>(mut inner: R) -> Prefetch {
        let (tx, rx) = mpsc::sync_channel(4);
        let (spent, recycled) = mpsc::channel::<Vec<u8>>();
        thread::spawn(move || {
            loop {
                let mut chunk = recycled
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(PREFETCH_CHUNK));
                chunk.resize(PREFETCH_CHUNK, 0);
                let mut filled = 0;
                while filled < chunk.len() {
                    match inner.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                chunk.truncate(filled);
                let done = filled == 0;
                if tx.send(Ok(chunk)).is_err() || done {
                    return;
                }
            }
        });
        Prefetch {
            rx,
            spent,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for Prefetch {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    let spent = std::mem::replace(&mut self.buf, chunk);
                    // The reader may have finished; then the chunk is just freed.
                    let _ = self.spent.send(spent);
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Column positions of the schema's fields in a CSV header.
#[derive(Debug, Clone)]
struct Columns {
    id: usize,
    timestamp: usize,
    card: usize,
    merchant: usize,
    amount: usize,
    optional: Vec<(usize, Setter)>,
    /// Columns named `attributes.NAME`.
    attributes: Vec<(usize, String)>,
}

type Setter = fn(&mut Transaction, &[u8]) -> Result<(), FieldError>;

impl Columns {
    fn from_header(header: &Record) -> Result<Columns, ReadError> {
        let find = |name: &str| {
            (0..header.len()).position(|i| {
                header
                    .get(i)
                    .trim_ascii()
                    .eq_ignore_ascii_case(name.as_bytes())
            })
        };
        let need = |name: &'static str| {
            find(name).ok_or_else(|| ReadError::Row {
                line: 1,
                source: FieldError::new(name, "required column is missing from the header"),
            })
        };
        let optional_fields: [(&str, Setter); 7] = [
            ("currency", Transaction::set_currency),
            ("mcc", Transaction::set_mcc),
            ("country", Transaction::set_country),
            ("channel", Transaction::set_channel),
            ("lat", Transaction::set_lat),
            ("lon", Transaction::set_lon),
            ("is_fraud", Transaction::set_label),
        ];
        Ok(Columns {
            id: need("transaction_id")?,
            timestamp: need("timestamp")?,
            card: need("card_id")?,
            merchant: need("merchant_id")?,
            amount: need("amount")?,
            optional: optional_fields
                .into_iter()
                .filter_map(|(name, set)| find(name).map(|i| (i, set)))
                .collect(),
            attributes: (0..header.len())
                .filter_map(|i| {
                    let name = std::str::from_utf8(header.get(i).trim_ascii()).ok()?;
                    let key = name.strip_prefix("attributes.")?;
                    Some((i, key.to_string()))
                })
                .collect(),
        })
    }

    fn fill(&self, rec: &Record, tx: &mut Transaction) -> Result<(), FieldError> {
        let field = |i: usize| rec.get(i);
        tx.set_id(field(self.id))?;
        tx.set_timestamp(field(self.timestamp))?;
        tx.set_card(field(self.card))?;
        tx.set_merchant(field(self.merchant))?;
        tx.set_amount(field(self.amount))?;
        tx.reset_optional();
        for (i, set) in &self.optional {
            set(tx, field(*i))?;
        }
        for (i, name) in &self.attributes {
            tx.attributes.set_raw(name, field(*i))?;
        }
        Ok(())
    }
}

/// One CSV row: its fields as ranges of a buffer. Rows without quotes (the
/// common case) are split in place; quoted fields are unescaped into a copy.
#[derive(Default)]
struct Record {
    line: Vec<u8>,
    unquoted: Vec<u8>,
    fields: Vec<(u32, u32)>,
    quoted: bool,
}

impl Record {
    fn len(&self) -> usize {
        self.fields.len()
    }

    fn get(&self, i: usize) -> &[u8] {
        let Some(&(a, b)) = self.fields.get(i) else {
            return &[];
        };
        let buf = if self.quoted {
            &self.unquoted
        } else {
            &self.line
        };
        &buf[a as usize..b as usize]
    }
}

/// A CSV reader (RFC 4180: quoted fields, `""` escapes, line breaks inside
/// quotes). Written for this schema's hot path: no per-row allocation.
struct CsvRows {
    reader: BufReader<Box<dyn Read + Send>>,
    line_no: u64,
}

impl CsvRows {
    /// Reads the next non-empty row; returns the line it started on.
    fn next(&mut self, rec: &mut Record) -> Result<Option<u64>, ReadError> {
        loop {
            rec.line.clear();
            if self.reader.read_until(b'\n', &mut rec.line)? == 0 {
                return Ok(None);
            }
            self.line_no += 1;
            let start = self.line_no;
            trim_newline(&mut rec.line);
            if rec.line.is_empty() {
                continue;
            }
            if split_plain(&rec.line, &mut rec.fields) {
                rec.quoted = false;
                return Ok(Some(start));
            }
            rec.fields.clear();
            rec.quoted = true;
            self.split_quoted(rec, start)?;
            return Ok(Some(start));
        }
    }

    fn split_quoted(&mut self, rec: &mut Record, start: u64) -> Result<(), ReadError> {
        rec.unquoted.clear();
        let mut pos = 0usize;
        let mut field_start = 0u32;
        let mut in_quotes = false;
        loop {
            while pos < rec.line.len() {
                let c = rec.line[pos];
                if in_quotes {
                    if c == b'"' {
                        if rec.line.get(pos + 1) == Some(&b'"') {
                            rec.unquoted.push(b'"');
                            pos += 1;
                        } else {
                            in_quotes = false;
                        }
                    } else {
                        rec.unquoted.push(c);
                    }
                } else if c == b'"' {
                    in_quotes = true;
                } else if c == b',' {
                    rec.fields.push((field_start, rec.unquoted.len() as u32));
                    field_start = rec.unquoted.len() as u32;
                } else {
                    rec.unquoted.push(c);
                }
                pos += 1;
            }
            if !in_quotes {
                rec.fields.push((field_start, rec.unquoted.len() as u32));
                return Ok(());
            }
            // A line break inside quotes belongs to the field.
            rec.unquoted.push(b'\n');
            let before = rec.line.len();
            if self.reader.read_until(b'\n', &mut rec.line)? == 0 {
                return Err(ReadError::Format {
                    line: start,
                    reason: "a quoted field is not closed before the end of the file".into(),
                });
            }
            self.line_no += 1;
            trim_newline(&mut rec.line);
            pos = before;
        }
    }
}

fn trim_newline(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
}

/// Splits a row at its commas into `fields`, in one pass that also looks
/// for quotes: returns false, with `fields` unfinished, if the row has one
/// and needs the full CSV rules. Sixteen bytes at a time where SSE2 is there
/// (every x86-64): a row's fields are short, so a search per field would
/// spend more on starting than on searching.
fn split_plain(line: &[u8], fields: &mut Vec<(u32, u32)>) -> bool {
    fields.clear();
    let mut start = 0u32;
    let mut i = 0usize;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
        };
        // SAFETY: SSE2 is part of x86-64, and every load reads the 16
        // bytes at i..i + 16, within the line.
        unsafe {
            let comma = _mm_set1_epi8(b',' as i8);
            let quote = _mm_set1_epi8(b'"' as i8);
            while i + 16 <= line.len() {
                let v = _mm_loadu_si128(line.as_ptr().add(i).cast::<__m128i>());
                if _mm_movemask_epi8(_mm_cmpeq_epi8(v, quote)) != 0 {
                    return false;
                }
                let mut commas = _mm_movemask_epi8(_mm_cmpeq_epi8(v, comma)) as u32;
                while commas != 0 {
                    let at = (i as u32) + commas.trailing_zeros();
                    fields.push((start, at));
                    start = at + 1;
                    commas &= commas - 1;
                }
                i += 16;
            }
        }
    }
    for (at, &c) in line.iter().enumerate().skip(i) {
        match c {
            b'"' => return false,
            b',' => {
                fields.push((start, at as u32));
                start = at as u32 + 1;
            }
            _ => {}
        }
    }
    fields.push((start, line.len() as u32));
    true
}

enum Format {
    Csv {
        rows: CsvRows,
        columns: Columns,
        record: Record,
    },
    Jsonl {
        reader: BufReader<Box<dyn Read + Send>>,
        line: u64,
        buf: String,
    },
}

/// Streams transactions out of a file, one reused [`Transaction`] at a time.
pub struct TransactionReader {
    format: Format,
}

impl TransactionReader {
    /// Opens a CSV or JSON Lines file (`.gz` or not); the format is told by
    /// the first byte: `{` means JSON Lines.
    pub fn open(path: &Path) -> Result<TransactionReader, ReadError> {
        Self::from_reader(open_decoded(path)?)
    }

    pub fn from_reader(raw: Box<dyn Read + Send>) -> Result<TransactionReader, ReadError> {
        let mut reader = BufReader::with_capacity(1 << 18, raw);
        let first = reader
            .fill_buf()?
            .iter()
            .find(|c| !c.is_ascii_whitespace())
            .copied();
        if first == Some(b'{') {
            return Ok(TransactionReader {
                format: Format::Jsonl {
                    reader,
                    line: 0,
                    buf: String::new(),
                },
            });
        }
        let mut rows = CsvRows { reader, line_no: 0 };
        let mut header = Record::default();
        if rows.next(&mut header)?.is_none() {
            return Err(ReadError::Format {
                line: 1,
                reason: "the file is empty: expected a CSV header or JSON Lines".into(),
            });
        }
        // A byte-order mark before the first column name is not part of it.
        if header.line.starts_with(&[0xef, 0xbb, 0xbf]) && !header.quoted {
            header.fields[0].0 += 3;
        }
        let columns = Columns::from_header(&header)?;
        Ok(TransactionReader {
            format: Format::Csv {
                rows,
                columns,
                record: Record::default(),
            },
        })
    }

    /// Reads the next row into `tx`; `Ok(false)` at the end of the file.
    pub fn next_into(&mut self, tx: &mut Transaction) -> Result<bool, ReadError> {
        match &mut self.format {
            Format::Csv {
                rows,
                columns,
                record,
            } => {
                let Some(line) = rows.next(record)? else {
                    return Ok(false);
                };
                columns
                    .fill(record, tx)
                    .map_err(|source| ReadError::Row { line, source })?;
                Ok(true)
            }
            Format::Jsonl { reader, line, buf } => loop {
                buf.clear();
                if reader.read_line(buf)? == 0 {
                    return Ok(false);
                }
                *line += 1;
                let text = buf.trim();
                if text.is_empty() {
                    continue;
                }
                let value: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| ReadError::Format {
                        line: *line,
                        reason: format!("not valid JSON: {e}"),
                    })?;
                *tx = Transaction::from_json(&value).map_err(|source| ReadError::Row {
                    line: *line,
                    source,
                })?;
                return Ok(true);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Result<Vec<Transaction>, ReadError> {
        let mut r =
            TransactionReader::from_reader(Box::new(io::Cursor::new(text.as_bytes().to_vec())))?;
        let mut out = Vec::new();
        let mut tx = Transaction::default();
        while r.next_into(&mut tx)? {
            out.push(tx.clone());
        }
        Ok(out)
    }

    #[test]
    fn csv_any_column_order_and_optional_fields() {
        let rows = read_all(
            "amount,card_id,timestamp,transaction_id,merchant_id,extra,lat,lon\n\
             12.50,c1,2018-04-01T00:00:01Z,1,m1,zzz,45.5,5.25\n\
             3,c2,2018-04-01T00:00:02Z,2,m2,,,\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].amount, 12.5);
        assert_eq!(rows[0].lat, Some(45.5));
        assert_eq!(rows[1].lat, None);
        assert_eq!(rows[1].card_id, "c2");
    }

    #[test]
    fn csv_attribute_columns() {
        let rows = read_all(
            "transaction_id,timestamp,card_id,merchant_id,amount,attributes.device_id,attributes.age\n\
             1,2018-04-01T00:00:01Z,c1,m1,2,d-17,12\n\
             2,2018-04-01T00:00:02Z,c1,m1,3,,\n",
        )
        .unwrap();
        use crate::ingest::AttrValue;
        let device = rows[0].attributes.get("device_id");
        assert_eq!(device, Some(&AttrValue::Text("d-17".into())));
        assert_eq!(
            rows[0].attributes.get("age"),
            Some(&AttrValue::Number(12.0))
        );
        assert!(rows[1].attributes.is_empty(), "empty cells are absent");
    }

    #[test]
    fn rows_split_alike_at_every_length() {
        // Rows long and short, so that commas and quotes fall both in the
        // sixteen-byte blocks and in the tail.
        for n in 0..40 {
            let line: Vec<u8> = (0..n)
                .map(|i| {
                    if i % 3 == 1 {
                        b','
                    } else {
                        b'a' + (i % 26) as u8
                    }
                })
                .collect();
            let mut fields = Vec::new();
            assert!(split_plain(&line, &mut fields));
            let mut a = 0u32;
            let mut want = Vec::new();
            for (i, &c) in line.iter().enumerate() {
                if c == b',' {
                    want.push((a, i as u32));
                    a = i as u32 + 1;
                }
            }
            want.push((a, line.len() as u32));
            assert_eq!(fields, want, "{}", String::from_utf8_lossy(&line));
            for q in 0..n {
                let mut quoted = line.clone();
                quoted[q] = b'"';
                assert!(!split_plain(&quoted, &mut fields), "quote at {q} of {n}");
            }
        }
    }

    #[test]
    fn quoted_fields_escapes_and_line_breaks() {
        let rows = read_all(
            "\u{feff}transaction_id,timestamp,card_id,merchant_id,amount\r\n\
             \"1\",2018-04-01T00:00:01Z,\"c,1\",\"the \"\"best\"\" shop\",2\r\n\
             \r\n\
             2,2018-04-01T00:00:02Z,c2,\"two\nlines\",3\n\
             3,2018-04-01T00:00:03Z,c3,m3,4",
        )
        .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].card_id, "c,1");
        assert_eq!(rows[0].merchant_id, "the \"best\" shop");
        assert_eq!(rows[1].merchant_id, "two\nlines");
        assert_eq!(rows[2].amount, 4.0);
        let err = read_all(
            "transaction_id,timestamp,card_id,merchant_id,amount\n1,2018-04-01T00:00:01Z,\"c,m,1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not closed"), "{err}");
    }

    #[test]
    fn bad_rows_name_field_and_line() {
        let text = "transaction_id,timestamp,card_id,merchant_id,amount\n\
                    1,2018-04-01T00:00:01Z,c1,m1,5\n\
                    2,2018-04-01T00:00:02Z,c1,m1,-5\n";
        let err = read_all(text).unwrap_err();
        assert_eq!(err.line(), Some(3));
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("`amount`"), "{msg}");

        let err = read_all("transaction_id,timestamp,card_id,amount\n1,2018-04-01T00:00:01Z,c,1\n")
            .unwrap_err();
        assert!(err.to_string().contains("`merchant_id`"), "{err}");

        let err = read_all("{\"transaction_id\":\"a\"}\n").unwrap_err();
        assert!(
            err.to_string().contains("line 1") && err.to_string().contains("`timestamp`"),
            "{err}"
        );
        let err = read_all("{\"transaction_id\":1,\"timestamp\":\"2018-04-01T00:00:01Z\",\"card_id\":\"c\",\"merchant_id\":\"m\",\"amount\":1}\nnot json\n").unwrap_err();
        assert!(
            err.to_string().starts_with("line 2: not valid JSON"),
            "{err}"
        );
    }
}
