//! Expressions of a features file: numbers throughout (a comparison is 1 or
//! 0), names resolved once at compile time to slots of a value array, and
//! string literals turned into the code of the field they are compared with.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    If,
    Min,
    Max,
    Abs,
    Floor,
    Sqrt,
    Log1p,
}

impl Func {
    fn of(name: &str) -> Option<Func> {
        Some(match name {
            "if" => Func::If,
            "min" => Func::Min,
            "max" => Func::Max,
            "abs" => Func::Abs,
            "floor" => Func::Floor,
            "sqrt" => Func::Sqrt,
            "log1p" => Func::Log1p,
            _ => return None,
        })
    }

    /// The argument counts it takes: at least, at most.
    fn arity(self) -> (usize, usize) {
        match self {
            Func::If => (3, 3),
            Func::Min | Func::Max => (2, 8),
            _ => (1, 1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Const(f64),
    /// A string literal: only as one side of `==`, `!=` or `in`, where
    /// [`Expr::resolve`] turns it into the other side's code.
    Str(String),
    /// A name before [`Expr::resolve`].
    Name(String),
    /// A slot of the value array after it.
    Var(usize),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
    In(Box<Expr>, Vec<Expr>),
    Call(Func, Vec<Expr>),
}

/// What is wrong with an expression, and where (a byte offset).
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    pub at: usize,
    pub reason: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at character {}: {}", self.at + 1, self.reason)
    }
}

fn err<T>(at: usize, reason: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError {
        at,
        reason: reason.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Ident(String),
    Op(&'static str),
}

fn lex(s: &str) -> Result<Vec<(usize, Tok)>, ExprError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            while i < b.len() && (b[i].is_ascii_digit() || matches!(b[i], b'.' | b'_' | b'e')) {
                i += 1;
            }
            let text: String = s[start..i].chars().filter(|&c| c != '_').collect();
            let Ok(v) = text.parse::<f64>() else {
                return err(start, format!("bad number `{}`", &s[start..i]));
            };
            out.push((start, Tok::Num(v)));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.')) {
                i += 1;
            }
            out.push((start, Tok::Ident(s[start..i].to_string())));
        } else if c == b'"' || c == b'\'' {
            let Some(len) = s[i + 1..].find(c as char) else {
                return err(start, "unterminated string");
            };
            out.push((start, Tok::Str(s[i + 1..i + 1 + len].to_string())));
            i += len + 2;
        } else {
            const OPS: [&str; 17] = [
                "<=", ">=", "==", "!=", "<", ">", "+", "-", "*", "/", "(", ")", "[", "]", ",",
                "&&", "||",
            ];
            let Some(op) = OPS.iter().find(|op| s[i..].starts_with(**op)) else {
                let ch = s[i..].chars().next().unwrap_or(' ');
                return err(start, format!("unexpected character `{ch}`"));
            };
            i += op.len();
            out.push((start, Tok::Op(op)));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }

