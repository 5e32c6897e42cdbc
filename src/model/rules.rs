//! Rules over named features, one per line:
//!
//! ```text
//! # name      severity  condition
//! burst_then_big high: card.count_1h > 10 and amount > 500
//! far_and_fast medium: card.geo_velocity_kmh > 900 and not tx.ecom == 1
//! ```
//!
//! A condition combines comparisons (`< <= > >= == !=`) of arithmetic
//! expressions (`+ - * /`, parentheses) over feature names, numbers and the
//! model's `score` and `anomaly`, with `and`, `or` and `not`. Severity
//! `high` makes the decision at least block, `medium` at least review, and
//! `low` only adds the rule to the reasons.

use crate::features::NAMES;
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rule `{rule}` (line {line}, column {column}): {message}")]
pub struct RuleError {
    pub rule: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Values a rule can read besides the features.
const SCORE: usize = usize::MAX - 1;
const ANOMALY: usize = usize::MAX;

#[derive(Debug, Clone, PartialEq)]
enum Num {
    Const(f64),
    Var(usize),
    Neg(Box<Num>),
    Bin(char, Box<Num>, Box<Num>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    Cmp(Cmp, Num, Num),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub severity: Severity,
    pub source: String,
    cond: Cond,
}

/// The inputs of a rule: the features, then the model's score and anomaly.
pub struct RuleInput<'a> {
    /// The slots of [`crate::features::Features`].
    pub features: &'a [f32],
    pub score: f64,
    pub anomaly: f64,
}

impl RuleInput<'_> {
    fn get(&self, i: usize) -> f64 {
        match i {
            SCORE => self.score,
            ANOMALY => self.anomaly,
            _ => self.features[i] as f64,
        }
    }
}

impl Num {
    fn eval(&self, x: &RuleInput) -> f64 {
        match self {
            Num::Const(v) => *v,
            Num::Var(i) => x.get(*i),
            Num::Neg(a) => -a.eval(x),
            Num::Bin(op, a, b) => {
                let (a, b) = (a.eval(x), b.eval(x));
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    _ => {
                        if b == 0.0 {
                            0.0
                        } else {
                            a / b
                        }
                    }
                }
            }
        }
    }
}

impl Cond {
    fn eval(&self, x: &RuleInput) -> bool {
        match self {
            Cond::Cmp(op, a, b) => {
                let (a, b) = (a.eval(x), b.eval(x));
                match op {
                    Cmp::Lt => a < b,
                    Cmp::Le => a <= b,
                    Cmp::Gt => a > b,
                    Cmp::Ge => a >= b,
                    Cmp::Eq => a == b,
                    Cmp::Ne => a != b,
                }
            }
            Cond::And(a, b) => a.eval(x) && b.eval(x),
            Cond::Or(a, b) => a.eval(x) || b.eval(x),
            Cond::Not(a) => !a.eval(x),
        }
    }
}

