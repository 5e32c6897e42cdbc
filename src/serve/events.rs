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

/// The entity-events topic's record of one event for one entity besides
/// the card: keyed by the entity's changelog key
/// ([`crate::features::entities::log_key`]), so that the entity's events
/// meet in one partition. The progress records there are
/// [`MerchantEvent::Progress`].
#[derive(Debug, Clone, PartialEq)]
pub struct EntityRow {
    pub source: Source,
    /// The input record's offset.
    pub offset: i64,
    pub time: i64,
    /// 1 for the first entity besides the card.
    pub entity: u8,
    /// The event's stored fields ([`crate::features::declared::Program::entity_row`]).
    pub row: Vec<f64>,
}

const ENTITY_ROW: u8 = 4;

impl EntityRow {
    /// Where the event stands in its source's order: rows of one event
    /// (one per entity) in entity order, after the rows of earlier offsets.
    pub fn position(&self) -> i64 {
        self.offset.saturating_mul(8) + self.entity as i64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 8 * self.row.len());
        out.push(ENTITY_ROW);
        self.source.encode(&mut out);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.time.to_le_bytes());
        out.push(self.entity);
        out.push(self.row.len() as u8);
        for v in &self.row {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<EntityRow> {
        let mut r = Reader(bytes);
        if r.u8()? != ENTITY_ROW {
            return None;
        }
        let source = Source::decode(&mut r)?;
        let (offset, time, entity) = (r.i64()?, r.i64()?, r.u8()?);
        let n = r.u8()? as usize;
        let row = (0..n)
            .map(|_| r.i64().map(|b| f64::from_bits(b as u64)))
            .collect::<Option<Vec<f64>>>()?;
        (r.0.is_empty() && (1..=8).contains(&entity)).then_some(EntityRow {
            source,
            offset,
            time,
            entity,
            row,
        })
    }
}

/// The entity-features topic's record: the values of one event's
/// aggregations over one entity, as the entity's owner computed them, sent
/// to the partition of the event's input partition.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityColumns {
    /// The input record's offset.
    pub offset: i64,
    pub entity: u8,
    pub values: Vec<f64>,
}

impl EntityColumns {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + 8 * self.values.len());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.push(self.entity);
        out.push(self.values.len() as u8);
        for v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<EntityColumns> {
        let mut r = Reader(bytes);
        let (offset, entity) = (r.i64()?, r.u8()?);
        let n = r.u8()? as usize;
        let values = (0..n)
            .map(|_| r.i64().map(|b| f64::from_bits(b as u64)))
            .collect::<Option<Vec<f64>>>()?;
        r.0.is_empty().then_some(EntityColumns {
            offset,
            entity,
            values,
        })
    }
}

/// A fraud label for the card tasks' label-delayed windows, sent by the
/// label task of `source` to every card-labels partition: the card (its
/// key hash) and the transaction's time, which find the row to mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardLabel {
    pub source: Source,
    /// The label's offset in its label partition.
    pub offset: i64,
    pub card: u64,
    pub time: i64,
}

const CARD_LABEL: u8 = 5;

impl CardLabel {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(30);
        out.push(CARD_LABEL);
        self.source.encode(&mut out);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.card.to_le_bytes());
        out.extend_from_slice(&self.time.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<CardLabel> {
        let mut r = Reader(bytes);
        if r.u8()? != CARD_LABEL {
            return None;
        }
        let source = Source::decode(&mut r)?;
        let (offset, card, time) = (r.i64()?, r.i64()? as u64, r.i64()?);
        r.0.is_empty().then_some(CardLabel {
            source,
            offset,
            card,
            time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_labels_round_trip() {
        let l = CardLabel {
            source: Source::Labels(1),
            offset: 42,
            card: u64::MAX - 3,
            time: 1_522_540_800,
        };
        let bytes = l.encode();
        assert_eq!(CardLabel::decode(&bytes), Some(l));
        assert_eq!(CardLabel::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(MerchantEvent::decode(&bytes), None, "kinds apart");
        let progress = MerchantEvent::Progress {
            source: Source::Labels(1),
            watermark: 5,
            idle: false,
        };
        assert_eq!(CardLabel::decode(&progress.encode()), None);
    }

    #[test]
    fn entity_records_round_trip() {
        let row = EntityRow {
            source: Source::Input(2),
            offset: 99,
            time: 1_522_540_800,
            entity: 1,
            row: vec![1.5, -1.0, f64::NAN],
        };
        let bytes = row.encode();
        let back = EntityRow::decode(&bytes).unwrap();
        assert_eq!(back.row[..2], row.row[..2]);
        assert!(back.row[2].is_nan());
        assert_eq!(EntityRow::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(MerchantEvent::decode(&bytes), None, "kinds apart");
        let cols = EntityColumns {
            offset: 7,
            entity: 2,
            values: vec![3.0, 0.25],
        };
        let bytes = cols.encode();
        assert_eq!(EntityColumns::decode(&bytes), Some(cols));
        assert_eq!(EntityColumns::decode(&bytes[1..]), None);
    }

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
