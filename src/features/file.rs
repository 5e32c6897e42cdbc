//! The features file: what a model's columns are, declared in TOML, and
//! compiled into a [`Plan`] for the engine.
//!
//! A declaration whose name and definition equal one of the default file's
//! (models/features-default.toml, embedded) is computed by the built-in
//! engine; any other is compiled into a [`Program`] the engine interprets
//! per card. The file is stored in the model, so that training, replay and
//! the service compute the same columns.

use super::declared::{
    AggKind, EntityPart, Field, Item, ItemKind, MAX_ATTRIBUTES, MAX_ENTITIES, Program, TimeZone,
    hash_code,
};
use super::expr::Expr;
use super::{MAX_DECLARED, N_FEATURES, NAMES};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The default features file: the built-in engine's 30 columns.
pub const DEFAULT_FILE: &str = include_str!("../../models/features-default.toml");
/// The layout version of features files this build reads.
pub const FORMAT: u32 = 1;
/// Columns a model may have.
pub const MAX_COLUMNS: usize = 64;
/// The longest window: a card's log holds 30 days (plus the lateness).
const MAX_WINDOW: i64 = 30 * 86_400;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    format: u32,
    /// `"default"`: the default file's tags and features come first.
    #[serde(default)]
    extends: Option<String>,
    /// `offset` (each timestamp's own UTC offset), `UTC`, or `+HH:MM`.
    #[serde(default)]
    time_zone: Option<String>,
    /// Per-event flags, fixed when the event is folded in.
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    feature: Vec<Decl>,
}

/// A number, or a duration such as `30d`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum NumberOrDuration {
    Number(f64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decl {
    name: String,
    value: Option<String>,
    expr: Option<String>,
    entity: Option<String>,
    agg: Option<String>,
    of: Option<String>,
    window: Option<String>,
    #[serde(rename = "where")]
    filter: Option<String>,
    current: Option<bool>,
    delay: Option<String>,
    cap: Option<NumberOrDuration>,
    missing: Option<f64>,
    output: Option<bool>,
    anomaly: Option<bool>,
}

impl Decl {
    fn output(&self) -> bool {
        self.output.unwrap_or(true)
    }
}

/// A features file that does not compile: the feature (or tag) and key at
/// fault, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("features file: {0}")]
pub struct FileError(pub String);

fn fail<T>(feature: &str, key: &str, reason: impl std::fmt::Display) -> Result<T, FileError> {
    Err(FileError(format!("feature `{feature}`, `{key}`: {reason}")))
}

/// A compiled features file: the model's columns and how each is computed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The file's text, as stored in a model.
    pub source: String,
    /// Column names, in the model's order.
    pub names: Vec<String>,
    /// For each column, its slot in [`super::Features`]: a built-in index
    /// below [`N_FEATURES`], or `N_FEATURES` + a declared value's index.
    pub slots: Vec<usize>,
    /// The columns the isolation forest reads.
    pub anomaly: Vec<usize>,
    /// The interpreted part; `None` when every column is built in.
    pub program: Option<Arc<Program>>,
}

impl Plan {
    /// The built-in plan: [`DEFAULT_FILE`].
    pub fn default_plan() -> &'static Plan {
        static PLAN: std::sync::OnceLock<Plan> = std::sync::OnceLock::new();
        PLAN.get_or_init(|| Plan::compile(DEFAULT_FILE).expect("the embedded default compiles"))
    }

    pub fn width(&self) -> usize {
        self.names.len()
    }

    /// Whether the columns are the first slots in order, so that a model
    /// reads a prefix of [`super::Features`] without copying.
    pub fn is_prefix(&self) -> bool {
        self.slots.iter().enumerate().all(|(i, &s)| i == s)
    }

    /// Whether this is the default file's plan (whatever its comments).
    pub fn is_default(&self) -> bool {
        self.names == NAMES && self.program.is_none()
    }

    pub fn compile(text: &str) -> Result<Plan, FileError> {
        compile(text, false)
    }

    /// Compiles every card feature of the file into the interpreter, even
    /// those the built-in engine computes: for tests that the two agree.
    pub fn compile_interpreted(text: &str) -> Result<Plan, FileError> {
        compile(text, true)
    }
}

fn parse(text: &str) -> Result<FileText, FileError> {
    let mut file: FileText = toml::from_str(text).map_err(|e| FileError(e.to_string()))?;
    if file.format != FORMAT {
        return Err(FileError(format!(
            "`format` {} is not supported (this build reads {FORMAT})",
            file.format
        )));
    }
    match file.extends.take().as_deref() {
        None => {}
        Some("default") => {
            let base = parse(DEFAULT_FILE)?;
            for (name, tag) in base.tags {
                if file.tags.contains_key(&name) {
                    return Err(FileError(format!(
                        "tag `{name}` is the default file's already"
                    )));
                }
                file.tags.insert(name, tag);
            }
            file.feature.splice(0..0, base.feature);
        }
        Some(other) => {
            return Err(FileError(format!(
                "`extends` = \"{other}\": only \"default\" can be extended"
            )));
        }
    }
    Ok(file)
}

/// The default file's declarations, by name.
fn builtin_decls() -> &'static HashMap<String, Decl> {
    static DECLS: std::sync::OnceLock<HashMap<String, Decl>> = std::sync::OnceLock::new();
    DECLS.get_or_init(|| {
        let file = parse(DEFAULT_FILE).expect("the embedded default parses");
        file.feature
            .into_iter()
            .map(|d| (d.name.clone(), d))
            .collect()
    })
}

