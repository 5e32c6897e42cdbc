//! The merchant-events topic's records: the one definition of their wire
//! format. Card partitions send each transaction's merchant event, label
//! partitions each fraud, keyed by merchant id so that a merchant's events
//! meet in one partition; every source also sends its progress to every
//! partition, so the merchant stage knows how far each source has come.
//!
//! Little-endian binary, first byte the kind: these are as many as the
//! transactions, and read by one consumer each.

use crate::features::card::Reader;
use serde::{Deserialize, Serialize};

/// Where a merchant event comes from: an input or a label partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Source {
    Input(i32),
    Labels(i32),
}

impl Source {
    fn encode(self, out: &mut Vec<u8>) {
        let (kind, p) = match self {
            Source::Input(p) => (0u8, p),
            Source::Labels(p) => (1u8, p),
        };
        out.push(kind);
        out.extend_from_slice(&p.to_le_bytes());
    }

    fn decode(r: &mut Reader) -> Option<Source> {
        let kind = r.u8()?;
        let p = r.u32()? as i32;
        match kind {
            0 => Some(Source::Input(p)),
            1 => Some(Source::Labels(p)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Input(p) => write!(f, "input/{p}"),
            Source::Labels(p) => write!(f, "labels/{p}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MerchantEvent {
    /// A transaction of the record key's merchant at `time`, from the input
    /// record at `offset` of the source's partition.
    Transaction {
        source: Source,
        offset: i64,
        time: i64,
    },
    /// A fraud at the record key's merchant, counted at transaction time
    /// `time`, from the label record at `offset`.
    Fraud {
        source: Source,
        offset: i64,
        time: i64,
    },
    /// The source will send no more events with an event time (input) or
    /// report time (labels) before `watermark`; `idle` when it has read its
    /// partition to the end, and so holds nothing back.
    Progress {
        source: Source,
        watermark: i64,
        idle: bool,
    },
}

const TRANSACTION: u8 = 1;
const FRAUD: u8 = 2;
const PROGRESS: u8 = 3;

impl MerchantEvent {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(22);
        match *self {
            MerchantEvent::Transaction {
                source,
                offset,
                time,
            }
            | MerchantEvent::Fraud {
                source,
                offset,
                time,
            } => {
                out.push(if matches!(self, MerchantEvent::Transaction { .. }) {
                    TRANSACTION
                } else {
                    FRAUD
                });
                source.encode(&mut out);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&time.to_le_bytes());
            }
            MerchantEvent::Progress {
                source,
                watermark,
                idle,
            } => {
                out.push(PROGRESS);
                source.encode(&mut out);
                out.extend_from_slice(&watermark.to_le_bytes());
                out.push(u8::from(idle));
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<MerchantEvent> {
        let mut r = Reader(bytes);
        let kind = r.u8()?;
        let source = Source::decode(&mut r)?;
        let event = match kind {
            TRANSACTION | FRAUD => {
                let (offset, time) = (r.i64()?, r.i64()?);
                if kind == TRANSACTION {
                    MerchantEvent::Transaction {
                        source,
                        offset,
                        time,
                    }
                } else {
                    MerchantEvent::Fraud {
                        source,
                        offset,
                        time,
                    }
                }
            }
            PROGRESS => MerchantEvent::Progress {
                source,
                watermark: r.i64()?,
                idle: r.u8()? != 0,
            },
            _ => return None,
        };
        r.0.is_empty().then_some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        for e in [
            MerchantEvent::Transaction {
                source: Source::Input(3),
                offset: 1 << 40,
                time: 1_522_540_800,
            },
            MerchantEvent::Fraud {
                source: Source::Labels(0),
                offset: 7,
                time: -5,
            },
            MerchantEvent::Progress {
                source: Source::Input(11),
                watermark: i64::MIN,
                idle: true,
            },
        ] {
            let bytes = e.encode();
            assert_eq!(MerchantEvent::decode(&bytes), Some(e));
            assert_eq!(MerchantEvent::decode(&bytes[..bytes.len() - 1]), None);
        }
        assert_eq!(MerchantEvent::decode(&[9, 0, 0, 0, 0, 0]), None);
    }
}
