//! CloudEvents SQL Expression Language (CESQL) v1, the `cesql` dialect of Trigger `filters`.
//!
//! An expression is parsed once, when the Trigger is loaded ([`Expression::compile`] also
//! rejects unknown functions and wrong arities, so a typo is a load error with a position), and
//! evaluated for every event. Evaluation is total, as the specification demands: it always
//! yields a value, plus the errors met on the way ([`Evaluation`]). A filter matches only when
//! the value is `true` and there was no error ([`Expression::matches`]).
//!
//! Semantics follow the specification and its conformance kit (`tests/tck/`):
//! - three types, Boolean, Integer (32-bit signed) and String; attributes are looked up through
//!   [`Attributes`] and keep the type the event gave them (binary-mode headers are strings);
//! - operators cast their operands implicitly (String ↔ Integer, String ↔ Boolean); a failed
//!   cast raises a cast error and uses the zero value (`0`, `false`, `""`); `=`/`!=` cast the
//!   left operand to the right operand's type and `IN` casts the set to the left operand's type;
//! - a missing attribute raises a missing-attribute error and makes the operator that uses it
//!   return its zero value, so `missing = 2` is `false`;
//! - `AND` and `OR` short-circuit; `/` and `%` truncate toward zero, and dividing by zero
//!   yields `0` with a math error;
//! - precedence, tightest first: `NOT` and unary `-`; `LIKE` and `IN`; `*` `/` `%`; `+` `-`;
//!   comparisons; `AND` `OR` `XOR` (one level, right-associative) — the grammar of the
//!   specification's ANTLR definition.

#![forbid(unsafe_code)]

mod eval;
mod lexer;
mod parser;

use std::fmt;

pub use eval::Evaluation;

/// A CESQL value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Boolean(bool),
    Integer(i32),
    String(String),
}

/// The three CESQL types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Boolean,
    Integer,
    String,
}

/// Where an expression reads an event's context attributes and extensions.
pub trait Attributes {
    /// The attribute's value, typed as the event carries it; `None` when absent.
    fn attribute(&self, name: &str) -> Option<Value>;
}

/// A parsed expression, ready to evaluate against any number of events.
#[derive(Debug, Clone)]
pub struct Expression {
    root: parser::Node,
}

/// Why an expression could not be parsed (or checked), and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based character position in the expression.
    pub position: usize,
    pub message: String,
}

/// The kinds of error CESQL defines, as the conformance kit names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Parse,
    Math,
    Cast,
    MissingAttribute,
    MissingFunction,
    FunctionEvaluation,
}

/// An error raised while evaluating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    pub kind: ErrorKind,
    pub message: String,
}

// === impl Value ===

impl Value {
    pub fn kind(&self) -> Type {
        match self {
            Value::Boolean(_) => Type::Boolean,
            Value::Integer(_) => Type::Integer,
            Value::String(_) => Type::String,
        }
    }

    /// The value a failed cast or a missing operand leaves behind.
    pub fn zero(kind: Type) -> Value {
        match kind {
            Type::Boolean => Value::Boolean(false),
            Type::Integer => Value::Integer(0),
            Type::String => Value::String(String::new()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::String(s) => f.write_str(s),
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Boolean => "Boolean",
            Type::Integer => "Integer",
            Type::String => "String",
        })
    }
}

// === impl Expression ===

impl Expression {
    /// Parses `text`. Unknown functions are not errors here: they evaluate to `false` with a
    /// missing-function error, as the specification says; use [`Expression::compile`] to refuse
    /// them up front.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let tokens = lexer::tokenize(text)?;
        let root = parser::parse(&tokens, text.chars().count())?;
        Ok(Self { root })
    }

    /// Parses `text` and checks every function call against the built-ins (name and arity).
    pub fn compile(text: &str) -> Result<Self, ParseError> {
        let expression = Self::parse(text)?;
        eval::check(&expression.root)?;
        Ok(expression)
    }

    /// Evaluates against one event.
    pub fn evaluate(&self, event: &dyn Attributes) -> Evaluation {
        eval::evaluate(&self.root, event)
    }

    /// Whether an event passes this expression used as a filter: the value is `true` and no
    /// error was raised.
    pub fn matches(&self, event: &dyn Attributes) -> bool {
        let evaluation = self.evaluate(event);
        evaluation.errors.is_empty() && evaluation.value == Value::Boolean(true)
    }
}

// === impl ParseError ===

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "position {}: {}", self.position, self.message)
    }
}