/// Seconds in `30d`, `12h`, `15m` or `45s`.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.len().saturating_sub(1));
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{text}` is not a duration such as 30d, 12h, 15m or 45s"
            ));
        }
    };
    match num.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n * scale),
        _ => Err(format!(
            "`{text}` is not a duration such as 30d, 12h, 15m or 45s"
        )),
    }
}

fn parse_time_zone(text: Option<&str>) -> Result<TimeZone, String> {
    match text.unwrap_or("offset") {
        "offset" => Ok(TimeZone::Offset),
        "UTC" | "utc" | "Z" => Ok(TimeZone::Fixed(0)),
        t => {
            let b = t.as_bytes();
            let parsed = (b.len() == 6 && matches!(b[0], b'+' | b'-') && b[3] == b':')
                .then(|| Some((t[1..3].parse::<i64>().ok()?, t[4..6].parse::<i64>().ok()?)))
                .flatten();
            match parsed {
                Some((h, m)) if h <= 14 && m < 60 => {
                    let secs = h * 3600 + m * 60;
                    Ok(TimeZone::Fixed(if b[0] == b'-' { -secs } else { secs }))
                }
                _ => jiff::tz::TimeZone::get(t).map(TimeZone::Named).map_err(|_| {
                    format!(
                        "`{t}` is not a time zone: \"offset\" (each timestamp's own), \"UTC\", a fixed offset such as \"+05:30\", or an IANA name such as \"Europe/Paris\""
                    )
                }),
            }
        }
    }
}

/// What a name in an expression stands for while compiling.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Named {
    Field(Field),
    Attribute(usize),
    Feature(usize),
    Tag(usize),
}

struct Compiler<'a> {
    file: &'a FileText,
    interpret_all: bool,
    /// Declarations by name (the file's, then the default's helpers it
    /// reads without declaring).
    decls: HashMap<&'a str, &'a Decl>,
    /// Declared items compiled so far, by name, and their order.
    items: Vec<Item>,
    by_name: HashMap<String, usize>,
    /// Names being compiled, to find cycles.
    visiting: Vec<String>,
    /// The `attributes.NAME` read so far, by slot.
    attributes: Vec<String>,
    /// The entities besides the card aggregated over so far.
    entities: Vec<Vec<EntityPart>>,
    /// Whether the expression being compiled may read `is_fraud`: the
    /// `of` and `where` of a window whose events' labels are known.
    labels_known: bool,
}

fn compile(text: &str, interpret_all: bool) -> Result<Plan, FileError> {
    let file = parse(text)?;
    let time_zone = parse_time_zone(file.time_zone.as_deref())
        .map_err(|e| FileError(format!("`time_zone`: {e}")))?;
    let own_offsets = matches!(time_zone, TimeZone::Offset);
    let mut seen = HashMap::new();
    for d in &file.feature {
        if seen.insert(d.name.as_str(), ()).is_some() {
            return fail(&d.name, "name", "declared twice");
        }
        // A feature may share a field's name (`amount`): in expressions
        // the name reads the field.
        if file.tags.contains_key(&d.name) {
            return fail(&d.name, "name", "is also a tag's name");
        }
    }
    let outputs: Vec<&Decl> = file.feature.iter().filter(|d| d.output()).collect();
    if outputs.is_empty() {
        return Err(FileError("no feature is declared as a column".into()));
    }
    if outputs.len() > MAX_COLUMNS {
        return Err(FileError(format!(
            "{} columns declared; a model has at most {MAX_COLUMNS}",
            outputs.len()
        )));
    }
    let mut c = Compiler {
        file: &file,
        interpret_all,
        decls: file.feature.iter().map(|d| (d.name.as_str(), d)).collect(),
        items: Vec::new(),
        by_name: HashMap::new(),
        visiting: Vec::new(),
        attributes: Vec::new(),
        entities: Vec::new(),
        labels_known: false,
    };
    let mut names = Vec::new();
    let mut slots = Vec::new();
    let mut anomaly = Vec::new();
    // Declared columns take the first declared slots, in column order, so
    // a file that lists the built-in columns first reads as a prefix.
    let mut declared_columns = Vec::new();
    for (col, d) in outputs.iter().enumerate() {
        names.push(d.name.clone());
        if d.anomaly == Some(true) {
            anomaly.push(col);
        }
        match c.builtin_index(d)? {
            Some(i) => slots.push(i),
            None => {
                slots.push(usize::MAX);
                declared_columns.push((col, d.name.as_str()));
            }
        }
    }
    for &(col, name) in &declared_columns {
        let item = c.feature(name)?;
        slots[col] = item;
    }
    let program = if c.items.is_empty() {
        None
    } else {
        let order: Vec<usize> = declared_columns
            .iter()
            .map(|&(col, _)| slots[col])
            .collect();
        let program = Program::new(
            std::mem::take(&mut c.items),
            order,
            std::mem::take(&mut c.attributes),
            std::mem::take(&mut c.entities),
            time_zone,
        )
        .map_err(FileError)?;
        // The program writes its columns in this order after the built-in slots.
        for (k, &(col, _)) in declared_columns.iter().enumerate() {
            slots[col] = N_FEATURES + k;
        }
        if program.values() > MAX_DECLARED {
            return Err(FileError(format!(
                "{} declared columns; this build computes at most {MAX_DECLARED} besides the built-in ones",
                program.values()
            )));
        }
        Some(Arc::new(program))
    };
    if !own_offsets && slots.iter().any(|&s| s == 1 || s == 2) {
        return Err(FileError(
            "`tx.weekend` and `tx.night` are built in with each timestamp's own offset; with another `time_zone`, declare them under other names".into(),
        ));
    }
    Ok(Plan {
        source: text.to_string(),
        names,
        slots,
        anomaly,
        program,
    })
}

impl<'a> Compiler<'a> {
    /// The built-in index of a declaration equal to the default file's.
    fn builtin_index(&self, d: &Decl) -> Result<Option<usize>, FileError> {
        let Some(i) = NAMES.iter().position(|n| *n == d.name) else {
            return Ok(None);
        };
        if builtin_decls().get(&d.name) != Some(d) {
            return fail(
                &d.name,
                "name",
                "is a built-in feature's name, declared differently from models/features-default.toml; give it another name",
            );
        }
        // The merchant's built-in features stay built in: their windows
        // are whole hours, where a declared one is exact to the second.
        if self.interpret_all && interpretable(d) && on_card(d) {
            return Ok(None);
        }
        Ok(Some(i))
    }

    fn decl(&self, name: &str) -> Option<&'a Decl> {
        self.decls
            .get(name)
            .copied()
            .or_else(|| builtin_decls().get(name))
    }

    /// The item index of a declared feature, compiling it (and what it
    /// reads) on first use.
    fn feature(&mut self, name: &str) -> Result<usize, FileError> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok(i);
        }
        if self.visiting.iter().any(|n| n == name) {
            return Err(FileError(format!(
                "a cycle: {} -> {name}",
                self.visiting.join(" -> ")
            )));
        }
        let Some(d) = self.decl(name) else {
            return Err(FileError(format!("unknown feature `{name}`")));
        };
        self.visiting.push(name.to_string());
        let kind = self.kind(d)?;
        self.visiting.pop();
        self.items.push(Item {
            name: name.to_string(),
            kind,
        });
        let i = self.items.len() - 1;
        self.by_name.insert(name.to_string(), i);
        Ok(i)
    }

    fn tag(&mut self, name: &str) -> Result<usize, FileError> {
        let key = format!("tag {name}");
        if let Some(&i) = self.by_name.get(&key) {
            return Ok(i);
        }
        if self.visiting.contains(&key) {
            return Err(FileError(format!(
                "a cycle: {} -> {key}",
                self.visiting.join(" -> ")
            )));
        }
        let text = &self.file.tags[name];
        self.visiting.push(key.clone());
        // A tag is kept with its event and read by any filter, so it never
        // reads a label, whichever window first asks for it.
        let labels_known = std::mem::replace(&mut self.labels_known, false);
        let expr = self.expr(name, "tags", text, Scope::Features);
        self.labels_known = labels_known;
        let expr = expr.map_err(|e| FileError(format!("tag `{name}`: {}", e.0)))?;
        self.visiting.pop();
        self.items.push(Item {
            name: key.clone(),
            kind: ItemKind::Tag(expr),
        });
        let i = self.items.len() - 1;
        self.by_name.insert(key, i);
        Ok(i)
    }

    /// An aggregation's `of` and `where`.
    fn of_and_filter(
        &mut self,
        d: &Decl,
        needs_of: bool,
    ) -> Result<(Option<Expr>, Option<Expr>), FileError> {
        let (name, agg) = (d.name.as_str(), d.agg.as_deref().unwrap_or_default());
        let of = match (&d.of, needs_of) {
            (Some(text), true) => Some(self.expr(name, "of", text, Scope::Event)?),
            (None, true) => return fail(name, "of", format!("`{agg}` needs `of`")),
            (Some(_), false) => return fail(name, "of", format!("`{agg}` takes no `of`")),
            (None, false) => None,
        };
        let filter = match &d.filter {
            Some(text) => Some(self.expr(name, "where", text, Scope::Event)?),
            None => None,
        };
        Ok((of, filter))
    }

    /// An aggregation's entity: 0 and the fields besides the card for a
    /// card entity (`card_id+mcc`), else the index of an entity besides
    /// the card (`merchant_id`, `attributes.device_id+mcc`) plus one.
    fn entity(&mut self, feature: &str, text: &str) -> Result<(usize, Vec<Expr>), FileError> {
        let mut parts: Vec<&str> = text.split('+').map(str::trim).collect();
        let on_card = parts.contains(&"card_id");
        parts.retain(|p| *p != "card_id");
        if parts.len() > 4 {
            return fail(feature, "entity", "at most four fields besides `card_id`");
        }
        if on_card {
            let mut key_columns = Vec::new();
            for p in parts {
                let slot = match (Field::of(p), self.attribute(p)) {
                    (Some(Field::IsFraud), _) => {
                        return fail(
                            feature,
                            "entity",
                            "`is_fraud` cannot key an entity: it is known only a label delay after the transaction",
                        );
                    }
                    (Some(f), _) => Program::field_slot(f),
                    (None, Ok(Some(k))) => Program::attribute_slot(k),
                    (None, Err(e)) => return fail(feature, "entity", e),
                    (None, Ok(None)) => {
                        return fail(
                            feature,
                            "entity",
                            format!("`{p}` is not a transaction field nor `attributes.NAME`"),
                        );
                    }
                };
                key_columns.push(Expr::Var(slot));
            }
            return Ok((0, key_columns));
        }
        let mut key = Vec::new();
        for p in parts {
            let part = match (Field::of(p), p.strip_prefix("attributes.")) {
                (Some(f), _) if EntityPart::FIELDS.contains(&f) => EntityPart::Field(f),
                (_, Some(name)) if !name.is_empty() => EntityPart::Attribute(name.to_string()),
                _ => {
                    return fail(
                        feature,
                        "entity",
                        format!(
                            "`{p}` cannot key an entity: use `card_id`, `merchant_id`, `mcc`, `channel`, `country`, `currency` or `attributes.NAME`, joined by `+`"
                        ),
                    );
                }
            };
            if key.contains(&part) {
                return fail(feature, "entity", format!("`{p}` is named twice"));
            }
            key.push(part);
        }
        if key.is_empty() {
            return fail(feature, "entity", "names no field");
        }
        let k = match self.entities.iter().position(|e| *e == key) {
            Some(k) => k,
            None if self.entities.len() == MAX_ENTITIES => {
                return fail(
                    feature,
                    "entity",
                    format!("`{text}`: at most {MAX_ENTITIES} entities besides the card"),
                );
            }
            None => {
                self.entities.push(key);
                self.entities.len() - 1
            }
        };
        Ok((k + 1, Vec::new()))
    }

    /// The slot of `attributes.NAME`, if `name` is one.
    fn attribute(&mut self, name: &str) -> Result<Option<usize>, String> {
        let Some(key) = name.strip_prefix("attributes.") else {
            return Ok(None);
        };
        if key.is_empty() {
            return Err("`attributes.` needs a name".into());
        }
        if let Some(k) = self.attributes.iter().position(|a| a == key) {
            return Ok(Some(k));
        }
        if self.attributes.len() == MAX_ATTRIBUTES {
            return Err(format!("more than {MAX_ATTRIBUTES} attributes are read"));
        }
        self.attributes.push(key.to_string());
        Ok(Some(self.attributes.len() - 1))
    }

    fn lookup(&mut self, name: &str, scope: Scope) -> Result<Named, String> {
        if let Some(f) = Field::of(name) {
            if f == Field::IsFraud && !self.labels_known {
                return Err(
                    "`is_fraud` is known only a label delay after the transaction: read it in the `of` or `where` of an aggregation with `delay = \"label\"`"
                        .into(),
                );
            }
            return Ok(Named::Field(f));
        }
        if let Some(k) = self.attribute(name)? {
            return Ok(Named::Attribute(k));
        }
        if self.file.tags.contains_key(name) {
            return self.tag(name).map(Named::Tag).map_err(|e| e.0);
        }
        if scope == Scope::Event {
            return Err(format!(
                "unknown field or tag `{name}` (this expression is evaluated on each event alone: it reads the transaction's fields and the tags)"
            ));
        }
        match self.decl(name) {
            Some(d) if !interpretable(d) => Err(format!(
                "`{name}` is a label-delayed merchant window, computed only by the built-in engine; a declared feature can read the other declared features and the transaction's fields"
            )),
            Some(_) => self.feature(name).map(Named::Feature).map_err(|e| e.0),
            None => Err(format!("unknown feature, field or tag `{name}`")),
        }
    }

    fn expr(
        &mut self,
        feature: &str,
        key: &str,
        text: &str,
        scope: Scope,
    ) -> Result<Expr, FileError> {
        let mut e = match Expr::parse(text) {
            Ok(e) => e,
            Err(err) => return fail(feature, key, err),
        };
        let mut named: Vec<(String, Named)> = Vec::new();
        for n in e.names() {
            if named.iter().any(|(m, _)| m == n) {
                continue;
            }
            match self.lookup(n, scope) {
                Ok(x) => named.push((n.to_string(), x)),
                Err(reason) => return fail(feature, key, reason),
            }
        }
        let resolved = e.resolve(
            &mut |n| {
                Ok(named
                    .iter()
                    .position(|(m, _)| m == n)
                    .expect("looked up above"))
            },
            &mut |slot, s| match named[slot].1 {
                Named::Field(f) => f.code_of(s),
                Named::Attribute(_) => Ok(hash_code(s)),
                _ => Err(format!("\"{s}\" is compared with a number")),
            },
        );
        if let Err(reason) = resolved {
            return fail(feature, key, reason);
        }
        // Slots so far index `named`; the program's are fields then items.
        Ok(e.map_vars(&|v| match named[v].1 {
            Named::Field(f) => Program::field_slot(f),
            Named::Attribute(k) => Program::attribute_slot(k),
            Named::Feature(i) | Named::Tag(i) => Program::item_slot(i),
        }))
    }

    fn kind(&mut self, d: &'a Decl) -> Result<ItemKind, FileError> {
        let name = d.name.as_str();
        let kinds = [d.value.is_some(), d.expr.is_some(), d.agg.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return fail(
                name,
                "value",
                "declare exactly one of `value`, `expr` and `agg`",
            );
        }
        let no_agg_keys = [
            ("entity", d.entity.is_some()),
            ("of", d.of.is_some()),
            ("window", d.window.is_some()),
            ("where", d.filter.is_some()),
            ("current", d.current.is_some()),
            ("delay", d.delay.is_some()),
            ("cap", d.cap.is_some()),
        ];
        if d.agg.is_none()
            && let Some((key, _)) = no_agg_keys.iter().find(|(_, set)| *set)
        {
            return fail(name, key, "only aggregations take it");
        }
        if let Some(text) = &d.value {
            let e = self.expr(name, "value", text, Scope::Event)?;
            return Ok(ItemKind::Value(e));
        }
        if let Some(text) = &d.expr {
            let e = self.expr(name, "expr", text, Scope::Features)?;
            return Ok(ItemKind::Derived(e));
        }
        let agg = d.agg.as_deref().unwrap_or_default();
        let Some(kind) = AggKind::of(agg) else {
            return fail(
                name,
                "agg",
                format!(
                    "`{agg}` is not an aggregation this build interprets (count, sum, mean, std, min, max, distinct, share, time_since_last, speed_kmh); the merchant's label windows are built in only"
                ),
            );
        };
        let entity_text = d.entity.as_deref().unwrap_or("card_id");
        let (entity, key_columns) = self.entity(name, entity_text)?;
        let delayed = match d.delay.as_deref() {
            None => false,
            Some("label") => true,
            Some(other) => {
                return fail(
                    name,
                    "delay",
                    format!(
                        "`{other}`: a declared window is delayed by the engine's label delay, `delay = \"label\"` (--label-delay-days)"
                    ),
                );
            }
        };
        if delayed && d.current == Some(true) {
            return fail(
                name,
                "current",
                "a delayed window never counts the event itself: its label is not known yet",
            );
        }
        if kind == AggKind::SpeedKmh {
            // The built-in speed's definition: from the previous event, if
            // it is at most 30 days old (so the window closes a second later).
            for (key, set) in [
                ("window", d.window.is_some()),
                ("current", d.current.is_some()),
            ] {
                if set {
                    return fail(
                        name,
                        key,
                        "`speed_kmh` is from the previous event within 30 days; it takes none",
                    );
                }
            }
        }
        let window = match (&d.window, kind) {
            (Some(w), _) => parse_duration(w).or_else(|e| fail(name, "window", e))?,
            (None, AggKind::TimeSinceLast) => MAX_WINDOW,
            (None, AggKind::SpeedKmh) => MAX_WINDOW + 1,
            (None, _) => return fail(name, "window", "an aggregation needs a window"),
        };
        if window > MAX_WINDOW && kind != AggKind::SpeedKmh {
            return fail(name, "window", "at most 30d");
        }
        let needs_of = !matches!(
            kind,
            AggKind::Count | AggKind::TimeSinceLast | AggKind::SpeedKmh
        );
        self.labels_known = delayed;
        let of_and_filter = self.of_and_filter(d, needs_of);
        self.labels_known = false;
        let (of, filter) = of_and_filter?;
        // `share` compares each event's `of` with the current event's,
        // whose label is not known yet.
        let label = Program::field_slot(Field::IsFraud);
        let of_reads_label = of.as_ref().is_some_and(|e| e.reads(label));
        if kind == AggKind::Share && of_reads_label {
            return fail(
                name,
                "of",
                "`share` compares with the current event's value, and its `is_fraud` is not known yet",
            );
        }
        let cap = match &d.cap {
            None => None,
            Some(NumberOrDuration::Number(v)) => Some(*v),
            Some(NumberOrDuration::Text(t)) => {
                Some(parse_duration(t).or_else(|e| fail(name, "cap", e))? as f64)
            }
        };
        if kind == AggKind::TimeSinceLast && cap.is_some_and(|c| c > MAX_WINDOW as f64) {
            return fail(name, "cap", "at most 30d: the log holds 30 days");
        }
        Ok(ItemKind::Agg {
            kind,
            entity,
            window,
            delayed,
            current: d.current.unwrap_or(true),
            key_columns,
            of,
            filter,
            cap,
            missing: d.missing.unwrap_or(0.0),
        })
    }
}