    fn here(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end, |(at, _)| *at)
    }

    fn eat_op(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Op(o)) if *o == op) {
            self.pos += 1;
            return true;
        }
        false
    }

    fn eat_word(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(w)) if w == word) {
            self.pos += 1;
            return true;
        }
        false
    }

    fn expect(&mut self, op: &str) -> Result<(), ExprError> {
        if self.eat_op(op) {
            Ok(())
        } else {
            err(self.here(), format!("expected `{op}`"))
        }
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.and()?;
        while self.eat_word("or") || self.eat_op("||") {
            left = Expr::Bin(Op::Or, Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.not()?;
        while self.eat_word("and") || self.eat_op("&&") {
            left = Expr::Bin(Op::And, Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ExprError> {
        if self.eat_word("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, ExprError> {
        let left = self.sum()?;
        if self.eat_word("in") {
            self.expect("[")?;
            let mut items = Vec::new();
            while !self.eat_op("]") {
                if !items.is_empty() {
                    self.expect(",")?;
                }
                items.push(self.sum()?);
            }
            return Ok(Expr::In(Box::new(left), items));
        }
        const CMPS: [(&str, Op); 6] = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        for (tok, op) in CMPS {
            if self.eat_op(tok) {
                return Ok(Expr::Bin(op, Box::new(left), Box::new(self.sum()?)));
            }
        }
        Ok(left)
    }

    fn sum(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.product()?;
        loop {
            let op = if self.eat_op("+") {
                Op::Add
            } else if self.eat_op("-") {
                Op::Sub
            } else {
                return Ok(left);
            };
            left = Expr::Bin(op, Box::new(left), Box::new(self.product()?));
        }
    }

    fn product(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.unary()?;
        loop {
            let op = if self.eat_op("*") {
                Op::Mul
            } else if self.eat_op("/") {
                Op::Div
            } else {
                return Ok(left);
            };
            left = Expr::Bin(op, Box::new(left), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        let at = self.here();
        if self.eat_op("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if self.eat_op("(") {
            let e = self.or()?;
            self.expect(")")?;
            return Ok(e);
        }
        let Some(tok) = self.peek().cloned() else {
            return err(at, "unexpected end of the expression");
        };
        self.pos += 1;
        match tok {
            Tok::Num(v) => Ok(Expr::Const(v)),
            Tok::Str(s) => Ok(Expr::Str(s)),
            Tok::Ident(name) if matches!(name.as_str(), "and" | "or" | "not" | "in") => {
                err(at, format!("expected a value, found `{name}`"))
            }
            Tok::Ident(name) if self.peek() == Some(&Tok::Op("(")) => {
                let Some(func) = Func::of(&name) else {
                    return err(at, format!("unknown function `{name}`"));
                };
                self.pos += 1;
                let mut args = Vec::new();
                while !self.eat_op(")") {
                    if !args.is_empty() {
                        self.expect(",")?;
                    }
                    args.push(self.or()?);
                }
                let (least, most) = func.arity();
                if args.len() < least || args.len() > most {
                    return err(
                        at,
                        format!(
                            "`{name}` takes {least} to {most} arguments, got {}",
                            args.len()
                        ),
                    );
                }
                Ok(Expr::Call(func, args))
            }
            Tok::Ident(name) => Ok(Expr::Name(name)),
            Tok::Op(op) => err(at, format!("expected a value, found `{op}`")),
        }
    }
}

impl Expr {
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        let mut p = Parser {
            toks: lex(text)?,
            pos: 0,
            end: text.len(),
        };
        let e = p.or()?;
        if p.pos != p.toks.len() {
            return err(p.here(), "unexpected text after the expression");
        }
        Ok(e)
    }

    /// Every name the expression reads.
    pub fn names(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit(&mut |e| {
            if let Expr::Name(n) = e {
                out.push(n.as_str());
            }
        });
        out
    }

    /// Whether the resolved expression reads slot `v`.
    pub fn reads(&self, v: usize) -> bool {
        let mut found = false;
        self.visit(&mut |e| found |= matches!(e, Expr::Var(w) if *w == v));
        found
    }

    /// Whether every slot it reads passes `ok`.
    pub fn reads_only(&self, ok: &dyn Fn(usize) -> bool) -> bool {
        let mut all = true;
        self.visit(&mut |e| all &= !matches!(e, Expr::Var(v) if !ok(*v)));
        all
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Expr)) {
        f(self);
        match self {
            Expr::Neg(a) | Expr::Not(a) => a.visit(f),
            Expr::Bin(_, a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::In(a, items) => {
                a.visit(f);
                items.iter().for_each(|i| i.visit(f));
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.visit(f)),
            _ => {}
        }
    }

    /// Replaces names by slots (`slot` says which, or why none), and each
    /// string literal compared with a slot by that slot's code for it.
    pub fn resolve(
        &mut self,
        slot: &mut impl FnMut(&str) -> Result<usize, String>,
        code: &mut impl FnMut(usize, &str) -> Result<f64, String>,
    ) -> Result<(), String> {
        match self {
            Expr::Name(n) => *self = Expr::Var(slot(n)?),
            Expr::Str(s) => return Err(format!("the string \"{s}\" is compared with nothing")),
            Expr::Bin(Op::Eq | Op::Ne, a, b) => resolve_pair(a, b, slot, code)?,
            Expr::In(a, items) => {
                a.resolve(slot, code)?;
                for item in items {
                    match (&**a, &*item) {
                        (Expr::Var(v), Expr::Str(s)) => *item = Expr::Const(code(*v, s)?),
                        _ => item.resolve(slot, code)?,
                    }
                }
            }
            Expr::Neg(a) | Expr::Not(a) => a.resolve(slot, code)?,
            Expr::Bin(_, a, b) => {
                a.resolve(slot, code)?;
                b.resolve(slot, code)?;
            }
            Expr::Call(_, args) => {
                for a in args {
                    a.resolve(slot, code)?;
                }
            }
            Expr::Const(_) | Expr::Var(_) => {}
        }
        Ok(())
    }

    /// The expression with every slot `v` replaced by `f(v)`.
    pub fn map_vars(mut self, f: &impl Fn(usize) -> usize) -> Expr {
        self.visit_mut(&mut |e| {
            if let Expr::Var(v) = e {
                *v = f(*v);
            }
        });
        self
    }

    /// The expression with slot `slot` read as the constant `value`.
    pub fn with_slot_as(mut self, slot: usize, value: f64) -> Expr {
        self.visit_mut(&mut |e| {
            if matches!(e, Expr::Var(v) if *v == slot) {
                *e = Expr::Const(value);
            }
        });
        self
    }

    fn visit_mut(&mut self, f: &mut impl FnMut(&mut Expr)) {
        f(self);
        match self {
            Expr::Neg(a) | Expr::Not(a) => a.visit_mut(f),
            Expr::Bin(_, a, b) => {
                a.visit_mut(f);
                b.visit_mut(f);
            }
            Expr::In(a, items) => {
                a.visit_mut(f);
                items.iter_mut().for_each(|i| i.visit_mut(f));
            }
            Expr::Call(_, args) => args.iter_mut().for_each(|a| a.visit_mut(f)),
            _ => {}
        }
    }

    /// The value over a resolved expression's slots. Division by zero gives
    /// 0, as in the rules, so that no feature is infinite.
    pub fn eval(&self, v: &[f64]) -> f64 {
        let truth = |b: bool| if b { 1.0 } else { 0.0 };
        match self {
            Expr::Const(c) => *c,
            Expr::Var(i) => v[*i],
            Expr::Str(_) | Expr::Name(_) => f64::NAN,
            Expr::Neg(a) => -a.eval(v),
            Expr::Not(a) => truth(a.eval(v) == 0.0),
            Expr::Bin(Op::And, a, b) => truth(a.eval(v) != 0.0 && b.eval(v) != 0.0),
            Expr::Bin(Op::Or, a, b) => truth(a.eval(v) != 0.0 || b.eval(v) != 0.0),
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval(v), b.eval(v));
                match op {
                    Op::Add => a + b,
                    Op::Sub => a - b,
                    Op::Mul => a * b,
                    Op::Div if b == 0.0 => 0.0,
                    Op::Div => a / b,
                    Op::Lt => truth(a < b),
                    Op::Le => truth(a <= b),
                    Op::Gt => truth(a > b),
                    Op::Ge => truth(a >= b),
                    Op::Eq => truth(a == b),
                    Op::Ne => truth(a != b),
                    Op::And | Op::Or => unreachable!("matched above"),
                }
            }
            Expr::In(a, items) => {
                let a = a.eval(v);
                truth(items.iter().any(|i| i.eval(v) == a))
            }
            Expr::Call(f, args) => {
                let x = args[0].eval(v);
                match f {
                    Func::If => {
                        if x != 0.0 {
                            args[1].eval(v)
                        } else {
                            args[2].eval(v)
                        }
                    }
                    Func::Min => args[1..].iter().fold(x, |m, a| m.min(a.eval(v))),
                    Func::Max => args[1..].iter().fold(x, |m, a| m.max(a.eval(v))),
                    Func::Abs => x.abs(),
                    Func::Floor => x.floor(),
                    Func::Sqrt => x.max(0.0).sqrt(),
                    Func::Log1p => x.max(0.0).ln_1p(),
                }
            }
        }
    }
}

fn resolve_pair(
    a: &mut Expr,
    b: &mut Expr,
    slot: &mut impl FnMut(&str) -> Result<usize, String>,
    code: &mut impl FnMut(usize, &str) -> Result<f64, String>,
) -> Result<(), String> {
    if let Expr::Str(s) = &*b {
        a.resolve(slot, code)?;
        let Expr::Var(v) = *a else {
            return Err(format!("the string \"{s}\" must be compared with a field"));
        };
        *b = Expr::Const(code(v, s)?);
    } else if let Expr::Str(_) = &*a {
        return resolve_pair(b, a, slot, code);
    } else {
        a.resolve(slot, code)?;
        b.resolve(slot, code)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str, names: &[(&str, f64)]) -> f64 {
        let mut e = Expr::parse(text).unwrap();
        let values: Vec<f64> = names.iter().map(|(_, v)| *v).collect();
        e.resolve(
            &mut |n| {
                names
                    .iter()
                    .position(|(k, _)| *k == n)
                    .ok_or(format!("unknown `{n}`"))
            },
            &mut |_, s| Ok(s.len() as f64),
        )
        .unwrap();
        e.eval(&values)
    }

    #[test]
    fn arithmetic_comparisons_and_functions() {
        assert_eq!(eval("1 + 2 * 3 - 4 / 2", &[]), 5.0);
        assert_eq!(eval("-(1 + 2)", &[]), -3.0);
        assert_eq!(eval("a.b >= 2 and not c", &[("a.b", 2.0), ("c", 0.0)]), 1.0);
        assert_eq!(eval("a < 1 or a > 3", &[("a", 2.0)]), 0.0);
        assert_eq!(eval("if(a > 0, 10 / a, 1)", &[("a", 4.0)]), 2.5);
        assert_eq!(eval("max(a, 0.1 * a, 0.01)", &[("a", 0.0)]), 0.01);
        assert_eq!(eval("floor(h / 4)", &[("h", 23.0)]), 5.0);
        assert_eq!(eval("x / 0", &[("x", 3.0)]), 0.0);
        // A string takes the code of the field it is compared with.
        assert_eq!(eval("ch == \"ecom\"", &[("ch", 4.0)]), 1.0);
        assert_eq!(eval("'pos' != ch", &[("ch", 3.0)]), 0.0);
        assert_eq!(eval("ch in ['a', 'ecom', 12]", &[("ch", 4.0)]), 1.0);
    }

    #[test]
    fn errors_say_where_and_what() {
        let e = Expr::parse("amount > ").unwrap_err();
        assert!(e.reason.contains("end of the expression"), "{e}");
        let e = Expr::parse("frob(1)").unwrap_err();
        assert_eq!(e.reason, "unknown function `frob`");
        let e = Expr::parse("if(1, 2)").unwrap_err();
        assert!(e.reason.contains("takes 3 to 3 arguments"), "{e}");
        let e = Expr::parse("a $ b").unwrap_err();
        assert_eq!((e.at, e.reason.as_str()), (2, "unexpected character `$`"));
        let mut e = Expr::parse("\"x\" + 1").unwrap();
        let r = e.resolve(&mut |_| Ok(0), &mut |_, _| Ok(0.0));
        assert!(r.unwrap_err().contains("compared with nothing"));
    }
}
