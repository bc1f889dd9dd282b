//! Evaluation: total, with errors collected beside the value.

use crate::parser::{BinOp, LikeToken, Node};
use crate::{Attributes, ErrorKind, EvalError, ParseError, Type, Value};

/// The outcome of evaluating an expression against one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub value: Value,
    /// Every error raised, in evaluation order; empty when evaluation went cleanly.
    pub errors: Vec<EvalError>,
}

/// The required context attributes: `EXISTS` is always true for them.
const REQUIRED: [&str; 4] = ["id", "source", "specversion", "type"];

struct Eval<'a> {
    event: &'a dyn Attributes,
    errors: Vec<EvalError>,
}

/// A sub-expression's value, or `None` when it read a missing attribute: the operator that
/// receives it returns its own zero value instead of computing.
type Operand = Option<Value>;

pub(crate) fn evaluate(root: &Node, event: &dyn Attributes) -> Evaluation {
    let mut eval = Eval {
        event,
        errors: Vec::new(),
    };
    let value = eval.node(root).unwrap_or(Value::Boolean(false));
    Evaluation {
        value,
        errors: eval.errors,
    }
}

/// Refuses calls to functions that do not exist or with the wrong number of arguments.
pub(crate) fn check(node: &Node) -> Result<(), ParseError> {
    match node {
        Node::Literal(_) | Node::Attribute(_) | Node::Exists(_) => Ok(()),
        Node::Not(inner) | Node::Negate(inner) => check(inner),
        Node::Binary { left, right, .. } => {
            check(left)?;
            check(right)
        }
        Node::Like { value, .. } => check(value),
        Node::In { value, set, .. } => {
            check(value)?;
            set.iter().try_for_each(check)
        }
        Node::Call {
            name,
            args,
            position,
        } => {
            if signature(name, args.len()).is_none() {
                return Err(ParseError {
                    position: *position,
                    message: missing_function(name, args.len()),
                });
            }
            args.iter().try_for_each(check)
        }
    }
}

/// The built-ins: parameter types (the last repeats for variadic functions) and result type.
fn signature(name: &str, arity: usize) -> Option<(&'static [Type], bool, Type)> {
    use Type::{Boolean as B, Integer as I, String as S};
    let (params, variadic, result): (&'static [Type], bool, Type) = match name {
        "LENGTH" => (&[S], false, I),
        "CONCAT" => (&[S], true, S),
        "CONCAT_WS" => (&[S, S], true, S),
        "LOWER" | "UPPER" | "TRIM" => (&[S], false, S),
        "LEFT" | "RIGHT" => (&[S, I], false, S),
        "SUBSTRING" if arity == 3 => (&[S, I, I], false, S),
        "SUBSTRING" => (&[S, I], false, S),
        "ABS" => (&[I], false, I),
        "INT" => (&[I], false, I),
        "BOOL" => (&[B], false, B),
        "STRING" => (&[S], false, S),
        _ => return None,
    };
    let fits = if variadic {
        // CONCAT takes zero or more; CONCAT_WS needs its delimiter.
        arity >= params.len() - 1
    } else {
        arity == params.len()
    };
    fits.then_some((params, variadic, result))
}

fn missing_function(name: &str, arity: usize) -> String {
    if signature(name, 1).is_some() || signature(name, 2).is_some() || name == "SUBSTRING" {
        format!("function {name} does not take {arity} argument(s)")
    } else {
        format!(
            "unknown function {name}; the built-ins are LENGTH, CONCAT, CONCAT_WS, LOWER, UPPER, TRIM, LEFT, RIGHT, SUBSTRING, ABS, INT, BOOL and STRING"
        )
    }
}

// === impl Eval ===