/// Where an expression is evaluated: on an event alone (`value`, `of`,
/// `where`), or over the features computed for it (`expr`, tags).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scope {
    Event,
    Features,
}

/// Whether the interpreter can compute a declaration (label-delayed
/// windows are the built-in merchant features alone).
fn interpretable(d: &Decl) -> bool {
    // The default file's merchant windows are built in, at whole hours.
    let built_in_merchant = !on_card(d) && builtin_decls().get(&d.name) == Some(d);
    match d.agg.as_deref() {
        None => true,
        Some(a) => AggKind::of(a).is_some() && !built_in_merchant,
    }
}

/// Whether a declaration is the card's, or no aggregation at all.
fn on_card(d: &Decl) -> bool {
    d.entity
        .as_deref()
        .is_none_or(|e| e.split('+').any(|p| p.trim() == "card_id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_the_built_in_engine() {
        let plan = Plan::compile(DEFAULT_FILE).unwrap();
        assert_eq!(plan.names, NAMES);
        assert!(plan.is_prefix() && plan.is_default());
        assert_eq!(plan.anomaly, crate::model::ANOMALY_FEATURES);
    }

    fn error(text: &str) -> String {
        Plan::compile(&format!("format = 1\n{text}")).unwrap_err().0
    }

    #[test]
    fn errors_name_the_feature_and_key() {
        let e = error(
            "[[feature]]\nname = \"a\"\nentity = \"card_id\"\nagg = \"count\"\nwindow = \"31d\"",
        );
        assert_eq!(e, "feature `a`, `window`: at most 30d");
        let e = error(
            "[[feature]]\nname = \"a\"\nentity = \"attributes.device+hour\"\nagg = \"count\"\nwindow = \"1d\"",
        );
        assert!(
            e.starts_with("feature `a`, `entity`: `hour` cannot key"),
            "{e}"
        );
        let e = error("[[feature]]\nname = \"a\"\nexpr = \"merchant.risk_7d * 2\"");
        assert!(e.contains("is a label-delayed merchant window"), "{e}");
        let e = error("[[feature]]\nname = \"a\"\nagg = \"mean\"\nwindow = \"1d\"");
        assert_eq!(e, "feature `a`, `of`: `mean` needs `of`");
        let e = error("[[feature]]\nname = \"a\"\nvalue = \"hour +\"");
        assert!(e.starts_with("feature `a`, `value`: at character"), "{e}");
        let e = error("[[feature]]\nname = \"a\"\nvalue = \"colour\"");
        assert!(e.contains("unknown field or tag `colour`"), "{e}");
        let e = error(
            "[[feature]]\nname = \"a\"\nexpr = \"b + 1\"\n[[feature]]\nname = \"b\"\nexpr = \"a\"",
        );
        assert!(e.contains("a cycle: a -> b -> a"), "{e}");
        let e = error("[[feature]]\nname = \"card.count_7d\"\nagg = \"count\"\nwindow = \"6d\"");
        assert!(e.contains("declared differently"), "{e}");
        let e = error("[[feature]]\nname = \"a\"\nexpr = \"merchant.risk_7d * 2\"");
        assert!(e.contains("only by the built-in engine"), "{e}");
        let e = error("[[feature]]\nname = \"a\"\nvalue = \"channel == 'web'\"");
        assert!(e.contains("\"web\" is not a channel"), "{e}");
        let e = error(
            "[[feature]]\nname = \"a\"\nvalue = \"hour\"\n[[feature]]\nname = \"a\"\nvalue = \"hour\"",
        );
        assert_eq!(e, "feature `a`, `name`: declared twice");
        let e = Plan::compile("format = 2").unwrap_err().0;
        assert!(e.contains("`format` 2 is not supported"), "{e}");
        let e = Plan::compile("format = 1\ncolour = 1").unwrap_err().0;
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    /// `speed_kmh` on a card entity narrower than the card, and the place
    /// as fields.
    #[test]
    fn speed_is_declared_per_entity_from_its_previous_place() {
        use crate::features::{Engine, FeatureConfig};
        use crate::ingest::{Channel, Transaction};
        let plan = Plan::compile(
            "format = 1
[[feature]]
name = \"card_channel.speed_kmh\"
entity = \"card_id+channel\"
agg = \"speed_kmh\"
[[feature]]
name = \"north\"
value = \"lat > 45\"
",
        )
        .unwrap();
        let mut engine = Engine::with_plan(FeatureConfig::default(), &plan);
        let mut speeds = Vec::new();
        let mut north = Vec::new();
        // Paris in person, then Berlin online an hour later, then Lyon in
        // person two hours after Paris, then a payment with no place.
        let events = [
            (Channel::Pos, Some((48.8566, 2.3522)), 0),
            (Channel::Ecom, Some((52.52, 13.405)), 3600),
            (Channel::Pos, Some((45.764, 4.8357)), 7200),
            (Channel::Pos, None, 7300),
        ];
        for (i, (channel, place, dt)) in events.into_iter().enumerate() {
            let tx = Transaction {
                transaction_id: i.to_string(),
                card_id: "c".into(),
                merchant_id: "m".into(),
                amount: 5.0,
                channel: Some(channel),
                lat: place.map(|p| p.0),
                lon: place.map(|p| p.1),
                time: crate::ingest::EventTime {
                    utc: 1_522_540_800 + dt,
                    offset: 0,
                },
                ..Transaction::default()
            };
            let f = engine.process(&tx).unwrap();
            speeds.push(f.0[plan.slots[0]]);
            north.push(f.0[plan.slots[1]]);
        }
        // No earlier in-person or online event, then Paris to Lyon (about
        // 392 km) in two hours, not Berlin to Lyon; no place, no speed.
        assert_eq!(speeds[..2], [0.0, 0.0]);
        assert!((speeds[2] - 196.0).abs() < 2.0, "{speeds:?}");
        assert_eq!(speeds[3], 0.0);
        // A missing place compares as false.
        assert_eq!(north, [1.0, 1.0, 1.0, 0.0]);
        let e = Plan::compile(
            "format = 1\n[[feature]]\nname = \"s\"\nagg = \"speed_kmh\"\nwindow = \"1d\"",
        )
        .unwrap_err();
        assert!(e.0.contains("takes none"), "{e}");
    }

    /// Attributes as values and as part of a card entity: a device's count
    /// on the card, and a number read as it is.
    #[test]
    fn attributes_are_fields() {
        use crate::features::{Engine, FeatureConfig};
        use crate::ingest::{AttrValue, Transaction};
        let plan = Plan::compile(
            "format = 1
[[feature]]
name = \"card_device.count_1d\"
entity = \"card_id+attributes.device_id\"
agg = \"count\"
window = \"1d\"
[[feature]]
name = \"account_age\"
value = \"attributes.account_age_days\"
[[feature]]
name = \"known_device\"
value = \"attributes.device_id == 'd-1'\"
",
        )
        .unwrap();
        let mut engine = Engine::with_plan(FeatureConfig::default(), &plan);
        let mut tx = Transaction {
            card_id: "c".into(),
            merchant_id: "m".into(),
            amount: 5.0,
            ..Transaction::default()
        };
        let mut seen = Vec::new();
        for (i, device) in ["d-1", "d-1", "d-2", "", "d-1"].into_iter().enumerate() {
            tx.transaction_id = i.to_string();
            tx.time.utc = 1_522_540_800 + 60 * i as i64;
            tx.attributes.clear();
            if !device.is_empty() {
                tx.attributes
                    .set("device_id", AttrValue::Text(device.into()))
                    .unwrap();
            }
            tx.attributes
                .set("account_age_days", AttrValue::Number(40.0 + i as f64))
                .unwrap();
            let f = engine.process(&tx).unwrap();
            let row: Vec<f32> = plan.slots.iter().map(|&s| f.0[s]).collect();
            seen.push(row);
        }
        let counts: Vec<f32> = seen.iter().map(|r| r[0]).collect();
        // The event without a device takes `missing` (0) and matches no other.
        assert_eq!(counts, [1.0, 2.0, 1.0, 0.0, 3.0]);
        assert_eq!(seen[2][1], 42.0);
        let known: Vec<f32> = seen.iter().map(|r| r[2]).collect();
        assert_eq!(known, [1.0, 1.0, 0.0, 0.0, 1.0]);
    }

    /// Entities besides the card: a device's count and its cards' amounts
    /// over every card that used it, a merchant's count in the last hour,
    /// and what an entity's key may be made of.
    #[test]
    fn entities_beside_the_card() {
        use crate::features::{Engine, FeatureConfig};
        use crate::ingest::{AttrValue, Transaction};
        let plan = Plan::compile(
            "format = 1
[[feature]]
name = \"device.count_1d\"
entity = \"attributes.device_id\"
agg = \"count\"
window = \"1d\"
[[feature]]
name = \"device.max_amount_1d\"
entity = \"attributes.device_id\"
agg = \"max\"
of = \"amount\"
window = \"1d\"
missing = -1
[[feature]]
name = \"merchant.count_last_hour\"
entity = \"merchant_id\"
agg = \"count\"
window = \"1h\"
current = false
",
        )
        .unwrap();
        let program = plan.program.as_deref().unwrap();
        assert_eq!(program.entities(), 2);
        assert!(
            !program.card_logged(),
            "no aggregation reads the card's log"
        );
        let mut engine = Engine::with_plan(FeatureConfig::default(), &plan);
        // Three cards on one device and one merchant, then a card without
        // a device, then the device a day and more later.
        let events = [
            ("c1", Some("d-1"), 10.0, 0),
            ("c2", Some("d-1"), 30.0, 60),
            ("c3", Some("d-1"), 20.0, 120),
            ("c3", None, 500.0, 180),
            ("c1", Some("d-1"), 5.0, 3700),
            ("c2", Some("d-1"), 7.0, 86_400 + 200),
        ];
        let mut rows = Vec::new();
        for (i, (card, device, amount, dt)) in events.into_iter().enumerate() {
            let mut tx = Transaction {
                transaction_id: i.to_string(),
                card_id: card.into(),
                merchant_id: "m".into(),
                amount,
                ..Transaction::default()
            };
            tx.time.utc = 1_522_540_800 + dt;
            if let Some(d) = device {
                tx.attributes
                    .set("device_id", AttrValue::Text(d.into()))
                    .unwrap();
            }
            let f = engine.process(&tx).unwrap();
            rows.push(plan.slots.iter().map(|&s| f.0[s]).collect::<Vec<f32>>());
        }
        let column = |k: usize| rows.iter().map(|r| r[k]).collect::<Vec<f32>>();
        assert_eq!(column(0), [1.0, 2.0, 3.0, 0.0, 4.0, 2.0]);
        assert_eq!(column(1), [10.0, 30.0, 30.0, -1.0, 30.0, 7.0]);
        // The merchant's events of the hour before, over every card.
        assert_eq!(column(2), [0.0, 1.0, 2.0, 3.0, 2.0, 0.0]);
        // At the next weekly sweep, a week past the longest window, the
        // device's and the merchant's logs go; the new merchant's stays.
        let later = Transaction {
            transaction_id: "later".into(),
            card_id: "c9".into(),
            merchant_id: "m2".into(),
            time: crate::ingest::EventTime {
                utc: 1_522_540_800 + 8 * 86_400,
                offset: 0,
            },
            ..Transaction::default()
        };
        engine.process(&later).unwrap();
        assert_eq!(engine.stats().entities_expired, 2);

        for (entity, says) in [
            ("amount", "`amount` cannot key an entity"),
            ("merchant_id+merchant_id", "named twice"),
            ("attributes.", "cannot key an entity"),
            ("card_id+is_fraud", "`is_fraud` cannot key an entity"),
            ("is_fraud", "`is_fraud` cannot key an entity"),
        ] {
            let e = Plan::compile(&format!(
                "format = 1\n[[feature]]\nname = \"d\"\nentity = \"{entity}\"\nagg = \"count\"\nwindow = \"1d\""
            ))
            .unwrap_err();
            assert!(
                e.0.starts_with("feature `d`, `entity`:") && e.0.contains(says),
                "{e}"
            );
        }
        let e = Plan::compile(
            "format = 1\n[[feature]]\nname = \"d\"\nentity = \"merchant_id\"\nagg = \"count\"\nwindow = \"1d\"\ndelay = \"2d\"",
        )
        .unwrap_err();
        assert!(e.0.contains("`delay`"), "{e}");
        let five: String = (0..5)
            .map(|k| format!("[[feature]]\nname = \"d{k}\"\nentity = \"attributes.a{k}\"\nagg = \"count\"\nwindow = \"1d\"\n"))
            .collect();
        let e = Plan::compile(&format!("format = 1\n{five}")).unwrap_err();
        assert!(e.0.contains("at most 4 entities besides the card"), "{e}");
    }

    /// Windows over events whose labels are known: they end one label
    /// delay before the event, never count it, and are the only place
    /// `is_fraud` may be read.
    #[test]
    fn label_windows_count_what_is_known() {
        use crate::features::{Engine, FeatureConfig};
        use crate::ingest::Transaction;
        const DAY: i64 = 86_400;
        let plan = Plan::compile(
            "format = 1
[[feature]]
name = \"card.frauds_known_30d\"
entity = \"card_id\"
agg = \"sum\"
of = \"is_fraud == 1\"
window = \"30d\"
delay = \"label\"
[[feature]]
name = \"merchant.fraud_share_known_7d\"
entity = \"merchant_id\"
agg = \"mean\"
of = \"is_fraud == 1\"
window = \"7d\"
delay = \"label\"
missing = -1
",
        )
        .unwrap();
        let cfg = FeatureConfig {
            label_delay_secs: 2 * DAY,
            ..FeatureConfig::default()
        };
        let mut engine = Engine::with_plan(cfg, &plan);
        // (card, fraud, time in days); one merchant.
        let events = [
            ("c1", true, 0.0),
            ("c2", false, 1.0),
            ("c1", false, 2.5),
            ("c1", true, 3.5),
            ("c1", false, 6.0),
        ];
        let mut seen = Vec::new();
        for (i, (card, fraud, day)) in events.into_iter().enumerate() {
            let mut tx = Transaction {
                transaction_id: i.to_string(),
                card_id: card.into(),
                merchant_id: "m".into(),
                amount: 5.0,
                is_fraud: Some(fraud),
                ..Transaction::default()
            };
            tx.time.utc = 1_522_540_800 + (day * DAY as f64) as i64;
            let f = engine.process(&tx).unwrap();
            seen.push((f.0[plan.slots[0]], f.0[plan.slots[1]]));
        }
        let (frauds, shares): (Vec<f32>, Vec<f32>) = seen.into_iter().unzip();
        assert_eq!(frauds, [0.0, 0.0, 1.0, 1.0, 2.0]);
        assert_eq!(shares, [-1.0, -1.0, 1.0, 0.5, 0.5]);
        let program = plan.program.as_deref().unwrap();
        // The service brings labels to the card's windows, not the merchant's.
        let (feature, needs) = program.unservable().unwrap();
        assert_eq!(feature, "merchant.fraud_share_known_7d");
        assert!(
            needs.contains("per `merchant_id` over fraud labels"),
            "{needs}"
        );
        assert!(program.reads_labels());

        let window = "entity = \"card_id\"\nagg = \"count\"\nwindow = \"1d\"";
        for (decl, says) in [
            ("value = \"is_fraud\"", "`value`: `is_fraud` is known only"),
            (
                &format!("{window}\nwhere = \"is_fraud == 1\"") as &str,
                "`where`: `is_fraud` is known only",
            ),
            (
                &format!("{window}\ndelay = \"2d\""),
                "`delay`: `2d`: a declared window is delayed by the engine's label delay",
            ),
            (
                &format!("{window}\ndelay = \"label\"\ncurrent = true"),
                "`current`: a delayed window never counts the event itself",
            ),
            (
                "entity = \"card_id\"\nagg = \"share\"\nof = \"is_fraud\"\nwindow = \"7d\"\ndelay = \"label\"",
                "`of`: `share` compares with the current event's value",
            ),
        ] {
            let e = error(&format!("[[feature]]\nname = \"a\"\n{decl}"));
            assert!(e.starts_with("feature `a`, ") && e.contains(says), "{e}");
        }
        // A delayed share of a field that is not the label is fine.
        Plan::compile(
            "format = 1\n[[feature]]\nname = \"a\"\nagg = \"share\"\nof = \"mcc\"\nwindow = \"7d\"\ndelay = \"label\"",
        )
        .unwrap();
        // A tag is kept with its event and read by any filter: never a label.
        let e = error(&format!(
            "[tags]\nknown_fraud = \"is_fraud == 1\"\n[[feature]]\nname = \"a\"\n{window}\ndelay = \"label\"\nwhere = \"known_fraud\""
        ));
        assert!(
            e.contains("tag `known_fraud`") && e.contains("`is_fraud` is known only"),
            "{e}"
        );
    }

    /// A card's declared log travels through its changelog record, and an
    /// engine under another file (or none) drops it on restore.
    #[test]
    fn declared_logs_restore_only_under_their_file() {
        use crate::features::card::CardState;
        use crate::features::{Engine, FeatureConfig};
        use crate::ingest::Transaction;
        let extended = Plan::compile(include_str!("../../models/features-extended.toml")).unwrap();
        let mut engine = Engine::with_plan(FeatureConfig::default(), &extended);
        let mut tx = Transaction {
            card_id: "c".into(),
            merchant_id: "m".into(),
            amount: 5.0,
            mcc: Some(5411),
            ..Transaction::default()
        };
        for i in 0..3 {
            tx.transaction_id = i.to_string();
            tx.time.utc = 1_522_540_800 + 60 * i;
            engine.process(&tx).unwrap();
        }
        let (key, card) = engine.all_cards().next().unwrap();
        assert_eq!(card.declared().map(|d| d.len()), Some(3));
        let mut bytes = Vec::new();
        card.encode(&mut bytes);
        let restored = CardState::decode(&bytes).unwrap();
        assert_eq!(restored.declared(), card.declared());

        let mut same = Engine::with_plan(FeatureConfig::default(), &extended);
        same.insert_card(key, restored.clone());
        assert_eq!(same.card(key).unwrap().declared().map(|d| d.len()), Some(3));
        let mut default = Engine::new(FeatureConfig::default());
        default.insert_card(key, restored);
        assert!(default.card(key).unwrap().declared().is_none());
    }

    /// `hour` in an IANA zone follows its daylight saving changes; the
    /// transaction's own offset is ignored.
    #[test]
    fn hours_in_a_named_time_zone() {
        use crate::features::{Engine, FeatureConfig};
        use crate::ingest::Transaction;
        use crate::ingest::time::parse_timestamp;
        let plan = Plan::compile(
            "format = 1\ntime_zone = \"Europe/Paris\"\n[[feature]]\nname = \"h\"\nvalue = \"hour\"\n[[feature]]\nname = \"wd\"\nvalue = \"weekday\"",
        )
        .unwrap();
        let mut engine = Engine::with_plan(FeatureConfig::default(), &plan);
        let mut hour = |ts: &str| {
            let tx = Transaction {
                transaction_id: ts.into(),
                card_id: "c".into(),
                merchant_id: "m".into(),
                time: parse_timestamp(ts.as_bytes()).unwrap(),
                ..Transaction::default()
            };
            let f = engine.process(&tx).unwrap();
            (f.0[plan.slots[0]], f.0[plan.slots[1]])
        };
        // The last Saturday of March 2018 in winter time (UTC+1), the
        // Sunday after the change (UTC+2); the offset given is ignored.
        assert_eq!(hour("2018-03-24T01:30:00Z"), (2.0, 5.0));
        assert_eq!(hour("2018-03-25T01:30:00Z"), (3.0, 6.0));
        assert_eq!(hour("2018-03-25T09:30:00+05:00"), (6.0, 6.0));
        let e = Plan::compile("format = 1\ntime_zone = \"Mars/Olympus\"").unwrap_err();
        assert!(e.0.contains("`Mars/Olympus` is not a time zone"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert!(parse_duration("0d").is_err() && parse_duration("1w").is_err());
    }
}