impl Rule {
    pub fn fires(&self, x: &RuleInput) -> bool {
        self.cond.eval(x)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

impl Num {
    fn reads(&self, var: usize) -> bool {
        match self {
            Num::Const(_) => false,
            Num::Var(i) => *i == var,
            Num::Neg(a) => a.reads(var),
            Num::Bin(_, a, b) => a.reads(var) || b.reads(var),
        }
    }
}

impl Cond {
    fn reads(&self, var: usize) -> bool {
        match self {
            Cond::Cmp(_, a, b) => a.reads(var) || b.reads(var),
            Cond::And(a, b) | Cond::Or(a, b) => a.reads(var) || b.reads(var),
            Cond::Not(a) => a.reads(var),
        }
    }
}

impl RuleSet {
    /// Whether any rule reads the anomaly score.
    pub fn reads_anomaly(&self) -> bool {
        self.rules.iter().any(|r| r.cond.reads(ANOMALY))
    }

    /// Whether any rule reads the model's score.
    pub fn reads_score(&self) -> bool {
        self.rules.iter().any(|r| r.cond.reads(SCORE))
    }
}

impl fmt::Display for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.rules {
            writeln!(f, "{} {:?}: {}", r.name, r.severity, r.source)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
}

/// Parses and checks a whole rules file against the built-in features.
pub fn parse_rules(text: &str) -> Result<RuleSet, RuleError> {
    parse_rules_with(text, &[])
}

/// [`parse_rules`] for a model whose features file declares more columns:
/// a rule may read them by name too.
pub fn parse_rules_for(
    text: &str,
    plan: &crate::features::file::Plan,
) -> Result<RuleSet, RuleError> {
    let declared: Vec<(&str, usize)> = plan
        .names
        .iter()
        .zip(&plan.slots)
        .filter(|(_, s)| **s >= crate::features::N_FEATURES)
        .map(|(n, s)| (n.as_str(), *s))
        .collect();
    parse_rules_with(text, &declared)
}

/// `declared`: the names of declared columns and their feature slots.
fn parse_rules_with(text: &str, declared: &[(&str, usize)]) -> Result<RuleSet, RuleError> {
    let mut rules: Vec<Rule> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("");
        if content.trim().is_empty() {
            continue;
        }
        let err = |rule: &str, column: usize, message: String| RuleError {
            rule: rule.to_string(),
            line,
            column,
            message,
        };
        let Some(colon) = content.find(':') else {
            let name = content.split_whitespace().next().unwrap_or("");
            return Err(err(name, 1, "expected `name severity: condition`".into()));
        };
        let head: Vec<&str> = content[..colon].split_whitespace().collect();
        let name = head.first().copied().unwrap_or("");
        if head.len() != 2 {
            return Err(err(
                name,
                1,
                "expected a name and a severity (low, medium or high) before `:`".into(),
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            || !name.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            return Err(err(
                name,
                1,
                "a rule name is letters, digits, `_` and `-`, starting with a letter".into(),
            ));
        }
        if rules.iter().any(|r| r.name == name) {
            return Err(err(
                name,
                1,
                "a rule of this name is already defined".into(),
            ));
        }
        let severity = match head[1] {
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            other => {
                let col = content.find(other).unwrap_or(0) + 1;
                return Err(err(
                    name,
                    col,
                    format!("unknown severity `{other}`; use low, medium or high"),
                ));
            }
        };
        let body = &content[colon + 1..];
        let offset = colon + 2;
        let toks = lex(body).map_err(|(pos, m)| err(name, offset + pos, m))?;
        let mut p = Parser {
            toks: &toks,
            pos: 0,
            end: body.len(),
            declared,
        };
        let cond = p.cond().map_err(|(pos, m)| err(name, offset + pos, m))?;
        if p.pos < toks.len() {
            return Err(err(
                name,
                offset + toks[p.pos].0,
                "unexpected text after the condition".into(),
            ));
        }
        rules.push(Rule {
            name: name.to_string(),
            severity,
            source: body.trim().to_string(),
            cond,
        });
    }
    Ok(RuleSet { rules })
}

type PErr = (usize, String);

fn lex(s: &str) -> Result<Vec<(usize, Tok)>, PErr> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            let text: String = s[start..i].chars().filter(|&c| c != '_').collect();
            let v = text
                .parse::<f64>()
                .map_err(|_| (start, format!("bad number `{}`", &s[start..i])))?;
            out.push((start, Tok::Num(v)));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
            out.push((start, Tok::Ident(s[start..i].to_string())));
        } else if c == b'(' {
            i += 1;
            out.push((start, Tok::LParen));
        } else if c == b')' {
            i += 1;
            out.push((start, Tok::RParen));
        } else {
            const OPS: [&str; 12] = [
                "<=", ">=", "==", "!=", "&&", "||", "<", ">", "+", "-", "*", "/",
            ];
            let Some(op) = OPS.iter().find(|op| s[i..].starts_with(**op)) else {
                return Err((
                    start,
                    format!(
                        "unexpected character `{}`",
                        &s[i..].chars().next().unwrap_or(' ')
                    ),
                ));
            };
            i += op.len();
            out.push((start, Tok::Op(op)));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: &'a [(usize, Tok)],
    pos: usize,
    end: usize,
    /// Declared columns a rule may read, with their feature slots.
    declared: &'a [(&'a str, usize)],
}

