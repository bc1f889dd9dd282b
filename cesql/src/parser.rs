//! Recursive-descent parser for the CESQL grammar, one function per precedence level.

use crate::lexer::{Tok, Token};
use crate::{ParseError, Value};

/// The longest attribute name the specification allows.
const MAX_IDENTIFIER: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Literal(Value),
    Attribute(String),
    Exists(String),
    Not(Box<Node>),
    Negate(Box<Node>),
    Binary {
        op: BinOp,
        left: Box<Node>,
        right: Box<Node>,
    },
    Like {
        value: Box<Node>,
        pattern: Vec<LikeToken>,
        negated: bool,
    },
    In {
        value: Box<Node>,
        set: Vec<Node>,
        negated: bool,
    },
    Call {
        /// Upper-cased: function names are case-insensitive.
        name: String,
        args: Vec<Node>,
        position: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    Mod,
    Add,
    Sub,
    Eq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Xor,
}

/// One element of a compiled `LIKE` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LikeToken {
    Char(char),
    /// `_`: exactly one character.
    One,
    /// `%`: any run of characters, possibly empty.
    Any,
}

struct Parser<'a> {
    tokens: &'a [Token],
    next: usize,
    /// Position just past the end, for "unexpected end" messages.
    end: usize,
}

pub(crate) fn parse(tokens: &[Token], length: usize) -> Result<Node, ParseError> {
    let mut parser = Parser {
        tokens,
        next: 0,
        end: length + 1,
    };
    if tokens.is_empty() {
        return Err(ParseError {
            position: 1,
            message: "the expression is empty".into(),
        });
    }
    let node = parser.logic()?;
    if let Some(token) = parser.peek() {
        return Err(parser.unexpected(token, "an operator or the end of the expression"));
    }
    Ok(node)
}

