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

/// Reads ahead on a background thread in 1 MiB chunks through a bounded channel.
pub struct Prefetch {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Prefetch {
    pub fn spawn<R: Read + Send + 'static>(mut inner: R) -> Prefetch {
        let (tx, rx) = mpsc::sync_channel(4);
        thread::spawn(move || {
            loop {
                let mut chunk = vec![0u8; 1 << 20];
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
                    self.buf = chunk;
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
}

type Setter = fn(&mut Transaction, &[u8]) -> Result<(), FieldError>;

impl Columns {
    fn from_header(header: &csv::ByteRecord) -> Result<Columns, ReadError> {
        let find = |name: &str| {
            header
                .iter()
                .position(|h| h.eq_ignore_ascii_case(name.as_bytes()))
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
        })
    }

    fn fill(&self, rec: &csv::ByteRecord, tx: &mut Transaction) -> Result<(), FieldError> {
        let field = |i: usize| rec.get(i).unwrap_or_default();
        tx.set_id(field(self.id))?;
        tx.set_timestamp(field(self.timestamp))?;
        tx.set_card(field(self.card))?;
        tx.set_merchant(field(self.merchant))?;
        tx.set_amount(field(self.amount))?;
        tx.reset_optional();
        for (i, set) in &self.optional {
            set(tx, field(*i))?;
        }
        Ok(())
    }
}

enum Format {
    Csv {
        reader: csv::Reader<Box<dyn Read + Send>>,
        columns: Columns,
        record: csv::ByteRecord,
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
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .buffer_capacity(1 << 18)
            .from_reader(Box::new(reader) as Box<dyn Read + Send>);
        let header = csv.byte_headers().map_err(csv_error)?.clone();
        let columns = Columns::from_header(&header)?;
        Ok(TransactionReader {
            format: Format::Csv {
                reader: csv,
                columns,
                record: csv::ByteRecord::new(),
            },
        })
    }

    /// Reads the next row into `tx`; `Ok(false)` at the end of the file.
    pub fn next_into(&mut self, tx: &mut Transaction) -> Result<bool, ReadError> {
        match &mut self.format {
            Format::Csv {
                reader,
                columns,
                record,
            } => {
                if !reader.read_byte_record(record).map_err(csv_error)? {
                    return Ok(false);
                }
                let line = record.position().map_or(0, |p| p.line());
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

fn csv_error(e: csv::Error) -> ReadError {
    let line = e.position().map_or(0, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(io) => ReadError::Io(io),
        other => ReadError::Format {
            line,
            reason: format!("{other:?}"),
        },
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