impl Parser<'_> {
    fn here(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end, |t| t.0)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.1)
    }

    fn keyword(&mut self, word: &str, op: &str) -> bool {
        match self.peek() {
            Some(Tok::Ident(w)) if w == word => {}
            Some(Tok::Op(o)) if *o == op => {}
            _ => return false,
        }
        self.pos += 1;
        true
    }

    fn cond(&mut self) -> Result<Cond, PErr> {
        let mut left = self.and()?;
        while self.keyword("or", "||") {
            left = Cond::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Cond, PErr> {
        let mut left = self.not()?;
        while self.keyword("and", "&&") {
            left = Cond::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Cond, PErr> {
        if self.keyword("not", "!") {
            return Ok(Cond::Not(Box::new(self.not()?)));
        }
        // A parenthesis may open a condition or an arithmetic term: try the
        // condition first and fall back.
        if self.peek() == Some(&Tok::LParen) {
            let save = self.pos;
            self.pos += 1;
            if let Ok(c) = self.cond()
                && self.peek() == Some(&Tok::RParen)
            {
                self.pos += 1;
                return Ok(c);
            }
            self.pos = save;
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Cond, PErr> {
        let left = self.sum()?;
        let at = self.here();
        let op = match self.peek() {
            Some(Tok::Op("<")) => Cmp::Lt,
            Some(Tok::Op("<=")) => Cmp::Le,
            Some(Tok::Op(">")) => Cmp::Gt,
            Some(Tok::Op(">=")) => Cmp::Ge,
            Some(Tok::Op("==")) => Cmp::Eq,
            Some(Tok::Op("!=")) => Cmp::Ne,
            _ => return Err((at, "expected a comparison (<, <=, >, >=, ==, !=)".into())),
        };
        self.pos += 1;
        Ok(Cond::Cmp(op, left, self.sum()?))
    }

    fn sum(&mut self) -> Result<Num, PErr> {
        let mut left = self.product()?;
        while let Some(Tok::Op(op @ ("+" | "-"))) = self.peek() {
            let op = op.chars().next().unwrap_or('+');
            self.pos += 1;
            left = Num::Bin(op, Box::new(left), Box::new(self.product()?));
        }
        Ok(left)
    }

    fn product(&mut self) -> Result<Num, PErr> {
        let mut left = self.unary()?;
        while let Some(Tok::Op(op @ ("*" | "/"))) = self.peek() {
            let op = op.chars().next().unwrap_or('*');
            self.pos += 1;
            left = Num::Bin(op, Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Num, PErr> {
        let at = self.here();
        match self.peek().cloned() {
            Some(Tok::Op("-")) => {
                self.pos += 1;
                Ok(Num::Neg(Box::new(self.unary()?)))
            }
            Some(Tok::Num(v)) => {
                self.pos += 1;
                Ok(Num::Const(v))
            }
            Some(Tok::Ident(name)) => {
                self.pos += 1;
                match name.as_str() {
                    "score" => Ok(Num::Var(SCORE)),
                    "anomaly" => Ok(Num::Var(ANOMALY)),
                    "and" | "or" | "not" => Err((at, format!("expected a value, found `{name}`"))),
                    _ => NAMES
                        .iter()
                        .position(|n| *n == name)
                        .or_else(|| {
                            self.declared
                                .iter()
                                .find(|(n, _)| *n == name)
                                .map(|(_, s)| *s)
                        })
                        .map(Num::Var)
                        .ok_or((at, format!("unknown feature `{name}`"))),
                }
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let v = self.sum()?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err((self.here(), "expected `)`".into()));
                }
                self.pos += 1;
                Ok(v)
            }
            None => Err((at, "unexpected end of the condition".into())),
            Some(t) => Err((at, format!("expected a value, found {t:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::idx;

    fn input(f: &[(usize, f32)]) -> [f32; crate::features::N_FEATURES] {
        let mut x = [0f32; crate::features::N_FEATURES];
        for &(i, v) in f {
            x[i] = v;
        }
        x
    }

    #[test]
    fn evaluates_with_precedence() {
        let set = parse_rules(
            "# comment\n\nburst high: card.count_1h > 10 and amount > 500\n\
             either low: amount > 1000 or (card.count_1h >= 3 and not tx.ecom == 1)\n\
             math medium: (amount - card.mean_amount_30d) / 2 > 100 && score >= 0.5\n",
        )
        .unwrap();
        assert_eq!(set.rules.len(), 3);
        let f = input(&[
            (idx::CARD_COUNT_1H, 11.0),
            (idx::AMOUNT, 600.0),
            (idx::CARD_MEAN_30D, 300.0),
        ]);
        let x = RuleInput {
            features: &f,
            score: 0.6,
            anomaly: 0.0,
        };
        let fired: Vec<_> = set
            .rules
            .iter()
            .filter(|r| r.fires(&x))
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(fired, ["burst", "either", "math"]);
        let f = input(&[
            (idx::CARD_COUNT_1H, 3.0),
            (idx::ECOM, 1.0),
            (idx::AMOUNT, 10.0),
        ]);
        let x = RuleInput {
            features: &f,
            score: 0.0,
            anomaly: 0.0,
        };
        assert!(set.rules.iter().all(|r| !r.fires(&x)));
    }

    #[test]
    fn errors_name_rule_and_position() {
        let e = parse_rules("ok low: amount > 1\nbad high: card.cnt_1h > 10").unwrap_err();
        assert_eq!((e.rule.as_str(), e.line, e.column), ("bad", 2, 11));
        assert!(e.message.contains("unknown feature `card.cnt_1h`"));
        let e = parse_rules("r1 urgent: amount > 1").unwrap_err();
        assert!(e.message.contains("unknown severity"), "{e}");
        let e = parse_rules("r2 low: amount > ").unwrap_err();
        assert!(e.message.contains("end of the condition"), "{e}");
        let e = parse_rules("r3 low: amount").unwrap_err();
        assert!(e.message.contains("expected a comparison"), "{e}");
        let e = parse_rules("r4 low: amount > 1 1").unwrap_err();
        assert_eq!(e.column, 20);
        let e = parse_rules("r5 low: amount $ 1").unwrap_err();
        assert!(e.message.contains("unexpected character"), "{e}");
        assert!(parse_rules("a low: amount > 1\na low: amount > 2").is_err());
        assert!(parse_rules("no colon here").is_err());
    }
}
