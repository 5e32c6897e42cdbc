//! The interpreter of declared features: values of the transaction,
//! aggregations over the card's own log of declared fields, tags and
//! derived features, compiled from a features file ([`super::file`]).
//!
//! A card's declared log keeps, per event of the last 30 days (plus the
//! lateness), its time and the fields its aggregations read (their `of`,
//! `where` and entity values, computed when the event was folded in).
//! Windows are exact to the second, `(t − w, t]`, as the built-in card
//! windows are.

use super::AMOUNT_CEILING;
use super::card::{Reader, speed_kmh};
use super::expr::Expr;
use super::store::{KeyHasher, key_hash};
use crate::ingest::{AttrValue, Channel, Transaction};

/// Events a card's declared log holds at most; past it the oldest go,
/// counted as window overflows, as in the built-in log.
pub const MAX_LOGGED: usize = 2048;
/// Distinct values a `distinct` aggregation tells apart.
const MAX_DISTINCT: usize = 64;
/// Entities besides the card one features file may aggregate over.
pub const MAX_ENTITIES: usize = 4;

/// A transaction field an expression may read. Categorical fields read as
/// codes: `mcc` its number, `channel` 0 (pos), 1 (ecom), 2 (atm), `country`
/// a number per ISO code, `merchant_id` and `currency` 24 bits of their
/// hash; a missing one reads −1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Amount,
    Hour,
    Weekday,
    Minute,
    Mcc,
    Channel,
    Country,
    MerchantId,
    Currency,
    /// Degrees; NaN when the transaction has no place (both or neither).
    Lat,
    Lon,
    /// The transaction's fraud label: 1, 0, or −1 when it has none. Read
    /// only by aggregations over events whose labels are known
    /// (`delay = "label"`).
    IsFraud,
}

const FIELDS: [(&str, Field); 9] = [
    ("amount", Field::Amount),
    ("hour", Field::Hour),
    ("weekday", Field::Weekday),
    ("minute", Field::Minute),
    ("mcc", Field::Mcc),
    ("channel", Field::Channel),
    ("country", Field::Country),
    ("merchant_id", Field::MerchantId),
    ("currency", Field::Currency),
];
const N_FIELDS: usize = FIELDS.len();
/// Fields added since the first release, in the last slots of the
/// attributes' region: there the slots of every other name stay where
/// earlier releases put them, and with them the layout of the declared
/// logs they stored. The place's, then (taken from the attributes later)
/// the label, before them.
const LATE: [(&str, Field); 3] = [
    ("is_fraud", Field::IsFraud),
    ("lat", Field::Lat),
    ("lon", Field::Lon),
];
/// Slots between the fields and the items: attributes, then `LATE`.
const ATTRIBUTE_REGION: usize = 32;
/// Names under `attributes` one features file may read.
pub const MAX_ATTRIBUTES: usize = ATTRIBUTE_REGION - LATE.len();
/// The slot of the first item's value.
const FIRST_ITEM: usize = N_FIELDS + ATTRIBUTE_REGION;

pub fn hash_code(s: &str) -> f64 {
    // 24 bits: exact in the f32 a stored column keeps.
    (key_hash(s) >> 40) as f64
}

fn country_code(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    (b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic)).then(|| {
        let l = |c: u8| (c.to_ascii_uppercase() - b'A') as f64;
        l(b[0]) * 26.0 + l(b[1])
    })
}

impl Field {
    pub fn of(name: &str) -> Option<Field> {
        FIELDS
            .iter()
            .chain(&LATE)
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
    }

    fn name(self) -> &'static str {
        FIELDS
            .iter()
            .chain(&LATE)
            .find(|(_, f)| *f == self)
            .map_or("", |(n, _)| n)
    }

    /// The code a string literal compared with this field stands for.
    pub fn code_of(self, s: &str) -> Result<f64, String> {
        match self {
            Field::Channel => Channel::parse(s.as_bytes())
                .map(|c| c as u8 as f64)
                .ok_or(format!("\"{s}\" is not a channel (pos, ecom, atm)")),
            Field::Country => {
                country_code(s).ok_or(format!("\"{s}\" is not a two-letter country code"))
            }
            Field::MerchantId | Field::Currency => Ok(hash_code(s)),
            f => Err(format!(
                "`{}` is a number: compare it with a number, not \"{s}\"",
                f.name()
            )),
        }
    }

    fn value(self, tx: &Transaction, local: i64) -> f64 {
        let text = |s: &str| if s.is_empty() { -1.0 } else { hash_code(s) };
        match self {
            Field::Amount => tx.amount.min(AMOUNT_CEILING),
            Field::Hour => (local.rem_euclid(86_400) / 3600) as f64,
            Field::Weekday => ((local.div_euclid(86_400) + 3).rem_euclid(7)) as f64,
            Field::Minute => (local.rem_euclid(86_400) / 60) as f64,
            Field::Mcc => tx.mcc.map_or(-1.0, f64::from),
            Field::Channel => tx.channel.map_or(-1.0, |c| c as u8 as f64),
            Field::Country => country_code(&tx.country).unwrap_or(-1.0),
            Field::MerchantId => text(&tx.merchant_id),
            Field::Currency => text(&tx.currency),
            Field::Lat | Field::Lon => match (tx.lat, tx.lon) {
                (Some(lat), Some(lon)) => {
                    if self == Field::Lat {
                        lat
                    } else {
                        lon
                    }
                }
                // As the built-in speed reads a place: whole, or not at all.
                _ => f64::NAN,
            },
            Field::IsFraud => tx.is_fraud.map_or(-1.0, |f| f64::from(u8::from(f))),
        }
    }
}