impl Eval<'_> {
    fn error(&mut self, kind: ErrorKind, message: impl Into<String>) {
        self.errors.push(EvalError {
            kind,
            message: message.into(),
        });
    }

    fn node(&mut self, node: &Node) -> Operand {
        match node {
            Node::Literal(value) => Some(value.clone()),
            Node::Attribute(name) => {
                let value = self.event.attribute(name);
                if value.is_none() {
                    self.error(
                        ErrorKind::MissingAttribute,
                        format!("the event has no attribute {name}"),
                    );
                }
                value
            }
            Node::Exists(name) => Some(Value::Boolean(
                REQUIRED.contains(&name.as_str()) || self.event.attribute(name).is_some(),
            )),
            Node::Not(inner) => {
                let value = self.node(inner)?;
                Some(Value::Boolean(!self.implicit_bool(value)))
            }
            Node::Negate(inner) => {
                let Some(value) = self.node(inner) else {
                    return Some(Value::Integer(0));
                };
                let i = self.explicit_int(value);
                Some(Value::Integer(self.checked(i.checked_neg(), i32::MAX)))
            }
            Node::Binary { op, left, right } => Some(self.binary(*op, left, right)),
            Node::Like {
                value,
                pattern,
                negated,
            } => {
                let Some(value) = self.node(value) else {
                    return Some(Value::Boolean(false));
                };
                let text = value.to_string();
                let chars: Vec<char> = text.chars().collect();
                Some(Value::Boolean(like(&chars, pattern) != *negated))
            }
            Node::In {
                value,
                set,
                negated,
            } => {
                let Some(value) = self.node(value) else {
                    return Some(Value::Boolean(false));
                };
                let mut found = false;
                for element in set {
                    let Some(element) = self.node(element) else {
                        return Some(Value::Boolean(false));
                    };
                    let element = self.implicit(element, value.kind());
                    if element == value {
                        found = true;
                        break;
                    }
                }
                Some(Value::Boolean(found != *negated))
            }
            Node::Call { name, args, .. } => Some(self.call(name, args)),
        }
    }

    fn binary(&mut self, op: BinOp, left: &Node, right: &Node) -> Value {
        match op {
            BinOp::And | BinOp::Or | BinOp::Xor => {
                let Some(l) = self.node(left) else {
                    return Value::Boolean(false);
                };
                let l = self.implicit_bool(l);
                // Short circuit: the right side is not evaluated, so it raises nothing.
                match (op, l) {
                    (BinOp::And, false) => return Value::Boolean(false),
                    (BinOp::Or, true) => return Value::Boolean(true),
                    _ => {}
                }
                let Some(r) = self.node(right) else {
                    return Value::Boolean(false);
                };
                let r = self.implicit_bool(r);
                Value::Boolean(match op {
                    BinOp::And => l && r,
                    BinOp::Or => l || r,
                    _ => l != r,
                })
            }
            BinOp::Eq | BinOp::NotEq => {
                let (Some(l), Some(r)) = (self.node(left), self.node(right)) else {
                    return Value::Boolean(false);
                };
                // `=` is defined for all three types: the right operand picks which.
                let l = self.implicit(l, r.kind());
                Value::Boolean((l == r) == (op == BinOp::Eq))
            }
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let (Some(l), Some(r)) = (self.node(left), self.node(right)) else {
                    return Value::Boolean(false);
                };
                let (l, r) = (self.implicit_int(l), self.implicit_int(r));
                Value::Boolean(match op {
                    BinOp::Lt => l < r,
                    BinOp::Le => l <= r,
                    BinOp::Gt => l > r,
                    _ => l >= r,
                })
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Mod => {
                let (Some(l), Some(r)) = (self.node(left), self.node(right)) else {
                    return Value::Integer(0);
                };
                let (l, r) = (self.implicit_int(l), self.implicit_int(r));
                let result = match op {
                    BinOp::Add => {
                        self.checked(l.checked_add(r), saturate(i64::from(l) + i64::from(r)))
                    }
                    BinOp::Sub => {
                        self.checked(l.checked_sub(r), saturate(i64::from(l) - i64::from(r)))
                    }
                    BinOp::Mul => {
                        self.checked(l.checked_mul(r), saturate(i64::from(l) * i64::from(r)))
                    }
                    _ if r == 0 => {
                        self.error(ErrorKind::Math, "division by zero");
                        0
                    }
                    // Rust's `/` and `%` truncate toward zero, as CESQL requires; only
                    // MIN / -1 overflows.
                    BinOp::Div => self.checked(l.checked_div(r), i32::MAX),
                    _ => self.checked(l.checked_rem(r), 0),
                };
                Value::Integer(result)
            }
        }
    }

    fn checked(&mut self, value: Option<i32>, otherwise: i32) -> i32 {
        value.unwrap_or_else(|| {
            self.error(ErrorKind::Math, "integer overflow");
            otherwise
        })
    }

    fn call(&mut self, name: &str, args: &[Node]) -> Value {
        let Some((params, variadic, result)) = signature(name, args.len()) else {
            self.error(
                ErrorKind::MissingFunction,
                missing_function(name, args.len()),
            );
            return Value::Boolean(false);
        };
        let mut values = Vec::with_capacity(args.len());
        for (index, arg) in args.iter().enumerate() {
            let Some(value) = self.node(arg) else {
                return Value::zero(result);
            };
            let kind = if variadic && index >= params.len() - 1 {
                params[params.len() - 1]
            } else {
                params[index]
            };
            // The cast functions convert explicitly: they are how a user turns TRUE into 1.
            let value = match name {
                "INT" => Value::Integer(self.explicit_int(value)),
                "BOOL" => Value::Boolean(self.explicit_bool(value)),
                _ => self.implicit(value, kind),
            };
            values.push(value);
        }
        let strings =
            |values: &[Value]| -> Vec<String> { values.iter().map(ToString::to_string).collect() };
        match name {
            "LENGTH" => Value::Integer(
                i32::try_from(values[0].to_string().chars().count()).unwrap_or(i32::MAX),
            ),
            "CONCAT" => Value::String(strings(&values).concat()),
            "CONCAT_WS" => {
                let all = strings(&values);
                Value::String(all[1..].join(&all[0]))
            }
            "LOWER" => Value::String(values[0].to_string().to_lowercase()),
            "UPPER" => Value::String(values[0].to_string().to_uppercase()),
            "TRIM" => Value::String(values[0].to_string().trim().to_string()),
            "LEFT" | "RIGHT" => {
                let text = values[0].to_string();
                let Value::Integer(count) = values[1] else {
                    return Value::String(text);
                };
                if count < 0 {
                    self.error(
                        ErrorKind::FunctionEvaluation,
                        format!("{name} needs a length of 0 or more, not {count}"),
                    );
                    return Value::String(text);
                }
                let chars: Vec<char> = text.chars().collect();
                let count = (count as usize).min(chars.len());
                Value::String(if name == "LEFT" {
                    chars[..count].iter().collect()
                } else {
                    chars[chars.len() - count..].iter().collect()
                })
            }
            "SUBSTRING" => self.substring(&values),
            "ABS" => {
                let Value::Integer(i) = values[0] else {
                    return Value::Integer(0);
                };
                Value::Integer(self.checked(i.checked_abs(), i32::MAX))
            }
            _ => values.swap_remove(0),
        }
    }

    fn substring(&mut self, values: &[Value]) -> Value {
        let text = values[0].to_string();
        let chars: Vec<char> = text.chars().collect();
        let length = i64::try_from(chars.len()).unwrap_or(i64::MAX);
        let Value::Integer(pos) = values[1] else {
            return Value::String(String::new());
        };
        let pos = i64::from(pos);
        if pos > length || pos < -length {
            self.error(
                ErrorKind::FunctionEvaluation,
                format!("SUBSTRING position {pos} is outside a string of {length} characters"),
            );
            return Value::String(String::new());
        }
        if pos == 0 {
            return Value::String(String::new());
        }
        let start = if pos > 0 { pos - 1 } else { length + pos };
        let end = match values.get(2) {
            Some(Value::Integer(len)) if *len < 0 => {
                self.error(
                    ErrorKind::FunctionEvaluation,
                    format!("SUBSTRING length must be 0 or more, not {len}"),
                );
                return Value::String(String::new());
            }
            Some(Value::Integer(len)) => (start + i64::from(*len)).min(length),
            _ => length,
        };
        Value::String(chars[start as usize..end as usize].iter().collect())
    }

    /// Operator casts: String ↔ Integer and String ↔ Boolean; Integer ↔ Boolean is refused.
    fn implicit(&mut self, value: Value, kind: Type) -> Value {
        let from = value.kind();
        if from == kind {
            return value;
        }
        let cast = match (&value, kind) {
            (_, Type::String) => Some(Value::String(value.to_string())),
            (Value::String(s), Type::Integer) => parse_int(s).map(Value::Integer),
            (Value::String(s), Type::Boolean) => parse_bool(s).map(Value::Boolean),
            _ => None,
        };
        cast.unwrap_or_else(|| {
            self.error(
                ErrorKind::Cast,
                format!("cannot cast {from} {value} to {kind}"),
            );
            Value::zero(kind)
        })
    }

    fn implicit_bool(&mut self, value: Value) -> bool {
        matches!(self.implicit(value, Type::Boolean), Value::Boolean(true))
    }

    fn implicit_int(&mut self, value: Value) -> i32 {
        match self.implicit(value, Type::Integer) {
            Value::Integer(i) => i,
            _ => 0,
        }
    }

    /// `INT(x)` and unary minus: Booleans become 1 and 0.
    fn explicit_int(&mut self, value: Value) -> i32 {
        match value {
            Value::Boolean(b) => i32::from(b),
            other => self.implicit_int(other),
        }
    }

    /// `BOOL(x)`: Integers are true unless 0.
    fn explicit_bool(&mut self, value: Value) -> bool {
        match value {
            Value::Integer(i) => i != 0,
            other => self.implicit_bool(other),
        }
    }
}

/// The bound an overflowing result is clamped to.
fn saturate(wide: i64) -> i32 {
    if wide > 0 { i32::MAX } else { i32::MIN }
}

fn parse_int(s: &str) -> Option<i32> {
    s.parse::<i32>().ok()
}

fn parse_bool(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// Whether `text` matches the `LIKE` pattern, by the classic two-pointer scan that remembers
/// the last `%` to backtrack to (linear in practice, never exponential).
fn like(text: &[char], pattern: &[LikeToken]) -> bool {
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(LikeToken::Any) => {
                star = Some((p, t));
                p += 1;
            }
            Some(LikeToken::One) => {
                t += 1;
                p += 1;
            }
            Some(LikeToken::Char(c)) if *c == text[t] => {
                t += 1;
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|token| *token == LikeToken::Any)
}