impl std::error::Error for ParseError {}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Event(BTreeMap<&'static str, Value>);

    impl Attributes for Event {
        fn attribute(&self, name: &str) -> Option<Value> {
            self.0.get(name).cloned()
        }
    }

    fn event() -> Event {
        Event(BTreeMap::from([
            ("id", Value::String("1".into())),
            ("source", Value::String("/orders".into())),
            ("specversion", Value::String("1.0".into())),
            ("type", Value::String("order.created".into())),
            ("sequence", Value::String("7".into())),
            ("priority", Value::Integer(3)),
        ]))
    }

    fn eval(text: &str) -> Evaluation {
        Expression::compile(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .evaluate(&event())
    }

    fn error(text: &str) -> ParseError {
        Expression::compile(text).expect_err(text)
    }

    #[test]
    fn in_casts_the_set_to_the_left_type() {
        assert_eq!(eval("sequence IN (5, 6, 7)").value, Value::Boolean(true));
        assert_eq!(eval("priority IN ('3', '4')").value, Value::Boolean(true));
        assert_eq!(eval("type NOT IN ('a', 'b')").value, Value::Boolean(true));
        assert_eq!(eval("type IN ('a', 'b')").value, Value::Boolean(false));
        let bad = eval("priority IN ('x')");
        assert_eq!(bad.errors[0].kind, ErrorKind::Cast);
        let missing = eval("nothing IN ('x')");
        assert_eq!(missing.value, Value::Boolean(false));
        assert_eq!(missing.errors[0].kind, ErrorKind::MissingAttribute);
    }

    #[test]
    fn exists() {
        assert_eq!(eval("EXISTS priority").value, Value::Boolean(true));
        assert_eq!(eval("EXISTS nothing").value, Value::Boolean(false));
        assert!(eval("EXISTS nothing").errors.is_empty());
        let empty = Event(BTreeMap::new());
        let id = Expression::parse("EXISTS id").expect("parses");
        assert_eq!(id.evaluate(&empty).value, Value::Boolean(true));
    }

    #[test]
    fn logic_is_right_associative_and_short_circuits() {
        // One level, right-associative: FALSE AND (FALSE OR TRUE) would be false;
        // left-to-right it would be true.
        assert_eq!(eval("FALSE AND FALSE OR TRUE").value, Value::Boolean(false));
        assert_eq!(
            eval("(FALSE AND FALSE) OR TRUE").value,
            Value::Boolean(true)
        );
        // The right side is not evaluated, so its missing attribute raises nothing.
        let short = eval("FALSE AND nothing = 1");
        assert_eq!(short.value, Value::Boolean(false));
        assert!(short.errors.is_empty());
        assert!(eval("TRUE OR 1 / 0 = 1").errors.is_empty());
        assert_eq!(eval("1 / 0 = 0 AND TRUE").errors[0].kind, ErrorKind::Math);
    }

    #[test]
    fn arithmetic_truncates_and_checks_overflow() {
        assert_eq!(eval("-7 / 2").value, Value::Integer(-3));
        assert_eq!(eval("-7 % 2").value, Value::Integer(-1));
        assert_eq!(eval("7 % -2").value, Value::Integer(1));
        let overflow = eval("2147483647 + 1");
        assert_eq!(overflow.value, Value::Integer(i32::MAX));
        assert_eq!(overflow.errors[0].kind, ErrorKind::Math);
        assert_eq!(eval("-2147483648 / -1").errors[0].kind, ErrorKind::Math);
    }

    #[test]
    fn keywords_and_functions_are_case_insensitive() {
        assert_eq!(
            eval("lower(type) like 'order.%'").value,
            Value::Boolean(true)
        );
        assert_eq!(
            eval("Substring(type, -7) = 'created'").value,
            Value::Boolean(true)
        );
        assert_eq!(eval("not (priority > 5)").value, Value::Boolean(true));
    }

    #[test]
    fn parse_errors_point_at_the_problem() {
        let e = error("type = ");
        assert_eq!(e.position, 8);
        assert!(e.message.contains("end of the expression"), "{e}");
        let e = error("type == 'a'");
        assert_eq!(e.position, 7);
        let e = error("type = 'open");
        assert_eq!(e.position, 8);
        assert!(e.message.contains("not closed"), "{e}");
        let e = error("Type = 'a'");
        assert_eq!(e.position, 1);
        assert!(e.message.contains("lower-case"), "{e}");
        let e = error("(type = 'a'");
        assert!(e.message.contains("')'"), "{e}");
        let e = error("type LIKE 5");
        assert_eq!(e.position, 11);
        let e = error("2147483648 > 1");
        assert!(e.message.contains("32-bit"), "{e}");
        assert_eq!(error("").position, 1);
        assert_eq!(error("type = 'a' $").position, 12);
        assert_eq!(error("averyveryverylongattributename = 1").position, 1);
    }

    #[test]
    fn compile_refuses_unknown_functions_and_arities() {
        let e = error("type = FOO(1)");
        assert_eq!(e.position, 8);
        assert!(e.message.contains("unknown function FOO"), "{e}");
        let e = error("LENGTH('a', 'b') = 1");
        assert!(e.message.contains("does not take 2"), "{e}");
        assert_eq!(error("SUBSTRING('a')").position, 1);
        // `parse` alone accepts them; evaluation then reports a missing function.
        let lenient = Expression::parse("FOO()").expect("parses");
        let evaluation = lenient.evaluate(&event());
        assert_eq!(evaluation.value, Value::Boolean(false));
        assert_eq!(evaluation.errors[0].kind, ErrorKind::MissingFunction);
    }

    #[test]
    fn matches_needs_true_without_errors() {
        let e = |text: &str| Expression::compile(text).expect("compiles");
        assert!(e("type = 'order.created'").matches(&event()));
        assert!(!e("type = 'order.paid'").matches(&event()));
        assert!(
            !e("priority").matches(&event()),
            "an Integer is not a match"
        );
        assert!(
            !e("NOT (nothing = 1)").matches(&event()),
            "errors never match"
        );
        assert!(
            !e("'x' + 1 = 1").matches(&event()),
            "a cast error never matches"
        );
    }

    #[test]
    fn like_backtracks_without_blowing_up() {
        let long = "a".repeat(5000);
        let text = format!("'{long}' LIKE '%a%a%a%a%a%b'");
        assert_eq!(eval(&text).value, Value::Boolean(false));
        assert_eq!(eval("'' LIKE '%'").value, Value::Boolean(true));
        assert_eq!(eval("'abc' LIKE 'a%'").value, Value::Boolean(true));
        assert_eq!(eval("'a\\b' LIKE 'a\\b'").value, Value::Boolean(true));
    }
}