/// Whose clock `hour`, `weekday` and `minute` read.
#[derive(Debug, Clone)]
pub enum TimeZone {
    /// Each timestamp's own UTC offset.
    Offset,
    /// A fixed offset in seconds, whatever the timestamp's.
    Fixed(i64),
    /// An IANA zone (`Europe/Paris`), with its daylight saving changes,
    /// from the database built into the binary.
    Named(jiff::tz::TimeZone),
}

impl TimeZone {
    /// Local seconds since the epoch of a transaction's time.
    fn local(&self, time: crate::ingest::EventTime) -> i64 {
        match self {
            TimeZone::Offset => time.local(),
            TimeZone::Fixed(o) => time.utc + o,
            TimeZone::Named(tz) => {
                let offset = jiff::Timestamp::from_second(time.utc)
                    .map_or(0, |ts| tz.to_offset(ts).seconds());
                time.utc + offset as i64
            }
        }
    }
}

/// A part of an entity other than the card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityPart {
    /// `merchant_id`, `mcc`, `channel`, `country` or `currency`.
    Field(Field),
    Attribute(String),
}

impl EntityPart {
    /// Fields an entity may be made of: those that name something.
    pub const FIELDS: [Field; 5] = [
        Field::MerchantId,
        Field::Mcc,
        Field::Channel,
        Field::Country,
        Field::Currency,
    ];

    /// Writes the part's value as the transaction carries it into `h`;
    /// false when the transaction lacks it.
    fn hash_into(&self, tx: &Transaction, h: &mut KeyHasher) -> bool {
        // Each value ends with a byte no UTF-8 text holds, tagged by its
        // kind, so that no two different tuples write the same bytes.
        let text = |h: &mut KeyHasher, s: &str| {
            h.write(s.as_bytes());
            h.write(&[0xff]);
            !s.is_empty()
        };
        let number = |h: &mut KeyHasher, v: f64| {
            h.write(&v.to_bits().to_le_bytes());
            h.write(&[0xfe]);
            true
        };
        match self {
            EntityPart::Field(Field::MerchantId) => text(h, &tx.merchant_id),
            EntityPart::Field(Field::Currency) => text(h, &tx.currency),
            EntityPart::Field(Field::Country) => text(h, &tx.country),
            EntityPart::Field(Field::Mcc) => tx.mcc.is_some_and(|m| number(h, m as f64)),
            EntityPart::Field(Field::Channel) => {
                tx.channel.is_some_and(|c| number(h, c as u8 as f64))
            }
            EntityPart::Field(_) => false,
            EntityPart::Attribute(name) => match tx.attributes.get(name) {
                Some(AttrValue::Text(t)) => text(h, t),
                Some(AttrValue::Number(v)) => number(h, *v),
                None => false,
            },
        }
    }
}

impl std::fmt::Display for EntityPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntityPart::Field(field) => f.write_str(field.name()),
            EntityPart::Attribute(name) => write!(f, "attributes.{name}"),
        }
    }
}

/// The values of the aggregations over one event's entities besides the
/// card, as the entities' owners computed them: per entity, in the
/// program's order; `None` where none came (each then reads its `missing`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntityValues(pub [Option<Vec<f64>>; MAX_ENTITIES]);

impl EntityValues {
    /// The entities whose values came: bit `k` for the `k`-th besides the card.
    pub fn came(&self) -> u8 {
        entity_mask(&self.0)
    }
}

/// Bit `k` set for each `k`-th entity besides the card that has something
/// (a key, values).
pub fn entity_mask<T>(per_entity: &[Option<T>; MAX_ENTITIES]) -> u8 {
    per_entity
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_some())
        .fold(0, |m, (k, _)| m | 1 << k)
}