// === impl Parser ===

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.next)
    }

    fn peek_tok(&self) -> Option<&Tok> {
        self.peek().map(|t| &t.tok)
    }

    fn keyword_at(&self, index: usize, keyword: &str) -> bool {
        matches!(self.tokens.get(index), Some(Token { tok: Tok::Word(w), .. }) if w.eq_ignore_ascii_case(keyword))
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        self.keyword_at(self.next, keyword)
    }

    fn bump(&mut self) -> Option<&Token> {
        let token = self.tokens.get(self.next);
        self.next += 1;
        token
    }

    fn position(&self) -> usize {
        self.peek().map_or(self.end, |t| t.position)
    }

    fn unexpected(&self, token: &Token, expected: &str) -> ParseError {
        ParseError {
            position: token.position,
            message: format!("expected {expected}, found {}", describe(&token.tok)),
        }
    }

    fn expect(&mut self, tok: &Tok, expected: &str) -> Result<(), ParseError> {
        match self.peek() {
            Some(token) if &token.tok == tok => {
                self.next += 1;
                Ok(())
            }
            Some(token) => Err(self.unexpected(token, expected)),
            None => Err(ParseError {
                position: self.end,
                message: format!("expected {expected}, found the end of the expression"),
            }),
        }
    }

    /// `AND`, `OR`, `XOR`: one level, right-associative.
    fn logic(&mut self) -> Result<Node, ParseError> {
        let left = self.comparison()?;
        let op = if self.at_keyword("AND") {
            BinOp::And
        } else if self.at_keyword("OR") {
            BinOp::Or
        } else if self.at_keyword("XOR") {
            BinOp::Xor
        } else {
            return Ok(left);
        };
        self.next += 1;
        let right = self.logic()?;
        Ok(binary(op, left, right))
    }

    fn comparison(&mut self) -> Result<Node, ParseError> {
        let mut left = self.additive()?;
        loop {
            let op = match self.peek_tok() {
                Some(Tok::Eq) => BinOp::Eq,
                Some(Tok::NotEq) => BinOp::NotEq,
                Some(Tok::Lt) => BinOp::Lt,
                Some(Tok::Le) => BinOp::Le,
                Some(Tok::Gt) => BinOp::Gt,
                Some(Tok::Ge) => BinOp::Ge,
                _ => return Ok(left),
            };
            self.next += 1;
            let right = self.additive()?;
            left = binary(op, left, right);
        }
    }

    fn additive(&mut self) -> Result<Node, ParseError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek_tok() {
                Some(Tok::Plus) => BinOp::Add,
                Some(Tok::Minus) => BinOp::Sub,
                _ => return Ok(left),
            };
            self.next += 1;
            let right = self.multiplicative()?;
            left = binary(op, left, right);
        }
    }

    fn multiplicative(&mut self) -> Result<Node, ParseError> {
        let mut left = self.postfix()?;
        loop {
            let op = match self.peek_tok() {
                Some(Tok::Star) => BinOp::Mul,
                Some(Tok::Slash) => BinOp::Div,
                Some(Tok::Percent) => BinOp::Mod,
                _ => return Ok(left),
            };
            self.next += 1;
            let right = self.postfix()?;
            left = binary(op, left, right);
        }
    }

    /// `x [NOT] LIKE 'pattern'` and `x [NOT] IN (a, b, …)`.
    fn postfix(&mut self) -> Result<Node, ParseError> {
        let mut value = self.unary()?;
        loop {
            let negated = self.at_keyword("NOT")
                && (self.keyword_at(self.next + 1, "LIKE") || self.keyword_at(self.next + 1, "IN"));
            let at = if negated { self.next + 1 } else { self.next };
            if self.keyword_at(at, "LIKE") {
                self.next = at + 1;
                let pattern = match self.bump() {
                    Some(Token {
                        tok: Tok::Str(pattern),
                        ..
                    }) => like_pattern(pattern),
                    Some(token) => {
                        let token = token.clone();
                        return Err(self.unexpected(&token, "a string literal pattern after LIKE"));
                    }
                    None => {
                        return Err(ParseError {
                            position: self.end,
                            message: "expected a string literal pattern after LIKE".into(),
                        });
                    }
                };
                value = Node::Like {
                    value: Box::new(value),
                    pattern,
                    negated,
                };
            } else if self.keyword_at(at, "IN") {
                self.next = at + 1;
                self.expect(&Tok::LParen, "'(' to open the IN set")?;
                let mut set = vec![self.logic()?];
                while self.peek_tok() == Some(&Tok::Comma) {
                    self.next += 1;
                    set.push(self.logic()?);
                }
                self.expect(&Tok::RParen, "',' or ')' in the IN set")?;
                value = Node::In {
                    value: Box::new(value),
                    set,
                    negated,
                };
            } else {
                return Ok(value);
            }
        }
    }

    /// `NOT x`, `-x`, and the primaries.
    fn unary(&mut self) -> Result<Node, ParseError> {
        if self.at_keyword("NOT") {
            self.next += 1;
            return Ok(Node::Not(Box::new(self.unary()?)));
        }
        if self.peek_tok() == Some(&Tok::Minus) {
            self.next += 1;
            // A minus directly before digits is part of the literal, so the most negative
            // Integer (-2147483648) can be written.
            if let Some(Token {
                tok: Tok::Word(word),
                position,
            }) = self.peek()
                && word.bytes().all(|b| b.is_ascii_digit())
            {
                let (word, position) = (word.clone(), *position);
                self.next += 1;
                return integer(&format!("-{word}"), position - 1);
            }
            return Ok(Node::Negate(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Node, ParseError> {
        let position = self.position();
        let Some(token) = self.bump().cloned() else {
            return Err(ParseError {
                position,
                message: "expected a value, found the end of the expression".into(),
            });
        };
        match token.tok {
            Tok::LParen => {
                let inner = self.logic()?;
                self.expect(&Tok::RParen, "')'")?;
                Ok(inner)
            }
            Tok::Str(value) => Ok(Node::Literal(Value::String(value))),
            Tok::Word(word) => self.word(word, position),
            _ => Err(self.unexpected(&token, "a value")),
        }
    }

    fn word(&mut self, word: String, position: usize) -> Result<Node, ParseError> {
        if word.eq_ignore_ascii_case("true") {
            return Ok(Node::Literal(Value::Boolean(true)));
        }
        if word.eq_ignore_ascii_case("false") {
            return Ok(Node::Literal(Value::Boolean(false)));
        }
        if word.eq_ignore_ascii_case("EXISTS") {
            return match self.bump().cloned() {
                Some(Token {
                    tok: Tok::Word(name),
                    position,
                }) => Ok(Node::Exists(identifier(name, position)?)),
                Some(token) => Err(self.unexpected(&token, "an attribute name after EXISTS")),
                None => Err(ParseError {
                    position: self.end,
                    message: "expected an attribute name after EXISTS".into(),
                }),
            };
        }
        if word.bytes().all(|b| b.is_ascii_digit()) {
            return integer(&word, position);
        }
        if self.peek_tok() == Some(&Tok::LParen) {
            if !word.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_')
                || !word.as_bytes()[0].is_ascii_alphabetic()
            {
                return Err(ParseError {
                    position,
                    message: format!(
                        "{word:?} is not a function name (letters and '_', starting with a letter)"
                    ),
                });
            }
            self.next += 1;
            let mut args = Vec::new();
            if self.peek_tok() == Some(&Tok::RParen) {
                self.next += 1;
            } else {
                args.push(self.logic()?);
                while self.peek_tok() == Some(&Tok::Comma) {
                    self.next += 1;
                    args.push(self.logic()?);
                }
                self.expect(&Tok::RParen, "',' or ')' after a function argument")?;
            }
            return Ok(Node::Call {
                name: word.to_ascii_uppercase(),
                args,
                position,
            });
        }
        if is_keyword(&word) {
            return Err(ParseError {
                position,
                message: format!(
                    "expected a value, found the keyword {}",
                    word.to_uppercase()
                ),
            });
        }
        Ok(Node::Attribute(identifier(word, position)?))
    }
}

fn binary(op: BinOp, left: Node, right: Node) -> Node {
    Node::Binary {
        op,
        left: Box::new(left),
        right: Box::new(right),
    }
}

fn integer(text: &str, position: usize) -> Result<Node, ParseError> {
    text.parse::<i32>()
        .map(|i| Node::Literal(Value::Integer(i)))
        .map_err(|_| ParseError {
            position,
            message: format!("{text} is outside the 32-bit Integer range"),
        })
}

/// An attribute name: lower-case letters and digits, at most 20 characters.
fn identifier(name: String, position: usize) -> Result<String, ParseError> {
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid {
        return Err(ParseError {
            position,
            message: format!(
                "{name:?} is not an attribute name (CloudEvents attribute names are lower-case letters and digits)"
            ),
        });
    }
    if name.len() > MAX_IDENTIFIER {
        return Err(ParseError {
            position,
            message: format!("attribute name {name:?} is longer than {MAX_IDENTIFIER} characters"),
        });
    }
    Ok(name)
}

fn is_keyword(word: &str) -> bool {
    ["AND", "OR", "XOR", "NOT", "LIKE", "IN", "EXISTS"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Word(w) => format!("{w:?}"),
        Tok::Str(s) => format!("the string '{s}'"),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::Comma => "','".into(),
        Tok::Plus => "'+'".into(),
        Tok::Minus => "'-'".into(),
        Tok::Star => "'*'".into(),
        Tok::Slash => "'/'".into(),
        Tok::Percent => "'%'".into(),
        Tok::Eq => "'='".into(),
        Tok::NotEq => "'!='".into(),
        Tok::Lt => "'<'".into(),
        Tok::Le => "'<='".into(),
        Tok::Gt => "'>'".into(),
        Tok::Ge => "'>='".into(),
    }
}

/// `%` any run, `_` one character; `\%` and `\_` are literal, and a backslash before anything
/// else is itself literal.
fn like_pattern(pattern: &str) -> Vec<LikeToken> {
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(&next @ ('%' | '_')) => {
                    chars.next();
                    tokens.push(LikeToken::Char(next));
                }
                _ => tokens.push(LikeToken::Char('\\')),
            },
            '%' => tokens.push(LikeToken::Any),
            '_' => tokens.push(LikeToken::One),
            c => tokens.push(LikeToken::Char(c)),
        }
    }
    tokens
}