/// An event's keys in each entity besides the card, as
/// [`Program::entity_keys`] gives them: a hash of the parts' values as the
/// transaction carries them (not their 24-bit codes, which would collide
/// among millions of devices); `None` where a part is missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntityKeys(pub [Option<u64>; MAX_ENTITIES]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    Count,
    Sum,
    Mean,
    Std,
    Min,
    Max,
    Distinct,
    Share,
    TimeSinceLast,
    /// km/h from the previous event's place, as `card.geo_velocity_kmh`.
    SpeedKmh,
}

impl AggKind {
    pub fn of(name: &str) -> Option<AggKind> {
        Some(match name {
            "count" => AggKind::Count,
            "sum" => AggKind::Sum,
            "mean" => AggKind::Mean,
            "std" => AggKind::Std,
            "min" => AggKind::Min,
            "max" => AggKind::Max,
            "distinct" => AggKind::Distinct,
            "share" => AggKind::Share,
            "time_since_last" => AggKind::TimeSinceLast,
            "speed_kmh" => AggKind::SpeedKmh,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ItemKind {
    /// An expression over the transaction's fields.
    Value(Expr),
    /// An expression over other features.
    Derived(Expr),
    /// A per-event flag, stored with the event where a filter reads it.
    Tag(Expr),
    Agg {
        kind: AggKind,
        /// Whose events it reads: 0 the card's, `k` those of the `k`-th
        /// entity besides the card, in the program's order.
        entity: usize,
        window: i64,
        /// Whether the window ends one label delay before the event
        /// (`delay = "label"`), at events whose labels are known.
        delayed: bool,
        /// Whether the event counts itself.
        current: bool,
        /// A card entity's fields besides the card: an event counts only
        /// if they equal the current event's.
        key_columns: Vec<Expr>,
        of: Option<Expr>,
        filter: Option<Expr>,
        cap: Option<f64>,
        /// The value of an empty window, or when the entity's field is missing.
        missing: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub name: String,
    pub kind: ItemKind,
}

/// Where a stored input is in a row: a column, or, for one that reads the
/// event's label, one of three (the input with the label −1, 0 and 1),
/// chosen by the row's label as it stands. A label that comes after its
/// event was folded in (the service's labels) then changes the input
/// without the event's other fields.
#[derive(Debug, Clone, Copy)]
enum Col {
    At(usize),
    ByLabel { label: usize, variants: [usize; 3] },
}

/// A stored label's bits, for [`Col::ByLabel`].
const FRAUD_BITS: u32 = 0x3f80_0000; // 1.0f32

impl Col {
    /// The column to read in `row`.
    #[inline]
    fn in_row(self, row: &[u32]) -> usize {
        match self {
            Col::At(c) => c,
            Col::ByLabel { label, variants } => variants[label_index(row[label])],
        }
    }

    /// The column of the current event's value in `current`.
    fn now(self, current: &[f64]) -> usize {
        match self {
            Col::At(c) => c,
            Col::ByLabel { label, variants } => variants[label_index(stored_bits(current[label]))],
        }
    }

    fn columns(self) -> impl Iterator<Item = usize> {
        let (a, more) = match self {
            Col::At(c) => (c, None),
            Col::ByLabel { label, variants } => (label, Some(variants)),
        };
        std::iter::once(a).chain(more.into_iter().flatten())
    }
}

fn label_index(bits: u32) -> usize {
    match bits {
        FRAUD_BITS => 2,
        0 => 1,
        _ => 0,
    }
}

/// Where an aggregation's inputs are in an event's stored row.
#[derive(Debug, Clone, Default)]
struct Stored {
    keys: Vec<usize>,
    of: Option<Col>,
    filter: Option<Col>,
    /// Latitude and longitude, for `speed_kmh`.
    place: Option<(usize, usize)>,
}

/// A compiled features file's interpreted part.
#[derive(Debug)]
pub struct Program {
    /// In evaluation order: everything an item reads comes before it.
    items: Vec<Item>,
    stored_of: Vec<Stored>,
    /// The expressions kept per event in the card's declared log.
    stored: Vec<Expr>,
    /// The items that are columns, in column order.
    columns: Vec<usize>,
    /// The `attributes.NAME` the file reads, by slot.
    attributes: Vec<String>,
    /// The entities besides the card, each the parts of its key.
    entities: Vec<Vec<EntityPart>>,
    /// Whether an aggregation reads the card's own log.
    card_logged: bool,
    /// Whether a window ends a label delay back, so logs keep that much more.
    delayed: bool,
    /// The stored column of the event's label, when an input reads it.
    label_column: Option<usize>,
    time_zone: TimeZone,
    /// How far back any window reaches.
    span: i64,
    /// A digest of `stored`: a log written under another layout is not read.
    layout: u32,
}

/// Per-event working values, reused between events.
#[derive(Debug, Default)]
pub struct Scratch {
    values: Vec<f64>,
    /// The current event's stored columns, and whether each is computed.
    current: Vec<f64>,
    done: Vec<bool>,
}

impl Program {
    pub fn field_slot(f: Field) -> usize {
        match LATE.iter().position(|(_, g)| *g == f) {
            Some(k) => N_FIELDS + MAX_ATTRIBUTES + k,
            None => FIELDS
                .iter()
                .position(|(_, g)| *g == f)
                .expect("every field is listed"),
        }
    }

    pub fn attribute_slot(k: usize) -> usize {
        N_FIELDS + k
    }

    pub fn item_slot(i: usize) -> usize {
        FIRST_ITEM + i
    }

    pub fn new(
        items: Vec<Item>,
        columns: Vec<usize>,
        attributes: Vec<String>,
        entities: Vec<Vec<EntityPart>>,
        time_zone: TimeZone,
    ) -> Result<Program, String> {
        if entities.len() > MAX_ENTITIES {
            return Err(format!(
                "{} entities besides the card; at most {MAX_ENTITIES}",
                entities.len()
            ));
        }
        let mut stored: Vec<Expr> = Vec::new();
        let mut column = |e: &Expr| match stored.iter().position(|s| s == e) {
            Some(i) => i,
            None => {
                stored.push(e.clone());
                stored.len() - 1
            }
        };
        let label_slot = Program::field_slot(Field::IsFraud);
        let mut label_column = None;
        let mut input = |e: &Expr| {
            if !e.reads(label_slot) {
                return Col::At(column(e));
            }
            let label = column(&Expr::Var(label_slot));
            label_column = Some(label);
            Col::ByLabel {
                label,
                variants: [-1.0, 0.0, 1.0].map(|v| column(&e.clone().with_slot_as(label_slot, v))),
            }
        };
        let mut stored_of = Vec::new();
        let mut span = 0;
        for item in &items {
            let mut s = Stored::default();
            if let ItemKind::Agg {
                kind,
                window,
                key_columns,
                of,
                filter,
                cap,
                ..
            } = &item.kind
            {
                let at = |c: Col| match c {
                    Col::At(c) => c,
                    Col::ByLabel { .. } => unreachable!("a key or place never reads the label"),
                };
                s.keys = key_columns.iter().map(|e| at(input(e))).collect();
                s.of = of.as_ref().map(&mut input);
                s.filter = filter.as_ref().map(&mut input);
                if *kind == AggKind::SpeedKmh {
                    let slot = |f| Expr::Var(Program::field_slot(f));
                    s.place = Some((at(input(&slot(Field::Lat))), at(input(&slot(Field::Lon)))));
                }
                span = span.max(match kind {
                    AggKind::TimeSinceLast => cap.map_or(*window, |c| c.ceil() as i64),
                    _ => *window,
                });
            }
            stored_of.push(s);
        }
        if stored.len() > u8::MAX as usize {
            return Err(format!("{} stored fields; at most 255", stored.len()));
        }
        let layout = key_hash(&format!("{stored:?}")) as u32;
        let card_logged = items
            .iter()
            .any(|i| matches!(i.kind, ItemKind::Agg { entity: 0, .. }));
        let delayed = items
            .iter()
            .any(|i| matches!(i.kind, ItemKind::Agg { delayed: true, .. }));
        Ok(Program {
            items,
            stored_of,
            stored,
            columns,
            attributes,
            entities,
            card_logged,
            delayed,
            label_column,
            time_zone,
            span,
            layout,
        })
    }

    /// Declared columns.
    pub fn values(&self) -> usize {
        self.columns.len()
    }

    /// The digest of the stored fields a declared log records.
    pub fn layout(&self) -> u32 {
        self.layout
    }

    /// How many entities besides the card the aggregations read.
    pub fn entities(&self) -> usize {
        self.entities.len()
    }

    /// The first item the service cannot compute, by name, and why: a
    /// window over fraud labels, or an aggregation over an entity besides
    /// the card whose stored fields read a feature (its owner sees the
    /// event, not the card's state).
    pub fn unservable(&self) -> Option<(&str, String)> {
        let event_only = self.event_only();
        self.items
            .iter()
            .enumerate()
            .find_map(|(i, item)| match &item.kind {
                // The service brings the labels topic's labels to the card
                // tasks (`Engine::label_card_event`), not to the entity stage.
                ItemKind::Agg {
                    delayed: true,
                    entity,
                    ..
                } if *entity > 0 => Some((
                    item.name.as_str(),
                    format!(
                        "aggregates per `{}` over fraud labels (`delay = \"label\"`): the \
                         service brings labels to the card's windows, not to the entity stage",
                        self.entity_name(*entity)
                    ),
                )),
                ItemKind::Agg { entity, .. } if *entity > 0 => {
                    let reads_a_feature = self.stored_columns(i).any(|c| {
                        !self.stored[c]
                            .reads_only(&|v| v < FIRST_ITEM || event_only[v - FIRST_ITEM])
                    });
                    reads_a_feature.then(|| {
                    (
                        item.name.as_str(),
                        format!(
                            "aggregates per `{}` and its `of` or `where` reads a tag that reads a \
                             feature: the entity's owner sees the event, not the card's state",
                            self.entity_name(*entity)
                        ),
                    )
                })
                }
                _ => None,
            })
    }

    /// The entity's key parts, as a file writes them.
    pub fn entity_name(&self, entity: usize) -> String {
        let parts: Vec<String> = self.entities[entity - 1]
            .iter()
            .map(|p| p.to_string())
            .collect();
        parts.join("+")
    }

    /// Per item, whether its value follows from the event alone.
    fn event_only(&self) -> Vec<bool> {
        let mut only = vec![false; self.items.len()];
        for (i, item) in self.items.iter().enumerate() {
            only[i] = match &item.kind {
                ItemKind::Value(e) | ItemKind::Tag(e) => {
                    e.reads_only(&|v| v < FIRST_ITEM || only[v - FIRST_ITEM])
                }
                _ => false,
            };
        }
        only
    }

    /// The stored columns the `i`-th item reads.
    fn stored_columns(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let s = &self.stored_of[i];
        let place = s.place.iter().flat_map(|&(a, b)| [a, b]);
        let of = s.of.into_iter().flat_map(Col::columns);
        let filter = s.filter.into_iter().flat_map(Col::columns);
        s.keys.iter().copied().chain(of).chain(filter).chain(place)
    }

    /// Whether an aggregation's input reads the event's label, so that the
    /// service brings labels to the card tasks' declared logs.
    pub fn reads_labels(&self) -> bool {
        self.label_column.is_some()
    }

    /// A label that came after its event was folded in (as the service's
    /// labels do): the rows of `log` at `t` take it, so that every input
    /// that reads the label reads it from now on. Whether a row took it.
    pub fn label_rows(&self, log: &mut DeclaredLog, t: i64, is_fraud: bool) -> bool {
        let Some(c) = self.label_column else {
            return false;
        };
        if log.layout != self.layout {
            return false;
        }
        let width = self.stored.len();
        let bits = stored_bits(if is_fraud { 1.0 } else { 0.0 });
        let ts = t as u32;
        let first = log.ts.partition_point(|&e| e < ts);
        let rows = log.ts[first..].iter().take_while(|&&e| e == ts).count();
        for i in first..first + rows {
            log.columns[i * width + c] = bits;
        }
        rows > 0
    }

    /// Whether any aggregation reads an entity besides the card.
    pub fn has_entities(&self) -> bool {
        !self.entities.is_empty()
    }

    /// Whether the card's declared log is read, so worth keeping.
    pub fn card_logged(&self) -> bool {
        self.card_logged
    }

    /// How far back any window reaches, with the label delay `label_delay`
    /// where a window ends that far back: a log with nothing newer than
    /// this before the settled time is of no more use.
    pub fn span(&self, label_delay: i64) -> i64 {
        self.span + if self.delayed { label_delay } else { 0 }
    }

    /// The event's key in each entity besides the card.
    pub fn entity_keys(&self, tx: &Transaction) -> EntityKeys {
        let mut keys = EntityKeys::default();
        for (key, parts) in keys.0.iter_mut().zip(&self.entities) {
            let mut h = KeyHasher::new();
            let whole = parts.iter().all(|p| p.hash_into(tx, &mut h));
            *key = whole.then(|| h.finish());
        }
        keys
    }

    /// Computes the declared columns of `tx` into `out` from its entities'
    /// logs before the event (`logs[0]` the card's, then one per entity
    /// besides it, for `keys`); the event's stored fields stay in
    /// `scratch` for [`Program::fold`]. With `owned_elsewhere`, the values
    /// of the aggregations over entities besides the card are taken from
    /// it, as their owners computed them, instead of from `logs`.
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &self,
        logs: &[Option<&DeclaredLog>],
        keys: &EntityKeys,
        tx: &Transaction,
        label_delay: i64,
        scratch: &mut Scratch,
        owned_elsewhere: Option<&EntityValues>,
        out: &mut [f32],
    ) {
        self.fill_event(tx, scratch);
        let Scratch {
            values,
            current,
            done,
        } = scratch;
        let t = tx.time.utc;
        let mut taken = [0usize; MAX_ENTITIES];
        for (i, item) in self.items.iter().enumerate() {
            let v = match &item.kind {
                ItemKind::Value(e) | ItemKind::Derived(e) | ItemKind::Tag(e) => e.eval(values),
                ItemKind::Agg {
                    entity, missing, ..
                } if *entity > 0 && owned_elsewhere.is_some() => {
                    let k = entity - 1;
                    taken[k] += 1;
                    owned_elsewhere
                        .and_then(|o| o.0[k].as_ref())
                        .and_then(|v| v.get(taken[k] - 1))
                        .copied()
                        .unwrap_or(*missing)
                }
                ItemKind::Agg { .. } => {
                    for c in self.stored_columns(i) {
                        if !done[c] {
                            current[c] = self.stored[c].eval(values);
                            done[c] = true;
                        }
                    }
                    self.aggregate(
                        &item.kind,
                        &self.stored_of[i],
                        logs,
                        keys,
                        (t, label_delay),
                        current,
                    )
                }
            };
            values[FIRST_ITEM + i] = v;
        }
        // Stored fields no aggregation computed here (those of the entities
        // owned elsewhere) are still folded into the card's own log.
        for c in 0..self.stored.len() {
            if !done[c] {
                current[c] = self.stored[c].eval(values);
            }
        }
        for (o, &c) in out.iter_mut().zip(&self.columns) {
            *o = column_value(values[FIRST_ITEM + c]);
        }
    }

    /// The transaction's fields and attributes into `scratch`'s values,
    /// every item's value zero, and no stored field computed yet.
    fn fill_event(&self, tx: &Transaction, scratch: &mut Scratch) {
        let local = self.time_zone.local(tx.time);
        let Scratch {
            values,
            current,
            done,
        } = scratch;
        values.clear();
        values.extend(FIELDS.iter().map(|(_, f)| f.value(tx, local)));
        values.extend(
            self.attributes
                .iter()
                .map(|name| match tx.attributes.get(name) {
                    Some(AttrValue::Number(v)) => *v,
                    Some(AttrValue::Text(t)) => hash_code(t),
                    None => -1.0,
                }),
        );
        values.resize(FIRST_ITEM + self.items.len(), 0.0);
        for (_, f) in LATE {
            values[Program::field_slot(f)] = f.value(tx, local);
        }
        current.clear();
        current.resize(self.stored.len(), 0.0);
        done.clear();
        done.resize(self.stored.len(), false);
    }

    /// The event's stored fields as its entities besides the card log
    /// them, from the event alone: the row an entity's owner folds in
    /// ([`Program::entity_values`], [`Program::fold_row`]). Exact for
    /// every field such an aggregation reads, when [`Program::unservable`]
    /// finds nothing.
    pub fn entity_row(&self, tx: &Transaction, scratch: &mut Scratch) -> Vec<f64> {
        self.fill_event(tx, scratch);
        let Scratch {
            values, current, ..
        } = scratch;
        for (i, item) in self.items.iter().enumerate() {
            if let ItemKind::Value(e) | ItemKind::Tag(e) = &item.kind {
                values[FIRST_ITEM + i] = e.eval(values);
            }
        }
        for (c, e) in self.stored.iter().enumerate() {
            current[c] = e.eval(values);
        }
        current.clone()
    }

    /// The values of the `entity`-th entity's aggregations (1 for the
    /// first besides the card), in the program's order, for an event at
    /// `t` with stored fields `row`, from the entity's log before it.
    pub fn entity_values(
        &self,
        entity: usize,
        log: Option<&DeclaredLog>,
        (t, label_delay): (i64, i64),
        row: &[f64],
        out: &mut Vec<f64>,
    ) {
        out.clear();
        let mut logs = [None; 1 + MAX_ENTITIES];
        logs[entity] = log;
        let mut keys = EntityKeys::default();
        keys.0[entity - 1] = Some(0);
        for (i, item) in self.items.iter().enumerate() {
            if matches!(item.kind, ItemKind::Agg { entity: e, .. } if e == entity) {
                let s = &self.stored_of[i];
                out.push(self.aggregate(&item.kind, s, &logs, &keys, (t, label_delay), row));
            }
        }
    }

    fn aggregate(
        &self,
        kind: &ItemKind,
        s: &Stored,
        logs: &[Option<&DeclaredLog>],
        keys: &EntityKeys,
        (t, label_delay): (i64, i64),
        current: &[f64],
    ) -> f64 {
        let ItemKind::Agg {
            kind,
            entity,
            window,
            delayed,
            current: counts_itself,
            cap,
            missing,
            ..
        } = *kind
        else {
            return 0.0;
        };
        if s.keys.iter().any(|&k| current[k] == -1.0)
            || (entity > 0 && keys.0[entity - 1].is_none())
        {
            return missing;
        }
        let log = logs
            .get(entity)
            .copied()
            .flatten()
            .filter(|l| l.layout == self.layout);
        // A delayed window ends at the newest event whose label is known.
        let end = if delayed { t - label_delay } else { t };
        let scan = Scan {
            log,
            width: self.stored.len(),
            t: end,
            window,
            keys: &s.keys,
            key_bits: std::array::from_fn(|k| {
                s.keys.get(k).map_or(0, |&c| stored_bits(current[c]))
            }),
            filter: s.filter,
        };
        // The event itself, when it counts and passes the filter; never in
        // a delayed window, since its label is not known yet.
        let own =
            counts_itself && !delayed && s.filter.is_none_or(|f| current[f.now(current)] != 0.0);
        let of_now = s.of.map_or(0.0, |c| current[c.now(current)]);
        let of = s.of.unwrap_or(Col::At(0));
        let value = |row: &[u32]| f32::from_bits(row[of.in_row(row)]) as f64;
        let v = match kind {
            AggKind::SpeedKmh => {
                let Some((la, lo)) = s.place else {
                    return missing;
                };
                let mut previous = None;
                scan.each(|row, ts| {
                    previous = Some((f32::from_bits(row[la]), f32::from_bits(row[lo]), ts));
                    false
                });
                let Some((lat, lon, ts)) = previous else {
                    return missing;
                };
                let here = (current[la] as f32, current[lo] as f32);
                speed_kmh((lat, lon), here, t - ts)
            }
            AggKind::TimeSinceLast => {
                let mut last = None;
                scan.each(|_, ts| {
                    last = Some(ts);
                    false
                });
                return match last {
                    Some(ts) => cap.map_or((t - ts) as f64, |c| ((t - ts) as f64).min(c)),
                    None => cap.unwrap_or(window as f64),
                };
            }
            AggKind::Count => {
                let mut n = u32::from(own);
                scan.each(|_, _| {
                    n += 1;
                    true
                });
                n as f64
            }
            AggKind::Sum | AggKind::Mean | AggKind::Std => {
                let (mut n, mut sum, mut sumsq) = (0u32, 0f64, 0f64);
                scan.each(|row, _| {
                    let v = value(row);
                    n += 1;
                    sum += v;
                    sumsq += v * v;
                    true
                });
                if own {
                    n += 1;
                    sum += of_now;
                    sumsq += of_now * of_now;
                }
                match kind {
                    AggKind::Sum => sum,
                    _ if n == 0 => missing,
                    AggKind::Mean => sum / n as f64,
                    _ => {
                        let mean = sum / n as f64;
                        (sumsq / n as f64 - mean * mean).max(0.0).sqrt()
                    }
                }
            }
            AggKind::Min | AggKind::Max => {
                let sign = if kind == AggKind::Min { -1.0 } else { 1.0 };
                let mut best = if own {
                    sign * of_now
                } else {
                    f64::NEG_INFINITY
                };
                scan.each(|row, _| {
                    best = best.max(sign * value(row));
                    true
                });
                if best == f64::NEG_INFINITY {
                    missing
                } else {
                    sign * best
                }
            }
            AggKind::Share => {
                let bits = stored_bits(of_now);
                let (mut n, mut same) = (u32::from(own), u32::from(own));
                scan.each(|row, _| {
                    n += 1;
                    same += u32::from(row[of.in_row(row)] == bits);
                    true
                });
                if n == 0 {
                    missing
                } else {
                    same as f64 / n as f64
                }
            }
            AggKind::Distinct => {
                let mut seen = [0u32; MAX_DISTINCT];
                let mut n = 0usize;
                let mut note = |bits: u32| {
                    if n < MAX_DISTINCT && !seen[..n].contains(&bits) {
                        seen[n] = bits;
                        n += 1;
                    }
                };
                if own {
                    note(stored_bits(of_now));
                }
                scan.each(|row, _| {
                    note(row[of.in_row(row)]);
                    true
                });
                n as f64
            }
        };
        cap.map_or(v, |c| v.min(c))
    }

    /// Adds the event [`Program::observe`] last saw to one of its
    /// entities' logs.
    /// `settled` is as in [`super::card::CardState::apply`]. Returns
    /// whether the log's bound dropped an event still inside a window.
    pub fn fold(
        &self,
        log: &mut DeclaredLog,
        t: i64,
        scratch: &Scratch,
        settled: i64,
        label_delay: i64,
    ) -> bool {
        self.fold_row(log, t, &scratch.current, settled, label_delay)
    }

    /// [`Program::fold`] of an event whose stored fields are `row`.
    pub fn fold_row(
        &self,
        log: &mut DeclaredLog,
        t: i64,
        row: &[f64],
        settled: i64,
        label_delay: i64,
    ) -> bool {
        if log.layout != self.layout {
            *log = DeclaredLog {
                layout: self.layout,
                ..DeclaredLog::default()
            };
        }
        let width = self.stored.len();
        let ts = t as u32;
        let pos = if log.ts.last().is_none_or(|&l| l <= ts) {
            log.ts.len()
        } else {
            log.ts.partition_point(|&e| e <= ts)
        };
        // Grown by an eighth, not doubled, as the built-in log is: a month of
        // rows is most of a card's declared state.
        if log.ts.len() == log.ts.capacity() {
            let more = log.ts.len() / 8 + 4;
            log.ts.reserve_exact(more);
            log.columns.reserve_exact(more * width);
        }
        log.ts.insert(pos, ts);
        log.columns.splice(
            pos * width..pos * width,
            row.iter().map(|&v| stored_bits(v)),
        );
        let horizon = settled - self.span(label_delay);
        let expired = log.ts.partition_point(|&e| (e as i64) <= horizon);
        let overflow = log.ts.len().saturating_sub(MAX_LOGGED);
        // Expired rows go a few at a time (no window reaches them), so that
        // the log is not shifted for every event.
        let cut = if expired >= 8 || overflow > 0 {
            expired.max(overflow)
        } else {
            0
        };
        if cut > 0 {
            log.ts.drain(..cut);
            log.columns.drain(..cut * width);
            // A card that slowed down gives back what its busier month took.
            if log.ts.capacity() >= 2 * log.ts.len() + 8 {
                let keep = log.ts.len() + log.ts.len() / 4 + 2;
                log.ts.shrink_to(keep);
                log.columns.shrink_to(keep * width);
            }
        }
        overflow > expired
    }
}

/// The rows of a card's declared log that one aggregation reads: in its
/// window at `t`, with the current event's entity values, passing its filter.
struct Scan<'a> {
    log: Option<&'a DeclaredLog>,
    width: usize,
    t: i64,
    window: i64,
    keys: &'a [usize],
    key_bits: [u32; 4],
    filter: Option<Col>,
}

impl Scan<'_> {
    /// Calls `visit` with each row and its time, newest first, while it
    /// returns true. A late event's window ends at its own time.
    #[inline]
    fn each(&self, mut visit: impl FnMut(&[u32], i64) -> bool) {
        let Some(log) = self.log else { return };
        for i in (0..log.ts.len()).rev() {
            let ts = log.ts[i] as i64;
            if ts > self.t {
                continue;
            }
            if ts <= self.t - self.window {
                break;
            }
            let row = &log.columns[i * self.width..(i + 1) * self.width];
            let other_entity = self
                .keys
                .iter()
                .zip(&self.key_bits)
                .any(|(&c, &bits)| row[c] != bits);
            let filtered_out = self
                .filter
                .is_some_and(|f| f32::from_bits(row[f.in_row(row)]) == 0.0);
            if other_entity || filtered_out {
                continue;
            }
            if !visit(row, ts) {
                return;
            }
        }
    }
}

/// A stored column's bits: the value as f32, with −0 as 0 so that equal
/// values compare equal.
fn stored_bits(v: f64) -> u32 {
    let f = v as f32;
    if f == 0.0 { 0 } else { f.to_bits() }
}

/// A column as a model reads it: never NaN nor infinite, since imported
/// trees and the logistic scaling assume finite inputs.
fn column_value(v: f64) -> f32 {
    if v.is_nan() {
        0.0
    } else {
        (v as f32).clamp(f32::MIN, f32::MAX)
    }
}

/// A card's events as its declared aggregations read them: times, oldest
/// first, and per event the program's stored fields, row by row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeclaredLog {
    layout: u32,
    ts: Vec<u32>,
    columns: Vec<u32>,
}

impl DeclaredLog {
    pub fn layout(&self) -> u32 {
        self.layout
    }

    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// The newest event's time.
    pub fn newest(&self) -> Option<i64> {
        self.ts.last().map(|&t| t as i64)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let width = self.columns.len().checked_div(self.ts.len()).unwrap_or(0);
        out.extend_from_slice(&self.layout.to_le_bytes());
        out.extend_from_slice(&(self.ts.len() as u16).to_le_bytes());
        out.push(width as u8);
        for t in &self.ts {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for c in &self.columns {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Option<DeclaredLog> {
        let layout = r.u32()?;
        let n = r.u16()? as usize;
        let width = r.u8()? as usize;
        let mut log = DeclaredLog {
            layout,
            ts: Vec::with_capacity(n),
            columns: Vec::with_capacity(n * width),
        };
        for _ in 0..n {
            let t = r.u32()?;
            if log.ts.last().is_some_and(|&l| l > t) {
                return None;
            }
            log.ts.push(t);
        }
        for _ in 0..n * width {
            log.columns.push(r.u32()?);
        }
        Some(log)
    }
}
